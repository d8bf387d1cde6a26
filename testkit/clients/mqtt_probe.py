#!/usr/bin/env python3
"""A third-party MQTT client (paho-mqtt) for the integration tests.

Connects, subscribes to every --sub filter and waits for the SUBACK, then publishes every --pub
message in order, then prints each received message as one JSON line
{"topic", "payload", "retain", "correlation"?} until --count messages arrived or --timeout passed.
Exit code 0 when --count was reached, 3 on timeout, 2 on connection failure.
"""
import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--v5", action="store_true")
    ap.add_argument("--sub", action="append", default=[])
    ap.add_argument("--pub", action="append", default=[], nargs=2, metavar=("TOPIC", "PAYLOAD"))
    ap.add_argument("--response-topic")
    ap.add_argument("--correlation")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--max-packet", type=int, help="MQTT 5 Maximum Packet Size to announce")
    a = ap.parse_args()

    proto = mqtt.MQTTv5 if a.v5 else mqtt.MQTTv311
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
    got = []
    done = threading.Event()
    subacked = threading.Event()
    connected = threading.Event()
    pending = {"subs": len(a.sub)}

    def on_connect(client, userdata, flags, rc, props=None):
        connected.set()

    def on_subscribe(client, userdata, mid, rcs, props=None):
        pending["subs"] -= 1
        if pending["subs"] <= 0:
            subacked.set()

    def on_message(client, userdata, msg):
        item = {"topic": msg.topic, "payload": msg.payload.decode("utf-8", "replace"), "retain": bool(msg.retain)}
        cd = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if cd is not None:
            item["correlation"] = cd.decode("utf-8", "replace")
        print(json.dumps(item), flush=True)
        got.append(item)
        if a.count and len(got) >= a.count:
            done.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    if a.username:
        c.username_pw_set(a.username, a.password)
    connect_props = None
    if a.v5 and a.max_packet:
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.MaximumPacketSize = a.max_packet
    try:
        if a.v5:
            c.connect("127.0.0.1", a.port, keepalive=30, properties=connect_props)
        else:
            c.connect("127.0.0.1", a.port, keepalive=30)
    except OSError as e:
        print(f"connect failed: {e}", file=sys.stderr)
        return 2
    c.loop_start()
    if not connected.wait(5):
        print("no CONNACK", file=sys.stderr)
        return 2
    for f in a.sub:
        c.subscribe(f, qos=a.qos)
    if a.sub and not subacked.wait(5):
        print("no SUBACK", file=sys.stderr)
        return 2
    for topic, payload in a.pub:
        props = None
        if a.v5 and (a.response_topic or a.correlation):
            props = Properties(PacketTypes.PUBLISH)
            if a.response_topic:
                props.ResponseTopic = a.response_topic
            if a.correlation:
                props.CorrelationData = a.correlation.encode()
        info = c.publish(topic, payload.encode(), qos=a.qos, properties=props)
        info.wait_for_publish(5)
    if a.count:
        ok = done.wait(a.timeout)
    else:
        time.sleep(a.timeout)
        ok = True
    c.loop_stop()
    c.disconnect()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
