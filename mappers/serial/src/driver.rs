//! [`SerialDriver`]: the SDK `Driver` for line-oriented ASCII devices over tokio-serial.
//!
//! * **Connection**: one open port per device (baud, data bits, parity, stop bits from the
//!   profile; the path is opened as is, so `/dev/serial/by-id/...` symlinks work). A reader task
//!   owned by the [`SerialConn`] cuts everything the device sends into lines
//!   ([`codec::LineSplitter`]).
//! * **Unsolicited properties** (`unsolicited: true`, no `request`): the reader task pushes
//!   each value as its line arrives ([`Driver::pushed`]) and keeps the latest with its arrival
//!   time; `read` returns that as a kept value (`Reading::kept`), so a device that went silent
//!   is not reported as read again. Before the first matching line, `read` waits up to the
//!   device `timeout`, then answers [`DriverError::Device`] ("no line ... has arrived yet").
//! * **Polled properties** (`request`): lines left over from earlier exchanges are discarded, the
//!   request is sent as written, and the first reply line within `timeout` is taken, skipping
//!   blank lines and lines an unsolicited pattern claimed (unless they match this property's
//!   pattern too).
//! * **Writes**: the `write` template with `{value}` filled in ([`codec::render`]) is sent; a line
//!   the device answers with within min(`timeout`, 200 ms) (e.g. `OK`) is consumed and logged.
//!   The profile has no reply pattern for writes, so it is not checked: the runtime reads the
//!   property back after every write, and that is what is reported.
//! * **Errors**: a reply that does not match the pattern, or whose value does not parse, is
//!   [`DriverError::Device`] "garbled line ..." for that property only (the runtime reports it on
//!   `dt/{device}/error`; the other properties go on). No reply within `timeout`, a write that
//!   does not go out within `timeout`, or a port that fails or closes is [`DriverError::Link`]
//!   (the runtime marks the device offline and reopens the port with backoff). A pattern or
//!   value the profile cannot work with is [`DriverError::Config`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgetwin_contract::{now_ms, PropertyType, TimestampMs};
use edgetwin_mapper_sdk::{
    read_result, written, Driver, DriverError, LinkLost, PropertyResult, Pushed, ReadResult,
    Reading, Refusal, PUSH_QUEUE,
};
use edgetwin_profile::protocol::{DataBits, Parity, StopBits};
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tracing::{debug, info, warn};

use crate::codec::{self, Extractor, LineSplitter};
use crate::config::{self, LineSettings};

/// How long a write waits for an acknowledgement line at most (also bounded by `timeout`).
const ACK_WINDOW: Duration = Duration::from_millis(200);

/// The serial line driver. One value serves every serial device of the mapper.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialDriver;

impl SerialDriver {
    /// A new driver.
    pub fn new() -> Self {
        SerialDriver
    }
}

/// One line from the device, and whether an unsolicited pattern took its value.
#[derive(Debug)]
struct Line {
    text: String,
    claimed: bool,
}

/// How one property is read.
#[derive(Debug, Clone)]
struct PropSpec {
    ex: Extractor,
    ty: PropertyType,
    request: Option<String>,
    write: Option<String>,
}

/// An unsolicited property's last value with when it arrived, or why its last line did not parse.
type Kept = Result<(Value, TimestampMs), DriverError>;

/// State the reader task shares with the connection.
#[derive(Debug, Default)]
struct Shared {
    /// Latest value with its arrival time (or garbled-line error) of each unsolicited property.
    latest: Mutex<HashMap<String, Kept>>,
    /// Why the port stopped delivering, once it has.
    closed: Mutex<Option<String>>,
    /// Woken on every unsolicited update and when the port closes.
    arrived: Notify,
}

impl Shared {
    fn closed(&self) -> Option<String> {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn latest(&self, name: &str) -> Option<Kept> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

/// An open serial port to one device, with its reader task.
#[derive(Debug)]
pub struct SerialConn {
    port: WriteHalf<SerialStream>,
    lines: mpsc::UnboundedReceiver<Line>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// Unsolicited values as they arrive, until the runtime takes the receiver.
    pushed: Option<mpsc::Receiver<Pushed>>,
    props: HashMap<String, Result<PropSpec, String>>,
    settings: LineSettings,
    requests: u64,
}

impl SerialConn {
    /// Requests and writes sent on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    fn link(&self, what: &str) -> DriverError {
        DriverError::Link(format!("{what} on {}", self.settings))
    }

    fn closed_error(&self) -> DriverError {
        let why = self
            .shared
            .closed()
            .unwrap_or_else(|| "the port closed".into());
        self.link(&format!("serial port failed: {why}"))
    }

    /// Sends `bytes` within the timeout.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), DriverError> {
        let t = self.settings.timeout;
        let sent = tokio::time::timeout(t, async {
            self.port.write_all(bytes).await?;
            self.port.flush().await
        })
        .await;
        self.requests += 1;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.link(&format!("writing {:?}: {e}", lossy(bytes)))),
            Err(_) => Err(self.link(&format!(
                "writing {:?}: not sent within {t:?}",
                lossy(bytes)
            ))),
        }
    }

    /// Drops lines nobody asked for (late replies, acknowledgements, noise).
    fn discard_stale(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            if !l.claimed {
                debug!(port = %self.settings.path, line = %l.text, "discarding a line nobody asked for");
            }
        }
    }

    /// Sends the request of `spec` and takes the value from the reply line.
    async fn poll(&mut self, name: &str, spec: &PropSpec, request: &str) -> PolledResult {
        self.discard_stale();
        self.send(request.as_bytes()).await?;
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => {
                    return Err(self.link(&format!(
                        "no reply to {request:?} for property {name:?} within {:?}",
                        self.settings.timeout
                    )))
                }
                Ok(None) => return Err(self.closed_error()),
                Ok(Some(l)) => l,
            };
            if spec.ex.matches(&line.text) {
                return Ok(codec::parse_line(&spec.ex, &line.text, spec.ty)
                    .map_err(|e| DriverError::Device(e.to_string())));
            }
            if line.claimed || line.text.trim().is_empty() {
                continue;
            }
            warn!(port = %self.settings.path, property = name, line = %line.text, "garbled reply line skipped");
            return Ok(codec::parse_line(&spec.ex, &line.text, spec.ty)
                .map_err(|e| DriverError::Device(e.to_string())));
        }
    }

    /// The latest value of an unsolicited property; waits until `deadline` for the first one.
    async fn latest(
        &mut self,
        name: &str,
        spec: &PropSpec,
        deadline: Instant,
    ) -> Result<Reading, DriverError> {
        loop {
            let notified = self.shared.arrived.notified();
            if let Some(v) = self.shared.latest(name) {
                return v.map(|(v, ts)| Reading::kept(v, ts));
            }
            if self.shared.closed().is_some() {
                return Err(self.closed_error());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(DriverError::Device(format!(
                    "no line matching {:?} has arrived yet (unsolicited)",
                    spec.ex.pattern()
                )));
            }
        }
    }

    /// Consumes the device's answer to a write, if it gives one promptly.
    async fn take_ack(&mut self, name: &str) {
        let deadline = Instant::now() + self.settings.timeout.min(ACK_WINDOW);
        while let Ok(Some(l)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            if !l.claimed && !l.text.trim().is_empty() {
                debug!(port = %self.settings.path, property = name, line = %l.text, "answer to write");
                return;
            }
        }
    }
}

impl Drop for SerialConn {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

/// A polled read: `Err` is a link failure, `Ok(Err)` a per-property error.
type PolledResult = Result<Result<Value, DriverError>, DriverError>;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn data_bits(b: DataBits) -> tokio_serial::DataBits {
    match b {
        DataBits::Five => tokio_serial::DataBits::Five,
        DataBits::Six => tokio_serial::DataBits::Six,
        DataBits::Seven => tokio_serial::DataBits::Seven,
        DataBits::Eight => tokio_serial::DataBits::Eight,
    }
}

fn parity(p: Parity) -> tokio_serial::Parity {
    match p {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    }
}

fn stop_bits(s: StopBits) -> tokio_serial::StopBits {
    match s {
        StopBits::One => tokio_serial::StopBits::One,
        StopBits::Two => tokio_serial::StopBits::Two,
    }
}

/// The reader task: lines into the channel, unsolicited values into `shared`.
async fn read_lines(
    mut port: tokio::io::ReadHalf<SerialStream>,
    ending: String,
    unsolicited: Vec<(String, PropSpec)>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Line>,
    push: mpsc::Sender<Pushed>,
) {
    let mut splitter = LineSplitter::new(&ending);
    let mut buf = [0u8; 512];
    let why = loop {
        let n = match port.read(&mut buf).await {
            Ok(0) => break "end of file".to_string(),
            Ok(n) => n,
            Err(e) => break e.to_string(),
        };
        for text in splitter.push(&buf[..n]) {
            let mut claimed = false;
            for (name, spec) in &unsolicited {
                if !spec.ex.matches(&text) {
                    continue;
                }
                claimed = true;
                let at = now_ms();
                let v = codec::parse_line(&spec.ex, &text, spec.ty)
                    .map(|v| (v, at))
                    .map_err(|e| DriverError::Device(e.to_string()));
                if let Err(e) = &v {
                    warn!(property = %name, error = %e, "garbled unsolicited line skipped");
                }
                let reading = match &v {
                    Ok((v, at)) => Ok(Reading::kept(v.clone(), *at)),
                    Err(e) => Err(Refusal::Device(e.to_string())),
                };
                // A full queue drops the push; the value stays in `latest` for the next read.
                let _ = push.try_send(Pushed {
                    property: name.clone(),
                    reading,
                });
                shared
                    .latest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), v);
            }
            if claimed {
                shared.arrived.notify_waiters();
            }
            if tx.send(Line { text, claimed }).is_err() {
                return;
            }
        }
    };
    debug!(error = %why, "serial reader stopped");
    *shared.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    shared.arrived.notify_waiters();
}

impl Driver for SerialDriver {
    type Conn = SerialConn;

    fn protocol(&self) -> &'static str {
        "serial"
    }

    async fn connect(&self, dev: &ResolvedDevice) -> Result<SerialConn, DriverError> {
        let settings = config::settings(dev).map_err(|e| DriverError::Config(e.to_string()))?;
        let mut props = HashMap::new();
        let mut unsolicited = Vec::new();
        for p in &dev.device.spec.properties {
            let name = p.name.as_str().to_string();
            let spec = config::property(dev, p)
                .map_err(|e| e.to_string())
                .and_then(|(v, ty)| {
                    let ex = Extractor::new(&v.pattern).map_err(|e| e.to_string())?;
                    Ok((
                        PropSpec {
                            ex,
                            ty,
                            request: v.request.clone(),
                            write: v.write.clone(),
                        },
                        config::is_unsolicited(v),
                    ))
                });
            match spec {
                Ok((spec, uns)) => {
                    if uns {
                        unsolicited.push((name.clone(), spec.clone()));
                    }
                    props.insert(name, Ok(spec));
                }
                Err(e) => {
                    props.insert(name, Err(e));
                }
            }
        }
        let port = tokio_serial::new(&settings.path, settings.baud_rate)
            .data_bits(data_bits(settings.data_bits))
            .parity(parity(settings.parity))
            .stop_bits(stop_bits(settings.stop_bits))
            .timeout(settings.timeout)
            .open_native_async()
            .map_err(|e| DriverError::Link(format!("opening serial port {settings}: {e}")))?;
        let (read_half, write_half) = tokio::io::split(port);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let pushes = !unsolicited.is_empty();
        let reader = tokio::spawn(read_lines(
            read_half,
            settings.line_ending.clone(),
            unsolicited,
            shared.clone(),
            tx,
            push_tx,
        ));
        info!(port = %settings, "serial port open");
        Ok(SerialConn {
            port: write_half,
            lines: rx,
            shared,
            reader: Some(reader),
            pushed: pushes.then_some(push_rx),
            props,
            settings,
            requests: 0,
        })
    }

    async fn read(
        &self,
        conn: &mut SerialConn,
        _dev: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> ReadResult {
        read_result(props.len(), conn.read_values(props).await)
    }

    async fn write(
        &self,
        conn: &mut SerialConn,
        _dev: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<PropertyResult<()>, LinkLost> {
        written(conn.write_value(prop, value).await)
    }

    fn pushed(&self, conn: &mut SerialConn) -> Option<mpsc::Receiver<Pushed>> {
        conn.pushed.take()
    }

    async fn disconnect(&self, mut conn: SerialConn) {
        // The port closes once the reader task has dropped its half and `conn` its own; wait for
        // that, so a reconnect does not find the port still open (and busy).
        let reader = conn.reader.take();
        drop(conn);
        if let Some(r) = reader {
            r.abort();
            let _ = r.await;
        }
    }

    fn requests_made(&self, conn: &SerialConn) -> Option<u64> {
        Some(conn.requests)
    }
}

impl SerialConn {
    /// Every property's value in the order of `props`; `Err` only for the link.
    async fn read_values(
        &mut self,
        props: &[&DeviceProperty],
    ) -> Result<Vec<Result<Reading, DriverError>>, DriverError> {
        let conn = self;
        if conn.shared.closed().is_some() {
            return Err(conn.closed_error());
        }
        let deadline = Instant::now() + conn.settings.timeout;
        let mut out = Vec::with_capacity(props.len());
        for p in props {
            let name = p.name.as_str();
            let spec = match conn.props.get(name) {
                Some(Ok(s)) => s.clone(),
                Some(Err(e)) => {
                    out.push(Err(DriverError::Config(e.clone())));
                    continue;
                }
                None => {
                    out.push(Err(DriverError::Config(format!(
                        "property {name} is not in the device profile"
                    ))));
                    continue;
                }
            };
            let r = match spec.request.clone() {
                Some(req) => conn.poll(name, &spec, &req).await?.map(Reading::fresh),
                None => conn.latest(name, &spec, deadline).await,
            };
            if let Err(DriverError::Link(m)) = r {
                return Err(DriverError::Link(m));
            }
            out.push(r);
        }
        Ok(out)
    }

    async fn write_value(
        &mut self,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<(), DriverError> {
        let conn = self;
        let name = prop.name.as_str();
        let spec = match conn.props.get(name) {
            Some(Ok(s)) => s.clone(),
            Some(Err(e)) => return Err(DriverError::Config(e.clone())),
            None => {
                return Err(DriverError::Config(format!(
                    "property {name} is not in the device profile"
                )))
            }
        };
        let Some(template) = &spec.write else {
            return Err(DriverError::Config(format!(
                "property {name} has no write template"
            )));
        };
        let text = codec::render(template, value)
            .map_err(|e| DriverError::Config(format!("property {name}: {e}")))?;
        if conn.shared.closed().is_some() {
            return Err(conn.closed_error());
        }
        conn.discard_stale();
        conn.send(text.as_bytes()).await?;
        conn.take_ack(name).await;
        Ok(())
    }
}
