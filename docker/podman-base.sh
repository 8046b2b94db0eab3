#!/usr/bin/env bash
# Build the local base image that stands in for python:3.11-slim where no image registry is
# reachable: Debian bookworm (minbase) with Python 3.11, from Debian's own packages.
# A test device for this project's machines, not a recommendation: real users build on
# python:3.11-slim (the Dockerfiles' default BASE_IMAGE).
# Installs debootstrap, podman and runc with apt-get when run as root and they are missing;
# otherwise exits 77 with the reason (tests skip on 77). The root file system is cached in
# $FEDGE_BASE_CACHE, so a second run only re-imports it (seconds).
set -euo pipefail
. "$(dirname "$0")/podman-env.sh"

missing=()
for tool in debootstrap podman runc; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" \
        >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "skip: needs ${missing[*]} (apt-get install debootstrap podman runc, as root)" >&2
        exit 77
    fi
    echo "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends debootstrap podman runc \
        ca-certificates >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"
if [ "$(id -u)" != 0 ]; then
    echo "skip: debootstrap and podman's chroot builds need root" >&2
    exit 77
fi

# Can this machine run a container at all? (Not, for example, inside an unprivileged container.)
probe() {
    local out
    if ! out=$(fedge_run --rm "$FEDGE_BASE_IMAGE" python3 -c 'print("ok")' 2>&1); then
        echo "skip: podman cannot run a container on this machine: $(echo "$out" | tail -1)" >&2
        exit 77
    fi
}

if pm image exists "$FEDGE_BASE_IMAGE"; then
    echo "base image $FEDGE_BASE_IMAGE exists"
    probe
    exit 0
fi

rootfs="$FEDGE_BASE_CACHE/rootfs"
if [ ! -f "$rootfs/.fedge-complete" ]; then
    echo "debootstrap bookworm (minbase + python3) into $rootfs"
    mkdir -p "$FEDGE_BASE_CACHE"
    rm -rf "$rootfs.partial"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$rootfs.partial" http://deb.debian.org/debian >"$FEDGE_BASE_CACHE/debootstrap.log"
    # python:3.11-slim has `python`; Debian has only `python3`.
    ln -sf python3 "$rootfs.partial/usr/bin/python"
    touch "$rootfs.partial/.fedge-complete"
    rm -rf "$rootfs"
    mv "$rootfs.partial" "$rootfs"
fi

# Trimmed like the slim images: no package caches or lists, documentation or translations.
tar -C "$rootfs" -c --exclude=./.fedge-complete --exclude='./var/cache/apt/*' \
    --exclude='./var/lib/apt/lists/*' --exclude='./usr/share/doc/*' \
    --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' . |
    pm import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$FEDGE_BASE_IMAGE" >/dev/null
echo "base image $FEDGE_BASE_IMAGE: $(image_mb "$FEDGE_BASE_IMAGE") MB"
probe
