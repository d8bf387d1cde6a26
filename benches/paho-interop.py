#!/usr/bin/env python3
"""The Eclipse Paho MQTT interoperability suite (eclipse/paho.mqtt.testing), unmodified, against
Mosquitto and the node (its front door, mqtt.listen, serving both versions) in one run.

    cargo build --release -p edgetwin-node
    benches/paho-interop.py PATH/TO/paho.mqtt.testing/interoperability [--timeout 30]

Each test runs in its own process with a timeout, so one hang does not hide the rest. Prints a
table of every test per target and whether the node's passing set contains Mosquitto's (exit 1
if not). Needs mosquitto and python3; everything listens on 127.0.0.1 on free ports.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = os.environ.get("EDGETWIN", os.path.join(HERE, "..", "target", "release", "edgetwin"))

RUNNER = r"""
import logging, sys, unittest
sys.path.insert(0, {dir!r})
import {module} as m
m.host = "127.0.0.1"
m.port = {port}
prefix = "client_test5/" if {module!r} == "client_test5" else ""
m.topic_prefix = prefix
m.topics = [prefix + t for t in ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")]
m.wildtopics = [prefix + t for t in ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")]
m.nosubscribe_topics = ("test/nosubscribe",)
logging.getLogger().setLevel(logging.CRITICAL)
r = unittest.main(module=m, argv=["x", "Test." + {name!r}], exit=False, verbosity=0)
sys.exit(0 if r.result.wasSuccessful() else 1)
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_tcp(port, proc, within=15.0):
    end = time.time() + within
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def tests_of(path):
    names = []
    for line in open(path, encoding="utf-8"):
        s = line.strip()
        if s.startswith("def test") and "(self" in s:
            names.append(s[4:s.index("(")])
    return names


def run(suite, module, name, port, timeout, show):
    code = RUNNER.format(dir=suite, module=module, port=port, name=name)
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=suite, timeout=timeout,
                           capture_output=True, text=True)
        if r.returncode != 0 and show:
            print(f"--- {module}.{name} on port {port}:\n{r.stdout}{r.stderr}", file=sys.stderr)
        return "pass" if r.returncode == 0 else "FAIL"
    except subprocess.TimeoutExpired:
        return "hang"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("suite", help="the suite's interoperability/ folder")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--only", default="", help="comma separated test names (default: all)")
    ap.add_argument("--show", action="store_true", help="print the output of every failing test")
    a = ap.parse_args()
    suite = os.path.abspath(a.suite)
    tmp = tempfile.mkdtemp(prefix="paho-interop-")
    procs = []
    try:
        mq = free_port()
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {mq} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        mosq = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(mosq)
        wait_tcp(mq, mosq)

        port, http = free_port(), free_port()
        node_conf = os.path.join(tmp, "node.yaml")
        with open(node_conf, "w") as f:
            f.write(f"data_dir: {tmp}/data\ndevices_dir: {tmp}/devices\n"
                    f"mqtt: {{listen: 127.0.0.1:{port}, listen_v5: null}}\n"
                    f"http: {{listen: 127.0.0.1:{http}}}\n")
        log = open(os.path.join(tmp, "node.log"), "w")
        node = subprocess.Popen([NODE, "serve", "--config", node_conf], stdout=log, stderr=log)
        procs.append(node)
        end = time.time() + 30
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.time() > end or node.poll() is not None:
                raise SystemExit("the node did not turn ready")
            time.sleep(0.1)

        rows = []
        for module in ("client_test", "client_test5"):
            targets = [("mosquitto", mq), ("node", port)]
            only = [n for n in a.only.split(",") if n]
            for name in tests_of(os.path.join(suite, module + ".py")):
                if only and name not in only:
                    continue
                rows.append((module, name, [run(suite, module, name, p, a.timeout, a.show)
                                            for _, p in targets]))
                print(f"  {module}.{name}: {rows[-1][2]}", file=sys.stderr, flush=True)

        print("| suite | test | mosquitto | node |")
        print("|---|---|---|---|")
        for module, name, res in rows:
            print(f"| {'3.1.1' if module == 'client_test' else '5'} | {name} | " + " | ".join(res) + " |")
        ok = True
        for i, label in ((1, "node"),):
            for v in ("client_test", "client_test5"):
                sel = [r for r in rows if r[0] == v]
                passed = sum(r[2][i] == "pass" for r in sel)
                mosq_passed = sum(r[2][0] == "pass" for r in sel)
                print(f"{label}, {'3.1.1' if v == 'client_test' else '5'}: {passed}/{len(sel)} "
                      f"(mosquitto {mosq_passed}/{len(sel)})")
        missing = [f"{m}.{n}" for m, n, r in rows if r[0] == "pass" and r[1] != "pass"]
        if missing:
            ok = False
            print("passed by mosquitto but not by the node: " + ", ".join(missing))
        else:
            print("the node passes every test mosquitto passes")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
