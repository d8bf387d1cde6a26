#!/usr/bin/env bash
# Builds the edgetwin Debian package (the node and every mapper) into target/debian/:
#   packaging/build-deb.sh                  release build, stripped (what to ship)
#   packaging/build-deb.sh --profile dev --no-build
#                                           the debug binaries the tests already built (the
#                                           package test uses it to keep CI short; cargo-deb
#                                           warns that dev is not for releases)
# Needs cargo-deb (`cargo install cargo-deb --locked`). Extra arguments go to cargo deb
# (e.g. --deb-version 0.1.0-2).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=no; shift ;;
    *) break ;;
  esac
done
case "$profile" in
  dev) out=debug ;;
  *) out=$profile ;;
esac
target=${CARGO_TARGET_DIR:-target}
bins=(-p edgetwin-node -p edgetwin-mapper-modbus -p edgetwin-mapper-opcua -p edgetwin-mapper-serial -p edgetwin-mapper-ble --bins)

[ "$build" = yes ] && cargo build --locked --profile "$profile" "${bins[@]}"
gen="$target/$out/packaging"
rm -rf "$gen" && mkdir -p "$gen/completions"
"$target/$out/edgetwin" man --out "$gen/man"
gzip -9n "$gen"/man/*.1
for shell in bash zsh fish; do
  "$target/$out/edgetwin" completions "$shell" > "$gen/completions/$(case $shell in bash) echo edgetwin.bash;; zsh) echo _edgetwin;; fish) echo edgetwin.fish;; esac)"
done
# cargo-deb maps the assets' target/release/ prefix to the profile's folder.
# --strip: the release profile keeps line tables (for perf), which cargo-deb would otherwise keep.
cargo deb --locked -p edgetwin-node --no-build --strip --profile "$profile" "$@"
