#!/usr/bin/env bash
# Build the edge image and get one prediction from it (what CI runs: tests/test_docker_edge_image.py):
#   docker/edge-check.sh BUNDLE_DIR SIGNING_PUB REQUEST_JSON
# Builds the local base if missing (docker/podman-base.sh), builds docker/Dockerfile.edge on it,
# checks with `pip list` that the image holds no torch, flwr or scikit-learn, serves BUNDLE_DIR
# with `fedge edge serve` in a container, POSTs REQUEST_JSON to /predict and prints the answer
# as the line after "prediction:", then stops the container with SIGTERM.
# Exit 77: podman cannot be used here (see podman-base.sh).
set -euo pipefail
. "$(dirname "$0")/podman-env.sh"

bundle="$1" key="$2" request="$3"
image="${FEDGE_EDGE_IMAGE:-localhost/fedge-edge:check}"
name="fedge-edge-check-$$"
stage=""
cleanup() {
    pm rm -f -v "$name" >/dev/null 2>&1 || true
    if [ -n "$stage" ]; then rm -rf "$stage"; fi
}
trap cleanup EXIT

rc=0
bash "$FEDGE_REPO/docker/podman-base.sh" || rc=$?
if [ "$rc" != 0 ]; then exit "$rc"; fi

# FEDGE_EDGE_EXTRA=edge-onnx builds the ONNX-only variant (no LiteRT).
step "build the edge image ($image)" fedge_build Dockerfile.edge "$image" \
    --build-arg "EDGE_EXTRA=${FEDGE_EDGE_EXTRA:-edge}"
echo "edge image: $(image_mb "$image") MB, base $FEDGE_BASE_IMAGE: $(image_mb "$FEDGE_BASE_IMAGE") MB"

check_packages() {
    local packages
    packages=$(fedge_run --rm --entrypoint sh "$image" -c \
        'pip --python /opt/venv/bin/python list --format=freeze')
    echo "    $(echo "$packages" | wc -l) packages in the image's venv"
    if echo "$packages" | grep -iE '^(torch|torchvision|flwr|scikit-learn)=='; then
        echo "the edge image must not hold torch, flwr or scikit-learn" >&2
        return 1
    fi
}
step "pip list in the image: no torch, flwr or scikit-learn" check_packages

# The container runs as uid 10001: it reads a world-readable copy (public material only).
stage=$(mktemp -d /var/tmp/fedge-edge-check.XXXXXX)
cp -r "$bundle" "$stage/bundle"
cp "$key" "$stage/signing.pub"
chmod -R a+rX "$stage"

port=$(free_port)
serve() {
    fedge_run -d --name "$name" -v "$stage:/srv/fedge:ro" --entrypoint fedge "$image" \
        edge serve /srv/fedge/bundle --key /srv/fedge/signing.pub --host 127.0.0.1 \
        --port "$port" >/dev/null
    wait_http "http://127.0.0.1:$port/healthz" 120 || { pm logs "$name" >&2; return 1; }
}
step "fedge edge serve in the container (port $port)" serve

predict() {
    echo "prediction:"
    post_json "http://127.0.0.1:$port/predict" "$request"
}
step "POST /predict" predict
step "SIGTERM stops the container" stop_gracefully "$name" 20
step_report
