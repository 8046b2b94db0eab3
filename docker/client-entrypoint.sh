#!/bin/sh
# Run one site: enroll it through the shared /enroll folder on first start, then its SuperNode.
# The operator approves the request once:
#   docker compose -f docker/compose.yaml exec server fedge server approve /enroll/SITE.enroll.json
set -eu

: "${FEDGE_SITE:?set FEDGE_SITE, the site name}"
: "${FEDGE_SERVER:?set FEDGE_SERVER, e.g. server:9092}"
: "${FEDGE_DATA:?set FEDGE_DATA, e.g. digits#0/2 or /data}"
SITE_DIR="${FEDGE_HOME:-/var/lib/fedge}/sites/$FEDGE_SITE"
ENROLL="${FEDGE_ENROLL_DIR:-/enroll}"

# Until `exec` below, this shell is the container's PID 1, which ignores SIGTERM unless it
# traps it: without the trap `docker stop` would wait its whole timeout while a site waits.
trap 'exit 143' TERM INT

if [ ! -f "$SITE_DIR/.approved" ]; then
    if [ ! -f "$SITE_DIR/$FEDGE_SITE.enroll.json" ]; then
        fedge client enroll --server "$FEDGE_SERVER" --name "$FEDGE_SITE"
    fi
    cp "$SITE_DIR/$FEDGE_SITE.enroll.json" "$ENROLL/"
    echo "waiting for approval: fedge server approve $ENROLL/$FEDGE_SITE.enroll.json"
    while [ ! -f "$ENROLL/$FEDGE_SITE.approved.json" ]; do
        sleep 5
    done
    # One host, one operator: the CA fingerprint is taken from the approval (trust on first
    # use). Across organisations, pass the fingerprint the operator reads out instead.
    yes | fedge client enroll --accept "$ENROLL/$FEDGE_SITE.approved.json"
    touch "$SITE_DIR/.approved"
fi

exec fedge client start --server "$FEDGE_SERVER" --name "$FEDGE_SITE" --data "$FEDGE_DATA" \
    --foreground
