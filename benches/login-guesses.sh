#!/usr/bin/env bash
# Password guesses per second against the node's gate, with the failed-login back-off at its
# defaults and with it effectively off (login_free_failures huge), in one run. One serial
# guesser (mosquitto_pub with a wrong password, as a scripted attacker would) and one with 8
# parallel connections, each for DURATION seconds; then the right password must still get in.
#
#   cargo build --release -p edgetwin-node && benches/login-guesses.sh [DURATION]
#
# Needs mosquitto_pub on PATH. Ports are taken from the free range; everything is on 127.0.0.1.
set -euo pipefail
DURATION=${1:-10}
BIN=${EDGETWIN:-$(dirname "$0")/../target/release/edgetwin}
work=$(mktemp -d)
trap 'kill $(cat "$work"/*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_node() { # $1 label, $2 login_free_failures
    local dir=$work/$1
    mkdir -p "$dir"
    echo "eng-pw" | "$BIN" user add eng --role engineer --credentials "$dir/users.yaml" >/dev/null
    local gate mqtt mqtt5 http
    gate=$(free_port); mqtt=$(free_port); mqtt5=$(free_port); http=$(free_port)
    cat >"$dir/node.yaml" <<EOF
data_dir: $dir/data
devices_dir: $dir/devices
mqtt: {listen: 127.0.0.1:$mqtt, listen_v5: 127.0.0.1:$mqtt5}
http: {listen: 127.0.0.1:$http}
gate:
  listeners: [{listen: 127.0.0.1:$gate}]
  credentials_file: $dir/users.yaml
  limits: {login_free_failures: $2}
EOF
    "$BIN" serve --config "$dir/node.yaml" >"$dir/node.log" 2>&1 &
    echo $! >"$dir/pid"
    echo "$http" >"$dir/http"
    for _ in $(seq 1 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/readyz")" = 200 ] && break
        sleep 0.05
    done
    echo "$gate"
}

guess() { mosquitto_pub -h 127.0.0.1 -p "$1" -u eng -P "$2" -t dt/x/desired -m '{}' -q 1 2>/dev/null; }

serial() { # port -> guesses in DURATION s
    local n=0 end=$((SECONDS + DURATION))
    while [ $SECONDS -lt $end ]; do guess "$1" "wrong-$n" || true; n=$((n + 1)); done
    echo "$n"
}

parallel() { # port -> guesses in DURATION s over 8 connections at a time
    local total=0
    for w in $(seq 1 8); do (serial "$1" >"$work/p$w") & done
    wait
    for w in $(seq 1 8); do total=$((total + $(cat "$work/p$w"))); done
    echo "$total"
}

checked() { # metrics port -> passwords checked and found wrong
    curl -s "http://127.0.0.1:$1/metrics" | awk '/^edgetwin_gate_auth_failures_total\{reason="bad_password"\}/ {print $2}'
}
refused() {
    curl -s "http://127.0.0.1:$1/metrics" | awk '/^edgetwin_gate_auth_failures_total\{reason="throttled"\}/ {print $2}'
}

printf '| gate | guesser | attempts in %s s | passwords checked | checked/s | refused unchecked | right password afterwards (s) |\n|---|---|---:|---:|---:|---:|---|\n' "$DURATION"
for setup in "back-off (defaults):3" "back-off off:1000000000"; do
    label=${setup%%:*}; free=${setup##*:}
    for mode in serial parallel; do
        name=$(echo "$label-$mode" | tr -c 'a-z0-9\n' '-')
        port=$(start_node "$name" "$free")
        n=$($mode "$port")
        http=$(cat "$work/$name/http")
        c=$(checked "$http"); c=${c:-0}; r=$(refused "$http"); r=${r:-0}
        t0=$(date +%s.%N)
        if guess "$port" eng-pw; then ok=yes; else ok=NO; fi
        took=$(echo "$(date +%s.%N) - $t0" | bc -l)
        printf '| %s | %s | %d | %d | %.1f | %d | %s (%.1f) |\n' "$label" "$mode" "$n" "$c" "$(echo "$c / $DURATION" | bc -l)" "$r" "$ok" "$took"
        kill "$(cat "$work/$name/pid")" 2>/dev/null || true
    done
done
