#!/usr/bin/env bash
# The whole story in containers, on this machine, with podman (no Docker engine needed):
# build the base and the three images, start the server (SuperLink + registry), enroll and
# approve two sites through the shared /enroll volume, train a few rounds, export and publish
# on the server, let the edge device's agent activate the version and ask its `edge serve`
# for a prediction; then stop every container with SIGTERM (`docker stop`), restart the
# server on its volume and check that it resumed. Prints each step and its time; exits
# non-zero on the first failure. Run as root from anywhere:  bash docker/smoke.sh
#
# Each service's command, environment and volumes are read from docker/compose.yaml
# (docker/compose_steps.py), so this script runs what `docker compose` runs. What differs, and
# why (podman without a Docker engine or compose):
#   * FEDGE_SMOKE_NETWORK=host (default): every container on the host's network, as the
#     recipe in docs/containers.md runs them. No service-name DNS there, so FEDGE_SERVER
#     points at 127.0.0.1 and every port is a free one (--port / --registry-port /
#     FEDGE_SERVE_PORT are appended).
#   * FEDGE_SMOKE_NETWORK=bridge: a podman network, like compose's: the containers reach the
#     server as compose says (server:9092, https://server:9443, so the certificate's
#     `--san server` is checked), on compose's own ports; the registry and edge serve are
#     published on free ports of 127.0.0.1 for this script's checks.
#   * images are built on a local stand-in for python:3.11-slim (docker/podman-base.sh) and,
#     since only PyPI is reachable here, torch comes from PyPI (FEDGE_SMOKE_TORCH_INDEX,
#     FEDGE_SMOKE_TORCH_PACKAGES);
#   * named volumes are podman volumes prefixed with $FEDGE_SMOKE_PREFIX- (removed at the end unless
#     FEDGE_SMOKE_KEEP=1); depends_on and restarts are this script's order of steps.
# Environment: FEDGE_SMOKE_ROUNDS (2), FEDGE_SMOKE_KEEP (0), FEDGE_SMOKE_NETWORK (host),
# FEDGE_SMOKE_PREFIX (fedge-smoke).
set -euo pipefail
. "$(dirname "$0")/podman-env.sh"

# Names of its containers, volumes and network, and the images' tag (two runs can share a machine).
P="${FEDGE_SMOKE_PREFIX:-fedge-smoke}"
ROUNDS="${FEDGE_SMOKE_ROUNDS:-2}"
TORCH_INDEX="${FEDGE_SMOKE_TORCH_INDEX:-https://pypi.org/simple}"
# The torch build CI tests (constraints/test.txt), e.g. "torch==2.14.1 torchvision==0.29.1".
TORCH_PACKAGES="${FEDGE_SMOKE_TORCH_PACKAGES:-$(grep -E '^(torch|torchvision)==' \
    "$FEDGE_REPO/constraints/test.txt" | paste -sd " ")}"
SERVER_IMAGE="localhost/fedge-server:${P#fedge-}"
CLIENT_IMAGE="localhost/fedge-client:${P#fedge-}"
EDGE_IMAGE="localhost/fedge-edge:${P#fedge-}"
STEPS_PY=(python3 "$FEDGE_REPO/docker/compose_steps.py")
WORK=$(mktemp -d /var/tmp/fedge-smoke.XXXXXX)
SERVICES=(server client-1 client-2 edge-1)
NETWORK="${FEDGE_SMOKE_NETWORK:-host}"
case "$NETWORK" in
    host) ;;
    bridge) FEDGE_NETWORK="$P-net" ;; # fedge_run's, not exported: podman-base.sh probes on the host's
    *) echo "FEDGE_SMOKE_NETWORK is host or bridge, not $NETWORK" >&2; exit 2 ;;
esac

cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        for s in "${SERVICES[@]}"; do
            echo "---- last log lines of $P-$s" >&2
            pm logs --tail 30 "$P-$s" >&2 2>/dev/null || true
        done
        step_report >&2 || true
    fi
    for s in "${SERVICES[@]}"; do pm rm -f -v -t 5 "$P-$s" >/dev/null 2>&1 || true; done
    if [ "${FEDGE_SMOKE_KEEP:-0}" != 1 ]; then
        local v
        for v in $(pm volume ls --format '{{.Name}}' | grep "^$P-" || true); do
            pm volume rm -f "$v" >/dev/null || true
        done
        rm -rf "$WORK"
    fi
    if [ "$NETWORK" = bridge ]; then pm network rm -f "$P-net" >/dev/null 2>&1 || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "$NETWORK" = bridge ]; then
    pm network rm -f "$P-net" >/dev/null 2>&1 || true
    pm network create "$P-net" >/dev/null
fi

# compose's named volumes of SERVICE as podman -v flags (prefixed volume names).
volumes_of() {
    local line
    VOLS=()
    while IFS= read -r line; do
        VOLS+=(-v "$P-$line")
    done < <("${STEPS_PY[@]}" volumes "$1")
}

# compose's environment of SERVICE as -e flags, FEDGE_SERVER replaced by $2 when given (on
# the host's network there is no service-name DNS).
environment_of() {
    local line
    ENVS=()
    while IFS= read -r line; do
        case "$line" in
            FEDGE_SERVER=*) ENVS+=(-e "FEDGE_SERVER=${2:-${line#FEDGE_SERVER=}}") ;;
            *) ENVS+=(-e "$line") ;;
        esac
    done < <("${STEPS_PY[@]}" environment "$1")
}

in_server() {
    pm exec "$P-server" "$@"
}

# until_true SECONDS WHAT COMMAND...: poll COMMAND every 2 s.
until_true() {
    local limit="$1" what="$2" start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - start)) -gt "$limit" ]; then
            echo "timed out after ${limit}s waiting for $what" >&2
            return 1
        fi
        sleep 2
    done
}

# ------------------------------------------------------------------ images
step "base image (debootstrap + podman import, cached)" bash "$FEDGE_REPO/docker/podman-base.sh"
torch_args=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX" --build-arg "TORCH_PACKAGES=$TORCH_PACKAGES")
# build LOG DOCKERFILE TAG [ARGS...]: the build's output goes to a log; its tail on failure.
build() {
    local log="$WORK/$1"
    shift
    echo "    log: $log"
    fedge_build "$@" >"$log" 2>&1 || { tail -40 "$log" >&2; return 1; }
}
step "build fedge-server" build server-build.log Dockerfile.server "$SERVER_IMAGE" "${torch_args[@]}"
step "build fedge-client" build client-build.log Dockerfile.client "$CLIENT_IMAGE" "${torch_args[@]}"
step "build fedge-edge" build edge-build.log Dockerfile.edge "$EDGE_IMAGE"
sizes() {
    local image
    for image in "$FEDGE_BASE_IMAGE" "$SERVER_IMAGE" "$CLIENT_IMAGE" "$EDGE_IMAGE"; do
        echo "    $image: $(image_mb "$image") MB"
    done
    local packages
    packages=$(fedge_run --rm --entrypoint sh "$EDGE_IMAGE" -c \
        'pip --python /opt/venv/bin/python list --format=freeze')
    if echo "$packages" | grep -iE '^(torch|torchvision|flwr|scikit-learn)=='; then
        echo "the edge image must not hold torch, flwr or scikit-learn" >&2
        return 1
    fi
    echo "    edge image: $(echo "$packages" | wc -l) packages, no torch, flwr or scikit-learn"
}
step "image sizes; pip list in the edge image" sizes

# ------------------------------------------------------------------ server
# SL: the SuperLink's port in the server container; RP, EP: the registry's and edge serve's
# ports on the host. SITE_SERVER, EDGE_SERVER: what FEDGE_SERVER becomes (empty: compose's).
read -r -a SERVER_CMD <<<"$("${STEPS_PY[@]}" command server)"
RP=$(free_port)
EP=$(free_port)
if [ "$NETWORK" = host ]; then
    SL=$(free_port)
    SERVER_ARGS=("${SERVER_CMD[@]}" --port "$SL" --registry-port "$RP")
    SERVER_NET=()
    SITE_SERVER="127.0.0.1:$SL" EDGE_SERVER="https://127.0.0.1:$RP"
    EDGE_NET=(-e "FEDGE_SERVE_PORT=$EP")
else
    SL=9092
    SERVER_ARGS=("${SERVER_CMD[@]}")
    SERVER_NET=(--network-alias server -p "127.0.0.1:$RP:9443")
    SITE_SERVER="" EDGE_SERVER=""
    EDGE_NET=(-p "127.0.0.1:$EP:8080")
fi
echo "network $NETWORK; SuperLink $SL (in the server), registry on 127.0.0.1:$RP, edge serve on 127.0.0.1:$EP"
start_server() {
    volumes_of server
    fedge_run -d --name "$P-server" "${SERVER_NET[@]}" "${VOLS[@]}" "$SERVER_IMAGE" \
        "${SERVER_ARGS[@]}" >/dev/null
    until_true 120 "the SuperLink" in_server python -c \
        "import socket; socket.create_connection(('127.0.0.1', $SL), 3)"
    wait_http "https://127.0.0.1:$RP/healthz" 60
}
step "server container: SuperLink + registry API" start_server

provision() {
    volumes_of provision
    fedge_run --rm --name "$P-provision" "${VOLS[@]}" --entrypoint /bin/sh "$SERVER_IMAGE" \
        -euc "$("${STEPS_PY[@]}" script provision)"
}
step "provision (compose's one-shot): signing key, edge-1's token" provision

# ------------------------------------------------------------------ sites
start_client() {
    volumes_of "$1"
    environment_of "$1" "$SITE_SERVER"
    fedge_run -d --name "$P-$1" "${VOLS[@]}" "${ENVS[@]}" "$CLIENT_IMAGE" >/dev/null
}
approve() {
    until_true 120 "$1's enrollment request" in_server test -f "/enroll/$1.enroll.json"
    in_server fedge server approve "/enroll/$1.enroll.json"
}
online() {
    in_server fedge server clients | grep -E "$1 .*online"
}
step "client-1 container: asks to enroll, waits" start_client client-1
step "client-2 container: asks to enroll, waits" start_client client-2
step "approve site-1 on the server" approve site-1
step "approve site-2 on the server" approve site-2
step "both sites online" until_true 180 "both sites online" \
    bash -c "$(declare -f pm in_server online); P=$P; online site-1 && online site-2"

# ------------------------------------------------------------------ run, export, publish
RUN=/var/lib/fedge/runs/smoke
step "fedge run: digits / cnn, $ROUNDS rounds, 2 sites" in_server fedge run \
    --config /opt/fedge/examples/run.toml --server "127.0.0.1:$SL" --out "$RUN" --rounds "$ROUNDS" \
    --token-file /var/lib/fedge/admin.token
step "fedge export (on the server)" in_server fedge export "$RUN"
publish() {
    in_server fedge registry publish "$RUN/bundle" --channel stable | tee "$WORK/publish.txt"
    VERSION=$(awk '/version/ { for (i = 1; i < NF; i++) if ($i == "version") print $(i + 1) }' \
        "$WORK/publish.txt" | head -1)
    [ -n "$VERSION" ]
}
step "fedge registry publish --channel stable" publish
echo "published version $VERSION"

# ------------------------------------------------------------------ edge device
start_edge() {
    volumes_of edge-1
    environment_of edge-1 "$EDGE_SERVER"
    fedge_run -d --name "$P-edge-1" "${EDGE_NET[@]}" "${VOLS[@]}" "${ENVS[@]}" \
        -e FEDGE_INTERVAL=2 "$EDGE_IMAGE" >/dev/null
}
step "edge container: agent + edge serve" start_edge
active() {
    python3 - "http://127.0.0.1:$EP/healthz" "$VERSION" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    assert json.load(r)["version"] == sys.argv[2]
PY
}
step "the agent activates $VERSION" until_true 180 "the edge device to activate $VERSION" active
predict() {
    # An 8x8 image of a digit, as a sensor would send it (0..255 grey levels).
    python3 -c 'import json; print(json.dumps({"inputs": [[[0, 0, 80, 208, 144, 16, 0, 0],
        [0, 0, 208, 240, 160, 240, 80, 0], [0, 48, 240, 32, 0, 176, 128, 0],
        [0, 64, 128, 0, 0, 128, 128, 0], [0, 80, 128, 0, 0, 144, 128, 0],
        [0, 64, 176, 0, 16, 192, 112, 0], [0, 32, 224, 80, 160, 192, 0, 0],
        [0, 0, 96, 208, 160, 0, 0, 0]]]}))' >"$WORK/request.json"
    post_json "http://127.0.0.1:$EP/predict" "$WORK/request.json" | tee "$WORK/prediction.json"
    python3 - "$WORK/prediction.json" "$VERSION" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
assert answer["version"] == sys.argv[2] and len(answer["predictions"]) == 1, answer
PY
}
step "POST /predict to the edge container" predict
step "fleet list on the server" in_server fedge fleet list

# ------------------------------------------------------------------ stop, restart, resume
fingerprint() {
    in_server sha256sum /var/lib/fedge/server/tls/ca.crt | cut -d' ' -f1
}
CA_BEFORE=$(fingerprint)
for s in edge-1 client-1 client-2 server; do
    step "SIGTERM stops $s" stop_gracefully "$P-$s" 30
done
pm rm "$P-server" >/dev/null
step "restart the server container on its volume" start_server
resumed() {
    [ "$(fingerprint)" = "$CA_BEFORE" ] || { echo "the server's CA changed" >&2; return 1; }
    in_server fedge registry list | grep -F "$VERSION"
    in_server fedge server clients | grep -E "site-1" && in_server fedge server clients |
        grep -E "site-2"
}
step "it resumed: same CA, $VERSION published, both sites enrolled" resumed
restart_client() {
    pm rm "$P-client-1" >/dev/null
    start_client client-1
}
step "restart client-1 on its volume (no new enrollment)" restart_client
step "site-1 online again" until_true 180 "site-1 online" \
    bash -c "$(declare -f pm in_server online); P=$P; online site-1"
step "SIGTERM stops client-1" stop_gracefully "$P-client-1" 30
step "SIGTERM stops the restarted server" stop_gracefully "$P-server" 30

step_report
echo "smoke passed"
