#!/usr/bin/env bash
# A Debian bookworm base image with python3 and python3-venv, made locally with debootstrap:
# for machines that reach Debian's package mirror but no image registry. The site image then
# builds on it with
#   make image BUILD_ARGS='--build-arg BASE_IMAGE=localhost/sicfed-base:bookworm'
#
# Usage (as root): docker/local-base.sh [TAG] [MIRROR]
#   TAG     default localhost/sicfed-base:bookworm
#   MIRROR  default http://deb.debian.org/debian
# Needs debootstrap and podman (or docker); takes about 1-2 minutes and 180 MB.
set -euo pipefail
tag=${1:-localhost/sicfed-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
engine=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" >&2
# Package caches are not part of an image, nor is the build host's network setup, which
# debootstrap copied: the engine mounts each container's own over these empty files (and
# then has nothing to create in the read-only image).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
for file in hosts hostname resolv.conf; do
  : >"$rootfs/etc/$file"
done
tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$tag"
