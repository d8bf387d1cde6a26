#!/usr/bin/env python3
"""Reads edgetwin telemetry at the cloud broker, batched or not.

A node with `bridge.batch` configured sends telemetry as envelopes on
`{prefix}dt/{device}/telemetry/batch` (docs/contract.md section 5.4):

    zstd( {"v": 1, "topic": "dt/{device}/telemetry", "messages": [<message>, ...]} )

or the same JSON uncompressed with `compression: none`. Over MQTT 5 the publish
carries the content type `application/vnd.edgetwin.batch.v1+json` and the user
property `content-encoding: zstd`; over MQTT 3.1.1 a decoder tells the two apart
by zstd's magic number, as `decode` does.

Use `decode` in your own consumer, or run this file to print every message as
one JSON line `{"topic": ..., "batch": n | null, "message": {...}}`:

    pip install 'paho-mqtt>=2' zstandard
    python3 edgetwin_batches.py --host cloud.example --port 1883 \
        --topic 'edgetwin/+/dt/+/telemetry/#'
"""

import argparse
import json
import sys

import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
VERSION = 1


def decode(payload: bytes):
    """Returns (local topic, [message, ...]) of one envelope."""
    if payload.startswith(ZSTD_MAGIC):
        # A frame written in one go carries its size; stream_reader also reads one that does not.
        with zstandard.ZstdDecompressor().stream_reader(payload) as r:
            payload = r.read()
    envelope = json.loads(payload)
    if envelope.get("v") != VERSION:
        raise ValueError(f"envelope version {envelope.get('v')!r}; this decoder reads {VERSION}")
    return envelope["topic"], envelope["messages"]


def main():
    import paho.mqtt.client as mqtt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--topic", default="edgetwin/+/dt/+/telemetry/#")
    ap.add_argument("--client-id", default="edgetwin-batches")
    ap.add_argument("--count", type=int, default=0, help="exit after this many messages (0: never)")
    ap.add_argument("--ready", action="store_true", help="print READY once subscribed (for scripts)")
    args = ap.parse_args()

    seen = {"messages": 0, "batches": 0}

    def emit(topic, batch, message):
        print(json.dumps({"topic": topic, "batch": batch, "message": message}), flush=True)
        seen["messages"] += 1
        if args.count and seen["messages"] >= args.count:
            client.disconnect()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        if args.ready:
            print("READY", flush=True)

    def on_message(client, userdata, msg):
        if msg.topic.endswith("/batch"):
            try:
                topic, messages = decode(msg.payload)
            except (ValueError, zstandard.ZstdError) as e:
                print(f"{msg.topic}: not a batch envelope: {e}", file=sys.stderr, flush=True)
                return
            n = seen["batches"]
            seen["batches"] += 1
            for m in messages:
                emit(msg.topic[: -len("/batch")], n, m)
        else:
            emit(msg.topic, None, json.loads(msg.payload))

    # A persistent session: what arrives while this consumer is away waits for it.
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port)
    client.loop_forever()


if __name__ == "__main__":
    main()
