//! [`ModbusDriver`]: the SDK `Driver` for Modbus TCP and RTU over tokio-modbus.
//!
//! * **TCP**: one tokio-modbus context (one TCP connection, `TCP_NODELAY`) per device.
//! * **RTU**: devices on the same serial line (same `serialName`, after resolving symlinks) share
//!   one open port behind an async mutex; requests to their unit ids are serialised on the line
//!   and the slave id is set on every request. Devices on one line must agree on its settings
//!   (baud, data bits, parity, stop bits), otherwise the later one gets a `Config` error.
//! * **Errors** follow tokio-modbus's `Result<Result<T, Exception>, Error>`: every request is
//!   bounded by the device's `timeout`; a timeout or I/O error is [`DriverError::Link`] (the
//!   runtime marks the device offline and reconnects); a Modbus exception is
//!   [`DriverError::Device`] for the properties it concerns only; a value that cannot be encoded
//!   or decoded is [`DriverError::Config`]. A response that does not match its request (a late
//!   answer on a shared RTU line) is retried once, then counts as a link error.
//! * **Coalescing**: the properties of one read are planned with [`codec::plan`]. When a merged
//!   request draws an exception, its properties are read one by one to find the culprit, and the
//!   culprit (or, if none fails alone, every member: a hole in the device's map lies in the gap)
//!   is read on its own for the rest of the connection.
//! * **Counting**: every request sent is counted per connection ([`ModbusConn::requests`]) and per
//!   driver ([`ModbusDriver::requests`]), so coalesced and per-property polling can be compared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::{ModbusDataType, ModbusVisitor, RegisterType};
use edgetwin_profile::{DeviceProperty, ProtocolVisitor, ResolvedDevice};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_modbus::client::{rtu, tcp, Client, Context, Reader, Writer};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPortBuilderExt;

use crate::codec::{self, CodecError, PlanLimits, Span};
use crate::config::{self, ConfigError, ConnSettings, Endpoint, SerialSettings};
use crate::discover;
use edgetwin_mapper_sdk::{
    read_result, written, Discovered, Driver, DriverError, LinkLost, PropertyResult, ReadResult,
    Reading,
};

/// The Modbus TCP/RTU driver. One value serves every Modbus device of the mapper.
#[derive(Debug)]
pub struct ModbusDriver {
    limits: PlanLimits,
    lines: StdMutex<HashMap<String, Weak<Line>>>,
    requests: Arc<AtomicU64>,
}

/// One open transport: a TCP connection of one device, or a serial line shared by devices.
struct Line {
    ctx: Mutex<Context>,
    /// Set after an I/O error: the next `connect` opens a fresh line instead of sharing this one.
    broken: AtomicBool,
    /// RTU only: the settings the port was opened with.
    serial: Option<SerialSettings>,
    label: String,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line").field("label", &self.label).finish()
    }
}

/// An open connection to one device (its slave id on a TCP connection or a shared RTU line).
#[derive(Debug)]
pub struct ModbusConn {
    line: Arc<Line>,
    slave: u8,
    timeout: Duration,
    rtu: bool,
    /// Properties read with a request of their own (see the module doc).
    isolated: HashSet<String>,
    /// Each property's model type and register span, or why it cannot be served: resolved
    /// once per connection, not at every poll.
    resolved: HashMap<String, Result<(PropertyType, Span), String>>,
    requests: u64,
}

impl ModbusConn {
    /// Modbus requests sent on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }
}

/// One Modbus request.
#[derive(Debug, Clone)]
enum Op {
    Read(RegisterType, u16, u16),
    WriteCoil(u16, bool),
    WriteRegisters(u16, Vec<u16>),
}

/// A successful answer.
#[derive(Debug)]
enum Answer {
    Bits(Vec<bool>),
    Words(Vec<u16>),
    Done,
}

/// How a request ended when the device answered.
type Outcome = Result<Answer, ExceptionCode>;

impl Default for ModbusDriver {
    fn default() -> Self {
        ModbusDriver::new()
    }
}

impl ModbusDriver {
    /// A driver that coalesces reads with the default [`PlanLimits`].
    pub fn new() -> Self {
        ModbusDriver::with_limits(PlanLimits::default())
    }

    /// A driver that plans reads with `limits` ([`PlanLimits::single`]: one request per property).
    pub fn with_limits(limits: PlanLimits) -> Self {
        ModbusDriver {
            limits,
            lines: StdMutex::new(HashMap::new()),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Modbus requests sent by every connection of this driver so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Serial lines open right now (RTU devices on one line share one).
    pub fn serial_lines(&self) -> usize {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.values().filter(|w| w.strong_count() > 0).count()
    }

    /// A shareable handle on the request counter (for metrics or benchmarks).
    pub fn request_counter(&self) -> Arc<AtomicU64> {
        self.requests.clone()
    }

    async fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        s: &ConnSettings,
    ) -> Result<Arc<Line>, DriverError> {
        let label = s.endpoint.to_string();
        let stream = tokio::time::timeout(s.timeout, tokio::net::TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                DriverError::Link(format!(
                    "connect to {label}: timed out after {:?}",
                    s.timeout
                ))
            })?
            .map_err(|e| DriverError::Link(format!("connect to {label}: {e}")))?;
        // Small request/response frames: Nagle would add tens of milliseconds.
        stream
            .set_nodelay(true)
            .map_err(|e| DriverError::Link(format!("{label}: {e}")))?;
        Ok(Arc::new(Line {
            ctx: Mutex::new(tcp::attach_slave(stream, Slave(s.slave))),
            broken: AtomicBool::new(false),
            serial: None,
            label,
        }))
    }

    fn connect_rtu(
        &self,
        serial: &SerialSettings,
        s: &ConnSettings,
    ) -> Result<Arc<Line>, DriverError> {
        // Two names for one port (a by-id symlink and /dev/ttyUSB0) are one line.
        let key = std::fs::canonicalize(&serial.path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| serial.path.clone());
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.retain(|_, w| w.strong_count() > 0);
        if let Some(line) = lines
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|l| !l.broken.load(Ordering::Relaxed))
        {
            let open = line.serial.as_ref();
            if open.map(line_settings) != Some(line_settings(serial)) {
                return Err(DriverError::Config(
                    ConfigError::LineSettings {
                        path: serial.path.clone(),
                        open: open.map(ToString::to_string).unwrap_or_default(),
                        wanted: serial.to_string(),
                    }
                    .to_string(),
                ));
            }
            return Ok(line);
        }
        let port = tokio_serial::new(&serial.path, serial.baud_rate)
            .data_bits(match serial.data_bits {
                config_bits::Five => tokio_serial::DataBits::Five,
                config_bits::Six => tokio_serial::DataBits::Six,
                config_bits::Seven => tokio_serial::DataBits::Seven,
                config_bits::Eight => tokio_serial::DataBits::Eight,
            })
            .parity(match serial.parity {
                config_parity::None => tokio_serial::Parity::None,
                config_parity::Even => tokio_serial::Parity::Even,
                config_parity::Odd => tokio_serial::Parity::Odd,
            })
            .stop_bits(match serial.stop_bits {
                config_stop::One => tokio_serial::StopBits::One,
                config_stop::Two => tokio_serial::StopBits::Two,
            })
            .open_native_async()
            .map_err(|e| DriverError::Link(format!("open serial line {}: {e}", serial.path)))?;
        let line = Arc::new(Line {
            ctx: Mutex::new(rtu::attach_slave(port, Slave(s.slave))),
            broken: AtomicBool::new(false),
            serial: Some(serial.clone()),
            label: s.endpoint.to_string(),
        });
        lines.insert(key, Arc::downgrade(&line));
        Ok(line)
    }

    /// Sends one request on the connection's line with the connection's slave id, bounded by the
    /// device timeout.
    async fn request(&self, conn: &mut ModbusConn, op: &Op) -> Result<Outcome, DriverError> {
        let line = conn.line.clone();
        let mut ctx = line.ctx.lock().await;
        ctx.set_slave(Slave(conn.slave));
        let mut last = String::new();
        for _attempt in 0..2 {
            conn.requests += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(conn.timeout, exec(&mut ctx, op)).await {
                Err(_) => {
                    // On TCP the connection is unusable (a late answer would be taken for the
                    // next one); on RTU the line is fine, only this slave is silent.
                    if !conn.rtu {
                        line.broken.store(true, Ordering::Relaxed);
                    }
                    return Err(DriverError::Link(format!(
                        "no answer from slave {} on {} within {:?}",
                        conn.slave, line.label, conn.timeout
                    )));
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => {
                    line.broken.store(true, Ordering::Relaxed);
                    return Err(DriverError::Link(format!(
                        "slave {} on {}: {e}",
                        conn.slave, line.label
                    )));
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => last = e.to_string(),
                Ok(Ok(Ok(answer))) => match check_len(op, &answer) {
                    Ok(()) => return Ok(Ok(answer)),
                    Err(msg) => last = msg,
                },
                Ok(Ok(Err(exc))) => return Ok(Err(exc)),
            }
        }
        Err(DriverError::Link(format!(
            "slave {} on {}: answer does not match the request: {last}",
            conn.slave, line.label
        )))
    }

    /// Reads each member of a failed merged request alone; returns their results.
    async fn read_alone(
        &self,
        conn: &mut ModbusConn,
        items: &[Item<'_>],
        members: &[usize],
        results: &mut [Option<Result<Value, DriverError>>],
    ) -> Result<(), DriverError> {
        let mut any_failed = false;
        for &m in members {
            let it = &items[m];
            let op = Op::Read(it.span.register, it.span.offset, it.span.count);
            let out = self.request(conn, &op).await?;
            if out.is_err() {
                any_failed = true;
                conn.isolated.insert(it.name.to_string());
            }
            results[it.index] = Some(answer_value(it, &op, &out, 0..usize::from(it.span.count)));
        }
        if !any_failed {
            for &m in members {
                conn.isolated.insert(items[m].name.to_string());
            }
        }
        Ok(())
    }
}

use edgetwin_profile::protocol::DataBits as config_bits;
use edgetwin_profile::protocol::Parity as config_parity;
use edgetwin_profile::protocol::StopBits as config_stop;

fn line_settings(s: &SerialSettings) -> (u32, u8, u8, u8) {
    let parity = match s.parity {
        config_parity::None => 0,
        config_parity::Even => 1,
        config_parity::Odd => 2,
    };
    (s.baud_rate, s.data_bits.get(), parity, s.stop_bits.get())
}

async fn exec(ctx: &mut Context, op: &Op) -> tokio_modbus::Result<Answer> {
    match op {
        Op::Read(RegisterType::CoilRegister, a, n) => {
            ctx.read_coils(*a, *n).await.map(|r| r.map(Answer::Bits))
        }
        Op::Read(RegisterType::DiscreteInputRegister, a, n) => ctx
            .read_discrete_inputs(*a, *n)
            .await
            .map(|r| r.map(Answer::Bits)),
        Op::Read(RegisterType::HoldingRegister, a, n) => ctx
            .read_holding_registers(*a, *n)
            .await
            .map(|r| r.map(Answer::Words)),
        Op::Read(RegisterType::InputRegister, a, n) => ctx
            .read_input_registers(*a, *n)
            .await
            .map(|r| r.map(Answer::Words)),
        Op::WriteCoil(a, b) => ctx
            .write_single_coil(*a, *b)
            .await
            .map(|r| r.map(|()| Answer::Done)),
        Op::WriteRegisters(a, w) if w.len() == 1 => ctx
            .write_single_register(*a, w[0])
            .await
            .map(|r| r.map(|()| Answer::Done)),
        Op::WriteRegisters(a, w) => ctx
            .write_multiple_registers(*a, w)
            .await
            .map(|r| r.map(|()| Answer::Done)),
    }
}

/// A read answer must carry exactly what was asked for (a stray frame may not).
fn check_len(op: &Op, answer: &Answer) -> Result<(), String> {
    let got = match answer {
        Answer::Bits(b) => b.len(),
        Answer::Words(w) => w.len(),
        Answer::Done => return Ok(()),
    };
    match op {
        Op::Read(_, _, n) if usize::from(*n) != got => {
            Err(format!("asked for {n} values, got {got}"))
        }
        _ => Ok(()),
    }
}

fn op_text(op: &Op) -> String {
    match op {
        Op::Read(r, a, n) => format!("reading {r:?} {a}..{}", u32::from(*a) + u32::from(*n)),
        Op::WriteCoil(a, _) => format!("writing CoilRegister {a}"),
        Op::WriteRegisters(a, w) => {
            format!("writing HoldingRegister {a}..{}", usize::from(*a) + w.len())
        }
    }
}

/// The `Device` error for a Modbus exception, naming it.
fn exception(exc: ExceptionCode, op: &Op) -> DriverError {
    DriverError::Device(format!(
        "Modbus exception {:#04x} {exc} {}",
        u8::from(exc),
        op_text(op)
    ))
}

fn codec_err(prop: &str, e: CodecError) -> DriverError {
    DriverError::Config(format!("property {prop}: {e}"))
}

fn config_err(e: ConfigError) -> DriverError {
    DriverError::Config(e.to_string())
}

/// One property of a read, with what the codec needs.
struct Item<'a> {
    index: usize,
    name: &'a str,
    visitor: &'a ModbusVisitor,
    ty: PropertyType,
    span: Span,
}

/// The value of `it` from an answer (or the exception that answered instead).
fn answer_value(
    it: &Item<'_>,
    op: &Op,
    out: &Outcome,
    range: std::ops::Range<usize>,
) -> Result<Value, DriverError> {
    match out {
        Err(exc) => Err(exception(*exc, op)),
        Ok(Answer::Bits(bits)) => bits
            .get(range.start)
            .map(|b| codec::decode_bit(*b, it.ty))
            .ok_or_else(|| DriverError::Config(format!("property {}: no bit in answer", it.name))),
        Ok(Answer::Words(words)) => {
            let w = words.get(range).ok_or_else(|| {
                DriverError::Config(format!("property {}: answer too short", it.name))
            })?;
            codec::decode_registers(it.visitor, it.ty, w).map_err(|e| codec_err(it.name, e))
        }
        Ok(Answer::Done) => Err(DriverError::Config(format!(
            "property {}: write answered a read",
            it.name
        ))),
    }
}

impl Driver for ModbusDriver {
    type Conn = ModbusConn;

    fn protocol(&self) -> &'static str {
        "modbus"
    }

    fn requests_made(&self, conn: &ModbusConn) -> Option<u64> {
        Some(conn.requests())
    }

    async fn discover(&self, target: &Value) -> Result<Discovered, String> {
        let req: discover::ScanRequest =
            serde_json::from_value(target.clone()).map_err(|e| format!("the scan request: {e}"))?;
        let found = self.scan(&req, discover::Limits::default()).await?;
        let lines = found
            .iter()
            .map(|(unit, regs)| format!("unit {unit}: {} register(s) and bit(s)", regs.len()))
            .collect();
        Ok(Discovered {
            profile: discover::draft(&req, &found)?,
            found: lines,
        })
    }

    async fn connect(&self, device: &ResolvedDevice) -> Result<ModbusConn, DriverError> {
        let s = config::settings(device).map_err(config_err)?;
        let line = self.open_line(&s).await?;
        let rtu = matches!(s.endpoint, Endpoint::Rtu(_));
        let resolved = device
            .device
            .spec
            .properties
            .iter()
            .map(|p| {
                let r = config::property(device, p)
                    .map(|(v, ty)| (ty, Span::of(v)))
                    .map_err(|e| e.to_string());
                (p.name.as_str().to_string(), r)
            })
            .collect();
        Ok(ModbusConn {
            line,
            slave: s.slave,
            timeout: s.timeout,
            rtu,
            isolated: HashSet::new(),
            resolved,
            requests: 0,
        })
    }

    async fn read(
        &self,
        conn: &mut ModbusConn,
        device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> ReadResult {
        read_result(props.len(), self.read_values(conn, device, props).await)
    }

    async fn write(
        &self,
        conn: &mut ModbusConn,
        device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<PropertyResult<()>, LinkLost> {
        written(self.write_value(conn, device, prop, value).await)
    }

    async fn disconnect(&self, conn: ModbusConn) {
        let ModbusConn { line, timeout, .. } = conn;
        // The last user of a line closes it; a shared RTU line stays open for the others.
        if let Some(line) = Arc::into_inner(line) {
            let mut ctx = line.ctx.into_inner();
            let _ = tokio::time::timeout(timeout, ctx.disconnect()).await;
        }
    }
}

impl ModbusDriver {
    /// Every property's value in the order of `props`; `Err` only for the link (a request that
    /// failed on the wire).
    async fn read_values(
        &self,
        conn: &mut ModbusConn,
        device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> Result<Vec<Result<Reading, DriverError>>, DriverError> {
        let mut results: Vec<Option<Result<Value, DriverError>>> = vec![None; props.len()];
        let mut items: Vec<Item<'_>> = Vec::new();
        for (index, p) in props.iter().enumerate() {
            let resolved = conn
                .resolved
                .get(p.name.as_str())
                .cloned()
                .unwrap_or_else(|| {
                    Err(format!(
                        "property {} was not in the profile when the device was connected",
                        p.name.as_str()
                    ))
                });
            match (resolved, ModbusVisitor::of(&p.visitors)) {
                (Ok((ty, span)), Some(visitor)) => items.push(Item {
                    index,
                    name: p.name.as_str(),
                    visitor,
                    ty,
                    span,
                }),
                (Err(e), _) => results[index] = Some(Err(DriverError::Config(e))),
                (Ok(_), None) => {
                    results[index] = Some(Err(DriverError::Config(format!(
                        "property {} has no modbus visitor",
                        p.name.as_str()
                    ))))
                }
            }
        }
        // Coalesce the rest; isolated properties get a request each.
        let (merge, alone): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| !conn.isolated.contains(items[i].name));
        let mut requests = Vec::new();
        for (ids, limits) in [(&merge, self.limits), (&alone, PlanLimits::single())] {
            let spans: Vec<Span> = ids.iter().map(|&i| items[i].span).collect();
            for mut r in codec::plan(&spans, &limits) {
                r.members = r.members.iter().map(|&m| ids[m]).collect();
                requests.push(r);
            }
        }
        for r in requests {
            let op = Op::Read(r.register, r.start, r.count);
            match self.request(conn, &op).await? {
                Err(_) if r.members.len() > 1 => {
                    tracing::debug!(
                        device = %device.id(),
                        request = op_text(&op),
                        "merged read refused; reading its properties one by one"
                    );
                    self.read_alone(conn, &items, &r.members, &mut results)
                        .await?;
                }
                Err(exc) => {
                    for &m in &r.members {
                        results[items[m].index] = Some(Err(exception(exc, &op)));
                    }
                }
                answer => {
                    for &m in &r.members {
                        let it = &items[m];
                        results[it.index] = Some(answer_value(it, &op, &answer, r.slice(&it.span)));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(DriverError::Config("property was not read".into())))
                    .map(Reading::fresh)
            })
            .collect())
    }

    async fn write_value(
        &self,
        conn: &mut ModbusConn,
        device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<(), DriverError> {
        let name = prop.name.as_str();
        let (v, ty) = config::property(device, prop).map_err(config_err)?;
        let op = match v.register {
            RegisterType::CoilRegister => Op::WriteCoil(
                v.offset,
                codec::encode_bit(value).map_err(|e| codec_err(name, e))?,
            ),
            RegisterType::HoldingRegister => {
                let mut words =
                    codec::encode_exact(v, ty, value).map_err(|e| codec_err(name, e))?;
                let masked = v.mask.is_some() && v.data_type != ModbusDataType::String;
                if masked {
                    // Read-modify-write: only the masked bits change.
                    let read = Op::Read(v.register, v.offset, codec::width(v));
                    match self.request(conn, &read).await? {
                        Ok(Answer::Words(cur)) => words = codec::merge_masked(v, &cur, &words),
                        Ok(_) => {
                            return Err(DriverError::Link(format!(
                                "slave {}: unexpected answer to {}",
                                conn.slave,
                                op_text(&read)
                            )))
                        }
                        Err(exc) => return Err(exception(exc, &read)),
                    }
                }
                Op::WriteRegisters(v.offset, words)
            }
            other => {
                return Err(DriverError::Config(format!(
                    "property {name}: {other:?} is read-only"
                )))
            }
        };
        match self.request(conn, &op).await? {
            Ok(_) => Ok(()),
            Err(exc) => Err(exception(exc, &op)),
        }
    }
}

impl ModbusDriver {
    /// Scans for units and registers (see [`crate::discover`]): what answered, per unit.
    pub async fn scan(
        &self,
        req: &discover::ScanRequest,
        limits: discover::Limits,
    ) -> Result<BTreeMap<u8, discover::Found>, String> {
        use discover::Table;
        let plan = discover::plan(req)?;
        let endpoint = match (&req.tcp, &req.serial) {
            (Some(hp), _) => {
                let (host, port) = hp
                    .rsplit_once(':')
                    .ok_or_else(|| format!("tcp {hp:?}: expected host:port"))?;
                let port = port
                    .parse()
                    .map_err(|_| format!("tcp {hp:?}: the port must be a number"))?;
                Endpoint::Tcp {
                    host: host.to_string(),
                    port,
                }
            }
            (None, Some(s)) => Endpoint::Rtu(SerialSettings {
                path: s.path.clone(),
                baud_rate: s.baud_rate.unwrap_or(9600),
                data_bits: Default::default(),
                parity: Default::default(),
                stop_bits: Default::default(),
            }),
            (None, None) => return Err("no target".into()),
        };
        let rtu = matches!(endpoint, Endpoint::Rtu(_));
        let settings = ConnSettings {
            endpoint,
            slave: plan.units.first().copied().unwrap_or(1),
            timeout: limits.timeout,
        };
        let mut conn = ModbusConn {
            line: self.open_line(&settings).await.map_err(|e| e.to_string())?,
            slave: settings.slave,
            timeout: limits.timeout,
            rtu,
            isolated: HashSet::new(),
            resolved: HashMap::new(),
            requests: 0,
        };
        let mut budget = limits.max_requests;
        let mut found = BTreeMap::new();
        'units: for unit in plan.units {
            conn.slave = unit;
            let mut regs = discover::Found::new();
            let mut present = false;
            for (table, range) in &plan.ranges {
                let register = match table {
                    Table::Holding => RegisterType::HoldingRegister,
                    Table::Input => RegisterType::InputRegister,
                    Table::Coils => RegisterType::CoilRegister,
                    Table::Discrete => RegisterType::DiscreteInputRegister,
                };
                let mut start = *range.start();
                loop {
                    let count = (discover::BLOCK - 1).min(range.end() - start) + 1;
                    let answer = self
                        .scan_request(
                            &mut conn,
                            &Op::Read(register, start, count),
                            &mut budget,
                            limits,
                            &settings,
                        )
                        .await?;
                    match answer {
                        // Silent, or a gateway saying nothing is behind it: no such unit.
                        None => {
                            if !present {
                                tracing::debug!(unit, "no answer; unit absent");
                                continue 'units;
                            }
                        }
                        Some(Ok(a)) => {
                            present = true;
                            insert(&mut regs, *table, start, &a);
                        }
                        Some(Err(_)) => {
                            // The unit answered: it is there, but not every address of the
                            // block is. One by one, then.
                            present = true;
                            for addr in start..start + count {
                                let one = self
                                    .scan_request(
                                        &mut conn,
                                        &Op::Read(register, addr, 1),
                                        &mut budget,
                                        limits,
                                        &settings,
                                    )
                                    .await?;
                                if let Some(Ok(a)) = one {
                                    insert(&mut regs, *table, addr, &a);
                                }
                            }
                        }
                    }
                    if start + count > *range.end() {
                        break;
                    }
                    start += count;
                }
            }
            if present {
                tracing::info!(unit, registers = regs.len(), "unit found");
                found.insert(unit, regs);
            }
        }
        Ok(found)
    }

    /// One scan request within the budget, after the pause. `None`: no answer (timeout, link
    /// error, or an exception meaning no such unit); the line is reopened when it broke.
    async fn scan_request(
        &self,
        conn: &mut ModbusConn,
        op: &Op,
        budget: &mut u32,
        limits: discover::Limits,
        settings: &ConnSettings,
    ) -> Result<Option<Outcome>, String> {
        if *budget == 0 {
            return Err(format!(
                "stopped after {} requests (the scan's limit): ask for fewer units or registers",
                limits.max_requests
            ));
        }
        *budget -= 1;
        tokio::time::sleep(limits.pause).await;
        let answer = match self.request(conn, op).await {
            Ok(Err(
                ExceptionCode::GatewayPathUnavailable
                | ExceptionCode::GatewayTargetDevice
                | ExceptionCode::ServerDeviceFailure,
            )) => None,
            Ok(outcome) => Some(outcome),
            Err(_) => None,
        };
        if conn.line.broken.load(Ordering::Relaxed) {
            // A late answer would be taken for the next request's (TCP): start afresh.
            conn.line = self.open_line(settings).await.map_err(|e| e.to_string())?;
        }
        Ok(answer)
    }
}

impl ModbusDriver {
    async fn open_line(&self, s: &ConnSettings) -> Result<Arc<Line>, DriverError> {
        match &s.endpoint {
            Endpoint::Tcp { host, port } => self.connect_tcp(host, *port, s).await,
            Endpoint::Rtu(serial) => self.connect_rtu(serial, s),
        }
    }
}

fn insert(regs: &mut discover::Found, table: discover::Table, start: u16, a: &Answer) {
    match a {
        Answer::Words(ws) => {
            for (i, w) in ws.iter().enumerate() {
                regs.insert((table, start + i as u16), *w);
            }
        }
        Answer::Bits(bs) => {
            for (i, b) in bs.iter().enumerate() {
                regs.insert((table, start + i as u16), u16::from(*b));
            }
        }
        Answer::Done => {}
    }
}
