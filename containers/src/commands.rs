//! Container commands: [`CommandHandler`] turns a raw `node/containers/cmd` payload into a
//! [`CommandResult`] for `node/containers/result`.
//!
//! # Idempotency
//!
//! The bridge delivers at least once, so a command may arrive twice. The handler keeps the result
//! of every command it carried out in an [`IdStore`], keyed by command id, and answers a
//! redelivery with the **same stored result** without touching the runtime. Two deliveries that
//! arrive at the same time are serialised: the second waits for the first and gets its result.
//!
//! - **Window**: the last [`DEFAULT_MAX_ENTRIES`] ids and at most [`DEFAULT_MAX_AGE`] (24 h),
//!   whichever is smaller; a redelivery outside the window runs again.
//! - **Durable before visible**: the result is committed (fsync) before it is returned, so a
//!   result the cloud has seen is never forgotten by a restart. A crash between carrying out the
//!   command and committing its result can make a redelivery run it again; `run` tolerates that:
//!   containers it creates carry the label `edgetwin.command-id`, and a redelivered `run` that
//!   finds its name taken by a container with its own id answers success.
//! - **Not stored**: malformed commands (nothing ran; they are answered every time) and commands
//!   that failed because the runtime was unreachable (nothing ran; a redelivery after the runtime
//!   is back should do the work).
//!
//! # Why redb
//!
//! The store is a small redb file of its own (`commands.redb` in the agent's data dir; redb allows
//! one writer per file, and the twin store and the outbox have theirs). redb gives atomic
//! commits with fsync and crash-safe reopen, which a hand-made JSON-lines file would have to
//! re-implement (torn last lines, compaction to stay bounded); it is already a dependency of the
//! node. Format: table `results` (id → JSON `{"seq","ts","result"}`), table `order`
//! (seq → id) so the oldest entries are pruned first. Every put prunes to the bounds in the same
//! transaction. A file that cannot be opened because it is corrupt is renamed to
//! `*.corrupt-{ms}` and a fresh one is started (losing only the idempotency window).
//!
//! Logs results are bounded to the last lines whose JSON fits [`MAX_LOG_BYTES`], which keeps the
//! result inside one MQTT message and the store bounded (at most `max_entries` × that). A logs
//! result stored by a build whose `logs` were plain strings no longer decodes: a redelivery of
//! it within the window reads the logs again (harmless, logs change nothing).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::crashloop;
use crate::runtime::{ContainerInfo, ContainerRuntime, LogsQuery, RuntimeError};
use crate::spec::{self, ContainerSpec, RawSpec, LABEL_COMMAND_ID};
use crate::wire::{
    parse_command, CommandAction, CommandResult, ContainerCommand, ContainerStatus, LogLine,
    TimestampMs,
};

/// Default number of command ids remembered.
pub const DEFAULT_MAX_ENTRIES: usize = 1000;
/// Default age after which a command id is forgotten.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default and maximum `tail` of a logs command.
pub const DEFAULT_TAIL: u32 = 100;
/// Largest `tail` accepted.
pub const MAX_TAIL: u32 = 1000;
/// Largest `timeout_s` accepted.
pub const MAX_TIMEOUT_S: u32 = 3600;
/// A logs result keeps the last lines that fit this many bytes.
pub const MAX_LOG_BYTES: usize = 32 * 1024;

const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const ORDER: TableDefinition<u64, &str> = TableDefinition::new("order");

/// Errors of the command id store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("command id store {path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: redb::Error,
    },
    /// A stored entry could not be decoded.
    #[error("command id store {path}: undecodable entry for id {id}: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The command id.
        id: String,
        /// What failed.
        message: String,
    },
    /// Could not move a corrupt file aside.
    #[error("command id store {path}: corrupt and could not be moved aside: {source}")]
    Quarantine {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    ts: TimestampMs,
    result: CommandResult,
}

/// The durable, bounded map command id → result (see the module doc for format and bounds).
/// Synchronous (redb is): call it from a blocking thread.
pub struct IdStore {
    db: Database,
    path: PathBuf,
    max_entries: usize,
    max_age: Duration,
}

impl IdStore {
    /// Opens or creates the store at `path` with the default bounds; a corrupt file is moved
    /// aside to `{path}.corrupt-{ms}` and a fresh store started.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = match Database::builder()
            .set_cache_size(edgetwin_redbfile::CACHE_BYTES)
            .create(&path)
        {
            Ok(db) => db,
            Err(e) if edgetwin_redbfile::is_corruption(&e) => {
                let reason = e.to_string();
                let aside =
                    edgetwin_redbfile::move_aside(&path).map_err(|e| StoreError::Quarantine {
                        path: path.clone(),
                        source: e.source,
                    })?;
                tracing::warn!(path = %path.display(), aside = %aside.display(), %reason,
                    "command id store is corrupt; starting a fresh one");
                Database::builder()
                    .set_cache_size(edgetwin_redbfile::CACHE_BYTES)
                    .create(&path)
                    .map_err(|e| db_err(&path, e))?
            }
            Err(e) => return Err(db_err(&path, e)),
        };
        let store = Self {
            db,
            path,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_age: DEFAULT_MAX_AGE,
        };
        store.init_tables()?;
        Ok(store)
    }

    /// Sets the bounds (ids kept, age).
    pub fn with_bounds(mut self, max_entries: usize, max_age: Duration) -> Self {
        self.max_entries = max_entries.max(1);
        self.max_age = max_age;
        self
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        txn.open_table(RESULTS).map_err(|e| db_err(&self.path, e))?;
        txn.open_table(ORDER).map_err(|e| db_err(&self.path, e))?;
        txn.commit().map_err(|e| db_err(&self.path, e))
    }

    fn max_age_ms(&self) -> i64 {
        i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX)
    }

    /// The stored result of command `id`, unless absent or older than the window at `now`.
    pub fn get(&self, id: &str, now: TimestampMs) -> Result<Option<CommandResult>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let table = txn.open_table(RESULTS).map_err(|e| db_err(&self.path, e))?;
        let Some(bytes) = table.get(id).map_err(|e| db_err(&self.path, e))? else {
            return Ok(None);
        };
        let entry: Entry =
            serde_json::from_slice(bytes.value()).map_err(|e| StoreError::Decode {
                path: self.path.clone(),
                id: id.to_string(),
                message: e.to_string(),
            })?;
        if now.saturating_sub(entry.ts) > self.max_age_ms() {
            return Ok(None);
        }
        Ok(Some(entry.result))
    }

    /// Stores the result of command `id` at `now` (durably) and prunes to the bounds.
    pub fn put(
        &self,
        id: &str,
        result: &CommandResult,
        now: TimestampMs,
    ) -> Result<(), StoreError> {
        let e = |err: redb::Error| StoreError::Db {
            path: self.path.clone(),
            source: err,
        };
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut results = txn.open_table(RESULTS).map_err(|x| e(x.into()))?;
            let mut order = txn.open_table(ORDER).map_err(|x| e(x.into()))?;
            let seq = order
                .last()
                .map_err(|x| e(x.into()))?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(0);
            let old_seq = results
                .get(id)
                .map_err(|x| e(x.into()))?
                .and_then(|v| serde_json::from_slice::<Entry>(v.value()).ok())
                .map(|entry| entry.seq);
            if let Some(old) = old_seq {
                order.remove(old).map_err(|x| e(x.into()))?;
            }
            let entry = Entry {
                seq,
                ts: now,
                result: result.clone(),
            };
            let bytes = serde_json::to_vec(&entry).unwrap_or_default();
            results
                .insert(id, bytes.as_slice())
                .map_err(|x| e(x.into()))?;
            order.insert(seq, id).map_err(|x| e(x.into()))?;
            // Prune: oldest first, while over the count or older than the window.
            loop {
                let len = order.len().map_err(|x| e(x.into()))?;
                let Some((oldest_id, too_many)) = ({
                    let first = order.first().map_err(|x| e(x.into()))?;
                    first.map(|(_, v)| (v.value().to_string(), len > self.max_entries as u64))
                }) else {
                    break;
                };
                let expired = match results.get(oldest_id.as_str()).map_err(|x| e(x.into()))? {
                    Some(v) => serde_json::from_slice::<Entry>(v.value())
                        .map(|en| now.saturating_sub(en.ts) > self.max_age_ms())
                        .unwrap_or(true),
                    None => true,
                };
                if !(too_many || expired) {
                    break;
                }
                order.pop_first().map_err(|x| e(x.into()))?;
                results
                    .remove(oldest_id.as_str())
                    .map_err(|x| e(x.into()))?;
            }
        }
        txn.commit().map_err(|x| e(x.into()))
    }

    /// Number of ids stored.
    pub fn len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let table = txn.open_table(ORDER).map_err(|e| db_err(&self.path, e))?;
        table.len().map_err(|e| db_err(&self.path, e))
    }

    /// Whether no id is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

/// Whether an open error means the file's content is unusable (as opposed to e.g. a permission
/// problem or a file held by another process, which must not lose the file).
fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

pub use edgetwin_contract::now_ms;

/// A validated command (closed: every action with exactly the fields it uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Create and start.
    Run(ContainerSpec),
    /// Start.
    Start(String),
    /// Stop.
    Stop {
        /// Container.
        name: String,
        /// Signal.
        signal: Option<String>,
        /// Kill after.
        timeout: Option<Duration>,
    },
    /// Restart.
    Restart {
        /// Container.
        name: String,
        /// Kill after.
        timeout: Option<Duration>,
    },
    /// Remove.
    Remove {
        /// Container.
        name: String,
        /// Also when running.
        force: bool,
    },
    /// List all.
    List,
    /// Last log lines.
    Logs {
        /// Container.
        name: String,
        /// Lines.
        tail: u32,
        /// Only lines since then.
        since: Option<Since>,
        /// Timestamp each line.
        timestamps: bool,
    },
}

/// The `since` of a logs command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// A time, ms since the epoch.
    At(TimestampMs),
    /// That long before the command runs.
    Ago(Duration),
}

impl Since {
    /// Parses an RFC 3339 UTC time (`2026-01-01T10:00:00Z`) or a duration (`10m`, `1h30m`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(t) = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')) {
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_millis()).ok())
                .ok_or_else(|| format!("{s:?} is before 1970"))?;
            return Ok(Self::At(ms));
        }
        match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => Err(format!("{s:?} is no time ago (give e.g. 10m)")),
            Ok(d) => Ok(Self::Ago(d)),
            Err(_) => Err(format!(
                "{s:?} is neither an RFC 3339 UTC time (2026-01-01T10:00:00Z) nor a duration meaning that long ago (30s, 10m, 2h, 1d)"
            )),
        }
    }

    /// The Unix time in seconds it stands for at `now` (rounded down: the runtime's precision).
    pub fn unix_s(self, now: TimestampMs) -> i64 {
        let ms = match self {
            Self::At(ms) => ms,
            Self::Ago(d) => now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        ms.div_euclid(1000)
    }
}

/// Checks a parsed command's values and the fields its action uses; every problem is
/// `"field: message"`.
pub fn validate(cmd: &ContainerCommand) -> Result<Request, Vec<String>> {
    let mut errors = Vec::new();
    let a = cmd.action;
    let used: &[&str] = match a {
        CommandAction::Run => &[
            "name", "image", "env", "args", "ports", "mounts", "restart", "limits",
        ],
        CommandAction::Start => &["name"],
        CommandAction::Stop => &["name", "signal", "timeout_s"],
        CommandAction::Restart => &["name", "timeout_s"],
        CommandAction::Remove => &["name", "force"],
        CommandAction::List => &[],
        CommandAction::Logs => &["name", "tail", "since", "timestamps"],
    };
    let present = [
        ("name", cmd.name.is_some()),
        ("image", cmd.image.is_some()),
        ("env", cmd.env.is_some()),
        ("args", cmd.args.is_some()),
        ("ports", cmd.ports.is_some()),
        ("mounts", cmd.mounts.is_some()),
        ("restart", cmd.restart.is_some()),
        ("limits", cmd.limits.is_some()),
        ("signal", cmd.signal.is_some()),
        ("timeout_s", cmd.timeout_s.is_some()),
        ("force", cmd.force.is_some()),
        ("tail", cmd.tail.is_some()),
        ("since", cmd.since.is_some()),
        ("timestamps", cmd.timestamps.is_some()),
    ];
    for (field, is_present) in present {
        if is_present && !used.contains(&field) {
            errors.push(format!("{field}: not used by action {}", a.as_str()));
        }
    }
    let name = cmd.name.clone().unwrap_or_default();
    if a != CommandAction::List {
        if cmd.name.is_none() {
            errors.push(format!("name: missing field (required for {})", a.as_str()));
        } else {
            spec::check_name("name", &name, &mut errors);
        }
    }
    if let Some(s) = &cmd.signal {
        let ok = !s.is_empty()
            && s.len() <= 16
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-');
        if !ok {
            errors.push(format!(
                "signal: {s:?} is not a signal name (e.g. SIGTERM) or number"
            ));
        }
    }
    if cmd.timeout_s.is_some_and(|t| t > MAX_TIMEOUT_S) {
        errors.push(format!("timeout_s: at most {MAX_TIMEOUT_S}"));
    }
    if cmd.tail.is_some_and(|t| t > MAX_TAIL) {
        errors.push(format!("tail: at most {MAX_TAIL}"));
    }
    let since = match cmd.since.as_deref().map(Since::parse) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            errors.push(format!("since: {e}"));
            None
        }
        None => None,
    };
    let timeout = cmd.timeout_s.map(|t| Duration::from_secs(u64::from(t)));
    let request = match a {
        CommandAction::Run => {
            if cmd.image.is_none() {
                errors.push("image: missing field (required for run)".into());
            }
            let raw = RawSpec {
                image: cmd.image.clone(),
                env: cmd.env.clone(),
                args: cmd.args.clone(),
                ports: cmd.ports.clone(),
                mounts: cmd.mounts.clone(),
                restart: cmd.restart.clone(),
                limits: cmd.limits,
            };
            let mut spec = spec::build_spec("", &name, raw, &mut errors);
            spec.labels
                .insert(LABEL_COMMAND_ID.to_string(), cmd.id.clone());
            Request::Run(spec)
        }
        CommandAction::Start => Request::Start(name),
        CommandAction::Stop => Request::Stop {
            name,
            signal: cmd.signal.clone(),
            timeout,
        },
        CommandAction::Restart => Request::Restart { name, timeout },
        CommandAction::Remove => Request::Remove {
            name,
            force: cmd.force.unwrap_or(false),
        },
        CommandAction::List => Request::List,
        CommandAction::Logs => Request::Logs {
            name,
            tail: cmd.tail.unwrap_or(DEFAULT_TAIL),
            since,
            timestamps: cmd.timestamps.unwrap_or(false),
        },
    };
    if errors.is_empty() {
        Ok(request)
    } else {
        Err(errors)
    }
}

/// How a command ended, for metrics (bounded label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Succeeded.
    Ok,
    /// Malformed or invalid command.
    Invalid,
    /// The runtime failed it; the value is [`RuntimeError::kind`].
    Failed(&'static str),
}

impl Outcome {
    /// Label value: `ok`, `invalid`, or the runtime error kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Invalid => "invalid",
            Self::Failed(kind) => kind,
        }
    }
}

/// What [`CommandHandler::handle_detailed`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The result to publish.
    pub result: CommandResult,
    /// The command's action (None when unreadable).
    pub action: Option<CommandAction>,
    /// How it ended (for a duplicate: how the original ended).
    pub outcome: Outcome,
    /// Whether this was a redelivery answered from the store.
    pub duplicate: bool,
}

/// Carries out container commands on a runtime, idempotent by command id.
pub struct CommandHandler {
    runtime: Arc<dyn ContainerRuntime>,
    store: Arc<IdStore>,
    inflight: Mutex<HashSet<String>>,
    done: Notify,
}

struct InflightGuard<'a> {
    handler: &'a CommandHandler,
    id: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.handler.inflight.lock() {
            g.remove(&self.id);
        }
        self.handler.done.notify_waiters();
    }
}

impl CommandHandler {
    /// A handler on `runtime` remembering results in `store`.
    pub fn new(runtime: Arc<dyn ContainerRuntime>, store: IdStore) -> Self {
        Self {
            runtime,
            store: Arc::new(store),
            inflight: Mutex::new(HashSet::new()),
            done: Notify::new(),
        }
    }

    /// Handles one raw payload and returns the result to publish.
    pub async fn handle(&self, payload: &[u8]) -> CommandResult {
        self.handle_detailed(payload).await.result
    }

    /// Handles one raw payload; also says what happened (for metrics).
    pub async fn handle_detailed(&self, payload: &[u8]) -> Handled {
        let cmd = match parse_command(payload) {
            Ok(c) => c,
            Err(e) => {
                return Handled {
                    result: CommandResult::err(
                        e.id.clone().unwrap_or_default(),
                        Outcome::Invalid.as_str(),
                        e.to_string(),
                    ),
                    action: e.action,
                    outcome: Outcome::Invalid,
                    duplicate: false,
                }
            }
        };
        let action = Some(cmd.action);
        let request = match validate(&cmd) {
            Ok(r) => r,
            Err(errors) => {
                return Handled {
                    result: CommandResult::err(
                        cmd.id.clone(),
                        Outcome::Invalid.as_str(),
                        format!("invalid command: {}", errors.join("; ")),
                    ),
                    action,
                    outcome: Outcome::Invalid,
                    duplicate: false,
                }
            }
        };
        // Claim the id, or wait for the delivery that holds it and answer from the store.
        let _guard = loop {
            if let Some(stored) = self.stored(&cmd.id).await {
                return Handled {
                    outcome: outcome_of(&stored),
                    result: stored,
                    action,
                    duplicate: true,
                };
            }
            let notified = self.done.notified();
            let claimed = self
                .inflight
                .lock()
                .map(|mut g| g.insert(cmd.id.clone()))
                .unwrap_or(true);
            if claimed {
                let guard = InflightGuard {
                    handler: self,
                    id: cmd.id.clone(),
                };
                // The previous holder may have stored its result just before we claimed.
                if let Some(stored) = self.stored(&cmd.id).await {
                    return Handled {
                        outcome: outcome_of(&stored),
                        result: stored,
                        action,
                        duplicate: true,
                    };
                }
                break guard;
            }
            notified.await;
        };
        let (result, outcome, store) = match self.execute(&cmd.id, request).await {
            Ok(r) => (r, Outcome::Ok, true),
            Err(e) => {
                let store = !matches!(e, RuntimeError::Unreachable { .. });
                (
                    CommandResult::err(cmd.id.clone(), e.kind(), e.to_string()),
                    Outcome::Failed(e.kind()),
                    store,
                )
            }
        };
        if store {
            let s = Arc::clone(&self.store);
            let (id, r) = (cmd.id.clone(), result.clone());
            let put = tokio::task::spawn_blocking(move || s.put(&id, &r, now_ms())).await;
            match put {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(id = %cmd.id, error = %e, "storing a command result failed; a redelivery would run it again")
                }
                Err(e) => {
                    tracing::error!(id = %cmd.id, error = %e, "storing a command result panicked")
                }
            }
        }
        Handled {
            result,
            action,
            outcome,
            duplicate: false,
        }
    }

    async fn stored(&self, id: &str) -> Option<CommandResult> {
        let s = Arc::clone(&self.store);
        let id_owned = id.to_string();
        match tokio::task::spawn_blocking(move || s.get(&id_owned, now_ms())).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(id, error = %e, "reading the command id store failed");
                None
            }
            Err(e) => {
                tracing::error!(id, error = %e, "reading the command id store panicked");
                None
            }
        }
    }

    async fn execute(&self, id: &str, request: Request) -> Result<CommandResult, RuntimeError> {
        let rt = &self.runtime;
        let mut result = CommandResult::ok(id);
        match request {
            Request::Run(spec) => {
                let info = match rt.run(&spec).await {
                    Ok(info) => info,
                    Err(RuntimeError::NameTaken { name }) => {
                        // A redelivery after a crash that lost the stored result: the container
                        // this very command created is there already.
                        match rt.inspect(&name).await {
                            Ok(existing)
                                if existing.labels.get(LABEL_COMMAND_ID).map(String::as_str)
                                    == Some(id) =>
                            {
                                existing
                            }
                            _ => return Err(RuntimeError::NameTaken { name }),
                        }
                    }
                    Err(e) => return Err(e),
                };
                result.container = Some(status_of(info));
            }
            Request::Start(name) => {
                rt.start(&name).await?;
                result.container = rt.inspect(&name).await.ok().map(status_of);
            }
            Request::Stop {
                name,
                signal,
                timeout,
            } => {
                rt.stop(&name, signal.as_deref(), timeout).await?;
                result.container = rt.inspect(&name).await.ok().map(status_of);
            }
            Request::Restart { name, timeout } => {
                rt.restart(&name, timeout).await?;
                result.container = rt.inspect(&name).await.ok().map(status_of);
            }
            Request::Remove { name, force } => rt.remove(&name, force).await?,
            Request::List => {
                let all = rt.list().await?;
                result.containers = Some(all.into_iter().map(status_of).collect());
            }
            Request::Logs {
                name,
                tail,
                since,
                timestamps,
            } => {
                let query = LogsQuery {
                    tail,
                    since_s: since.map(|s| s.unix_s(now_ms())),
                    timestamps,
                };
                let lines = rt.logs(&name, &query).await?;
                result.logs = Some(bound_lines(lines, MAX_LOG_BYTES));
            }
        }
        Ok(result)
    }
}

/// The wire form of a container in a command result, a crash loop of the runtime's restart policy
/// named (the agent's own restarts are known to the agent only: they show in the status and the
/// node twin).
fn status_of(info: ContainerInfo) -> ContainerStatus {
    crashloop::annotate(info, None, &crashloop::BackoffPolicy::default(), now_ms()).to_status()
}

fn outcome_of(r: &CommandResult) -> Outcome {
    if r.ok {
        Outcome::Ok
    } else {
        Outcome::Failed("stored_error")
    }
}

/// Keeps the last lines whose JSON (each entry plus its comma) fits `max_bytes`.
fn bound_lines(lines: Vec<LogLine>, max_bytes: usize) -> Vec<LogLine> {
    let mut total = 2usize; // the brackets
    let mut keep = 0usize;
    for l in lines.iter().rev() {
        total += serde_json::to_string(l).map_or(usize::MAX / 2, |j| j.len()) + 1;
        if total > max_bytes {
            break;
        }
        keep += 1;
    }
    let skip = lines.len() - keep;
    lines.into_iter().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, IdStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = IdStore::open(dir.path().join("commands.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn id_store_returns_what_was_put_and_survives_reopen() {
        let (dir, s) = store();
        let r = CommandResult::err("a", "runtime_error", "boom");
        s.put("a", &r, 1000).unwrap();
        assert_eq!(s.get("a", 1001).unwrap(), Some(r.clone()));
        drop(s);
        let s = IdStore::open(dir.path().join("commands.redb")).unwrap();
        assert_eq!(s.get("a", 1002).unwrap(), Some(r));
        assert_eq!(s.get("b", 1002).unwrap(), None);
    }

    #[test]
    fn id_store_keeps_only_the_last_n_ids() {
        let (_dir, s) = store();
        let s = s.with_bounds(3, DEFAULT_MAX_AGE);
        for i in 0..5 {
            s.put(
                &format!("c{i}"),
                &CommandResult::ok(format!("c{i}")),
                1000 + i,
            )
            .unwrap();
        }
        assert_eq!(s.len().unwrap(), 3);
        assert_eq!(s.get("c0", 2000).unwrap(), None);
        assert_eq!(s.get("c1", 2000).unwrap(), None);
        assert!(s.get("c4", 2000).unwrap().is_some());
    }

    #[test]
    fn id_store_forgets_ids_older_than_the_window() {
        let (_dir, s) = store();
        let s = s.with_bounds(100, Duration::from_secs(10));
        s.put("old", &CommandResult::ok("old"), 0).unwrap();
        assert!(s.get("old", 5_000).unwrap().is_some());
        assert_eq!(s.get("old", 10_001).unwrap(), None, "expired on read");
        s.put("new", &CommandResult::ok("new"), 20_000).unwrap();
        assert_eq!(s.len().unwrap(), 1, "expired entry pruned on put");
    }

    #[test]
    fn id_store_put_twice_keeps_one_entry() {
        let (_dir, s) = store();
        s.put("a", &CommandResult::ok("a"), 1).unwrap();
        s.put("a", &CommandResult::ok("a"), 2).unwrap();
        assert_eq!(s.len().unwrap(), 1);
    }

    #[test]
    fn id_store_moves_a_corrupt_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.redb");
        std::fs::write(&path, vec![0xAB; 8192]).unwrap();
        let s = IdStore::open(&path).unwrap();
        assert!(s.is_empty().unwrap());
        s.put("a", &CommandResult::ok("a"), 1).unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("commands.redb.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the bad file is kept aside");
    }

    #[test]
    fn validate_rejects_fields_the_action_does_not_use() {
        let mut c = ContainerCommand::new("x", CommandAction::Stop, Some("web"));
        c.image = Some("img".into());
        let e = validate(&c).unwrap_err();
        assert_eq!(e, vec!["image: not used by action stop".to_string()]);
    }

    #[test]
    fn validate_names_bad_ports_mounts_and_names() {
        let mut c = ContainerCommand::new("x", CommandAction::Run, Some("-bad"));
        c.image = Some("img".into());
        c.ports = Some(vec!["8080".into()]);
        c.mounts = Some(vec!["rel/path:/x".into()]);
        c.restart = Some("sometimes".into());
        let text = validate(&c).unwrap_err().join("\n");
        for needle in [
            "name: \"-bad\"",
            "ports[0]:",
            "mounts[0]:",
            "restart: \"sometimes\"",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }

    #[test]
    fn validate_run_labels_the_container_with_the_command_id() {
        let mut c = ContainerCommand::new("cmd-9", CommandAction::Run, Some("web"));
        c.image = Some("img".into());
        let Request::Run(spec) = validate(&c).unwrap() else {
            panic!("not a run")
        };
        assert_eq!(spec.labels.get(LABEL_COMMAND_ID).unwrap(), "cmd-9");
        assert!(!spec.labels.contains_key(crate::spec::LABEL_MANAGED));
    }

    #[test]
    fn logs_are_bounded_to_the_last_lines_whose_json_fits() {
        let line = |i| LogLine {
            ts: None,
            stream: crate::wire::LogStream::Stdout,
            line: format!("line{i}"),
        };
        let lines: Vec<LogLine> = (0..10).map(line).collect();
        // {"stream":"stdout","line":"line9"} is 34 bytes, plus a comma; plus the brackets.
        let kept = bound_lines(lines, 2 + 2 * 35);
        assert_eq!(kept, vec![line(8), line(9)]);
    }

    fn logs_cmd(extra: serde_json::Value) -> Result<Request, Vec<String>> {
        let mut v = serde_json::json!({"id": "l", "action": "logs", "name": "web"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let cmd = parse_command(v.to_string().as_bytes()).map_err(|e| e.errors)?;
        validate(&cmd)
    }

    #[test]
    fn logs_since_takes_an_rfc3339_time_or_a_duration_ago() {
        let Request::Logs {
            since,
            timestamps,
            tail,
            ..
        } = logs_cmd(serde_json::json!({"since": "2026-11-23T11:32:40Z", "timestamps": true}))
            .unwrap()
        else {
            panic!("not logs")
        };
        assert_eq!(
            (since, timestamps, tail),
            (Some(Since::At(1_795_433_560_000)), true, 100)
        );
        let Request::Logs { since, .. } = logs_cmd(serde_json::json!({"since": "10m"})).unwrap()
        else {
            panic!("not logs")
        };
        assert_eq!(since, Some(Since::Ago(Duration::from_secs(600))));
        assert_eq!(
            Since::Ago(Duration::from_secs(600)).unix_s(1_000_000_999),
            999_400
        );
        assert_eq!(Since::At(1_795_433_560_999).unix_s(0), 1_795_433_560);
    }

    #[test]
    fn logs_bad_options_are_refused_naming_the_field() {
        for (extra, needle) in [
            (
                serde_json::json!({"since": "yesterday"}),
                "since: \"yesterday\" is neither",
            ),
            (
                serde_json::json!({"since": "0s"}),
                "since: \"0s\" is no time ago",
            ),
            (serde_json::json!({"since": 5}), "since: must be a string"),
            (
                serde_json::json!({"timestamps": "yes"}),
                "timestamps: must be true or false",
            ),
            (serde_json::json!({"tail": 1001}), "tail: at most 1000"),
        ] {
            let e = logs_cmd(extra.clone()).unwrap_err().join("; ");
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let mut stop = ContainerCommand::new("x", CommandAction::Stop, Some("web"));
        stop.since = Some("10m".into());
        assert_eq!(
            validate(&stop).unwrap_err(),
            vec!["since: not used by action stop".to_string()]
        );
    }
}
