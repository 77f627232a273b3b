#!/usr/bin/env bash
# Builds the keepfs image (docker/Dockerfile) from a release binary.
#
#   docker/build.sh [TAG]          default tag: localhost/keepfs:<version from Cargo.toml>
#
# With a working `docker`, a plain `docker build`. Otherwise buildah (podman's builder), which
# also works without any registry: when the base image is missing and can't be pulled, it is
# made from Debian packages with mmdebstrap and imported under the name the Dockerfile expects
# (the tar is cached in $KEEPFS_BASE_CACHE, default ~/.cache/keepfs-base).
#
# Environment: KEEPFS_BIN (a built binary to use instead of running `cargo build --release`),
# KEEPFS_BUILDER (docker or buildah, to choose), BASE (base image, default
# debian:bookworm-slim), CONTAINERS_CONF (default: docker/containers.conf, for podman/buildah).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
tag="${1:-localhost/keepfs:$version}"
base="${BASE:-debian:bookworm-slim}"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

say() { printf 'build.sh: %s\n' "$*" >&2; }

# The binary: given, or built now.
bin="${KEEPFS_BIN:-}"
if [ -z "$bin" ]; then
    say "cargo build --release"
    cargo build --release --locked --bin keepfs
    target_dir="$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    bin="$target_dir/release/keepfs"
fi
[ -x "$bin" ] || { say "no executable keepfs binary at $bin"; exit 1; }

# A context holding only the binary: small, and independent of where cargo puts its target.
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$bin" "$context/keepfs"
# Debug line tables are most of a release binary (debug = "line-tables-only"); symbols stay,
# so backtraces still name functions.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$context/keepfs"
fi
build_args=(--build-arg "BASE=$base" --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision" --build-arg "KEEPFS_BIN=keepfs")

builder="${KEEPFS_BUILDER:-}"
if [ -z "$builder" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        builder=docker
    elif command -v buildah >/dev/null 2>&1; then
        builder=buildah
    else
        say "neither a running docker nor buildah found (apt-get install buildah podman runc)"
        exit 1
    fi
fi

if [ "$builder" = docker ]; then
    say "docker build -t $tag"
    docker build "${build_args[@]}" -t "$tag" -f "$here/Dockerfile" "$context"
    exit 0
fi

# buildah: make sure the base exists locally, pulling it or else making it from Debian.
full_base="$base"
case "$base" in */*) ;; *) full_base="docker.io/library/$base" ;; esac
if ! buildah inspect --type image "$full_base" >/dev/null 2>&1 \
    && ! buildah pull --quiet "$full_base" >/dev/null 2>&1; then
    case "$base" in
    debian:bookworm-slim | debian:bookworm) suite=bookworm ;;
    *) say "base image $base is missing and can't be pulled; only debian:bookworm(-slim) can be made here"; exit 1 ;;
    esac
    cache="${KEEPFS_BASE_CACHE:-$HOME/.cache/keepfs-base}"
    tar="$cache/debian-$suite-slim.tar"
    if [ ! -s "$tar" ]; then
        command -v mmdebstrap >/dev/null 2>&1 || { say "mmdebstrap is needed to make the base image (apt-get install mmdebstrap)"; exit 1; }
        say "making $base from Debian packages (mmdebstrap, about a minute; cached in $cache)"
        mkdir -p "$cache"
        # The mirrors apt already uses; no docs, man pages or locales, as in -slim images.
        mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)"
        mirror="${mirror:-http://deb.debian.org/debian}"
        security="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | sed -n 2p)"
        security="${security:-http://deb.debian.org/debian-security}"
        # merged-usr as a hook, not the usrmerge package (which pulls in perl: +40 MB).
        hooks=()
        [ -d /usr/share/mmdebstrap/hooks/merged-usr ] \
            && hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
        mmdebstrap --variant=apt --format=tar "${hooks[@]}" \
            --dpkgopt='path-exclude=/usr/share/info/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            "$suite" "$tar.tmp" \
            "deb $mirror $suite main" "deb $mirror $suite-updates main" \
            "deb $security $suite-security main"
        mv "$tar.tmp" "$tar"
    fi
    say "importing $tar as $full_base"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' "$tar" "$full_base" >/dev/null
fi

say "buildah bud -t $tag"
buildah bud --quiet --pull=never --network host --isolation chroot --layers=false \
    "${build_args[@]}" -t "$tag" -f "$here/Dockerfile" "$context" >/dev/null
size="$(podman image inspect --format '{{.Size}}' "$tag" 2>/dev/null || echo 0)"
say "built $tag ($((size / 1000000)) MB)"
