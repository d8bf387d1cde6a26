#!/usr/bin/env python3
"""Publishes numbered messages to the node for as long as it runs, reconnecting at once after
every lost connection, and appends the number of every message the node acknowledged (PUBACK
for QoS 1, PUBCOMP for QoS 2) to --out, one per line, flushed at once.

A paho-mqtt client as a third party would run it: a fresh client (clean session) per
connection, so nothing unacknowledged is sent twice and every number is published once.

  desired:   {"mode": "<n, 10 digits>"} on dt/{device}/desired
  telemetry: {"w": "<id>", "n": n} on dt/{device}/telemetry
"""
import argparse
import json
import threading
import time

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--kind", choices=["desired", "telemetry"], required=True)
    ap.add_argument("--qos", type=int, choices=[1, 2], default=1)
    ap.add_argument("--id", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--inflight", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0, help="messages per second; 0 = flood")
    a = ap.parse_args()

    topic = f"dt/{a.device}/{a.kind}"
    out = open(a.out, "a", buffering=1)
    lock = threading.Lock()
    n = 0
    start = time.monotonic()
    while True:
        inflight = {}
        early = set()  # acknowledged before publish() returned its mid to us
        lost = threading.Event()

        def on_publish(_c, _u, mid, rc, _p, inflight=inflight, early=early):
            if rc.is_failure:
                return
            with lock:
                m = inflight.pop(mid, None)
                if m is None:
                    early.add(mid)
                    return
            out.write(f"{m}\n")

        def on_disconnect(_c, _u, _f, _rc, _p, lost=lost):
            lost.set()

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.id, clean_session=True)
        c.max_inflight_messages_set(a.inflight)
        c.max_queued_messages_set(a.inflight)
        c.on_publish = on_publish
        c.on_disconnect = on_disconnect
        try:
            c.connect("127.0.0.1", a.port, keepalive=10)
        except OSError:
            time.sleep(0.005)
            continue
        c.loop_start()
        while not lost.is_set():
            if a.kind == "desired":
                # Zero-padded, so value order is number order: past the node's stamp lead (a
                # flood of over 1000 writes a second to one property) writes tie on `ts` and the
                # value decides.
                payload = json.dumps({"mode": f"{n:010d}"})
            else:
                payload = json.dumps({"w": a.id, "n": n})
            # Not under `lock`: paho calls on_publish holding its own lock, which publish()
            # takes too.
            info = c.publish(topic, payload, qos=a.qos)
            queued = info.rc == mqtt.MQTT_ERR_SUCCESS
            if queued:
                with lock:
                    if info.mid in early:
                        early.discard(info.mid)
                        acked_now = True
                    else:
                        inflight[info.mid] = n
                        acked_now = False
                if acked_now:
                    out.write(f"{n}\n")
            if queued:
                n += 1
                if a.rate > 0:
                    wait = start + n / a.rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
            else:
                # The window is full (or the connection is gone): wait for acknowledgements.
                time.sleep(0.001)
        c.loop_stop()


if __name__ == "__main__":
    main()
