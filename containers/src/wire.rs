//! Wire types of the container topics (docs/contract.md §2, extended for issue 5):
//!
//! - `node/containers/cmd`: [`ContainerCommand`]
//!   `{"id","action":"run"|"start"|"stop"|"restart"|"remove"|"list"|"logs","name","image"?,"env"?,
//!   "args"?,"ports"?,"mounts"?,"restart"?,"limits"?,"signal"?,"timeout_s"?,"force"?,"tail"?,
//!   "since"?,"timestamps"?}`
//!   (`name` is required except for `list`, `image` for `run`);
//! - `node/containers/result`: [`CommandResult`] `{"id","ok","error"?,"container"?,"containers"?,"logs"?}`,
//!   `logs` being `[{"stream":"stdout"|"stderr","line","ts"?}]` ([`LogLine`]);
//! - `node/containers/status` (retained): [`StatusMsg`]
//!   `{"ts","containers":[{"name","image","state","started_at"?,"finished_at"?,"exit_code"?,
//!   "restart_count"?,"backoff_ms"?}]}`.
//!
//! Field names here are the contract: renaming one is a breaking change. Commands are parsed by
//! [`parse_command`], which reports every bad field by name (serde alone would say "invalid type"
//! without saying which field).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::spec;

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

/// The action of a container command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandAction {
    /// Create and start a container from `image`.
    Run,
    /// Start an existing container.
    Start,
    /// Stop a running container (`signal`, `timeout_s`).
    Stop,
    /// Restart a container (`timeout_s`).
    Restart,
    /// Remove a container (`force` also removes a running one).
    Remove,
    /// List all containers of the runtime.
    List,
    /// The last `tail` lines of a container's output.
    Logs,
}

impl CommandAction {
    /// Every action, in wire order.
    pub const ALL: [CommandAction; 7] = [
        Self::Run,
        Self::Start,
        Self::Stop,
        Self::Restart,
        Self::Remove,
        Self::List,
        Self::Logs,
    ];

    /// Wire spelling (also the metrics label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::Remove => "remove",
            Self::List => "list",
            Self::Logs => "logs",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Resource limits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireLimits {
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in CPUs (e.g. 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

/// A command on `node/containers/cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerCommand {
    /// Command id, the idempotency key (a redelivery with the same id runs once).
    pub id: String,
    /// What to do.
    pub action: CommandAction,
    /// Container name (required except for `list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Image (required for `run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Command and arguments (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Published ports, `"[ip:]host:container[/proto]"` (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
    /// Mounts, `"source:/target[:ro|rw]"` (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<String>>,
    /// Restart policy: `no`, `always`, `on-failure`, `unless-stopped` (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// Resource limits (`run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WireLimits>,
    /// Stop signal, e.g. `SIGTERM` (`stop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Seconds to wait before killing (`stop`, `restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// Remove even when running (`remove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Number of last log lines (`logs`, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
    /// Only lines since then (`logs`): an RFC 3339 UTC time, or a duration meaning that long
    /// ago (`10m`, `2h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Give each line the runtime's timestamp (`logs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamps: Option<bool>,
}

impl ContainerCommand {
    /// A command with only id, action and name set.
    pub fn new(id: impl Into<String>, action: CommandAction, name: Option<&str>) -> Self {
        Self {
            id: id.into(),
            action,
            name: name.map(str::to_string),
            image: None,
            env: None,
            args: None,
            ports: None,
            mounts: None,
            restart: None,
            limits: None,
            signal: None,
            timeout_s: None,
            force: None,
            tail: None,
            since: None,
            timestamps: None,
        }
    }
}

/// Container state vocabulary (Docker's, with `restarting` folded into `running` and
/// `removing` into `dead`, as Docker's own `State.Running` does; Podman's words are mapped by
/// [`crate::runtime::map_status`]), plus `crash_loop`, which the agent derives
/// ([`crate::crashloop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// Created, never started.
    Created,
    /// Running (also while the runtime restarts it under its restart policy).
    Running,
    /// Paused.
    Paused,
    /// Exited (see the exit code).
    Exited,
    /// Dead or being removed.
    Dead,
    /// The runtime reported a state we do not know.
    Unknown,
    /// Restarted again and again, each run short (see [`crate::crashloop`]); never read from a
    /// runtime, only reported.
    #[serde(rename = "crash_loop")]
    CrashLoop,
}

impl ContainerState {
    /// Every state (for per-state gauges).
    pub const ALL: [ContainerState; 7] = [
        Self::Created,
        Self::Running,
        Self::Paused,
        Self::Exited,
        Self::Dead,
        Self::Unknown,
        Self::CrashLoop,
    ];

    /// Wire spelling (also the metrics label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Exited => "exited",
            Self::Dead => "dead",
            Self::Unknown => "unknown",
            Self::CrashLoop => "crash_loop",
        }
    }
}

/// One container in a result or status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// Container name.
    pub name: String,
    /// Image reference it was created from.
    pub image: String,
    /// State.
    pub state: ContainerState,
    /// Last start, ms since the epoch (absent if never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<TimestampMs>,
    /// Last exit, ms since the epoch (absent if it never exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<TimestampMs>,
    /// Exit code of the last run (when exited, or between two restarts of a crash loop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// How often it was restarted: by the runtime under its restart policy, plus (declared
    /// containers) by the agent since the last run of 10 min.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<u64>,
    /// The agent's wait before it starts this exited declared container again (its restart
    /// back-off), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

/// A result on `node/containers/result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command's id (empty when the command had no readable id).
    pub id: String,
    /// Whether the command succeeded.
    pub ok: bool,
    /// Why it failed, machine-readable (when `ok` is false): `invalid`, `image_not_present`,
    /// `name_taken`, `no_such_container`, `unreachable`, `runtime_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What went wrong (when `ok` is false), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The container after the command (run, start, stop, restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerStatus>,
    /// All containers (list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<ContainerStatus>>,
    /// Last log lines (logs), oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<LogLine>>,
}

/// Which output of a container a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output (also everything of a container with a TTY, which has no stderr).
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a `logs` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the runtime logged it, ms since the epoch (only with `timestamps: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<TimestampMs>,
    /// stdout or stderr.
    pub stream: LogStream,
    /// The text, without its newline.
    pub line: String,
}

impl CommandResult {
    /// A success with nothing attached.
    pub fn ok(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ok: true,
            code: None,
            error: None,
            container: None,
            containers: None,
            logs: None,
        }
    }

    /// A failure, with its code.
    pub fn err(id: impl Into<String>, code: &str, error: impl Into<String>) -> Self {
        Self {
            code: Some(code.to_string()),
            error: Some(error.into()),
            ok: false,
            ..Self::ok(id)
        }
    }

    /// The JSON bytes published on `node/containers/result`.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The retained `node/containers/status` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMsg {
    /// When the status was taken, ms since the epoch.
    pub ts: TimestampMs,
    /// Every container of the runtime, sorted by name.
    pub containers: Vec<ContainerStatus>,
}

impl StatusMsg {
    /// The JSON bytes published on `node/containers/status`.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a command payload could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid command: {}", errors.join("; "))]
pub struct CommandParseError {
    /// The command's id when it could be read (the result is sent under it).
    pub id: Option<String>,
    /// The command's action when it could be read (for metrics).
    pub action: Option<CommandAction>,
    /// Every problem, `"field: message"`.
    pub errors: Vec<String>,
}

const COMMAND_KEYS: &[&str] = &[
    "id",
    "action",
    "name",
    "image",
    "env",
    "args",
    "ports",
    "mounts",
    "restart",
    "limits",
    "signal",
    "timeout_s",
    "force",
    "tail",
    "since",
    "timestamps",
];

/// Parses a `node/containers/cmd` payload, checking every field's type and naming every bad or
/// missing field (`name` for all actions but `list`, `image` for `run`). Formats of ports,
/// mounts, names etc. are checked later by [`crate::commands`].
pub fn parse_command(payload: &[u8]) -> Result<ContainerCommand, CommandParseError> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| CommandParseError {
        id: None,
        action: None,
        errors: vec![format!("malformed JSON: {e}")],
    })?;
    let Value::Object(obj) = value else {
        return Err(CommandParseError {
            id: None,
            action: None,
            errors: vec!["the command is not a JSON object".into()],
        });
    };
    let mut errors = Vec::new();
    for key in obj.keys() {
        if !COMMAND_KEYS.contains(&key.as_str()) {
            errors.push(format!("{key}: unknown field"));
        }
    }
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            errors.push("id: must not be empty".into());
            None
        }
        Some(_) => {
            errors.push("id: must be a string".into());
            None
        }
        None => {
            errors.push("id: missing field".into());
            None
        }
    };
    let action = match obj.get("action") {
        Some(Value::String(s)) => {
            let a = CommandAction::parse(s);
            if a.is_none() {
                errors.push(format!(
                    "action: unknown action {s:?} (run, start, stop, restart, remove, list, logs)"
                ));
            }
            a
        }
        Some(_) => {
            errors.push("action: must be a string".into());
            None
        }
        None => {
            errors.push("action: missing field".into());
            None
        }
    };
    let name = opt_str(&obj, "name", &mut errors);
    let image = opt_str(&obj, "image", &mut errors);
    if let Some(a) = action {
        if a != CommandAction::List && name.is_none() && !obj.contains_key("name") {
            errors.push(format!("name: missing field (required for {})", a.as_str()));
        }
        if a == CommandAction::Run && image.is_none() && !obj.contains_key("image") {
            errors.push("image: missing field (required for run)".into());
        }
    }
    let env = opt_str_map(&obj, "env", &mut errors);
    let args = opt_str_list(&obj, "args", &mut errors);
    let ports = opt_str_list(&obj, "ports", &mut errors);
    let mounts = opt_str_list(&obj, "mounts", &mut errors);
    let restart = opt_str(&obj, "restart", &mut errors);
    let limits = opt_limits(&obj, "limits", &mut errors);
    let signal = opt_str(&obj, "signal", &mut errors);
    let timeout_s = opt_u32(&obj, "timeout_s", &mut errors);
    let force = opt_bool(&obj, "force", &mut errors);
    let tail = opt_u32(&obj, "tail", &mut errors);
    let since = opt_str(&obj, "since", &mut errors);
    let timestamps = opt_bool(&obj, "timestamps", &mut errors);
    match (errors.is_empty(), id, action) {
        (true, Some(id), Some(action)) => Ok(ContainerCommand {
            id,
            action,
            name,
            image,
            env,
            args,
            ports,
            mounts,
            restart,
            limits,
            signal,
            timeout_s,
            force,
            tail,
            since,
            timestamps,
        }),
        (_, id, action) => Err(CommandParseError { id, action, errors }),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(format!("{key}: must be a string"));
            None
        }
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            errors.push(format!("{key}: must be true or false"));
            None
        }
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<u32> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                errors.push(format!("{key}: must be a non-negative integer"));
                None
            }
        },
    }
}

/// Reads an optional list of strings at `obj[key]`, errors under `path`.
pub(crate) fn str_list_at(path: &str, v: &Value, errors: &mut Vec<String>) -> Option<Vec<String>> {
    let Value::Array(items) = v else {
        errors.push(format!("{path}: must be a list of strings"));
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let before = errors.len();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) => out.push(s.clone()),
            _ => errors.push(format!("{path}[{i}]: must be a string")),
        }
    }
    (errors.len() == before).then_some(out)
}

/// Reads a map of strings, errors under `path`.
pub(crate) fn str_map_at(
    path: &str,
    v: &Value,
    errors: &mut Vec<String>,
) -> Option<BTreeMap<String, String>> {
    let Value::Object(m) = v else {
        errors.push(format!("{path}: must be an object of strings"));
        return None;
    };
    let before = errors.len();
    let mut out = BTreeMap::new();
    for (k, v) in m {
        spec::check_env_key(&format!("{path}.{k}"), k, errors);
        match v {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            _ => errors.push(format!("{path}.{k}: must be a string")),
        }
    }
    (errors.len() == before).then_some(out)
}

/// Reads limits `{memory_bytes?, cpus?}`, errors under `path`.
pub(crate) fn limits_at(path: &str, v: &Value, errors: &mut Vec<String>) -> Option<WireLimits> {
    let Value::Object(m) = v else {
        errors.push(format!(
            "{path}: must be an object {{memory_bytes?, cpus?}}"
        ));
        return None;
    };
    let before = errors.len();
    let mut out = WireLimits::default();
    for (k, v) in m {
        match k.as_str() {
            "memory_bytes" => match v.as_u64() {
                Some(n) => out.memory_bytes = Some(n),
                None => errors.push(format!("{path}.memory_bytes: must be a positive integer")),
            },
            "cpus" => match v.as_f64() {
                Some(c) => out.cpus = Some(c),
                None => errors.push(format!("{path}.cpus: must be a number")),
            },
            other => errors.push(format!("{path}.{other}: unknown field")),
        }
    }
    (errors.len() == before).then_some(out)
}

fn opt_str_list(
    obj: &Map<String, Value>,
    key: &str,
    errors: &mut Vec<String>,
) -> Option<Vec<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => str_list_at(key, v, errors),
    }
}

fn opt_str_map(
    obj: &Map<String, Value>,
    key: &str,
    errors: &mut Vec<String>,
) -> Option<BTreeMap<String, String>> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => str_map_at(key, v, errors),
    }
}

fn opt_limits(obj: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<WireLimits> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => limits_at(key, v, errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_parses_a_full_run_command() {
        let c = parse_command(
            br#"{"id":"c1","action":"run","name":"web","image":"nginx:1","env":{"A":"1"},
                "args":["x"],"ports":["8080:80/tcp"],"mounts":["/d:/d:ro"],"restart":"always",
                "limits":{"memory_bytes":1048576,"cpus":0.5}}"#,
        )
        .unwrap();
        assert_eq!(c.action, CommandAction::Run);
        assert_eq!(c.image.as_deref(), Some("nginx:1"));
        assert_eq!(c.limits.unwrap().cpus, Some(0.5));
        let back: ContainerCommand =
            serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn command_rejects_malformed_json() {
        let e = parse_command(b"{not json").unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.errors[0].contains("malformed JSON"), "{e}");
    }

    #[test]
    fn command_missing_fields_are_named() {
        let e = parse_command(br#"{"id":"c2","action":"run"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c2"));
        let text = e.to_string();
        assert!(text.contains("name: missing field"), "{text}");
        assert!(text.contains("image: missing field"), "{text}");
        let e = parse_command(br#"{"action":"list"}"#).unwrap_err();
        assert!(e.to_string().contains("id: missing field"), "{e}");
    }

    #[test]
    fn command_wrong_types_and_unknown_fields_are_named() {
        let e = parse_command(
            br#"{"id":"c3","action":"stop","name":5,"timeout_s":-1,"imgae":"x","env":{"A":1}}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "name: must be a string",
            "timeout_s:",
            "imgae: unknown field",
            "env.A: must be a string",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }

    #[test]
    fn command_unknown_action_is_named() {
        let e = parse_command(br#"{"id":"c4","action":"jump","name":"a"}"#).unwrap_err();
        assert!(
            e.to_string().contains("action: unknown action \"jump\""),
            "{e}"
        );
    }

    #[test]
    fn command_list_needs_no_name() {
        let c = parse_command(br#"{"id":"c5","action":"list"}"#).unwrap();
        assert_eq!(c.name, None);
    }

    #[test]
    fn result_omits_absent_fields() {
        let r = CommandResult::err("x", "runtime_error", "boom");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            r#"{"id":"x","ok":false,"code":"runtime_error","error":"boom"}"#
        );
        // A result stored by a build before codes reads as one without.
        let old: CommandResult =
            serde_json::from_str(r#"{"id":"y","ok":false,"error":"boom"}"#).unwrap();
        assert_eq!(old.code, None);
    }
}
