//! One device's task: connect with backoff, poll on the fixed-rate schedule, report, write
//! desired values, publish status and errors.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use edgetwin_contract::value::same_value;
use edgetwin_contract::{
    DeltaMsg, DeviceId, DeviceState, ErrorCode, ErrorMsg, PropertyErrorReport, PropertyOp,
    TelemetryMsg, TimestampMs, Topic, ERRORS_KEY,
};
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{now_ms, DeviceSettings, Out};
use crate::driver::{LinkLost, Pushed, Reading, Refusal};
use crate::metrics::{observe, Metrics};
use crate::report::{patch, ReportPolicy, Reporter};
use crate::schedule::{Due, Schedule};
use crate::{Driver, DriverError};
use edgetwin_retry::Backoff;

/// How many times a desired value is written while the device reads back another value.
pub const WRITE_ATTEMPTS: u32 = 3;

/// The wait before the second write of a value not held; doubled for each further one.
pub const WRITE_RETRY_BASE: Duration = Duration::from_millis(500);

/// How long a value written and read back as held stands against a delta asking for it again.
/// A reading taken before the write (an OPC UA data change queued before it, a collect cycle in
/// flight) can reach the node after the write, and the node answers it with a delta for the
/// value just written; within this window that delta is not a reason to write again.
pub const WRITE_SETTLE: Duration = Duration::from_secs(2);

/// The error code a refused read or write is published with.
fn refusal_code(e: &Refusal, writing: bool) -> ErrorCode {
    match e {
        Refusal::Config(_) => ErrorCode::DeviceConfig,
        Refusal::Device(_) if writing => ErrorCode::WriteFailed,
        Refusal::Device(_) => ErrorCode::DeviceRefused,
    }
}

/// A desired value to write: the property, the value, how many writes it had, when it is due.
struct Write {
    idx: usize,
    value: Value,
    attempt: u32,
    due: Instant,
}

/// What one poll, push or write produces, published by [`DeviceTask::send`].
#[derive(Default)]
struct Report {
    /// Fresh values, stamped when sent.
    values: Map<String, Value>,
    /// Kept (pushed) values by the time the device sent them.
    kept: BTreeMap<TimestampMs, Map<String, Value>>,
    telemetry: Map<String, Value>,
    kept_telemetry: BTreeMap<TimestampMs, Map<String, Value>>,
    /// Property errors that are new or changed.
    errors: BTreeMap<String, PropertyErrorReport>,
}

impl Report {
    fn values_at(&mut self, ts: TimestampMs) -> &mut Map<String, Value> {
        self.kept.entry(ts).or_default()
    }

    fn telemetry_at(&mut self, ts: TimestampMs) -> &mut Map<String, Value> {
        self.kept_telemetry.entry(ts).or_default()
    }
}

/// `90 s`, `500 ms`: a duration as a field engineer writes it.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Why a connected phase ended.
enum Ended {
    /// The link broke (message from the driver).
    LinkLost(String),
    /// Shutdown, removal or profile change.
    Cancelled,
}

pub(crate) struct DeviceTask<D: Driver> {
    driver: Arc<D>,
    resolved: Arc<ResolvedDevice>,
    id: DeviceId,
    out: Out,
    metrics: Metrics,
    token: CancellationToken,
    settings: DeviceSettings,
    cycles: Vec<Duration>,
    reporter: Reporter,
    /// Last published (state, message).
    status: Option<(DeviceState, Option<String>)>,
    /// The lasting error each property carries, as last sent (sent again only when it changes).
    prop_errors: Vec<Option<(String, PropertyOp)>>,
    /// The device's time of the last kept (pushed) value reported, per property.
    kept_ts: Vec<Option<TimestampMs>>,
    /// When a pushed value last arrived, per property (for `silenceTimeout`).
    pushed_at: Vec<Option<Duration>>,
    /// When the current connection opened (since `epoch`).
    connected_at: Duration,
    /// Desired values to write now, in order.
    pending: Vec<Write>,
    /// Desired values the device did not hold, to be written again when due.
    retries: Vec<Write>,
    /// Per property: the last value written and read back as held, and when.
    settled: Vec<Option<(Value, Instant)>>,
    last_delta_version: Option<u64>,
    epoch: Instant,
}

impl<D: Driver> DeviceTask<D> {
    pub(crate) fn new(
        driver: Arc<D>,
        resolved: Arc<ResolvedDevice>,
        out: Out,
        metrics: Metrics,
        token: CancellationToken,
        settings: DeviceSettings,
    ) -> DeviceTask<D> {
        let props = &resolved.device.spec.properties;
        let cycles: Vec<Duration> = props
            .iter()
            .map(|p| {
                p.collect_cycle
                    .map(|d| d.as_std())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(settings.default_collect_cycle)
            })
            .collect();
        let policies = props
            .iter()
            .zip(&cycles)
            .map(|(p, c)| ReportPolicy::of(p, *c))
            .collect();
        DeviceTask {
            id: resolved.id().clone(),
            driver,
            out,
            metrics,
            token,
            settings,
            reporter: Reporter::new(policies),
            prop_errors: vec![None; cycles.len()],
            kept_ts: vec![None; cycles.len()],
            pushed_at: vec![None; cycles.len()],
            connected_at: Duration::ZERO,
            retries: Vec::new(),
            settled: vec![None; cycles.len()],
            cycles,
            status: None,
            pending: Vec::new(),
            last_delta_version: None,
            epoch: Instant::now(),
            resolved,
        }
    }

    fn props(&self) -> &[DeviceProperty] {
        &self.resolved.device.spec.properties
    }

    /// Runs until cancelled. `predecessor` is the task this one replaces (profile change): it
    /// must have closed its connection before this one opens one.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<DeltaMsg>,
        predecessor: Option<JoinHandle<()>>,
    ) {
        if let Some(p) = predecessor {
            let _ = p.await;
        }
        let shortest = self
            .cycles
            .iter()
            .min()
            .copied()
            .unwrap_or(self.settings.default_collect_cycle);
        // Retry at least once per poll period, so "offline within two poll periods" and recovery
        // without restart hold even after long outages.
        let cap = self.settings.backoff_max.min(shortest);
        let mut backoff = Backoff::new(Duration::from_millis(100).min(cap), cap);
        loop {
            let connected = tokio::select! {
                biased;
                _ = self.token.cancelled() => return,
                r = self.driver.connect(&self.resolved) => r,
            };
            let mut conn = match connected {
                Ok(c) => c,
                Err(DriverError::Config(m)) => {
                    warn!(device = %self.id, error = %m, "device configuration cannot work; waiting for a profile change");
                    self.set_status(DeviceState::Error, Some(format!("configuration: {m}")));
                    self.wait(&mut rx, Duration::from_secs(365 * 24 * 3600))
                        .await;
                    return;
                }
                Err(e) => {
                    let state = match e {
                        DriverError::Device(_) => DeviceState::Error,
                        _ => DeviceState::Offline,
                    };
                    debug!(device = %self.id, error = %e, "connect failed");
                    self.set_status(state, Some(e.to_string()));
                    let delay = backoff.next_delay();
                    if !self.wait(&mut rx, delay).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            info!(device = %self.id, "device connected");
            self.reporter.reset();
            let ended = self.connected(&mut conn, &mut rx).await;
            self.driver.disconnect(conn).await;
            match ended {
                Ended::Cancelled => return,
                Ended::LinkLost(m) => {
                    warn!(device = %self.id, error = %m, "device link lost");
                    self.set_status(DeviceState::Offline, Some(format!("link: {m}")));
                    let delay = backoff.next_delay();
                    if !self.wait(&mut rx, delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits `d` while taking deltas; false when cancelled.
    async fn wait(&mut self, rx: &mut mpsc::UnboundedReceiver<DeltaMsg>, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return false,
                m = rx.recv() => match m {
                    Some(m) => self.accept_delta(m),
                    None => return false,
                },
                _ = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }

    /// The connected phase: polls and writes until the link breaks or the task is cancelled.
    async fn connected(
        &mut self,
        conn: &mut D::Conn,
        rx: &mut mpsc::UnboundedReceiver<DeltaMsg>,
    ) -> Ended {
        let mut schedule = Schedule::new(&self.cycles);
        let start = Instant::now();
        self.connected_at = self.epoch.elapsed();
        self.kept_ts.iter_mut().for_each(|t| *t = None);
        let mut pushed = self.driver.pushed(conn);
        if let Err(e) = self.write_pending(conn).await {
            return e;
        }
        loop {
            let wake = schedule.next_wake().map(|w| start + w);
            let retry = self.retries.iter().map(|w| w.due).min();
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Ended::Cancelled,
                p = recv_pushed(&mut pushed) => match p {
                    Some(p) => self.take_pushed(p),
                    None => {
                        // The driver's push source ended, which means the link is gone: a read
                        // of everything gets the driver's own account of why.
                        pushed = None;
                        let all = Due {
                            props: (0..self.props().len()).collect(),
                            overruns: 0,
                        };
                        if let Err(e) = self.poll(conn, all).await {
                            return e;
                        }
                    }
                },
                _ = sleep_until_opt(retry) => {
                    self.due_retries();
                    if let Err(e) = self.write_pending(conn).await {
                        return e;
                    }
                }
                m = rx.recv() => match m {
                    None => return Ended::Cancelled,
                    Some(m) => {
                        self.accept_delta(m);
                        if let Err(e) = self.write_pending(conn).await {
                            return e;
                        }
                    }
                },
                _ = sleep_until_opt(wake) => {
                    let due = schedule.take_due(start.elapsed());
                    if let Err(e) = self.poll(conn, due).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Runs a driver call unless the task is cancelled first.
    async fn guarded<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, Ended> {
        tokio::select! {
            biased;
            _ = self.token.cancelled() => Err(Ended::Cancelled),
            r = f => Ok(r),
        }
    }

    fn count_requests(&self, before: Option<u64>, conn: &D::Conn) -> u64 {
        match (before, self.driver.requests_made(conn)) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => 1,
        }
    }

    async fn poll(&mut self, conn: &mut D::Conn, due: Due) -> Result<(), Ended> {
        let name = self.id.as_str().to_owned();
        if due.overruns > 0 {
            debug!(device = %self.id, overruns = due.overruns, "poll overran its cycle");
            self.metrics
                .with(&name, |c| c.poll_overruns += due.overruns);
        }
        let mut report = Report::default();
        self.check_silence(&mut report);
        if due.props.is_empty() {
            self.send(report);
            return Ok(());
        }
        let resolved = self.resolved.clone();
        let props: Vec<&DeviceProperty> = due
            .props
            .iter()
            .filter_map(|i| resolved.device.spec.properties.get(*i))
            .collect();
        let n = props.len() as u64;
        let before = self.driver.requests_made(conn);
        let started = Instant::now();
        let result = self
            .guarded(self.driver.read(conn, &resolved, &props))
            .await?;
        let latency = started.elapsed();
        let requests = self.count_requests(before, conn);
        self.metrics.with(&name, |c| {
            c.reads += n;
            c.requests += requests;
            observe(&mut c.read_latency, latency);
        });
        let mut results = match result {
            Err(LinkLost(m)) => {
                self.metrics.with(&name, |c| c.read_errors += n);
                self.send(report);
                return Err(Ended::LinkLost(m));
            }
            Ok(list) => list.into_iter(),
        };
        let mut ok = 0usize;
        let mut first_refusal = None;
        for i in due.props.iter().copied() {
            let r = results.next().unwrap_or_else(|| {
                Err(Refusal::Config(
                    "the driver returned no value for it".into(),
                ))
            });
            match r {
                Ok(reading) => {
                    ok += 1;
                    self.take_reading(&mut report, i, reading);
                }
                Err(e) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    let msg = format!("reading property {:?}: {e}", self.props()[i].name.as_str());
                    first_refusal.get_or_insert_with(|| msg.clone());
                    self.set_error(&mut report, i, refusal_code(&e, false), msg, None);
                }
            }
        }
        self.send(report);
        if ok > 0 {
            self.set_status(DeviceState::Online, None);
        } else if let Some(m) = first_refusal {
            // Only count it as "every read refused" when nothing else on the device is readable.
            let all_refused = self.prop_errors.iter().all(Option::is_some);
            if all_refused {
                self.set_status(
                    DeviceState::Error,
                    Some(format!("every property read was refused; {m}")),
                );
            }
        }
        Ok(())
    }

    /// Takes one reading of property `i` into `report`, if it is to be reported: a fresh one by
    /// the report policy, a kept one only when the device pushed it since the last report (a
    /// kept value is never reported again as if read now). A property that had a read error is
    /// reported at once, so the twin sees it readable again.
    fn take_reading(&mut self, report: &mut Report, i: usize, reading: Reading) {
        let now = self.epoch.elapsed();
        let prop = &self.resolved.device.spec.properties[i];
        let name = prop.name.as_str().to_string();
        // A kept value the device sent no later than the one reported last is nothing new: not
        // a reading, so not a recovery either.
        if let Some(ts) = reading.kept_since {
            if self.kept_ts[i].is_some_and(|last| ts <= last) {
                return;
            }
        }
        let recovered = match self.prop_errors[i].take() {
            Some((_, PropertyOp::Read)) => {
                info!(device = %self.id, property = %name, "property readable again");
                true
            }
            Some(e) => {
                // A write error stays until desired changes or the value is met.
                self.prop_errors[i] = Some(e);
                false
            }
            None => false,
        };
        match reading.kept_since {
            Some(ts) => {
                self.kept_ts[i] = Some(ts);
                self.pushed_at[i] = Some(now);
                self.reporter.force(i, &reading.value, now);
                if prop.telemetry {
                    report
                        .telemetry_at(ts)
                        .insert(name.clone(), reading.value.clone());
                }
                report.values_at(ts).insert(name, reading.value);
            }
            None => {
                if prop.telemetry {
                    report.telemetry.insert(name.clone(), reading.value.clone());
                }
                let reported = if recovered {
                    self.reporter.force(i, &reading.value, now);
                    true
                } else {
                    self.reporter.observe(i, &reading.value, now)
                };
                if reported {
                    report.values.insert(name, reading.value);
                }
            }
        }
    }

    /// A pushed value: reported at once, with the time it arrived.
    fn take_pushed(&mut self, p: Pushed) {
        let Some(i) = self
            .props()
            .iter()
            .position(|q| q.name.as_str() == p.property)
        else {
            debug!(device = %self.id, property = %p.property, "pushed value for a property this device does not map; ignored");
            return;
        };
        let mut report = Report::default();
        match p.reading {
            Ok(reading) => self.take_reading(&mut report, i, reading),
            Err(e) => {
                let msg = format!("pushed value of {:?}: {e}", p.property);
                self.set_error(&mut report, i, refusal_code(&e, false), msg, None);
            }
        }
        self.send(report);
        self.set_status(DeviceState::Online, None);
    }

    /// Pushed properties with a `silenceTimeout` that sent nothing for that long get a lasting
    /// error (the node marks the whole device `stale` when nothing else is read).
    fn check_silence(&mut self, report: &mut Report) {
        let now = self.epoch.elapsed();
        for i in 0..self.props().len() {
            let prop = &self.props()[i];
            let Some(limit) = prop
                .silence_timeout
                .map(|d| d.as_std())
                .filter(|_| prop.is_pushed())
            else {
                continue;
            };
            let since = self.pushed_at[i].unwrap_or(self.connected_at);
            if now.saturating_sub(since) <= limit || self.prop_errors[i].is_some() {
                continue;
            }
            let msg = format!(
                "property {:?}: the device pushed no value for {} s (silenceTimeout {})",
                prop.name.as_str(),
                now.saturating_sub(since).as_secs(),
                humantime(limit)
            );
            warn!(device = %self.id, property = %prop.name, "pushed value silent past its silenceTimeout");
            self.set_error(report, i, ErrorCode::Silent, msg, None);
        }
    }

    /// Records a lasting error of property `i` (sent in `report`'s `$errors`, and once on
    /// `dt/{device}/error`) unless it already carries the same one.
    fn set_error(
        &mut self,
        report: &mut Report,
        i: usize,
        code: ErrorCode,
        message: String,
        write: Option<Value>,
    ) {
        let op = if write.is_some() {
            PropertyOp::Write
        } else {
            PropertyOp::Read
        };
        if self.prop_errors[i].as_ref() == Some(&(message.clone(), op)) {
            return;
        }
        let prop = self.props()[i].name.as_str().to_string();
        warn!(device = %self.id, property = %prop, code = %code, error = %message, "property error");
        let about = match op {
            PropertyOp::Read => Topic::Reported(self.id.clone()),
            PropertyOp::Write => Topic::Delta(self.id.clone()),
        };
        self.error(about, code, message.clone());
        report.errors.insert(
            prop,
            PropertyErrorReport {
                code,
                message: message.clone(),
                op,
                value: write,
            },
        );
        self.prop_errors[i] = Some((message, op));
    }

    /// Publishes what a poll, push or write produced: fresh values as one patch stamped now,
    /// kept values each with their own time, telemetry likewise.
    fn send(&self, report: Report) {
        let Report {
            values,
            kept,
            telemetry,
            kept_telemetry,
            errors,
        } = report;
        let reported = Topic::Reported(self.id.clone()).to_topic_string();
        let now = now_ms();
        if !values.is_empty() || !errors.is_empty() {
            let mut m = patch(values, now);
            if !errors.is_empty() {
                match serde_json::to_value(&errors) {
                    Ok(e) => {
                        m.insert(ERRORS_KEY.into(), e);
                    }
                    Err(e) => warn!(device = %self.id, error = %e, "cannot encode property errors"),
                }
            }
            self.out.json(&reported, &m, false);
        }
        for (ts, values) in kept {
            self.out.json(&reported, &patch(values, ts), false);
        }
        let telemetry_topic = Topic::Telemetry(self.id.clone()).to_topic_string();
        if !telemetry.is_empty() {
            self.out.json(
                &telemetry_topic,
                &TelemetryMsg {
                    ts: now,
                    values: telemetry,
                },
                false,
            );
        }
        for (ts, values) in kept_telemetry {
            self.out
                .json(&telemetry_topic, &TelemetryMsg { ts, values }, false);
        }
    }

    fn accept_delta(&mut self, m: DeltaMsg) {
        if self.last_delta_version.is_some_and(|v| m.version <= v) {
            debug!(device = %self.id, version = m.version, "ignoring delta not newer than the last applied");
            return;
        }
        self.last_delta_version = Some(m.version);
        for (k, v) in m.delta {
            let Some(i) = self.props().iter().position(|p| p.name.as_str() == k) else {
                debug!(device = %self.id, property = %k, "delta for a property this device does not map; ignored");
                continue;
            };
            // The same value already being written (or waiting for its retry) keeps its count:
            // a delta repeated by a reconnect must not reset the budget.
            let busy = self
                .pending
                .iter()
                .any(|w| w.idx == i && same_value(&w.value, &v))
                || self
                    .retries
                    .iter()
                    .any(|w| w.idx == i && same_value(&w.value, &v));
            if busy {
                continue;
            }
            let settled_at = self.settled[i]
                .as_ref()
                .filter(|(held, at)| same_value(held, &v) && at.elapsed() < WRITE_SETTLE)
                .map(|(_, at)| *at);
            // This delta replaces whatever write of the property was waiting.
            self.pending.retain(|w| w.idx != i);
            self.retries.retain(|w| w.idx != i);
            let write = |due| Write {
                idx: i,
                value: v,
                attempt: 0,
                due,
            };
            match settled_at {
                Some(at) => {
                    // Looked at again when the window closes: written then only if the device
                    // was last reported holding something else (a check, not a retry: attempt 0).
                    debug!(device = %self.id, property = %k, "delta for the value just written and held; checked again in 2 s");
                    self.retries.push(write(at + WRITE_SETTLE));
                }
                None => self.pending.push(write(Instant::now())),
            }
        }
    }

    /// Moves the retries that are due into the write queue.
    fn due_retries(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Write>, Vec<Write>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|w| w.due <= now);
        self.retries = later;
        for w in due {
            // A settle check (attempt 0, see `accept_delta`) whose value the device holds is done.
            let held = self
                .reporter
                .last_reported(w.idx)
                .is_some_and(|r| same_value(r, &w.value));
            if w.attempt == 0 && held {
                continue;
            }
            self.pending.push(w);
        }
    }

    /// Writes every pending desired value, reads it back and reports it. A read-back that
    /// differs is written again after a back-off, at most [`WRITE_ATTEMPTS`] times in all; then
    /// the property carries a lasting `write_not_held` error and is not written again until
    /// desired changes.
    async fn write_pending(&mut self, conn: &mut D::Conn) -> Result<(), Ended> {
        let name = self.id.as_str().to_owned();
        let resolved = self.resolved.clone();
        while !self.pending.is_empty() {
            let w = self.pending.remove(0);
            let (i, value) = (w.idx, w.value.clone());
            let prop = &resolved.device.spec.properties[i];
            let before = self.driver.requests_made(conn);
            let written = match self
                .guarded(self.driver.write(conn, &resolved, prop, &value))
                .await
            {
                Ok(w) => w,
                Err(e) => {
                    self.pending.insert(0, w);
                    return Err(e);
                }
            };
            let requests = self.count_requests(before, conn);
            self.metrics.with(&name, |c| {
                c.writes += 1;
                c.requests += requests;
            });
            let mut report = Report::default();
            match written {
                Ok(Ok(())) => {
                    info!(device = %self.id, property = %prop.name, value = %value, attempt = w.attempt + 1, "desired value written");
                }
                Err(LinkLost(m)) => {
                    self.metrics.with(&name, |c| c.write_errors += 1);
                    self.pending.insert(0, w);
                    return Err(Ended::LinkLost(m));
                }
                Ok(Err(e)) => {
                    self.metrics.with(&name, |c| c.write_errors += 1);
                    let msg = format!(
                        "writing property {:?} = {value}: {e}; not written again until desired changes",
                        prop.name.as_str()
                    );
                    self.set_error(&mut report, i, refusal_code(&e, true), msg, Some(value));
                    self.send(report);
                    continue;
                }
            }
            // Read back what the device now holds and report it.
            let before = self.driver.requests_made(conn);
            let started = Instant::now();
            let back = self
                .guarded(self.driver.read(conn, &resolved, &[prop]))
                .await?;
            let latency = started.elapsed();
            let requests = self.count_requests(before, conn);
            self.metrics.with(&name, |c| {
                c.reads += 1;
                c.requests += requests;
                observe(&mut c.read_latency, latency);
            });
            let back = match back {
                Ok(list) => list.into_iter().next().unwrap_or_else(|| {
                    Err(Refusal::Config(
                        "the driver returned no value for it".into(),
                    ))
                }),
                Err(LinkLost(m)) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    return Err(Ended::LinkLost(m));
                }
            };
            match back {
                Ok(reading) => {
                    let held = reading.value.clone();
                    let now = self.epoch.elapsed();
                    self.reporter.force(i, &held, now);
                    if matches!(self.prop_errors[i], Some((_, PropertyOp::Read))) {
                        self.prop_errors[i] = None;
                    }
                    report
                        .values
                        .insert(prop.name.as_str().into(), held.clone());
                    if same_value(&held, &value) {
                        self.settled[i] = Some((held.clone(), Instant::now()));
                        // Met: the node clears a write error once reported equals desired.
                        if matches!(self.prop_errors[i], Some((_, PropertyOp::Write))) {
                            self.prop_errors[i] = None;
                        }
                    } else if w.attempt + 1 < WRITE_ATTEMPTS {
                        let delay = WRITE_RETRY_BASE.saturating_mul(1 << w.attempt);
                        warn!(device = %self.id, property = %prop.name, wrote = %value, holds = %held, retry_in_ms = delay.as_millis() as u64, "the device holds another value than written; writing again");
                        self.retries.push(Write {
                            idx: i,
                            value,
                            attempt: w.attempt + 1,
                            due: Instant::now() + delay,
                        });
                    } else {
                        let msg = format!(
                            "wrote {value} to property {:?} {WRITE_ATTEMPTS} times, the device holds {held}; not written again until desired changes",
                            prop.name.as_str()
                        );
                        self.set_error(&mut report, i, ErrorCode::WriteNotHeld, msg, Some(value));
                    }
                }
                Err(e) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    let msg = format!(
                        "reading back property {:?} after a write: {e}",
                        prop.name.as_str()
                    );
                    self.set_error(&mut report, i, refusal_code(&e, false), msg, None);
                }
            }
            self.send(report);
        }
        Ok(())
    }

    fn error(&self, about: Topic, code: ErrorCode, message: String) {
        let msg = ErrorMsg {
            id: None,
            code,
            message,
            topic: about.to_topic_string(),
        };
        self.out.json(
            &Topic::Error(self.id.clone()).to_topic_string(),
            &msg,
            false,
        );
    }

    fn set_status(&mut self, state: DeviceState, message: Option<String>) {
        let same = match &self.status {
            Some((s, _)) if *s == state && state == DeviceState::Online => true,
            Some((s, m)) => *s == state && *m == message,
            None => false,
        };
        if same {
            return;
        }
        info!(device = %self.id, state = ?state, message = message.as_deref().unwrap_or(""), "device status");
        self.out.status(&self.id, state, message.clone());
        self.status = Some((state, message));
    }
}

/// The next pushed value; never, when the driver pushes nothing.
async fn recv_pushed(rx: &mut Option<mpsc::Receiver<Pushed>>) -> Option<Pushed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
