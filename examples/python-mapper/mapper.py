#!/usr/bin/env python3
"""A complete edgetwin mapper in Python (paho-mqtt 2.x), speaking only the topic contract.

It serves a protocol of its own, `pysim`, whose sections the node does not know and passes
through as JSON: the device's `spec.protocol.pysim` (`{"seed"?}`) and each property's
`visitors.pysim` (`{"signal": "counter"|"sine"|"register"}`). A `counter` counts up on every
poll, a `sine` drifts around 20, a `register` holds whatever was last written. Everything else is
what any mapper must do:

  subscribe  mappers/pysim/devices/+    retained assignments (JSON resolved device; empty = removed)
             dt/+/delta                 {"device","version","delta":{prop: value},"ts"}
  publish    mappers/pysim/status       retained {"state":"online"|"offline","ts","version"},
                                        also the MQTT will (offline)
             dt/{device}/status         retained {"state":"online"|"offline"|"error","ts","message"?}
             dt/{device}/reported       merge patch {prop: value, ..., "ts"}
             dt/{device}/telemetry      {"ts","values":{prop: value}} for telemetry: true
             dt/{device}/error          {"code","message","topic"} when the device refuses

Run: python3 mapper.py --broker 127.0.0.1:1883   (SIGTERM or Ctrl-C stops it cleanly)
"""
import argparse
import json
import math
import os
import re
import signal
import threading
import time

import paho.mqtt.client as mqtt

PROTOCOL = "pysim"
SIGNALS = ("counter", "sine", "register")
VERSION = "0.1.0-python-example"
DEFAULT_CYCLE_S = 1.0


def now_ms():
    return int(time.time() * 1000)


def parse_duration(text, default=DEFAULT_CYCLE_S):
    """'250ms', '1s', '5m', '1h 30m' -> seconds."""
    if not text:
        return default
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        total += float(num) * units[unit]
    return total or default


def self_name(resolved):
    return resolved.get("device", {}).get("metadata", {}).get("name", "?")


class Device:
    """One assigned device: its properties, poll schedule and simulated values."""

    def __init__(self, resolved):
        self.resolved = resolved
        self.name = resolved["device"]["metadata"]["name"]
        model = {p["name"]: p for p in resolved["model"]["spec"]["properties"]}
        self.props = []
        seed = (resolved["device"]["spec"]["protocol"].get(PROTOCOL) or {}).get("seed", 0)
        for p in resolved["device"]["spec"].get("properties", []):
            mp = model.get(p["name"], {})
            signal = (p.get("visitors", {}).get(PROTOCOL) or {}).get("signal")
            if signal not in SIGNALS:
                # The node passes another protocol's visitor through unchecked: this mapper
                # checks its own.
                signal = "register" if mp.get("accessMode") == "ReadWrite" else "counter"
                print(f"{self_name(resolved)}: property {p['name']!r} has no valid "
                      f"visitors.{PROTOCOL}.signal (one of {', '.join(SIGNALS)}); using {signal}",
                      flush=True)
            self.props.append({
                "name": p["name"],
                "signal": signal,
                "type": mp.get("type", "float"),
                "writable": mp.get("accessMode") == "ReadWrite",
                "cycle": parse_duration(p.get("collectCycle")),
                "telemetry": bool(p.get("telemetry", False)),
                "deadband": (p.get("reportOnChange") or {}).get("deadband"),
                "on_change": "reportOnChange" in p,
                "next": 0.0,
            })
        self.values = {}
        for p in self.props:
            default = model.get(p["name"], {}).get("default")
            start = seed if p["signal"] == "counter" else 0
            self.values[p["name"]] = default if default is not None else (start if p["type"] == "int" else float(start))
        self.last_reported = {}
        self.last_version = -1
        self.online = False

    def read(self, prop):
        """The simulated hardware read."""
        name = prop["name"]
        if prop["signal"] == "counter":
            self.values[name] += 1
        elif prop["signal"] == "sine":
            self.values[name] = round(20.0 + 2.0 * math.sin(time.time() / 10.0), 2)
        return self.values[name]

    def write(self, name, value):
        """The simulated hardware write."""
        self.values[name] = value

    def should_report(self, prop, value):
        if not prop["on_change"] or prop["name"] not in self.last_reported:
            return True
        last = self.last_reported[prop["name"]]
        band = prop["deadband"] or 0.0
        if isinstance(value, (int, float)) and isinstance(last, (int, float)):
            return abs(value - last) > band
        return value != last


class Mapper:
    def __init__(self, host, port):
        self.devices = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgetwin-mapper-{PROTOCOL}",
            protocol=mqtt.MQTTv311,
        )
        self.client.will_set(self.status_topic(), self.mapper_status("offline"), qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message
        self.host, self.port = host, port

    def status_topic(self):
        return f"mappers/{PROTOCOL}/status"

    def mapper_status(self, state):
        return json.dumps({"state": state, "ts": now_ms(), "version": VERSION})

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)

    def device_status(self, dev, state, message=None):
        msg = {"state": state, "ts": now_ms()}
        if message:
            msg["message"] = message
        self.publish(f"dt/{dev.name}/status", msg, retain=True)

    # --- MQTT callbacks -------------------------------------------------------------------
    def on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            return
        # Subscribe on every (re)connect, then announce: the node resends deltas to a mapper
        # that comes online.
        client.subscribe([(f"mappers/{PROTOCOL}/devices/+", 1), ("dt/+/delta", 1)])
        client.publish(self.status_topic(), self.mapper_status("online"), qos=1, retain=True)

    def on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        try:
            if len(parts) == 4 and parts[0] == "mappers" and parts[2] == "devices":
                self.on_assignment(parts[3], msg.payload)
            elif len(parts) == 3 and parts[0] == "dt" and parts[2] == "delta":
                self.on_delta(parts[1], json.loads(msg.payload))
        except (ValueError, KeyError, TypeError) as e:
            print(f"ignoring bad message on {msg.topic}: {e}", flush=True)

    def on_assignment(self, name, payload):
        with self.lock:
            if not payload:
                if self.devices.pop(name, None) is not None:
                    # Clear the retained status of a removed device.
                    self.client.publish(f"dt/{name}/status", b"", qos=1, retain=True)
                return
            resolved = json.loads(payload)
            old = self.devices.get(name)
            if old is not None and old.resolved == resolved:
                return  # redelivered on reconnect: nothing changed
            self.devices[name] = Device(resolved)

    def on_delta(self, name, delta):
        with self.lock:
            dev = self.devices.get(name)
            if dev is None or delta.get("version", 0) <= dev.last_version:
                return
            dev.last_version = delta["version"]
            for prop_name, value in delta.get("delta", {}).items():
                prop = next((p for p in dev.props if p["name"] == prop_name), None)
                if prop is None:
                    continue
                if not prop["writable"]:
                    self.publish(f"dt/{name}/error", {
                        "code": "write_failed",
                        "message": f"writing property {prop_name!r}: device refused: read-only register",
                        "topic": f"dt/{name}/delta",
                    })
                    continue
                dev.write(prop_name, value)
                back = dev.read(prop)  # read back what the device now holds
                dev.last_reported[prop_name] = back
                self.publish(f"dt/{name}/reported", {prop_name: back, "ts": now_ms()})

    # --- polling ----------------------------------------------------------------------------
    def poll_forever(self):
        start = time.monotonic()
        while not self.stop.wait(0.05):
            now = time.monotonic() - start
            with self.lock:
                for dev in self.devices.values():
                    self.poll(dev, now)

    def poll(self, dev, now):
        due = [p for p in dev.props if p["next"] <= now]
        if not due:
            return
        reported, telemetry = {}, {}
        for p in due:
            # Fixed rate: the next tick stays on the grid; missed ticks are skipped.
            while p["next"] <= now:
                p["next"] += p["cycle"]
            value = dev.read(p)
            if p["telemetry"]:
                telemetry[p["name"]] = value
            if dev.should_report(p, value):
                reported[p["name"]] = value
                dev.last_reported[p["name"]] = value
        ts = now_ms()
        if reported:
            self.publish(f"dt/{dev.name}/reported", {**reported, "ts": ts})
        if telemetry:
            self.publish(f"dt/{dev.name}/telemetry", {"ts": ts, "values": telemetry})
        if not dev.online:
            dev.online = True
            self.device_status(dev, "online")

    # --- life cycle -----------------------------------------------------------------------
    def run(self):
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        poller = threading.Thread(target=self.poll_forever, daemon=True)
        poller.start()
        self.stop.wait()
        poller.join(timeout=2)
        with self.lock:
            infos = [self.client.publish(f"dt/{d.name}/status",
                                         json.dumps({"state": "offline", "ts": now_ms(), "message": "mapper stopped"}),
                                         qos=1, retain=True)
                     for d in self.devices.values()]
        infos.append(self.client.publish(self.status_topic(), self.mapper_status("offline"), qos=1, retain=True))
        for info in infos:
            try:
                info.wait_for_publish(timeout=2)
            except (ValueError, RuntimeError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def main():
    ap = argparse.ArgumentParser(description="edgetwin example mapper (the simulated pysim protocol)")
    ap.add_argument("--broker", default=os.environ.get("EDGETWIN_BROKER", "127.0.0.1:1883"),
                    help="the node's MQTT broker, host:port (env EDGETWIN_BROKER)")
    a = ap.parse_args()
    host, _, port = a.broker.rpartition(":")
    m = Mapper(host or "127.0.0.1", int(port))
    signal.signal(signal.SIGTERM, lambda *_: m.stop.set())
    signal.signal(signal.SIGINT, lambda *_: m.stop.set())
    m.run()


if __name__ == "__main__":
    main()
