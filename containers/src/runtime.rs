//! The runtime connector: [`ContainerRuntime`] is everything the agent needs from a container
//! runtime; [`DockerRuntime`] implements it on the Docker Engine API with bollard (Podman's
//! `podman system service` socket serves the same API).
//!
//! Errors keep apart what a caller must treat differently ([`RuntimeError`]): the image is not on
//! the node (the agent never pulls: edge nodes are often air-gapped, images are imported or
//! pre-pulled), the name is taken, the container does not exist, the runtime cannot be reached
//! (nothing happened; safe to retry), and anything else the runtime refused.
//!
//! # Reading states leniently (Podman)
//!
//! bollard decodes `State.Status` into a closed enum of Docker's words, so one word it does not
//! know makes the whole inspect (or list) fail: Podman 4.x's compat API leaks libpod's own
//! `stopped` (a process that exited, not yet cleaned up by conmon; so a `run` whose process exits
//! at once was reported failed), and could leak `configured`, `initialized`, `stopping`.
//! When bollard's typed decode fails, the agent reads the raw JSON of the same answer itself
//! ([`decode_inspect`], bollard's `json_data_content` feature keeps it) and maps the word with
//! [`map_status`]:
//!
//! | runtime word | ours | why |
//! |---|---|---|
//! | `created`, `configured`, `initialized` | `created` | exists, never started (Podman: storage set up / OCI container made) |
//! | `running`, `restarting`, `stopping` | `running` | the process still runs (or the restart policy is about to run it again), as Docker's `State.Running` says |
//! | `paused` | `paused` | |
//! | `exited`, `stopped` | `exited` | Podman's `stopped` is an exited process whose cleanup is pending |
//! | `dead`, `removing` | `dead` | going away; the reconcile recreates a managed one |
//! | `unknown`, empty, anything else | `unknown` | |
//!
//! # Stopping with a signal on API < 1.42
//!
//! The stop endpoint's `signal` parameter exists from API 1.42 (Docker 23); older daemons
//! (Debian 12's Docker 20.10 speaks 1.41) ignore it silently and send the image's stop signal, so
//! `stop signal=SIGKILL` took the whole timeout. On a negotiated API below 1.42 a stop with a
//! signal is carried out as the stop endpoint would: send the signal with the kill endpoint, wait
//! (wait endpoint, condition `not-running`) up to the timeout (default
//! [`DEFAULT_STOP_TIMEOUT`]), then SIGKILL and wait again. Docker's kill marks the container as
//! stopped by hand, as stop does, so `unless-stopped` does not bring it back; `always` does not
//! either when the signal is SIGKILL or the image declares no stop signal (Docker cancels the
//! restart then), but it would restart an image with its own STOPSIGNAL that exits on another
//! signal (a limit of the kill endpoint).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    PortBinding, RestartPolicy as DockerRestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, KillContainerOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
    WaitContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt;
use serde_json::Value;

use crate::spec::{ContainerSpec, RestartPolicy, LABEL_MANAGED, LABEL_SPEC_HASH};
pub use crate::wire::ContainerState;
use crate::wire::{ContainerStatus, LogLine, LogStream, TimestampMs};

/// What a runtime says about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Runtime id.
    pub id: String,
    /// Name (without Docker's leading `/`).
    pub name: String,
    /// Image reference as given at creation.
    pub image: String,
    /// State.
    pub state: ContainerState,
    /// Exit code of the last run (when exited or dead, or while the runtime's restart policy
    /// waits to restart it).
    pub exit_code: Option<i64>,
    /// Restarts done by the runtime under the restart policy.
    pub restart_count: Option<u64>,
    /// Last start, ms since the epoch.
    pub started_at: Option<TimestampMs>,
    /// Last exit, ms since the epoch (absent if it never exited).
    pub finished_at: Option<TimestampMs>,
    /// The runtime's restart policy is between two runs (Docker's `State.Restarting`; `state` is
    /// then `running`, as Docker's `State.Running` says).
    pub restarting: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The runtime's last error for this container (e.g. a failed start), if any.
    pub error: Option<String>,
    /// The agent's restart back-off for this container, in ms (set by the agent, never by a
    /// runtime; see [`crate::crashloop::annotate`]).
    pub backoff_ms: Option<u64>,
}

impl ContainerInfo {
    /// Whether the reconciler owns this container (label `edgetwin.managed=true`).
    pub fn managed(&self) -> bool {
        self.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true")
    }

    /// Whether another node's agent declared it (label `edgetwin.node` naming another node).
    pub fn declared_by_other(&self, node: &str) -> bool {
        self.managed()
            && self
                .labels
                .get(crate::spec::LABEL_NODE)
                .is_some_and(|n| n != node)
    }

    /// The spec fingerprint it was created from (label `edgetwin.spec-hash`).
    pub fn spec_hash(&self) -> Option<&str> {
        self.labels.get(LABEL_SPEC_HASH).map(String::as_str)
    }

    /// The wire form.
    pub fn to_status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            state: self.state,
            started_at: self.started_at,
            finished_at: self.finished_at,
            exit_code: self.exit_code,
            restart_count: self.restart_count,
            backoff_ms: self.backoff_ms,
        }
    }
}

/// Why a runtime operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The image is not on the node (the agent never pulls).
    #[error("image {image} is not present on the node (import or pull it first)")]
    ImageNotPresent {
        /// The image reference.
        image: String,
    },
    /// A container with that name exists already.
    #[error("container name {name} is already taken")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// No container with that name.
    #[error("no such container: {name}")]
    NoSuchContainer {
        /// The name.
        name: String,
    },
    /// The runtime's API socket is missing, refuses connections or does not answer.
    #[error("container runtime unreachable at {}: {reason}", socket.display())]
    Unreachable {
        /// The API socket path.
        socket: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The runtime refused the request for another reason.
    #[error("container runtime error: {0}")]
    Other(String),
}

impl RuntimeError {
    /// A short, bounded label for metrics: `image_not_present`, `name_taken`,
    /// `no_such_container`, `unreachable`, `runtime_error`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ImageNotPresent { .. } => "image_not_present",
            Self::NameTaken { .. } => "name_taken",
            Self::NoSuchContainer { .. } => "no_such_container",
            Self::Unreachable { .. } => "unreachable",
            Self::Other(_) => "runtime_error",
        }
    }
}

/// A container runtime as the agent needs it. Names identify containers.
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// Creates the container without starting it.
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError>;
    /// Creates and starts a container (a container whose start fails is removed again).
    async fn run(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError>;
    /// Starts a container (a running one is left as is).
    async fn start(&self, name: &str) -> Result<(), RuntimeError>;
    /// Stops a container with `signal` (runtime default: the image's stop signal, else SIGTERM),
    /// killing it after `timeout` (runtime default 10 s). A stopped one is left as is. On Docker
    /// API < 1.42 a `signal` is sent with kill (see the module doc).
    async fn stop(
        &self,
        name: &str,
        signal: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(), RuntimeError>;
    /// Restarts a container (stop with `timeout`, then start).
    async fn restart(&self, name: &str, timeout: Option<Duration>) -> Result<(), RuntimeError>;
    /// Removes a container; `force` removes a running one too.
    async fn remove(&self, name: &str, force: bool) -> Result<(), RuntimeError>;
    /// Every container of the runtime, running or not, sorted by name.
    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// One container.
    async fn inspect(&self, name: &str) -> Result<ContainerInfo, RuntimeError>;
    /// The last `query.tail` lines (stdout and stderr interleaved, each marked), oldest first.
    async fn logs(&self, name: &str, query: &LogsQuery) -> Result<Vec<LogLine>, RuntimeError>;
}

/// What a logs read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogsQuery {
    /// The last this many lines.
    pub tail: u32,
    /// Only lines logged at or after this Unix time, in seconds (the API's precision).
    pub since_s: Option<i64>,
    /// Give each line its timestamp.
    pub timestamps: bool,
}

/// Splits the runtime's log frames into lines. Docker sends one frame per logged message, which
/// is one line (its newline kept) or, for a line longer than 16 KiB or output without a final
/// newline, a part of one; a frame is never merged with the next, so a timestamp (a frame's
/// first word, with `timestamps`) always starts a line.
pub fn log_lines(
    frames: impl IntoIterator<Item = (LogStream, Vec<u8>)>,
    timestamps: bool,
) -> Vec<LogLine> {
    let mut out = Vec::new();
    for (stream, bytes) in frames {
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let (ts, text) = match text.split_once(' ') {
            Some((t, rest)) if timestamps => match parse_docker_time(t) {
                Some(ms) => (Some(ms), rest),
                None => (None, text),
            },
            _ => (None, text),
        };
        // A frame holding several lines (not what Docker sends) gives each the frame's time.
        for line in text.split('\n') {
            out.push(LogLine {
                ts,
                stream,
                line: line.strip_suffix('\r').unwrap_or(line).to_string(),
            });
        }
    }
    out
}

/// Default time a Docker API request may take before the runtime counts as unreachable.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Kill after this long when a stop gives no timeout (Docker's own default).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The first API version whose stop endpoint takes a `signal`.
pub const STOP_SIGNAL_API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 42,
};

/// [`ContainerRuntime`] on the Docker Engine API over a unix socket (Docker's
/// `/var/run/docker.sock`, or Podman's API socket). Connects lazily and again after a failure,
/// so the node may start before the runtime.
pub struct DockerRuntime {
    socket: PathBuf,
    timeout: Duration,
    /// The highest API version to speak (negotiation only ever lowers it).
    api: ClientVersion,
    client: Mutex<Option<Docker>>,
}

/// What a failed request was about, to turn 404/409 into the right [`RuntimeError`].
enum Ctx<'a> {
    Create { name: &'a str, image: &'a str },
    Container(&'a str),
    Other,
}

impl DockerRuntime {
    /// A runtime on the API socket at `socket` (a `unix://` prefix is accepted).
    pub fn new(socket: impl AsRef<Path>) -> Self {
        let s = socket.as_ref().to_string_lossy();
        let path = s.strip_prefix("unix://").unwrap_or(&s).to_string();
        Self {
            socket: PathBuf::from(path),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            api: *bollard::API_DEFAULT_VERSION,
            client: Mutex::new(None),
        }
    }

    /// Speaks at most API `major.minor` (default: bollard's, lowered to the daemon's by
    /// negotiation). Pinning an old version lets tests exercise what older daemons get.
    pub fn with_api_version(mut self, major: usize, minor: usize) -> Self {
        self.api = ClientVersion {
            major_version: major,
            minor_version: minor,
        };
        self
    }

    /// The API version agreed with the daemon, e.g. `1.41` (connects if needed).
    pub async fn api_version(&self) -> Result<String, RuntimeError> {
        Ok(self.client().await?.client_version().to_string())
    }

    /// Sets how long one API request may take (default [`DEFAULT_REQUEST_TIMEOUT`]; a stop adds
    /// its own timeout to it).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Checks that the runtime answers.
    pub async fn ping(&self) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        c.ping()
            .await
            .map(|_| ())
            .map_err(|e| self.fail(e, Ctx::Other))
    }

    fn unreachable(&self, reason: impl Into<String>) -> RuntimeError {
        RuntimeError::Unreachable {
            socket: self.socket.clone(),
            reason: reason.into(),
        }
    }

    async fn client(&self) -> Result<Docker, RuntimeError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let path = self.socket.to_string_lossy().to_string();
        let docker = Docker::connect_with_unix(&path, self.timeout.as_secs().max(1), &self.api)
            .map_err(|e| self.fail(e, Ctx::Other))?;
        // The daemon may speak an older API (Debian 12's Docker 20.10: 1.41).
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| self.fail(e, Ctx::Other))?;
        if let Ok(mut guard) = self.client.lock() {
            *guard = Some(docker.clone());
        }
        Ok(docker)
    }

    fn cached(&self) -> Option<Docker> {
        self.client.lock().ok().and_then(|g| g.clone())
    }

    fn forget_client(&self) {
        if let Ok(mut guard) = self.client.lock() {
            *guard = None;
        }
    }

    fn fail(&self, e: bollard::errors::Error, ctx: Ctx<'_>) -> RuntimeError {
        use bollard::errors::Error as E;
        let err = match e {
            E::SocketNotFoundError(_) => self.unreachable("socket not found"),
            E::HyperLegacyError { err } => self.unreachable(err.to_string()),
            E::HyperResponseError { err } => self.unreachable(err.to_string()),
            E::IOError { err } => self.unreachable(err.to_string()),
            E::RequestTimeoutError => {
                self.unreachable(format!("no answer within {} s", self.timeout.as_secs()))
            }
            E::DockerResponseServerError {
                status_code,
                message,
            } => match (status_code, ctx) {
                (404, Ctx::Create { image, name }) => {
                    if message.to_ascii_lowercase().contains("image") {
                        RuntimeError::ImageNotPresent {
                            image: image.to_string(),
                        }
                    } else {
                        RuntimeError::NoSuchContainer {
                            name: name.to_string(),
                        }
                    }
                }
                (409, Ctx::Create { name, .. }) => RuntimeError::NameTaken {
                    name: name.to_string(),
                },
                (404, Ctx::Container(name)) => RuntimeError::NoSuchContainer {
                    name: name.to_string(),
                },
                (code, _) => RuntimeError::Other(format!("{message} (HTTP {code})")),
            },
            other => RuntimeError::Other(other.to_string()),
        };
        if matches!(err, RuntimeError::Unreachable { .. }) {
            self.forget_client();
        }
        err
    }

    fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
        let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &spec.ports {
            port_bindings
                .entry(p.container_key())
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: p.host_ip.clone(),
                    host_port: Some(p.host_port.to_string()),
                });
        }
        let exposed: Vec<String> = port_bindings.keys().cloned().collect();
        let restart = match spec.restart {
            RestartPolicy::No => RestartPolicyNameEnum::NO,
            RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
            RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
            RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        };
        let host_config = HostConfig {
            binds: (!spec.mounts.is_empty())
                .then(|| spec.mounts.iter().map(ToString::to_string).collect()),
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            restart_policy: Some(DockerRestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            memory: spec.limits.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            nano_cpus: spec.limits.cpus.map(|c| (c * 1e9).round() as i64),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: (!spec.env.is_empty())
                .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            labels: Some(spec.labels.clone().into_iter().collect()),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// What the stop endpoint does, for daemons whose stop ignores `signal`: `signal`, wait up
    /// to `timeout`, SIGKILL, wait.
    async fn stop_by_kill(
        &self,
        c: &Docker,
        name: &str,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        if !self.is_running(name).await? {
            return Ok(()); // as the stop endpoint: a stopped container is left as is
        }
        self.kill(c, name, signal).await?;
        if self.exits_within(c, name, timeout).await? {
            return Ok(());
        }
        tracing::info!(
            container = name,
            signal,
            timeout_s = timeout.as_secs(),
            "container did not stop on its signal in time; killing it"
        );
        self.kill(c, name, "SIGKILL").await?;
        if self.exits_within(c, name, self.timeout).await? {
            return Ok(());
        }
        Err(RuntimeError::Other(format!(
            "container {name} still runs {} s after SIGKILL",
            self.timeout.as_secs()
        )))
    }

    async fn is_running(&self, name: &str) -> Result<bool, RuntimeError> {
        let info = self.inspect(name).await?;
        Ok(info.state == ContainerState::Running || info.state == ContainerState::Paused)
    }

    /// Sends `signal`; a container that exited meanwhile is fine.
    async fn kill(&self, c: &Docker, name: &str, signal: &str) -> Result<(), RuntimeError> {
        let opts = KillContainerOptions {
            signal: signal.to_string(),
        };
        match c.kill_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = self.fail(e, Ctx::Container(name));
                // 409 "is not running": it exited between our look and the kill.
                if self.is_running(name).await? {
                    Err(err)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Whether the container is not running within `within`.
    async fn exits_within(
        &self,
        c: &Docker,
        name: &str,
        within: Duration,
    ) -> Result<bool, RuntimeError> {
        use bollard::errors::Error as E;
        // The wait answers when the container is not running (at once if it is not already);
        // the client's own deadline must not cut it short.
        let c = c.clone().with_timeout(within + self.timeout);
        let opts = WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let mut wait = c.wait_container(name, Some(opts));
        match tokio::time::timeout(within, wait.next()).await {
            Err(_) => Ok(false),
            // bollard turns a non-zero exit code into an error: it exited all the same.
            Ok(Some(Ok(_))) | Ok(Some(Err(E::DockerContainerWaitError { .. }))) => Ok(true),
            Ok(Some(Err(e))) => Err(self.fail(e, Ctx::Container(name))),
            Ok(None) => Ok(!self.is_running(name).await?),
        }
    }

    async fn create_only(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        c.create_container(Some(opts), Self::create_body(spec))
            .await
            .map_err(|e| {
                self.fail(
                    e,
                    Ctx::Create {
                        name: &spec.name,
                        image: &spec.image,
                    },
                )
            })?;
        Ok(())
    }
}

/// Parses Docker's RFC 3339 timestamps; the zero time (`0001-01-01T00:00:00Z`, never started)
/// and anything unparsable give `None`.
pub fn parse_docker_time(s: &str) -> Option<TimestampMs> {
    let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok().filter(|ms| *ms > 0)
}

/// Maps a runtime's `State.Status` word (Docker's or Podman's) to ours; see the module doc for
/// the table and the reasons.
pub fn map_status(status: &str) -> ContainerState {
    match status.to_ascii_lowercase().as_str() {
        "created" | "configured" | "initialized" => ContainerState::Created,
        "running" | "restarting" | "stopping" => ContainerState::Running,
        "paused" => ContainerState::Paused,
        "exited" | "stopped" => ContainerState::Exited,
        "dead" | "removing" => ContainerState::Dead,
        _ => ContainerState::Unknown,
    }
}

/// The fields of an inspect answer the agent reads, however they were decoded.
struct Inspected {
    id: String,
    name: String,
    image: String,
    status: String,
    restarting: bool,
    exit_code: Option<i64>,
    restart_count: Option<u64>,
    started_at: Option<String>,
    finished_at: Option<String>,
    labels: BTreeMap<String, String>,
    error: Option<String>,
}

impl Inspected {
    fn into_info(self) -> ContainerInfo {
        let state = map_status(&self.status);
        let restarting = self.restarting || self.status == "restarting";
        let exited = matches!(state, ContainerState::Exited | ContainerState::Dead);
        ContainerInfo {
            id: self.id,
            name: self.name.trim_start_matches('/').to_string(),
            image: self.image,
            state,
            // While running, Docker's ExitCode is 0, which says nothing.
            exit_code: (exited || restarting).then_some(self.exit_code).flatten(),
            restart_count: self.restart_count,
            started_at: self.started_at.as_deref().and_then(parse_docker_time),
            finished_at: self.finished_at.as_deref().and_then(parse_docker_time),
            restarting,
            labels: self.labels,
            error: self.error.filter(|e| !e.is_empty()),
            backoff_ms: None,
        }
    }
}

fn info_from_inspect(r: ContainerInspectResponse) -> ContainerInfo {
    let state = r.state.unwrap_or_default();
    let config = r.config.unwrap_or_default();
    Inspected {
        id: r.id.unwrap_or_default(),
        name: r.name.unwrap_or_default(),
        image: config.image.or(r.image).unwrap_or_default(),
        status: state
            .status
            .map(|s: ContainerStateStatusEnum| s.as_ref().to_string())
            .unwrap_or_default(),
        restarting: state.restarting.unwrap_or(false),
        exit_code: state.exit_code,
        restart_count: r.restart_count.and_then(|n| u64::try_from(n).ok()),
        started_at: state.started_at,
        finished_at: state.finished_at,
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        error: state.error,
    }
    .into_info()
}

/// Reads the fields the agent needs from raw inspect JSON, accepting any state word (the
/// fallback when bollard's typed decode refused the answer).
fn info_from_json(v: &Value) -> Result<ContainerInfo, String> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let id = text(v.get("Id")).ok_or("no \"Id\" in the inspect answer")?;
    let state = v.get("State");
    let at = |key: &str| state.and_then(|s| s.get(key));
    let config = v.get("Config");
    let labels = config
        .and_then(|c| c.get("Labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Inspected {
        id,
        name: text(v.get("Name")).unwrap_or_default(),
        image: text(config.and_then(|c| c.get("Image")))
            .or_else(|| text(v.get("Image")))
            .unwrap_or_default(),
        status: text(at("Status")).unwrap_or_default(),
        restarting: at("Restarting").and_then(Value::as_bool).unwrap_or(false),
        exit_code: at("ExitCode").and_then(Value::as_i64),
        restart_count: v.get("RestartCount").and_then(Value::as_u64),
        started_at: text(at("StartedAt")),
        finished_at: text(at("FinishedAt")),
        labels,
        error: text(at("Error")),
    }
    .into_info())
}

/// Decodes an inspect answer (`GET /containers/{id}/json`): with bollard's types when they
/// accept it, else leniently (any state word, see [`map_status`]). Live answers that bollard
/// refused come through here, as do the recorded ones of the tests.
pub fn decode_inspect(body: &[u8]) -> Result<ContainerInfo, String> {
    if let Ok(r) = serde_json::from_slice::<ContainerInspectResponse>(body) {
        return Ok(info_from_inspect(r));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    info_from_json(&v)
}

/// The container ids of a list answer (`GET /containers/json`) bollard refused: the agent needs
/// only the ids, and inspects each.
pub fn decode_list_ids(body: &[u8]) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let items = v.as_array().ok_or("the list answer is not a JSON array")?;
    Ok(items
        .iter()
        .filter_map(|c| c.get("Id").and_then(Value::as_str).map(str::to_string))
        .collect())
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        self.create_only(spec).await?;
        self.inspect(&spec.name).await
    }

    async fn run(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        self.create_only(spec).await?;
        if let Err(e) = self.start(&spec.name).await {
            // Leave nothing half-made behind: a retry must not find the name taken.
            if let Err(rm) = self.remove(&spec.name, true).await {
                tracing::warn!(container = %spec.name, error = %rm, "removing a container that failed to start failed");
            }
            return Err(e);
        }
        self.inspect(&spec.name).await
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        c.start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| self.fail(e, Ctx::Container(name)))
    }

    async fn stop(
        &self,
        name: &str,
        signal: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        if let Some(s) = signal {
            if c.client_version() < STOP_SIGNAL_API {
                // The stop endpoint would ignore the signal (see the module doc).
                return self
                    .stop_by_kill(&c, name, s, timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))
                    .await;
            }
        }
        let mut opts = StopContainerOptionsBuilder::default();
        if let Some(s) = signal {
            opts = opts.signal(s);
        }
        let mut c = c;
        if let Some(t) = timeout {
            opts = opts.t(i32::try_from(t.as_secs()).unwrap_or(i32::MAX));
            c = c.with_timeout(self.timeout + t);
        }
        c.stop_container(name, Some(opts.build()))
            .await
            .map_err(|e| self.fail(e, Ctx::Container(name)))
    }

    async fn restart(&self, name: &str, timeout: Option<Duration>) -> Result<(), RuntimeError> {
        let mut c = self.client().await?;
        let mut opts = RestartContainerOptionsBuilder::default();
        if let Some(t) = timeout {
            opts = opts.t(i32::try_from(t.as_secs()).unwrap_or(i32::MAX));
            c = c.with_timeout(self.timeout + t);
        }
        c.restart_container(name, Some(opts.build()))
            .await
            .map_err(|e| self.fail(e, Ctx::Container(name)))
    }

    async fn remove(&self, name: &str, force: bool) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        let opts = RemoveContainerOptionsBuilder::default()
            .force(force)
            .build();
        c.remove_container(name, Some(opts))
            .await
            .map_err(|e| self.fail(e, Ctx::Container(name)))
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let c = self.client().await?;
        let opts = ListContainersOptionsBuilder::default().all(true).build();
        let ids = match c.list_containers(Some(opts)).await {
            Ok(summaries) => summaries.into_iter().filter_map(|s| s.id).collect(),
            // A state word bollard does not know (Podman's `stopped`): read the ids ourselves.
            Err(bollard::errors::Error::JsonDataError {
                contents, message, ..
            }) => decode_list_ids(contents.as_bytes()).map_err(|e| {
                RuntimeError::Other(format!("unreadable container list ({message}): {e}"))
            })?,
            Err(e) => return Err(self.fail(e, Ctx::Other)),
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.inspect(&id).await {
                Ok(info) => out.push(info),
                // Removed between list and inspect.
                Err(RuntimeError::NoSuchContainer { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn inspect(&self, name: &str) -> Result<ContainerInfo, RuntimeError> {
        let c = self.client().await?;
        match c
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(r) => Ok(info_from_inspect(r)),
            // A state word bollard does not know (Podman's `stopped`): read the JSON ourselves.
            Err(bollard::errors::Error::JsonDataError {
                contents, message, ..
            }) => decode_inspect(contents.as_bytes()).map_err(|e| {
                RuntimeError::Other(format!(
                    "unreadable inspect answer for {name} ({message}): {e}"
                ))
            }),
            Err(e) => Err(self.fail(e, Ctx::Container(name))),
        }
    }

    async fn logs(&self, name: &str, query: &LogsQuery) -> Result<Vec<LogLine>, RuntimeError> {
        use bollard::container::LogOutput;
        let c = self.client().await?;
        let mut opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(query.timestamps)
            .tail(&query.tail.to_string());
        if let Some(s) = query.since_s {
            // The API takes an i32; 0 means "from the start", so the epoch itself is 1 s later.
            opts = opts.since(i32::try_from(s.max(1)).unwrap_or(i32::MAX));
        }
        let mut stream = c.logs(name, Some(opts.build()));
        let mut frames = Vec::new();
        while let Some(chunk) = stream.next().await {
            let frame = match chunk.map_err(|e| self.fail(e, Ctx::Container(name)))? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    (LogStream::Stdout, message.to_vec())
                }
                LogOutput::StdErr { message } => (LogStream::Stderr, message.to_vec()),
                LogOutput::StdIn { .. } => continue,
            };
            frames.push(frame);
        }
        Ok(log_lines(frames, query.timestamps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_time_parses_nanoseconds_and_rejects_the_zero_time() {
        assert_eq!(
            parse_docker_time("2026-11-23T11:32:40.123456789Z"),
            Some(1_795_433_560_123)
        );
        assert_eq!(parse_docker_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_docker_time("garbage"), None);
    }

    const PODMAN_INSPECT_STOPPED: &str =
        include_str!("../tests/data/podman-4.9-inspect-stopped.json");
    const PODMAN_LIST: &str = include_str!("../tests/data/podman-4.9-list.json");

    #[test]
    fn podman_stopped_is_refused_by_bollard_and_read_as_exited_by_us() {
        let typed = serde_json::from_str::<ContainerInspectResponse>(PODMAN_INSPECT_STOPPED);
        let e = typed.unwrap_err().to_string();
        assert!(e.contains("unknown variant `stopped`"), "{e}");
        let info = decode_inspect(PODMAN_INSPECT_STOPPED.as_bytes()).unwrap();
        assert_eq!(info.name, "crashy");
        assert_eq!(info.image, "localhost/bb:local");
        assert_eq!(info.state, ContainerState::Exited);
        assert_eq!(info.exit_code, Some(3));
        assert_eq!(info.restart_count, Some(0));
        assert_eq!(info.started_at, Some(1_715_677_923_512));
        assert_eq!(info.finished_at, Some(1_715_677_923_540));
        assert!(info.managed());
        assert_eq!(info.error, None);
    }

    #[test]
    fn lenient_and_typed_decodes_agree_on_a_state_bollard_knows() {
        let docker_words = PODMAN_INSPECT_STOPPED.replace("\"stopped\"", "\"exited\"");
        let typed = info_from_inspect(serde_json::from_str(&docker_words).unwrap());
        let lenient = info_from_json(&serde_json::from_str(&docker_words).unwrap()).unwrap();
        assert_eq!(typed, lenient);
        assert_eq!(decode_inspect(docker_words.as_bytes()).unwrap(), typed);
    }

    #[test]
    fn podman_list_with_stopped_is_read_for_its_ids() {
        let typed = serde_json::from_str::<Vec<bollard::models::ContainerSummary>>(PODMAN_LIST);
        assert!(typed.is_err(), "bollard refuses State \"stopped\"");
        assert_eq!(
            decode_list_ids(PODMAN_LIST.as_bytes()).unwrap(),
            vec![
                "5c0e1b7a3f52d9e4a6b8c1d2e3f40516273849a0b1c2d3e4f5a6b7c8d9e0f1a2".to_string(),
                "9a8b7c6d5e4f30211f0e1d2c3b4a59687766554433221100ffeeddccbbaa9988".to_string()
            ]
        );
    }

    #[test]
    fn every_podman_and_docker_state_word_maps_to_a_state() {
        use ContainerState::*;
        for (word, want) in [
            ("configured", Created),
            ("created", Created),
            ("initialized", Created),
            ("running", Running),
            ("restarting", Running),
            ("stopping", Running),
            ("paused", Paused),
            ("stopped", Exited),
            ("exited", Exited),
            ("removing", Dead),
            ("dead", Dead),
            ("unknown", Unknown),
            ("", Unknown),
            ("bad state", Unknown),
        ] {
            assert_eq!(map_status(word), want, "{word:?}");
        }
    }

    #[test]
    fn every_stopped_like_podman_answer_decodes_with_the_mapped_state() {
        for (word, want) in [
            ("configured", ContainerState::Created),
            ("initialized", ContainerState::Created),
            ("stopping", ContainerState::Running),
            ("removing", ContainerState::Dead),
            ("unknown", ContainerState::Unknown),
        ] {
            let body = PODMAN_INSPECT_STOPPED.replace("\"stopped\"", &format!("\"{word}\""));
            assert_eq!(
                decode_inspect(body.as_bytes()).unwrap().state,
                want,
                "{word}"
            );
        }
        let no_id = br#"{"State": {"Status": "stopped"}}"#;
        assert!(decode_inspect(no_id).unwrap_err().contains("Id"));
    }

    #[test]
    fn log_frames_become_marked_lines_with_their_timestamps() {
        let frames = vec![
            (
                LogStream::Stdout,
                b"2026-11-23T11:32:40.123456789Z out one\n".to_vec(),
            ),
            (
                LogStream::Stderr,
                b"2026-11-23T11:32:40.200000000Z err\r\n".to_vec(),
            ),
            (
                LogStream::Stdout,
                b"2026-11-23T11:32:41.000000000Z partial".to_vec(),
            ),
        ];
        let lines = log_lines(frames.clone(), true);
        let got: Vec<_> = lines
            .iter()
            .map(|l| (l.ts, l.stream, l.line.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1_795_433_560_123), LogStream::Stdout, "out one"),
                (Some(1_795_433_560_200), LogStream::Stderr, "err"),
                (Some(1_795_433_561_000), LogStream::Stdout, "partial"),
            ]
        );
        // Without timestamps the first word is text, even when it looks like a time.
        let plain = log_lines(frames, false);
        assert_eq!(plain[0].ts, None);
        assert_eq!(plain[0].line, "2026-11-23T11:32:40.123456789Z out one");
        let two = log_lines([(LogStream::Stdout, b"a\nb\n".to_vec())], false);
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn unix_prefix_is_stripped_from_the_socket() {
        assert_eq!(
            DockerRuntime::new("unix:///run/podman/podman.sock").socket(),
            Path::new("/run/podman/podman.sock")
        );
    }

    #[test]
    fn create_body_carries_ports_mounts_limits_and_labels() {
        let mut s = ContainerSpec::new("a", "img");
        s.ports
            .push(crate::spec::PortMapping::parse("8080:80").unwrap());
        s.mounts
            .push(crate::spec::Mount::parse("/d:/d:ro").unwrap());
        s.limits.cpus = Some(0.5);
        s.labels.insert("k".into(), "v".into());
        let b = DockerRuntime::create_body(&s);
        let hc = b.host_config.unwrap();
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        assert_eq!(hc.binds.unwrap(), vec!["/d:/d:ro".to_string()]);
        assert!(hc.port_bindings.unwrap().contains_key("80/tcp"));
        assert_eq!(b.exposed_ports.unwrap(), vec!["80/tcp".to_string()]);
        assert_eq!(b.labels.unwrap().get("k").map(String::as_str), Some("v"));
    }
}
