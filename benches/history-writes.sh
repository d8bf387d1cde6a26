#!/usr/bin/env bash
# Disk bytes the local history writes per reading: the same reported readings sent to a node
# with the history on and to one with it off, in one run; the difference of the node's
# write_bytes (/proc/PID/io) divided by the readings is the history's cost. Also the size of
# history.redb per stored point.
#
#   cargo build --release -p edgetwin-node && benches/history-writes.sh [DEVICES] [READINGS_PER_DEVICE] [FLUSH_S]
#
# Readings come from one paho-mqtt client, 20 per second per device, each a new value of
# `temperature` (so the twin store commits every one in both runs). Everything is on 127.0.0.1.
set -euo pipefail
DEVICES=${1:-50}
PER_DEVICE=${2:-200}
FLUSH=${3:-5}
BIN=${EDGETWIN:-$(dirname "$0")/../target/release/edgetwin}
work=$(mktemp -d)
trap 'kill $(cat "$work"/*/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

profile() {
    cat <<EOF
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  protocol: modbus
  properties:
    - {name: temperature, type: float, accessMode: ReadOnly}
EOF
    for i in $(seq 0 $((DEVICES - 1))); do
        cat <<EOF
---
apiVersion: edgetwin/v1
kind: Device
metadata: {name: h-$i}
spec:
  deviceModelRef: thermostat
  protocol:
    modbus: {communicateMode: TCP, ip: 127.0.0.1, port: 502, slaveID: 1}
  properties:
    - name: temperature
      visitors:
        modbus: {register: HoldingRegister, offset: 0, dataType: float32}
EOF
    done
}

run() { # $1 label, $2 enabled
    local dir=$work/$1
    mkdir -p "$dir/devices"
    profile >"$dir/devices/h.yaml"
    local mqtt mqtt5 http
    mqtt=$(free_port); mqtt5=$(free_port); http=$(free_port)
    cat >"$dir/node.yaml" <<EOF
data_dir: $dir/data
devices_dir: $dir/devices
mqtt: {listen: 127.0.0.1:$mqtt, listen_v5: 127.0.0.1:$mqtt5}
http: {listen: 127.0.0.1:$http}
history: {enabled: $2, resolution_s: 60, flush_interval_s: $FLUSH}
EOF
    "$BIN" serve --config "$dir/node.yaml" >"$dir/node.log" 2>&1 &
    local pid=$!
    echo $pid >"$dir/pid"
    for _ in $(seq 1 400); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/readyz")" = 200 ] && break
        sleep 0.05
    done
    local before after
    before=$(awk '/^write_bytes/ {print $2}' /proc/$pid/io)
    python3 - "$mqtt" "$DEVICES" "$PER_DEVICE" <<'EOF'
import sys, time, json
import paho.mqtt.client as mqtt
port, devices, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.connect("127.0.0.1", port)
c.loop_start()
for k in range(per):
    t0 = time.time()
    for i in range(devices):
        c.publish(f"dt/h-{i}/reported", json.dumps({"temperature": 20 + (k % 100) / 10 + i / 1000}), qos=1).wait_for_publish()
    time.sleep(max(0, 0.05 - (time.time() - t0)))
c.loop_stop()
EOF
    # A full flush interval after the last reading, then a clean stop (which writes the rest).
    sleep $((FLUSH + 1))
    after=$(awk '/^write_bytes/ {print $2}' /proc/$pid/io)
    kill -TERM $pid; wait $pid || true
    local size=0
    [ -f "$dir/data/history.redb" ] && size=$(stat -c %s "$dir/data/history.redb")
    echo "$1 $((after - before)) $size"
}

readings=$((DEVICES * PER_DEVICE))
on=$(run on true)
off=$(run off false)
read -r _ on_bytes size <<<"$on"
read -r _ off_bytes _ <<<"$off"
echo "devices $DEVICES, readings $readings (20 per second per device), flush every ${FLUSH}s, 60 s points"
printf '| node | disk bytes written while readings arrived | per reading |\n|---|---:|---:|\n'
printf '| history on | %d | %.1f |\n' "$on_bytes" "$(echo "$on_bytes / $readings" | bc -l)"
printf '| history off | %d | %.1f |\n' "$off_bytes" "$(echo "$off_bytes / $readings" | bc -l)"
printf 'history cost: %.1f bytes per reading; history.redb %d bytes at the end\n' \
    "$(echo "($on_bytes - $off_bytes) / $readings" | bc -l)" "$size"
