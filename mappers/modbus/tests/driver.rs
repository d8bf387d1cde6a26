//! The Modbus driver against the pymodbus simulator, without a node: decoding of every data type
//! and order, coalescing, exceptions, writes, RTU line sharing, link loss and reconnect.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgetwin_mapper_modbus::codec::PlanLimits;
use edgetwin_mapper_modbus::{ModbusConn, ModbusDriver};
use edgetwin_mapper_sdk::driver::flat;
use edgetwin_mapper_sdk::{Driver, DriverError};
use edgetwin_profile::ResolvedDevice;
use edgetwin_testkit::PtyPair;
use serde_json::{json, Value};

async fn read_all(
    d: &ModbusDriver,
    conn: &mut ModbusConn,
    dev: &ResolvedDevice,
) -> Result<Vec<(String, Result<Value, DriverError>)>, DriverError> {
    let props: Vec<_> = dev.device.spec.properties.iter().collect();
    flat::reads(&props, d.read(conn, dev, &props).await)
}

fn value<'a>(rs: &'a [(String, Result<Value, DriverError>)], name: &str) -> &'a Value {
    match &rs.iter().find(|(n, _)| n == name).unwrap().1 {
        Ok(v) => v,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn error<'a>(rs: &'a [(String, Result<Value, DriverError>)], name: &str) -> &'a DriverError {
    match &rs.iter().find(|(n, _)| n == name).unwrap().1 {
        Ok(v) => panic!("{name} read {v}, expected an error"),
        Err(e) => e,
    }
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64()
        .is_some_and(|x| (x - want).abs() <= want.abs() * 1e-9 + 1e-9)
}

/// Every layout of the simulator's holding registers 0..33.
fn all_types<'a>() -> Vec<Prop<'a>> {
    vec![
        prop("f_abcd", "float", "{register: HoldingRegister, offset: 0, dataType: float32}"),
        prop("f_cdab", "float", "{register: HoldingRegister, offset: 2, dataType: float32, isRegisterSwap: true}"),
        prop("f_badc", "float", "{register: HoldingRegister, offset: 4, dataType: float32, isSwap: true}"),
        prop("f_dcba", "float", "{register: HoldingRegister, offset: 6, dataType: float32, isRegisterSwap: true, isSwap: true}"),
        prop("i16", "int", "{register: HoldingRegister, offset: 8, dataType: int16}"),
        prop("u16", "int", "{register: HoldingRegister, offset: 9, dataType: uint16}"),
        prop("i32", "int", "{register: HoldingRegister, offset: 10, dataType: int32}"),
        prop("u32", "int", "{register: HoldingRegister, offset: 12, dataType: uint32, isRegisterSwap: true}"),
        prop("i64", "int", "{register: HoldingRegister, offset: 14, dataType: int64}"),
        prop("u64", "int", "{register: HoldingRegister, offset: 18, dataType: uint64, isRegisterSwap: true, isSwap: true}"),
        prop("f64", "float", "{register: HoldingRegister, offset: 22, dataType: float64}"),
        prop("name", "string", "{register: HoldingRegister, offset: 26, limit: 4, dataType: string}"),
        prop("setpoint", "float", "{register: HoldingRegister, offset: 30, dataType: uint16, scale: 0.1}"),
        prop("flag_on", "boolean", "{register: HoldingRegister, offset: 31, dataType: bool, mask: 4}"),
        prop("flag_off", "boolean", "{register: HoldingRegister, offset: 31, dataType: bool, mask: 2}"),
        prop("low_byte", "int", "{register: HoldingRegister, offset: 31, dataType: uint16, mask: 255}"),
        prop("offset_temp", "float", "{register: HoldingRegister, offset: 32, dataType: int16, scale: 0.1, valueOffset: 10}"),
        prop("coil0", "boolean", "{register: CoilRegister, offset: 0, dataType: bool}"),
        prop("coil1", "boolean", "{register: CoilRegister, offset: 1, dataType: bool}"),
        prop("di1", "boolean", "{register: DiscreteInputRegister, offset: 1, dataType: bool}"),
        prop("ir_temp", "float", "{register: InputRegister, offset: 0, dataType: float32}"),
        prop("ir_101", "int", "{register: InputRegister, offset: 101, dataType: uint16}"),
    ]
}

#[tokio::test]
async fn modbus_tcp_every_data_type_order_and_scale_decodes_right() {
    let port = edgetwin_testkit::free_port();
    let _sim = Sim::tcp(port);
    let dev = resolve(
        &profile_yaml("m", "d", &tcp(port, 1), "1s", &all_types()),
        "d",
    );
    let d = ModbusDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read_all(&d, &mut conn, &dev).await.unwrap();
    for name in ["f_abcd", "f_cdab", "f_badc", "f_dcba"] {
        assert!(
            close(value(&rs, name), 230.5),
            "{name}: {}",
            value(&rs, name)
        );
    }
    assert_eq!(value(&rs, "i16"), &json!(-1234));
    assert_eq!(value(&rs, "u16"), &json!(54321));
    assert_eq!(value(&rs, "i32"), &json!(-123_456_789));
    assert_eq!(value(&rs, "u32"), &json!(3_000_000_000u64));
    assert_eq!(value(&rs, "i64"), &json!(-1_234_567_890_123i64));
    assert_eq!(value(&rs, "u64"), &json!(12_345_678_901_234u64));
    assert!(close(value(&rs, "f64"), -3.25e10));
    assert_eq!(value(&rs, "name"), &json!("EDGE-1"));
    assert!(
        close(value(&rs, "setpoint"), 21.5),
        "{}",
        value(&rs, "setpoint")
    );
    assert_eq!(value(&rs, "flag_on"), &json!(true));
    assert_eq!(value(&rs, "flag_off"), &json!(false));
    assert_eq!(value(&rs, "low_byte"), &json!(4));
    assert!(
        close(value(&rs, "offset_temp"), -30.0),
        "{}",
        value(&rs, "offset_temp")
    );
    assert_eq!(value(&rs, "coil0"), &json!(true));
    assert_eq!(value(&rs, "coil1"), &json!(false));
    assert_eq!(value(&rs, "di1"), &json!(true));
    assert!(close(value(&rs, "ir_temp"), 21.75));
    assert_eq!(value(&rs, "ir_101"), &json!(101));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn modbus_tcp_coalescing_makes_fewer_requests_than_properties() {
    let port = edgetwin_testkit::free_port();
    let _sim = Sim::tcp(port);
    let props = all_types();
    let n = props.len() as u64;
    let dev = resolve(&profile_yaml("m", "d", &tcp(port, 1), "1s", &props), "d");

    let merged = ModbusDriver::new();
    let mut conn = merged.connect(&dev).await.unwrap();
    let a = read_all(&merged, &mut conn, &dev).await.unwrap();
    // Holding 0..33, coils 0..2, discrete input 1, input 0..2 and 101: five requests.
    assert_eq!(conn.requests(), 5, "coalesced requests for {n} properties");
    assert_eq!(merged.requests(), 5);

    let single = ModbusDriver::with_limits(PlanLimits::single());
    let mut conn1 = single.connect(&dev).await.unwrap();
    let b = read_all(&single, &mut conn1, &dev).await.unwrap();
    assert_eq!(conn1.requests(), n);
    assert_eq!(a, b, "coalesced and single reads must give the same values");
}

#[tokio::test]
async fn modbus_tcp_exception_fails_only_that_property() {
    let port = edgetwin_testkit::free_port();
    let _sim = Sim::tcp(port);
    let props = vec![
        prop(
            "good",
            "int",
            "{register: HoldingRegister, offset: 8, dataType: int16}",
        ),
        // Address 60 is unmapped and far from the others: a request of its own.
        prop(
            "far_hole",
            "int",
            "{register: HoldingRegister, offset: 60, dataType: uint16}",
        ),
        // Address 50 is unmapped but within the merge gap of the scratch registers 34..49.
        prop(
            "scratch",
            "int",
            "{register: HoldingRegister, offset: 45, dataType: uint16}",
        ),
        prop(
            "near_hole",
            "int",
            "{register: HoldingRegister, offset: 50, dataType: uint16}",
        ),
        prop(
            "coil",
            "boolean",
            "{register: CoilRegister, offset: 0, dataType: bool}",
        ),
    ];
    let dev = resolve(&profile_yaml("m", "d", &tcp(port, 1), "1s", &props), "d");
    let d = ModbusDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read_all(&d, &mut conn, &dev).await.unwrap();
    // good (8), scratch+near_hole (45..51, refused, then 2 alone), far_hole (60), coil.
    assert_eq!(conn.requests(), 6);
    assert_eq!(value(&rs, "good"), &json!(-1234));
    assert_eq!(value(&rs, "scratch"), &json!(0));
    assert_eq!(value(&rs, "coil"), &json!(true));
    for hole in ["far_hole", "near_hole"] {
        let e = error(&rs, hole);
        assert!(
            matches!(e, DriverError::Device(m) if m.contains("0x02") && m.contains("Illegal data address")),
            "{hole}: {e:?}"
        );
    }
    // The refused merged request was split once; from now on the hole is read on its own, so
    // no request is refused and retried: good, scratch, near_hole, far_hole, coil.
    let before = conn.requests();
    let again = read_all(&d, &mut conn, &dev).await.unwrap();
    assert_eq!(conn.requests() - before, 5);
    assert_eq!(value(&again, "scratch"), &json!(0));
    assert!(matches!(error(&again, "near_hole"), DriverError::Device(_)));
}

#[tokio::test]
async fn modbus_tcp_write_reaches_the_register_and_reads_back() {
    let port = edgetwin_testkit::free_port();
    let sim = Sim::tcp(port);
    let props = vec![
        rw(
            "setpoint",
            "float",
            "{register: HoldingRegister, offset: 30, dataType: uint16, scale: 0.1}",
        ),
        rw(
            "big",
            "int",
            "{register: HoldingRegister, offset: 34, dataType: int32, isRegisterSwap: true}",
        ),
        rw(
            "bit",
            "boolean",
            "{register: HoldingRegister, offset: 36, dataType: bool, mask: 4}",
        ),
        rw(
            "nibble",
            "int",
            "{register: HoldingRegister, offset: 36, dataType: uint16, mask: 240}",
        ),
        rw(
            "relay",
            "boolean",
            "{register: CoilRegister, offset: 1, dataType: bool}",
        ),
        rw(
            "label",
            "string",
            "{register: HoldingRegister, offset: 40, limit: 3, dataType: string}",
        ),
    ];
    let dev = resolve(&profile_yaml("m", "d", &tcp(port, 1), "1s", &props), "d");
    let d = ModbusDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let p = |n: &str| dev.device.property(n).unwrap().clone();

    flat::write(d.write(&mut conn, &dev, &p("setpoint"), &json!(25.3)).await).unwrap();
    assert_eq!(sim.wait_write(1, 30), vec![253]);
    flat::write(d.write(&mut conn, &dev, &p("big"), &json!(-2)).await).unwrap();
    assert_eq!(sim.wait_write(1, 34), vec![0xFFFE, 0xFFFF]);
    flat::write(d.write(&mut conn, &dev, &p("nibble"), &json!(0x50)).await).unwrap();
    flat::write(d.write(&mut conn, &dev, &p("bit"), &json!(true)).await).unwrap();
    assert_eq!(
        sim.wait_nth_write(1, 36, 2),
        vec![0x54],
        "masked writes keep the other bits"
    );
    flat::write(d.write(&mut conn, &dev, &p("relay"), &json!(true)).await).unwrap();
    flat::write(d.write(&mut conn, &dev, &p("label"), &json!("ok")).await).unwrap();

    let rs = read_all(&d, &mut conn, &dev).await.unwrap();
    assert!(
        close(value(&rs, "setpoint"), 25.3),
        "{}",
        value(&rs, "setpoint")
    );
    assert_eq!(value(&rs, "big"), &json!(-2));
    assert_eq!(value(&rs, "bit"), &json!(true));
    assert_eq!(value(&rs, "nibble"), &json!(0x50));
    assert_eq!(value(&rs, "relay"), &json!(true));
    assert_eq!(value(&rs, "label"), &json!("ok"));

    // Too large for uint16 after the inverse scale: refused before anything is sent.
    let before = conn.requests();
    let e = flat::write(d.write(&mut conn, &dev, &p("setpoint"), &json!(7000)).await).unwrap_err();
    assert!(matches!(e, DriverError::Config(_)), "{e:?}");
    assert_eq!(conn.requests(), before);
}

#[tokio::test]
async fn modbus_tcp_stopped_simulator_gives_link_error_and_reconnect_works_after_restart() {
    let port = edgetwin_testkit::free_port();
    let mut sim = Sim::tcp(port);
    let props = vec![prop(
        "i16",
        "int",
        "{register: HoldingRegister, offset: 8, dataType: int16}",
    )];
    let dev = resolve(&profile_yaml("m", "d", &tcp(port, 1), "1s", &props), "d");
    let d = ModbusDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    assert_eq!(
        value(&read_all(&d, &mut conn, &dev).await.unwrap(), "i16"),
        &json!(-1234)
    );

    sim.stop();
    let e = read_all(&d, &mut conn, &dev).await.unwrap_err();
    assert!(matches!(e, DriverError::Link(_)), "{e:?}");
    d.disconnect(conn).await;
    let e = d.connect(&dev).await.unwrap_err();
    assert!(matches!(e, DriverError::Link(_)), "{e:?}");

    let _sim = Sim::tcp(port);
    let mut conn = d.connect(&dev).await.unwrap();
    assert_eq!(
        value(&read_all(&d, &mut conn, &dev).await.unwrap(), "i16"),
        &json!(-1234)
    );
}

/// Reads `dev` until it answers (the RTU simulator opens its port a moment after READY).
async fn read_when_up(
    d: &ModbusDriver,
    conn: &mut ModbusConn,
    dev: &ResolvedDevice,
) -> Vec<(String, Result<Value, DriverError>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match read_all(d, conn, dev).await {
            Ok(rs) => return rs,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "RTU never answered: {e}"
            ),
        }
    }
}

#[tokio::test]
async fn modbus_rtu_two_units_share_one_serial_line() {
    let pty = PtyPair::new();
    let _sim = Sim::rtu(&pty.a);
    // The second device names the line through a symlink, as /dev/serial/by-id paths do.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("usb-FTDI_FT232R-if00-port0");
    std::os::unix::fs::symlink(&pty.b, &link).unwrap();
    let props = |_: u8| {
        vec![
            prop(
                "unit",
                "int",
                "{register: HoldingRegister, offset: 33, dataType: uint16}",
            ),
            prop(
                "temp",
                "float",
                "{register: InputRegister, offset: 0, dataType: float32}",
            ),
        ]
    };
    let d1 = resolve(
        &profile_yaml("m", "d1", &rtu(&path(&pty.b), 1), "1s", &props(1)),
        "d1",
    );
    let d2 = resolve(
        &profile_yaml("m", "d2", &rtu(&link, 2), "1s", &props(2)),
        "d2",
    );
    let d = ModbusDriver::new();
    let mut c1 = d.connect(&d1).await.unwrap();
    let mut c2 = d.connect(&d2).await.unwrap();
    assert_eq!(d.serial_lines(), 1, "both devices use one open serial port");

    let r1 = read_when_up(&d, &mut c1, &d1).await;
    let r2 = read_when_up(&d, &mut c2, &d2).await;
    assert_eq!(value(&r1, "unit"), &json!(111));
    assert_eq!(value(&r2, "unit"), &json!(222));
    assert!(close(value(&r2, "temp"), 21.75));

    // Both devices polled at once: requests are serialised on the line, answers do not mix.
    let (a, b) = tokio::join!(read_all(&d, &mut c1, &d1), read_all(&d, &mut c2, &d2));
    assert_eq!(value(&a.unwrap(), "unit"), &json!(111));
    assert_eq!(value(&b.unwrap(), "unit"), &json!(222));

    d.disconnect(c1).await;
    assert_eq!(
        d.serial_lines(),
        1,
        "the line stays open for the other device"
    );
    d.disconnect(c2).await;
    assert_eq!(d.serial_lines(), 0);
}

#[tokio::test]
async fn modbus_rtu_silent_unit_is_a_link_error_and_the_line_keeps_working() {
    let pty = PtyPair::new();
    let _sim = Sim::rtu(&pty.a);
    let props = vec![prop(
        "unit",
        "int",
        "{register: HoldingRegister, offset: 33, dataType: uint16}",
    )];
    let live = resolve(
        &profile_yaml("m", "live", &rtu(&path(&pty.b), 1), "1s", &props),
        "live",
    );
    let dead = resolve(
        &profile_yaml("m", "dead", &rtu(&path(&pty.b), 9), "1s", &props),
        "dead",
    );
    let d = ModbusDriver::new();
    let mut cl = d.connect(&live).await.unwrap();
    let mut cd = d.connect(&dead).await.unwrap();
    assert_eq!(
        value(&read_when_up(&d, &mut cl, &live).await, "unit"),
        &json!(111)
    );

    let e = read_all(&d, &mut cd, &dead).await.unwrap_err();
    assert!(
        matches!(&e, DriverError::Link(m) if m.contains("no answer from slave 9")),
        "{e:?}"
    );
    assert_eq!(
        value(&read_all(&d, &mut cl, &live).await.unwrap(), "unit"),
        &json!(111)
    );
}
