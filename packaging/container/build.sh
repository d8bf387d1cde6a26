#!/usr/bin/env bash
# Builds the edgetwin container image from binaries already built, without a registry:
#   packaging/container/build.sh [--profile release|dev] [--tag edgetwin:0.1.0] [--docker "docker -H ..."]
# Stages a root file system (the binaries, stripped; every shared library they link, found
# with ldd; CA certificates for the bridge's TLS; /etc/edgetwin), then `docker build` with
# packaging/container/Containerfile. `cargo build --release -p edgetwin-node -p
# edgetwin-mapper-modbus -p edgetwin-mapper-opcua -p edgetwin-mapper-serial -p
# edgetwin-mapper-ble --bins` first.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
profile=release; tag=edgetwin:0.1.0; docker=docker
bins="edgetwin edgetwin-mapper-modbus edgetwin-mapper-opcua edgetwin-mapper-serial edgetwin-mapper-ble"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --docker) docker=$2; shift 2 ;;
    --bins) bins=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$profile" in dev) out=debug ;; *) out=$profile ;; esac
target=${CARGO_TARGET_DIR:-$repo/target}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/etc/edgetwin/conf.d" "$root/etc/edgetwin/devices" "$root/tmp" "$ctx/state"
chmod 1777 "$root/tmp"
for b in $bins; do
  strip -o "$root/usr/bin/$b" "$target/$out/$b"
  # Every library the binary links, at the path the loader looks for it.
  ldd "$target/$out/$b" | awk '/=> \// {print $3} /^\s*\/[^ ]+ \(/ {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
# The loader as the binaries name it (lib64 → usr/lib64 on merged-/usr systems).
interp=$(readelf -l "$target/$out/edgetwin" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
mkdir -p "$root$(dirname "$interp")"
cp -L "$interp" "$root$interp"
[ -f /etc/ssl/certs/ca-certificates.crt ] && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0::/:/nonexistent\nedgetwin:x:10001:10001::/var/lib/edgetwin:/nonexistent\n' > "$root/etc/passwd"
printf 'root:x:0:\nedgetwin:x:10001:\n' > "$root/etc/group"
cp "$here/node.yaml" "$root/etc/edgetwin/node.yaml"
cp "$here/Containerfile" "$ctx/Containerfile"
DOCKER_BUILDKIT=0 $docker build -q -f "$ctx/Containerfile" -t "$tag" "$ctx"
