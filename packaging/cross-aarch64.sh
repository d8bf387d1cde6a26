#!/usr/bin/env bash
# Builds the edgetwin node for aarch64 (64-bit ARM edge boxes) on a Debian 12 x86_64 machine
# without rustup targets: Debian's rustc-web with its arm64 standard library and the cross
# linker, then runs the binary under qemu-user (`--version`, `serve --help`; with `--serve`
# also a node on loopback until /readyz answers 200). Prints the binary's size.
#
#   packaging/cross-aarch64.sh --install   installs what it needs first (apt, as root):
#       dpkg --add-architecture arm64; rustc-web libstd-rust-web-dev:arm64
#       gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
#   packaging/cross-aarch64.sh             builds into target/cross/ and checks
#   packaging/cross-aarch64.sh --serve     ... and starts a node under qemu (see below)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--install" ]; then
  shift
  dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web libstd-rust-web-dev:arm64 \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi

triple=aarch64-unknown-linux-gnu
# rustc-web installs Debian's compiler as /usr/bin/rustc (rustup's in ~/.cargo/bin comes first
# on PATH, so it is named here); its sysroot /usr holds the arm64 std of libstd-rust-web-dev:arm64.
rustc=${DEBIAN_RUSTC:-/usr/bin/rustc}
[ -x "$rustc" ] || { echo "cross-aarch64: no Debian rustc-web at $rustc (run with --install)" >&2; exit 1; }
sysroot=$("$rustc" --print sysroot)
[ -d "$sysroot/lib/rustlib/$triple" ] || { echo "cross-aarch64: no $triple std in $sysroot (libstd-rust-web-dev:arm64)" >&2; exit 1; }
echo "cross-aarch64: $("$rustc" --version), sysroot $sysroot"

export RUSTC="$rustc"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# The node only (the BLE mapper links libdbus, which would need the arm64 -dev package too).
cargo build --locked --release --target "$triple" --target-dir target/cross -p edgetwin-node --bin edgetwin

bin="target/cross/$triple/release/edgetwin"
stripped="target/cross/edgetwin-aarch64-stripped"
aarch64-linux-gnu-strip -o "$stripped" "$bin"
file "$bin" | sed 's/, BuildID[^,]*//'
echo "size: $(stat -c %s "$bin") bytes, stripped $(stat -c %s "$stripped") bytes"
run() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$@"; }
echo "--version under qemu: $(run "$stripped" --version)"

echo "help under qemu: $(run "$stripped" serve --help | head -1)"

# A node under qemu until /readyz answers: only with --serve. Under Debian 12's qemu-user 7.2 the
# first thread the process starts hangs (a minimal program whose main spawns one std::thread
# hangs the same way), so the check needs a newer qemu-user or a real arm64 machine.
[ "${1:-}" = "--serve" ] || [ "${2:-}" = "--serve" ] || exit 0
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(port); mqtt5=$(port); http=$(port)
printf 'node_id: arm-check\ndata_dir: %s/data\ndevices_dir: %s/devices\nmqtt:\n  listen: 127.0.0.1:%s\n  listen_v5: 127.0.0.1:%s\nhttp:\n  listen: 127.0.0.1:%s\n' \
  "$dir" "$dir" "$mqtt" "$mqtt5" "$http" > "$dir/node.yaml"
run "$stripped" serve --config "$dir/node.yaml" 2> "$dir/node.log" &
pid=$!
for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; then
    echo "serving under qemu: /readyz 200"
    kill -TERM "$pid"; wait "$pid" && echo "stopped cleanly"; pid=
    exit 0
  fi
  sleep 0.1
done
echo "cross-aarch64: the node did not get ready under qemu:" >&2
cat "$dir/node.log" >&2
exit 1
