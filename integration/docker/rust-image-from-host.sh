#!/usr/bin/env bash
# Check the Dockerfile's from-source build (its builder stage) on a machine with no
# registry: make a Rust toolchain image out of the host's own toolchain (rustup's, the
# version Cargo.toml asks for) on top of the local base image, plus the C tools the
# vendored OpenSSL build needs (apt, from Debian's mirror), then
#   docker build --build-arg RUST_IMAGE=TAG -t IMAGE .
# The crates come from the host's Cargo cache (~/.cargo/registry, filled by any host build)
# and the build runs offline (CARGO_NET_OFFLINE in this image only; a real Rust image
# fetches them from crates.io). Not part
# of the test command (it compiles everything, about 10 minutes on 2 cores); README.md,
# "Run with Docker". Usage: integration/docker/rust-image-from-host.sh [TAG [IMAGE]]
# (default sipmail-rust:host and sipmail:source). KEEP_RUST_IMAGE=1 keeps TAG afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TAG=${1:-sipmail-rust:host}
IMAGE=${2:-sipmail:source}
version=$(awk -F'"' '/^rust-version/ {print $2}' "$ROOT/Cargo.toml")
toolchain=$(rustup toolchain list 2>/dev/null | awk -v v="$version" 'index($1, v) == 1 {print $1; exit}')
[ -n "$toolchain" ] || { echo "rust-image-from-host: no rustup toolchain $version here (rustup toolchain install $version)" >&2; exit 1; }
src=$(readlink -f "$(rustup run "$toolchain" rustc --print sysroot)")
docker image inspect debian:bookworm-slim >/dev/null 2>&1 || "$ROOT/integration/docker/base-images.sh"

ctx=$(mktemp -d /tmp/sipmail-rustctx.XXXXXX)
cleanup() {
    rm -rf "$ctx"
    [ -n "${KEEP_RUST_IMAGE:-}" ] || docker rmi "$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir "$ctx/rust"
# bin and lib are the toolchain; share/ is documentation.
cp -a "$src/bin" "$src/lib" "$ctx/rust/"
[ -d "$src/libexec" ] && cp -a "$src/libexec" "$ctx/rust/"
registry=${CARGO_HOME:-$HOME/.cargo}/registry
[ -d "$registry/cache" ] || { echo "rust-image-from-host: no crates in $registry: run cargo build once on the host" >&2; exit 1; }
mkdir "$ctx/cargo"
cp -a "$registry" "$ctx/cargo/registry"
cat >"$ctx/Dockerfile" <<'DF'
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       gcc libc6-dev make perl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
COPY cargo /usr/local/cargo
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/usr/local/cargo \
    CARGO_NET_OFFLINE=true
DF
start=$SECONDS
docker build -q --force-rm -t "$TAG" "$ctx" >/dev/null
echo "rust-image-from-host: $TAG ($toolchain) in $((SECONDS - start)) s"
start=$SECONDS
docker build --force-rm --build-arg RUST_IMAGE="$TAG" -t "$IMAGE" "$ROOT"
echo "rust-image-from-host: $IMAGE built from source in $((SECONDS - start)) s"
docker run --rm --entrypoint sipmail "$IMAGE" --version
