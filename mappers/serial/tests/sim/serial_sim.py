#!/usr/bin/env python3
"""Scripted ASCII serial device for the edgetwin serial mapper tests (pyserial).

    serial_sim.py /dev/pts/N

Plays the CO2 analyser of examples/profiles/serial-sensor.yaml on one end of a socat pty pair.
Lines it receives end with "\\n" (a "\\r" before it is dropped); lines it sends end with "\\r\\n".

    READ CO2        -> CO2=0412ppm
    READ T          -> T=21.5C          (or a garbled line, see `garble` below)
    GET SETPOINT    -> SETPOINT=<n>     (1000 at start)
    SETPOINT <n>    -> OK               (and the setpoint becomes n)
    anything else   -> ERR
    every 250 ms    -> ALARM=<0|1>      (unsolicited; 0 at start)

Commands on stdin, one per line:

    garble N        the next N replies to READ T are "T=#?!C" (no match for the pattern)
    alarm V         unsolicited ALARM lines say V from now on
    send TEXT       sends TEXT + "\\r\\n" once
    mute            stop answering requests (unsolicited lines go on)
    unmute          answer again
    quiet           stop sending unsolicited lines (a device gone silent)
    loud            send them again

Every line received is printed on stdout as one JSON line {"rx": "..."}; "READY" is printed once
the port is open.
"""

import json
import sys
import threading
import time

import serial

port = serial.Serial(sys.argv[1], 9600, timeout=0.05)
lock = threading.Lock()
state = {"setpoint": 1000, "alarm": 0, "garble": 0, "mute": False, "quiet": False}


def send(text):
    with lock:
        port.write((text + "\r\n").encode())
        port.flush()


def answer(line):
    if state["mute"]:
        return None
    if line == "READ CO2":
        return "CO2=0412ppm"
    if line == "READ T":
        if state["garble"] > 0:
            state["garble"] -= 1
            return "T=#?!C"
        return "T=21.5C"
    if line == "GET SETPOINT":
        return "SETPOINT=%d" % state["setpoint"]
    if line.startswith("SETPOINT "):
        try:
            state["setpoint"] = int(line.split(" ", 1)[1])
            return "OK"
        except ValueError:
            return "ERR"
    return "ERR"


def control():
    for cmd in sys.stdin:
        cmd = cmd.rstrip("\n")
        word, _, arg = cmd.partition(" ")
        if word == "garble":
            state["garble"] = int(arg)
        elif word == "alarm":
            state["alarm"] = int(arg)
        elif word == "send":
            send(arg)
        elif word == "mute":
            state["mute"] = True
        elif word == "unmute":
            state["mute"] = False
        elif word == "quiet":
            state["quiet"] = True
        elif word == "loud":
            state["quiet"] = False


def unsolicited():
    while True:
        if not state["quiet"]:
            send("ALARM=%d" % state["alarm"])
        time.sleep(0.25)


threading.Thread(target=control, daemon=True).start()
threading.Thread(target=unsolicited, daemon=True).start()
print("READY", flush=True)
buf = b""
while True:
    buf += port.read(256)
    while b"\n" in buf:
        raw, buf = buf.split(b"\n", 1)
        line = raw.decode("utf-8", "replace").rstrip("\r")
        print(json.dumps({"rx": line}), flush=True)
        reply = answer(line)
        if reply is not None:
            send(reply)
