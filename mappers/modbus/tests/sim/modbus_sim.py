#!/usr/bin/env python3
"""Modbus device simulator for the edgetwin Modbus mapper tests (pymodbus 3.16.1).

    modbus_sim.py tcp PORT           Modbus TCP server on 127.0.0.1:PORT
    modbus_sim.py rtu /dev/pts/N     Modbus RTU server on a serial port (one end of a socat pty pair)
    modbus_sim.py tcp PORT --ticking every read of holding registers 100-199 first adds 1 to
                                     the registers it reads, so every reading is a new value
                                     (for the benchmark)

Serves unit ids 1 and 2 with the register map below (on RTU other unit ids get no answer). Every register value is packed here with
Python's struct module, independently of the mapper's Rust codec. Addresses that are not listed
are invalid: reading them draws the IllegalAddress exception (0x02).

Holding registers (and, from address 100, input registers too):
    0-1   float32 230.5           ABCD (big endian)
    2-3   float32 230.5           CDAB (isRegisterSwap)
    4-5   float32 230.5           BADC (isSwap)
    6-7   float32 230.5           DCBA (both)
    8     int16   -1234
    9     uint16  54321
    10-11 int32   -123456789      ABCD
    12-13 uint32  3000000000      CDAB
    14-17 int64   -1234567890123  ABCD
    18-21 uint64  12345678901234  DCBA
    22-25 float64 -3.25e10        ABCD
    26-29 string  "EDGE-1"        (NUL padded)
    30    uint16  215             (setpoint: scale 0.1 -> 21.5)
    31    uint16  0x0104          (bool with mask 0x0004 -> true; mask 0x0002 -> false)
    32    int16   -400            (scale 0.1, valueOffset 10 -> -30.0)
    33    uint16  unit id * 111   (tells the units apart)
    34-47 uint16  0               (writable scratch)
    48    uint16  0               (a limit the device clamps: takes any write, reads back at
                                   most 100, as a device that limits its own setpoint)
    49    uint16  0               (writable scratch)
    50-99 invalid
    100-199 uint16 = address      (many small properties, for coalescing and the benchmark)
Input registers: 0-1 float32 21.75 (the testkit thermostat's temperature), 100-199 as above.
Coils 0-15: 1,0,1,1, then 0. Discrete inputs 0-15: 0,1, then 0.

Every write is printed on stdout as one JSON line:
    {"unit": 1, "fc": 6, "address": 30, "values": [250]}
and "READY" is printed once the server is about to serve.
"""

import asyncio
import json
import struct
import sys

from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def words(fmt, value, word_swap=False, byte_swap=False):
    raw = struct.pack(">" + fmt, value)
    ws = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if byte_swap:
        ws = [w[::-1] for w in ws]
    if word_swap:
        ws.reverse()
    return [int.from_bytes(w, "big") for w in ws]


def holding(unit):
    regs = []
    regs += words("f", 230.5)
    regs += words("f", 230.5, word_swap=True)
    regs += words("f", 230.5, byte_swap=True)
    regs += words("f", 230.5, word_swap=True, byte_swap=True)
    regs += words("h", -1234)
    regs += words("H", 54321)
    regs += words("i", -123456789)
    regs += words("I", 3000000000, word_swap=True)
    regs += words("q", -1234567890123)
    regs += words("Q", 12345678901234, word_swap=True, byte_swap=True)
    regs += words("d", -3.25e10)
    text = b"EDGE-1".ljust(8, b"\0")
    regs += [int.from_bytes(text[i : i + 2], "big") for i in range(0, 8, 2)]
    regs += [215, 0x0104]
    regs += words("h", -400)
    regs += [unit * 111]
    regs += [0] * 16
    assert len(regs) == 50, len(regs)
    return regs


def device(unit, action):
    many = SimData(100, values=list(range(100, 200)), datatype=DataType.REGISTERS)
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[True, False, True, True] + [False] * 12, datatype=DataType.BITS)],
            [SimData(0, values=[False, True] + [False] * 14, datatype=DataType.BITS)],
            [SimData(0, values=holding(unit), datatype=DataType.REGISTERS), many],
            [
                SimData(0, values=words("f", 21.75), datatype=DataType.REGISTERS),
                SimData(100, values=list(range(100, 200)), datatype=DataType.REGISTERS),
            ],
        ),
        action=action,
    )


TICKING = "--ticking" in sys.argv
CLAMPED, CLAMP_MAX = 48, 100


def make_action(unit):
    async def action(function_code, start_address, address, count, current_registers, set_values):
        if TICKING and set_values is None and function_code == 3 and address >= 100:
            for i in range(address - start_address, address - start_address + count):
                current_registers[i] = (current_registers[i] + 1) & 0xFFFF
        if set_values is None and function_code == 3 and address <= CLAMPED < address + count:
            i = CLAMPED - start_address
            if 0 <= i < len(current_registers):
                current_registers[i] = min(current_registers[i], CLAMP_MAX)
        if set_values is not None:
            print(
                json.dumps(
                    {
                        "unit": unit,
                        "fc": function_code,
                        "address": address,
                        "values": [int(v) for v in set_values],
                    }
                ),
                flush=True,
            )
        return None

    return action


UNITS = (1, 2)


def silence_unknown_units():
    """On RTU a unit id nobody serves stays silent, as on a real RS-485 bus (pymodbus's
    SimDevice path answers 0x04 even with ignore_missing_devices)."""
    from pymodbus.server.requesthandler import ServerRequestHandler

    original = ServerRequestHandler.handle_request

    async def handle_request(self):
        if self.last_pdu is not None and self.last_pdu.dev_id not in UNITS:
            return
        await original(self)

    ServerRequestHandler.handle_request = handle_request


async def main():
    args = [a for a in sys.argv[1:] if a != "--ticking"]
    if len(args) != 2 or args[0] not in ("tcp", "rtu"):
        sys.exit(__doc__)
    if args[0] == "rtu":
        try:
            import serial  # noqa: F401  (pymodbus needs pyserial for RTU)
        except ImportError:
            sys.exit("No module named 'serial': pyserial is not installed; run ./test.sh")
    devices = [device(u, make_action(u)) for u in UNITS]
    print("READY", flush=True)
    if args[0] == "tcp":
        await StartAsyncTcpServer(devices, address=("127.0.0.1", int(args[1])))
    else:
        silence_unknown_units()
        await StartAsyncSerialServer(devices, port=args[1], baudrate=115200)


if __name__ == "__main__":
    asyncio.run(main())
