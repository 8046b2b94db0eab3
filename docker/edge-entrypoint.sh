#!/bin/sh
# Run one edge device: `fedge edge serve` follows what `fedge edge agent` activates.
# Both stop together: a signal stops both, and if either exits the other is stopped.
set -eu

: "${FEDGE_SERVER:?set FEDGE_SERVER, e.g. https://server:9443}"
CHANNEL="${FEDGE_CHANNEL:-stable}"
PROVISION="${FEDGE_PROVISION:-/provision}"
DEVICE_DIR="${FEDGE_HOME:-/var/lib/fedge}/device"

fedge edge serve --agent-dir "$DEVICE_DIR" --host 0.0.0.0 --port "${FEDGE_SERVE_PORT:-8080}" \
    --key "$PROVISION/signing.pub" &
serve_pid=$!

fedge edge agent --server "$FEDGE_SERVER" --channel "$CHANNEL" --dir "$DEVICE_DIR" \
    --token-file "$PROVISION/device.token" --key "$PROVISION/signing.pub" \
    --ca "$PROVISION/ca.crt" --interval "${FEDGE_INTERVAL:-10}" &
agent_pid=$!

stop() {
    kill -TERM "$serve_pid" "$agent_pid" 2>/dev/null || true
}
trap stop INT TERM

# Whichever ends first (or a signal) ends the container; a restart policy brings it back.
while kill -0 "$serve_pid" 2>/dev/null && kill -0 "$agent_pid" 2>/dev/null; do
    sleep 1
done
stop
wait
