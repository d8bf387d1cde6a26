//! One device's task: connect with backoff, poll on the fixed-rate schedule, report, write
//! desired values, publish status and errors.

use std::sync::Arc;
use std::time::Duration;

use edgetwin_contract::{
    DeltaMsg, DeviceId, DeviceState, ErrorCode, ErrorMsg, TelemetryMsg, Topic,
};
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{now_ms, DeviceSettings, Out};
use crate::metrics::{observe, Metrics};
use crate::report::{patch, ReportPolicy, Reporter};
use crate::schedule::{Due, Schedule};
use crate::{Driver, DriverError};
use edgetwin_retry::Backoff;

/// The error code a failed read or write is published with.
fn error_code(e: &DriverError, writing: bool) -> ErrorCode {
    match e {
        DriverError::Config(_) => ErrorCode::DeviceConfig,
        _ if writing => ErrorCode::WriteFailed,
        _ => ErrorCode::DeviceRefused,
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
    /// Last error published per property (published again only when it changes).
    prop_errors: Vec<Option<String>>,
    /// Desired values not written yet (device offline when they arrived), by property index.
    pending: Vec<(usize, Value)>,
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
        if let Err(e) = self.write_pending(conn).await {
            return e;
        }
        loop {
            let wake = schedule.next_wake().map(|w| start + w);
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Ended::Cancelled,
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
        if due.props.is_empty() {
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
        let results: Vec<(usize, Result<Value, DriverError>)> = match result {
            Err(DriverError::Link(m)) => {
                self.metrics.with(&name, |c| c.read_errors += n);
                return Err(Ended::LinkLost(m));
            }
            Err(e) => due.props.iter().map(|i| (*i, Err(e.clone()))).collect(),
            Ok(list) => due
                .props
                .iter()
                .map(|i| {
                    let pname = self.props()[*i].name.as_str();
                    let r = list
                        .iter()
                        .find(|(n, _)| n == pname)
                        .map(|(_, r)| r.clone())
                        .unwrap_or_else(|| {
                            Err(DriverError::Config("the driver returned no value".into()))
                        });
                    (*i, r)
                })
                .collect(),
        };
        if let Some(m) = results.iter().find_map(|(_, r)| match r {
            Err(DriverError::Link(m)) => Some(m.clone()),
            _ => None,
        }) {
            self.metrics.with(&name, |c| c.read_errors += n);
            return Err(Ended::LinkLost(m));
        }

        let now = self.epoch.elapsed();
        let mut reported = Map::new();
        let mut telemetry = Map::new();
        let mut ok = 0usize;
        let mut first_refusal = None;
        for (i, r) in results {
            let prop = &resolved.device.spec.properties[i];
            match r {
                Ok(v) => {
                    ok += 1;
                    if self.prop_errors[i].take().is_some() {
                        info!(device = %self.id, property = %prop.name, "property readable again");
                    }
                    if prop.telemetry {
                        telemetry.insert(prop.name.as_str().into(), v.clone());
                    }
                    if self.reporter.observe(i, &v, now) {
                        reported.insert(prop.name.as_str().into(), v);
                    }
                }
                Err(e) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    let msg = format!("reading property {:?}: {e}", prop.name.as_str());
                    first_refusal.get_or_insert_with(|| msg.clone());
                    if self.prop_errors[i].as_deref() != Some(msg.as_str()) {
                        warn!(device = %self.id, property = %prop.name, error = %e, "property read refused");
                        self.error(
                            Topic::Reported(self.id.clone()),
                            error_code(&e, false),
                            msg.clone(),
                        );
                        self.prop_errors[i] = Some(msg);
                    }
                }
            }
        }
        let ts = now_ms();
        if !reported.is_empty() {
            self.out.json(
                &Topic::Reported(self.id.clone()).to_topic_string(),
                &patch(reported, ts),
                false,
            );
        }
        if !telemetry.is_empty() {
            self.out.json(
                &Topic::Telemetry(self.id.clone()).to_topic_string(),
                &TelemetryMsg {
                    ts,
                    values: telemetry,
                },
                false,
            );
        }
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
            self.pending.retain(|(j, _)| *j != i);
            self.pending.push((i, v));
        }
    }

    /// Writes every pending desired value, reads it back and reports it.
    async fn write_pending(&mut self, conn: &mut D::Conn) -> Result<(), Ended> {
        let name = self.id.as_str().to_owned();
        let resolved = self.resolved.clone();
        while !self.pending.is_empty() {
            let (i, value) = self.pending.remove(0);
            let prop = &resolved.device.spec.properties[i];
            let before = self.driver.requests_made(conn);
            let written = self
                .guarded(self.driver.write(conn, &resolved, prop, &value))
                .await;
            let written = match written {
                Ok(w) => w,
                Err(e) => {
                    self.pending.insert(0, (i, value));
                    return Err(e);
                }
            };
            let requests = self.count_requests(before, conn);
            self.metrics.with(&name, |c| {
                c.writes += 1;
                c.requests += requests;
            });
            match written {
                Ok(()) => {
                    info!(device = %self.id, property = %prop.name, value = %value, "desired value written");
                }
                Err(DriverError::Link(m)) => {
                    self.metrics.with(&name, |c| c.write_errors += 1);
                    self.pending.insert(0, (i, value));
                    return Err(Ended::LinkLost(m));
                }
                Err(e) => {
                    self.metrics.with(&name, |c| c.write_errors += 1);
                    warn!(device = %self.id, property = %prop.name, error = %e, "write refused");
                    self.error(
                        Topic::Delta(self.id.clone()),
                        error_code(&e, true),
                        format!("writing property {:?} = {value}: {e}", prop.name.as_str()),
                    );
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
                Ok(list) => list
                    .into_iter()
                    .find(|(n, _)| n == prop.name.as_str())
                    .map(|(_, r)| r)
                    .unwrap_or_else(|| {
                        Err(DriverError::Config("the driver returned no value".into()))
                    }),
                Err(e) => Err(e),
            };
            match back {
                Ok(v) => {
                    self.reporter.force(i, &v, self.epoch.elapsed());
                    let mut m = Map::new();
                    m.insert(prop.name.as_str().into(), v);
                    self.out.json(
                        &Topic::Reported(self.id.clone()).to_topic_string(),
                        &patch(m, now_ms()),
                        false,
                    );
                }
                Err(DriverError::Link(m)) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    return Err(Ended::LinkLost(m));
                }
                Err(e) => {
                    self.metrics.with(&name, |c| c.read_errors += 1);
                    self.error(
                        Topic::Reported(self.id.clone()),
                        error_code(&e, false),
                        format!(
                            "reading back property {:?} after a write: {e}",
                            prop.name.as_str()
                        ),
                    );
                }
            }
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

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
