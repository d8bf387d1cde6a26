#!/usr/bin/env python3
"""OPC UA server simulator for the edgetwin OPC UA mapper tests (asyncua 2.1.0).

    opcua_sim.py serve PORT [--secure DIR] [--user NAME:PASSWORD]
        OPC UA server on opc.tcp://127.0.0.1:PORT. Without --secure it offers only
        None/None. With --secure it also offers Basic256Sha256 Sign and SignAndEncrypt, with a
        server certificate kept in DIR (made on first use). With --user only that user (and no
        anonymous session) is accepted; wrong passwords draw BadUserAccessDenied.
    opcua_sim.py client-cert DIR
        Writes a self-signed client certificate DIR/client-cert.der and key DIR/client-key.pem
        with the mapper's application URI (urn:edgetwin:mapper-opcua), then exits.

Namespace 2 (urn:edgetwin:sim), object "Sim":
    ns=2;s=Bool     Boolean  true
    ns=2;s=Int16    Int16    -1234
    ns=2;s=Int32    Int32    -123456
    ns=2;s=Int64    Int64    -1234567890123
    ns=2;s=UInt16   UInt16   54321
    ns=2;s=UInt32   UInt32   3000000000
    ns=2;s=UInt64   UInt64   12345678901234
    ns=2;s=Float    Float    21.5
    ns=2;s=Double   Double   -3.25e10
    ns=2;s=String   String   "EDGE-1"
    ns=2;i=5        Int32    42              (numeric node id)
    ns=2;s=Counter  UInt32   +1 every 200 ms (changes over time)
    ns=2;s=Setpoint Double   21.5            writable
    ns=2;s=W.<T>    writable copies of each type above (T = Bool, Int16, ..., String)
Namespace 3 (urn:edgetwin:plc): exactly the node ids of examples/profiles/opcua-plc.yaml:
    ns=3;s="Tank1"."Level"        Double  starts at 40.0, +0.5 every 250 ms, wraps at 90
    ns=3;s="Tank1"."Temperature"  Float   18.5
    ns=3;s="Pump1"."Run"          Boolean false   writable
    ns=3;s="Pump1"."Speed"        UInt16  1200    writable
    ns=3;i=1001                   UInt32  7       (batch count)
    ns=3;s="Recipe"."Name"        String  "PILS"  writable

Every successful write is printed on stdout as one JSON line:
    {"write": "ns=2;s=Setpoint", "type": "Double", "value": 25.5}
and "READY" is printed once the server serves.
"""

import asyncio
import json
import sys
from pathlib import Path

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.server.user_managers import UserManager
from asyncua.crypto.permission_rules import User, UserRole
from cryptography.x509.oid import ExtendedKeyUsageOID

MAPPER_URI = "urn:edgetwin:mapper-opcua"

TYPED = [
    ("Bool", True, ua.VariantType.Boolean),
    ("Int16", -1234, ua.VariantType.Int16),
    ("Int32", -123456, ua.VariantType.Int32),
    ("Int64", -1234567890123, ua.VariantType.Int64),
    ("UInt16", 54321, ua.VariantType.UInt16),
    ("UInt32", 3000000000, ua.VariantType.UInt32),
    ("UInt64", 12345678901234, ua.VariantType.UInt64),
    ("Float", 21.5, ua.VariantType.Float),
    ("Double", -3.25e10, ua.VariantType.Double),
    ("String", "EDGE-1", ua.VariantType.String),
]


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name = name
        self.password = password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User)
        return None


async def on_write(event, _dispatcher):
    if not event.is_external:
        return
    results = event.response_params or []
    for wv, status in zip(event.request_params.NodesToWrite, results):
        if not status.is_good() or wv.NodeId.NamespaceIndex < 2:
            continue
        v = wv.Value.Value
        print(json.dumps({"write": wv.NodeId.to_string(), "type": v.VariantType.name, "value": v.Value}, default=str), flush=True)


async def serve(port, secure_dir, user):
    server = Server(user_manager=OneUser(*user.split(":", 1)) if user else None)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_server_name("edgetwin OPC UA simulator")
    policies = [ua.SecurityPolicyType.NoSecurity]
    if secure_dir:
        d = Path(secure_dir)
        d.mkdir(parents=True, exist_ok=True)
        await server.set_application_uri("urn:edgetwin:opcua-sim")
        await setup_self_signed_certificate(
            d / "server-key.pem",
            d / "server-cert.der",
            "urn:edgetwin:opcua-sim",
            "127.0.0.1",  # the host name clients check: the tests connect to 127.0.0.1
            [ExtendedKeyUsageOID.SERVER_AUTH],
            {"countryName": "DE", "organizationName": "edgetwin tests"},
        )
        await server.load_certificate(str(d / "server-cert.der"))
        await server.load_private_key(str(d / "server-key.pem"))
        policies += [
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        ]
    server.set_security_policy(policies)
    if user:
        server.set_identity_tokens([ua.UserNameIdentityToken])

    ns2 = await server.register_namespace("urn:edgetwin:sim")
    ns3 = await server.register_namespace("urn:edgetwin:plc")
    assert (ns2, ns3) == (2, 3), (ns2, ns3)
    objects = server.nodes.objects
    sim = await objects.add_object(ua.NodeId("Sim", ns2), "Sim")
    for name, value, vt in TYPED:
        await sim.add_variable(ua.NodeId(name, ns2), name, ua.Variant(value, vt))
        w = await sim.add_variable(ua.NodeId("W." + name, ns2), "W." + name, ua.Variant(value, vt))
        await w.set_writable()
    await sim.add_variable(ua.NodeId(5, ns2), "Numeric", ua.Variant(42, ua.VariantType.Int32))
    counter = await sim.add_variable(ua.NodeId("Counter", ns2), "Counter", ua.Variant(0, ua.VariantType.UInt32))
    setpoint = await sim.add_variable(ua.NodeId("Setpoint", ns2), "Setpoint", ua.Variant(21.5, ua.VariantType.Double))
    await setpoint.set_writable()

    plc = await objects.add_object(ua.NodeId("PLC", ns3), "PLC")
    level = await plc.add_variable(ua.NodeId('"Tank1"."Level"', ns3), "Level", ua.Variant(40.0, ua.VariantType.Double))
    await plc.add_variable(ua.NodeId('"Tank1"."Temperature"', ns3), "Temperature", ua.Variant(18.5, ua.VariantType.Float))
    run = await plc.add_variable(ua.NodeId('"Pump1"."Run"', ns3), "Run", ua.Variant(False, ua.VariantType.Boolean))
    speed = await plc.add_variable(ua.NodeId('"Pump1"."Speed"', ns3), "Speed", ua.Variant(1200, ua.VariantType.UInt16))
    await plc.add_variable(ua.NodeId(1001, ns3), "BatchCount", ua.Variant(7, ua.VariantType.UInt32))
    recipe = await plc.add_variable(ua.NodeId('"Recipe"."Name"', ns3), "Name", ua.Variant("PILS", ua.VariantType.String))
    for n in (run, speed, recipe):
        await n.set_writable()

    server.subscribe_server_callback(CallbackType.PostWrite, on_write)
    async with server:
        print("READY", flush=True)
        n = 0
        lvl = 40.0
        while True:
            await asyncio.sleep(0.05)
            n += 1
            if n % 4 == 0:
                await counter.write_value(ua.Variant(n // 4, ua.VariantType.UInt32))
            if n % 5 == 0:
                lvl = 40.0 if lvl >= 90.0 else lvl + 0.5
                await level.write_value(ua.Variant(lvl, ua.VariantType.Double))


async def client_cert(dir_):
    d = Path(dir_)
    d.mkdir(parents=True, exist_ok=True)
    await setup_self_signed_certificate(
        d / "client-key.pem",
        d / "client-cert.der",
        MAPPER_URI,
        "localhost",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"countryName": "DE", "organizationName": "edgetwin tests"},
    )


def main():
    args = sys.argv[1:]
    if args[:1] == ["client-cert"] and len(args) == 2:
        asyncio.run(client_cert(args[1]))
        return
    if args[:1] != ["serve"] or len(args) < 2:
        sys.exit(__doc__)
    port = int(args[1])
    secure = None
    user = None
    rest = args[2:]
    while rest:
        if rest[0] == "--secure":
            secure, rest = rest[1], rest[2:]
        elif rest[0] == "--user":
            user, rest = rest[1], rest[2:]
        else:
            sys.exit(f"unknown argument {rest[0]}\n{__doc__}")
    asyncio.run(serve(port, secure, user))


if __name__ == "__main__":
    main()
