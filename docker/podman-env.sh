# Sourced by docker/*.sh: podman as it runs on a machine without a Docker engine.
# These flags are what works on the project's Debian VMs (docs/containers.md says why each
# one is there); with a Docker engine, use `docker build` / `docker compose` instead.

# The stand-in for python:3.11-slim (docker/podman-base.sh builds it from Debian's packages).
FEDGE_BASE_IMAGE="${FEDGE_BASE_IMAGE:-localhost/fedge-base:bookworm-py3.11}"
# Where the debootstrap root file system is cached between runs.
FEDGE_BASE_CACHE="${FEDGE_BASE_CACHE:-/var/tmp/fedge-podman-base}"
# pip inside a build reaches the package index with the host's CA bundle.
FEDGE_CA_BUNDLE="${FEDGE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
FEDGE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# crun fails here ("cgroups in hybrid mode not supported"): runc, cgroupfs.
pm() {
    podman --runtime runc --cgroup-manager=cgroupfs "$@"
}

# fedge_build DOCKERFILE TAG [BUILD ARGS...]: build from the repository root on the local base.
fedge_build() {
    local dockerfile="$1" tag="$2"
    shift 2
    local mounts=()
    if [ -f "$FEDGE_CA_BUNDLE" ]; then
        mounts=(-v "$FEDGE_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
    fi
    pm build --format docker --isolation=chroot --network host "${mounts[@]}" \
        --build-arg "BASE_IMAGE=$FEDGE_BASE_IMAGE" "$@" \
        -f "$FEDGE_REPO/docker/$dockerfile" -t "$tag" "$FEDGE_REPO"
}

# fedge_run [RUN ARGS...] IMAGE [CMD...]: setrlimit is refused here without explicit ulimits;
# podman runs HEALTHCHECKs with systemd timers, which these machines lack (the scripts poll).
# FEDGE_NETWORK: the host's network (default) or a podman network's name.
fedge_run() {
    pm run --network "${FEDGE_NETWORK:-host}" --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --no-healthcheck \
        "$@"
}

# A free TCP port on 127.0.0.1 (for a container on the host's network, or a published one).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Image size in MB (uncompressed, as `podman images` counts it).
image_mb() {
    pm image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1000000}'
}

# wait_http URL SECONDS: until URL answers 200.
wait_http() {
    python3 - "$1" "$2" <<'PY'
import ssl, sys, time, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
context = ssl._create_unverified_context()  # only asks "is it up?"; no data is trusted
deadline = time.monotonic() + limit
while True:
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception as e:
        last = e
    if time.monotonic() > deadline:
        sys.exit(f"{url} did not answer 200 within {limit:.0f}s ({last})")
    time.sleep(1)
PY
}

# step "WHAT" COMMAND...: run it, print how long it took; a failure names the step and stops.
FEDGE_STEPS=()
step() {
    local what="$1" start end rc=0
    shift
    echo "==> $what"
    start=$(date +%s.%N)
    "$@" || rc=$?
    end=$(date +%s.%N)
    local took
    took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" != 0 ]; then
        FEDGE_STEPS+=("FAIL  ${took}s  $what")
        echo "FAILED ($rc) after ${took}s: $what" >&2
        return "$rc"
    fi
    FEDGE_STEPS+=("ok  ${took}s  $what")
    echo "    ok, ${took}s"
}

# Print the steps run so far with their times (the script's record).
step_report() {
    echo "---- steps"
    printf '%s\n' "${FEDGE_STEPS[@]}"
}

# stop_gracefully CONTAINER SECONDS: SIGTERM (what `docker stop` sends) and check that it
# exited by itself before the deadline; 137 means podman had to SIGKILL it.
stop_gracefully() {
    local name="$1" limit="$2" code
    pm stop -t "$limit" "$name" >/dev/null
    code=$(pm inspect --format '{{.State.ExitCode}}' "$name")
    if [ "$code" = 137 ]; then
        echo "$name ignored SIGTERM for ${limit}s and was killed" >&2
        return 1
    fi
    echo "    $name exited with code $code after SIGTERM"
}

# post_json URL FILE: POST the JSON in FILE, print the JSON answer; non-200 fails.
post_json() {
    python3 - "$1" "$2" <<'PY'
import sys, urllib.request
url, path = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    body = f.read()
request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as r:
    print(r.read().decode())
PY
}
