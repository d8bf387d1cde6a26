#!/usr/bin/env bash
# Runs the edgetwin test suite in two lanes:
#   ./test.sh fast   unit and property tests only (every crate's lib and bins; in-process node
#                    tests included), no peers needed: seconds once built.
#   ./test.sh        both lanes: the fast one first, then the process and peer tests (every
#                    crate's tests/ folder: the real binary driven by third-party clients) and
#                    doc tests. This is what CI runs.
# The full run installs the real peers the tests drive when they are
# missing (Debian packages: mosquitto, mosquitto-clients, socat, docker.io, busybox-static, dbus,
# iproute2, prometheus (promtool), systemd (systemd-analyze), debootstrap, and pkg-config +
# libdbus-1-dev that btleplug builds against; crates.io: cargo-deb, cargo-deny; PyPI: paho-mqtt, pymodbus, pyserial,
# asyncua). Under CI=true a peer that cannot be installed is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")"

lane=${1:-all}
case "$lane" in
  fast) exec cargo test --workspace --locked --lib --bins ;;
  all) ;;
  *) echo "usage: ./test.sh [fast]" >&2; exit 2 ;;
esac

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need_apt+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)  # the test image holds only a static busybox
command -v dbus-daemon >/dev/null 2>&1 || need_apt+=(dbus)              # a private bus for the BLE no-adapter test
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)  # a network namespace as a second host
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
dpkg -s libdbus-1-dev >/dev/null 2>&1 || need_apt+=(libdbus-1-dev)    # btleplug (BlueZ over D-Bus)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)          # promtool checks /metrics
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)      # verifies the units
command -v file >/dev/null 2>&1 || need_apt+=(file)                    # the package test: stripped binaries
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)  # the package test's scratch root
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]} (apt-get)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${EDGETWIN_TEST_PYTHON:-python3}
PY_PEERS=('paho-mqtt>=2,<3' 'pymodbus==3.16.1' 'pyserial>=3.5' 'asyncua==2.1.0' 'cryptography' 'zstandard')
PY_IMPORTS='import paho.mqtt, pymodbus, serial, asyncua, cryptography, zstandard'
if ! "$PY" -c "$PY_IMPORTS" 2>/dev/null; then
  echo "test.sh: installing paho-mqtt, pymodbus, pyserial, asyncua, cryptography, zstandard (pip)"
  "$PY" -m pip install -q --disable-pip-version-check "${PY_PEERS[@]}" \
    || "$PY" -m pip install -q --disable-pip-version-check --break-system-packages "${PY_PEERS[@]}"
fi

for tool in cargo-deb cargo-deny; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "test.sh: installing $tool (cargo install)"
    cargo install -q --locked "$tool"
  fi
done
for p in mosquitto_pub mosquitto_sub mosquitto_rr socat dbus-daemon pkg-config promtool systemd-analyze cargo-deb cargo-deny; do
  command -v "$p" >/dev/null 2>&1 || { echo "test.sh: peer $p is still missing" >&2; exit 1; }
done
"$PY" -c "$PY_IMPORTS" || { echo "test.sh: a Python peer (${PY_PEERS[*]}) is still missing" >&2; exit 1; }
export PATH="$PATH:/usr/sbin"
export EDGETWIN_TEST_PYTHON="$PY"
# A CI build is cold and never rebuilt, so incremental state is only disk used (it was as large
# as the binaries themselves).
[ "${CI:-}" = "true" ] && export CARGO_INCREMENTAL=0

cargo deny --locked check licenses bans sources      # deny.toml: the dependencies' licenses and origins
cargo test --workspace --locked --lib --bins          # fast lane
cargo test --workspace --locked --test '*'            # process and peer tests
cargo test --workspace --locked --doc
