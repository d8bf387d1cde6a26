#!/usr/bin/env python3
"""MQTT behaviours the spec is clear about, as a third-party paho-mqtt client sees them.

    conformance.py --port P SCENARIO

Runs one scenario against the broker on 127.0.0.1:P and prints one JSON object with what it
observed; the caller asserts on it (so the same scenario can be pointed at Mosquitto to check
the scenario itself). Topics carry a random prefix, so runs do not meet.
"""
import argparse
import json
import queue
import random
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

PORT = 0
ARGS = {}
PREFIX = "cf%06d/" % random.randrange(10**6)


class Client:
    """A paho client with its deliveries in a queue and its acks waited for."""

    def __init__(self, cid, v5=True, clean=True, expiry=None, receive_max=None):
        self.v5 = v5
        self.msgs = queue.Queue()
        self.subacks = queue.Queue()
        self.connacks = queue.Queue()
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, **kw)
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_subscribe = lambda c, u, mid, rc, p: self.subacks.put(rc)
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put((f.session_present, rc))
        self.clean, self.expiry, self.receive_max = clean, expiry, receive_max

    def connect(self):
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.expiry is not None:
                props.SessionExpiryInterval = self.expiry
            if self.receive_max is not None:
                props.ReceiveMaximum = self.receive_max
            self.c.connect("127.0.0.1", PORT, keepalive=30, clean_start=self.clean, properties=props)
        else:
            self.c.connect("127.0.0.1", PORT, keepalive=30)
        self.c.loop_start()
        present, rc = self.connacks.get(timeout=10)
        return bool(present)

    def sub(self, topic, qos=2, **opts):
        if self.v5:
            self.c.subscribe(PREFIX + topic, options=SubscribeOptions(qos=qos, **opts))
        else:
            self.c.subscribe(PREFIX + topic, qos)
        self.subacks.get(timeout=10)

    def pub(self, topic, payload, qos, retain=False, props=None):
        info = self.c.publish(PREFIX + topic, payload, qos, retain, properties=props)
        if qos > 0:
            info.wait_for_publish(timeout=10)

    def take(self, n, within=5.0):
        """Up to n deliveries, waiting at most `within` seconds for them."""
        got, end = [], time.time() + within
        while len(got) < n:
            left = end - time.time()
            if left <= 0:
                break
            try:
                got.append(self.msgs.get(timeout=left))
            except queue.Empty:
                break
        return got

    def quiet(self, within=1.0):
        """Deliveries that arrive within `within` seconds (expected: none)."""
        return self.take(10**9, within)

    def close(self, expiry=None):
        props = None
        if self.v5 and expiry is not None:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = expiry
        self.c.disconnect(properties=props)
        self.c.loop_stop()


def away(cid, topic, qos, sub=None, **client):
    """A session of `cid` (made with `client`'s options) subscribed to `topic` at `qos` (with
    the options `sub`), then disconnected: away, its session kept if the options say so."""
    c = Client(cid, **client)
    c.connect()
    c.sub(topic, qos, **(sub or {}))
    c.close()


def user_props(m):
    p = getattr(m, "properties", None)
    return [list(kv) for kv in getattr(p, "UserProperty", [])] if p else []


def delivery_qos():
    """A QoS 2 subscription gets each message at the publisher's QoS (v5 and 3.1.1, both ways)."""
    out = {}
    for sub_v5, pub_v5 in ((True, True), (False, False), (True, False), (False, True)):
        s = Client("cf-s%d%d" % (sub_v5, pub_v5), v5=sub_v5)
        s.connect()
        s.sub("q", 2)
        p = Client("cf-p%d%d" % (sub_v5, pub_v5), v5=pub_v5)
        p.connect()
        for q in (0, 1, 2):
            p.pub("q", b"%d" % q, q)
        got = s.take(3)
        out["sub%s-pub%s" % ("5" if sub_v5 else "4", "5" if pub_v5 else "4")] = sorted(
            [int(m.payload), m.qos] for m in got)
        p.close()
        s.close()
    return out


def downgraded_flows_complete(n=300):
    """Many messages published at QoS 0 and 1 to a QoS 2 subscriber all arrive: the gate closes
    the broker's QoS 2 exchanges it did not forward as such, so the broker's window never fills."""
    s = Client("cf-dg-s")
    s.connect()
    s.sub("dg", 2)
    p = Client("cf-dg-p")
    p.connect()
    for i in range(n):
        p.pub("dg", b"%d" % i, i % 2)
    got = s.take(n, within=20)
    p.close()
    s.close()
    return {"sent": n, "received": len(got), "qos": sorted({m.qos for m in got})}


def no_local():
    a, b = Client("cf-nl-a"), Client("cf-nl-b")
    a.connect()
    b.connect()
    a.sub("nl", 1, noLocal=True)
    b.sub("nl", 1, noLocal=True)
    a.pub("nl", b"from a", 1)
    got_b = b.take(1)
    got_a = a.quiet(1.0)
    a.close()
    b.close()
    return {"a": len(got_a), "b": len(got_b)}


def retain_flags():
    a = Client("cf-rf")
    a.connect()
    a.sub("rap", 1, retainAsPublished=True)
    a.sub("norap", 1)
    a.pub("rap", b"live", 1, retain=False)
    a.pub("rap", b"kept", 1, retain=True)
    a.pub("norap", b"kept", 1, retain=True)
    got = a.take(3)
    a.pub("rap", b"", 1, retain=True)
    a.pub("norap", b"", 1, retain=True)
    a.close()
    return {"flags": sorted([m.topic[len(PREFIX):], m.payload.decode(), bool(m.retain)] for m in got)}


def retain_handling():
    a = Client("cf-rh")
    a.connect()
    a.pub("rh/x", b"kept", 1, retain=True)
    out = {}
    a.sub("rh/+", 1, retainHandling=2)
    out["rh2"] = len(a.quiet(1.0))
    a.c.unsubscribe(PREFIX + "rh/+")
    time.sleep(0.3)
    a.sub("rh/+", 1, retainHandling=1)
    out["rh1_new"] = len(a.take(1, 3.0))
    a.sub("rh/+", 1, retainHandling=1)
    out["rh1_again"] = len(a.quiet(1.0))
    # Retain Handling 0 on a filter already subscribed: the retained message again.
    a.sub("rh/+", 2, retainHandling=0)
    again = a.take(1, 3.0)
    out["rh0_again"] = [[m.payload.decode(), bool(m.retain), m.qos] for m in again]
    a.pub("rh/x", b"", 1, retain=True)
    a.close()
    return out


def many_retained(n=150):
    """More retained messages than rumqttd's in-flight window (100), to a QoS 1 wildcard
    subscription: all of them arrive, each at its own QoS."""
    a = Client("cf-mr")
    a.connect()
    for i in range(n):
        a.pub("mr/%d" % i, b"v", 1, retain=True)
    b = Client("cf-mr-sub")
    b.connect()
    b.sub("mr/+", 1)
    got = b.take(n, 10.0)
    extra = b.quiet(0.5)
    b.close()
    for i in range(n):
        a.pub("mr/%d" % i, b"", 1, retain=True)
    a.close()
    return {"got": len({m.topic for m in got}), "copies": len(got) + len(extra),
            "retain": sorted({bool(m.retain) for m in got}), "qos": sorted({m.qos for m in got})}


def properties_pass_through():
    a = Client("cf-pp")
    a.connect()
    a.sub("pp", 2)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("a", "2")
    props.UserProperty = ("$edgetwin", "2199")  # a forgery of the gate's internal property
    props.PayloadFormatIndicator = 1
    props.ContentType = "text/plain"
    props.ResponseTopic = PREFIX + "reply"
    props.CorrelationData = b"\x01\x02"
    a.pub("pp", b"hello", 1, props=props)
    got = a.take(1)
    a.close()
    m = got[0]
    p = m.properties
    return {
        "user": user_props(m),
        "format": getattr(p, "PayloadFormatIndicator", None),
        "content_type": getattr(p, "ContentType", None),
        "response_topic": getattr(p, "ResponseTopic", "")[len(PREFIX):],
        "correlation": list(getattr(p, "CorrelationData", b"")),
        "qos": m.qos,
    }


def session_expiry():
    out = {}
    a = Client("cf-se", clean=True, expiry=2)
    out["first"] = a.connect()
    a.sub("se", 1)
    a.close()
    p = Client("cf-se-p")
    p.connect()
    p.pub("se", b"while away", 1)
    a = Client("cf-se", clean=False, expiry=2)
    out["resumed"] = a.connect()
    out["queued"] = [m.payload.decode() for m in a.take(1)]
    a.close()
    time.sleep(3.5)
    p.pub("se", b"after expiry", 1)
    a = Client("cf-se", clean=False, expiry=2)
    out["after_expiry"] = a.connect()
    out["after_expiry_msgs"] = len(a.quiet(1.0))
    # Expiry 0 at DISCONNECT ends a kept session at once.
    a.close(expiry=0)
    a = Client("cf-se", clean=False, expiry=60)
    out["after_disconnect_0"] = a.connect()
    a.close(expiry=0)
    # clean_start with an expiry: a fresh session, kept afterwards.
    away("cf-se", "se", 1, clean=True, expiry=60)
    a = Client("cf-se", clean=True, expiry=60)
    out["clean_start_present"] = a.connect()
    a.close(expiry=0)
    p.close()
    return out


def message_expiry():
    away("cf-me", "me", 1, clean=True, expiry=60)
    p = Client("cf-me-p")
    p.connect()
    for secs, text in ((1, "short"), (30, "long")):
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = secs
        p.pub("me", text.encode(), 1, props=props)
    time.sleep(2.5)
    a = Client("cf-me", clean=False, expiry=60)
    a.connect()
    got = a.take(2, 3.0)
    a.close(expiry=0)
    p.close()
    return {"got": [[m.payload.decode(), getattr(m.properties, "MessageExpiryInterval", None)]
                    for m in got]}


def v4_persistent_session():
    away("cf-v4ps", "ps", 1, v5=False, clean=False)
    p = Client("cf-v4ps-p", v5=False)
    p.connect()
    p.pub("ps", b"queued", 1)
    a = Client("cf-v4ps", v5=False, clean=False)
    present = a.connect()
    got = a.take(1)
    a.close()
    # And a clean session ends it.
    a = Client("cf-v4ps", v5=False, clean=True)
    a.connect()
    a.close()
    a = Client("cf-v4ps", v5=False, clean=False)
    present_after_clean = a.connect()
    a.close()
    a = Client("cf-v4ps", v5=False, clean=True)
    a.connect()
    a.close()
    p.close()
    return {"present": present, "queued": [m.payload.decode() for m in got],
            "present_after_clean": present_after_clean}


def persist_setup():
    """Kept sessions of both versions, and one that will have expired, before a node restart."""
    away("cf-keep4", "keep4", 1, v5=False, clean=False)
    away("cf-keep5", "keep5", 1, sub={"noLocal": True}, clean=True, expiry=300)
    away("cf-short", "short", 1, clean=True, expiry=1)
    # Queued while they are away, before the restart (QoS 0 is not queued).
    p = Client("cf-keep-p0")
    p.connect()
    p.pub("keep4", b"before restart keep4", 1)
    p.pub("keep4", b"qos0 not queued", 0)
    p.pub("keep5", b"before restart keep5", 2)
    p.close()
    return {}


def persist_check():
    """After the restart: publish, then resume each session."""
    p = Client("cf-keep-p")
    p.connect()
    for t in ("keep4", "keep5", "short"):
        p.pub(t, ("after restart " + t).encode(), 1)
    out = {}
    a = Client("cf-keep4", v5=False, clean=False)
    out["v4_present"] = a.connect()
    out["v4_msgs"] = [m.payload.decode() for m in a.take(2) + a.quiet(0.5)]
    a.close()
    b = Client("cf-keep5", clean=False, expiry=300)
    out["v5_present"] = b.connect()
    got = b.take(2) + b.quiet(0.5)
    out["v5_msgs"] = [m.payload.decode() for m in got]
    out["v5_qos"] = [m.qos for m in got]
    # Its No Local option came back with it: its own publish is not sent to it.
    b.pub("keep5", b"own", 1)
    out["v5_own"] = len(b.quiet(1.0))
    b.close(expiry=0)
    time.sleep(1.2)
    c = Client("cf-short", clean=False, expiry=1)
    out["short_present"] = c.connect()
    c.close(expiry=0)
    a = Client("cf-keep4", v5=False, clean=True)
    a.connect()
    a.close()
    p.close()
    return out


def busy_subscribe():
    """A QoS 1 wildcard subscription made while a publisher keeps its filter busy is served
    while the publisher goes on: more than the broker's in-flight window (100) of messages
    arrive before the publisher stops (it stops after 4 s, or once 150 arrived)."""
    running = threading.Event()
    running.set()
    enough = threading.Event()
    p = Client("cf-busy-p")
    p.connect()

    def publish():
        end = time.time() + 4.0
        i = 0
        while time.time() < end and not enough.is_set():
            p.pub("busy/x", b"%d" % i, 1)
            i += 1
            time.sleep(0.002)
        running.clear()

    t = threading.Thread(target=publish)
    t.start()
    time.sleep(0.3)
    s = Client("cf-busy-s")
    s.connect()
    s.sub("busy/#", 1)
    got = 0
    while running.is_set() and got < 150:
        got += len(s.take(1, within=0.2))
    during = got >= 150 and running.is_set()
    enough.set()
    t.join()
    s.close()
    p.close()
    return {"served_while_busy": during}


def kept_setup():
    """A 3.1.1 kept session subscribed to `queued` at QoS 1, then away (for the crash loop)."""
    away("cf-crash-kept", "queued", 1, v5=False, clean=False)
    return {}


def kept_check():
    """The kept session comes back: what was queued for it (expected: `n` messages)."""
    n = int(ARGS.get("n", 1))
    c = Client("cf-crash-kept", v5=False, clean=False)
    present = c.connect()
    got = c.take(n, within=10) + c.quiet(0.5)
    c.close()
    return {"present": present, "got": [m.payload.decode() for m in got]}


def queue_setup():
    """A kept session of each version goes away; messages are published for it at QoS 1 and 2,
    interleaved, and some at QoS 0."""
    n = int(ARGS.get("n", 100))
    for cid, v5 in (("cf-q4", False), ("cf-q5", True)):
        away(cid, "q/" + cid, 2, v5=v5, clean=v5, expiry=3600 if v5 else None)
    p = Client("cf-q-p")
    p.connect()
    for i in range(n):
        for cid in ("cf-q4", "cf-q5"):
            p.pub("q/" + cid, b"%d" % i, 1 + i % 2)
            p.pub("q/" + cid, b"qos0", 0)
    p.close()
    return {}


def queue_check():
    """Each session comes back: its queue, in order, once, at the publish QoS; then nothing."""
    n = int(ARGS.get("n", 100))
    out = {}
    for cid, v5 in (("cf-q4", False), ("cf-q5", True)):
        c = Client(cid, v5=v5, clean=False, expiry=3600 if v5 else None)
        present = c.connect()
        everything = c.take(n, within=10) + c.quiet(0.5)
        # QoS 0 messages for an absent client may be queued or not (the spec leaves it open).
        got = [m for m in everything if m.payload != b"qos0"]
        seen = [int(m.payload) for m in got]
        # In order within each QoS (paho hands a QoS 2 message over at PUBREL, so the two
        # interleave differently than they were sent).
        by_qos = [[int(m.payload) for m in got if m.qos == q] for q in (1, 2)]
        out[cid] = {"present": present, "count": len(got),
                    "once": sorted(seen) == list(range(n)),
                    "in_order": all(s == sorted(s) for s in by_qos),
                    "qos": sorted({m.qos for m in got}),
                    "qos0": len(everything) - len(got)}
        c.close(expiry=0)
        if not v5:
            c = Client(cid, v5=False, clean=True)
            c.connect()
            c.close()
    return out


SCENARIOS = {f.__name__: f for f in (kept_setup, kept_check, busy_subscribe, queue_setup, queue_check, many_retained, persist_setup, persist_check, delivery_qos, downgraded_flows_complete, no_local, retain_flags,
                                     retain_handling, properties_pass_through, session_expiry,
                                     message_expiry, v4_persistent_session)}


def main():
    global PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", help="topic prefix (default: random), to meet an earlier run")
    ap.add_argument("--arg", action="append", default=[], help="key=value for the scenario")
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    a = ap.parse_args()
    ARGS.update(kv.split("=", 1) for kv in a.arg)
    PORT = a.port
    if a.prefix:
        global PREFIX
        PREFIX = a.prefix
    print(json.dumps(SCENARIOS[a.scenario]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
