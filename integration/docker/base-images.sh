#!/usr/bin/env bash
# Where no container registry is reachable: build the base image the Dockerfiles start
# from (debian:bookworm-slim by default) out of Debian's own packages, with debootstrap
# from the mirror apt already uses, then `docker import`. Tagged with the name the
# Dockerfiles' RUNTIME_IMAGE argument defaults to, so docker-compose.yml runs unchanged.
# Does nothing when the image exists already (FORCE=1 rebuilds it). Needs root.
#
#   integration/docker/base-images.sh [TAG]        (default debian:bookworm-slim)
#   MIRROR=http://deb.debian.org/debian integration/docker/base-images.sh
set -euo pipefail
TAG=${1:-debian:bookworm-slim}
SUITE=${SUITE:-bookworm}

if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base-images: $TAG exists already (FORCE=1 rebuilds it)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "base-images: debootstrap needs root; run: sudo $0 $*" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    else
        echo "base-images: debootstrap is missing (apt-get install debootstrap)" >&2
        exit 1
    fi
fi

# The Debian mirror apt uses here (deb822 "URIs:" or one-line "deb URI suite ..."),
# skipping the security archive; MIRROR overrides it.
mirror_from_apt() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^[[:space:]]*#/ {next}
             $1 == "URIs:" {for (i = 2; i <= NF; i++) print $i}
             $1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' |
        grep -v -e security -e '^$' | grep -m1 '/debian/\?$' || true
}
MIRROR=${MIRROR:-$(mirror_from_apt)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

dir=$(mktemp -d /tmp/sipmail-base.XXXXXX)
trap 'rm -rf "$dir"' EXIT
start=$SECONDS
echo "base-images: debootstrap --variant=minbase $SUITE from $MIRROR"
if ! debootstrap --variant=minbase "$SUITE" "$dir/root" "$MIRROR" >"$dir/debootstrap.log" 2>&1; then
    tail -20 "$dir/debootstrap.log" >&2
    echo "base-images: debootstrap failed (its log is above)" >&2
    exit 1
fi
# As in the official slim image: no package lists or caches in the layer.
chroot "$dir/root" apt-get clean
rm -rf "$dir/root/var/lib/apt/lists/"* "$dir/root/var/cache/apt/"*.bin
tar --numeric-owner -C "$dir/root" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$TAG" >/dev/null
echo "base-images: $TAG built in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
