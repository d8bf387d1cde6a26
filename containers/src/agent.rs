//! [`Agent`]: what the node daemon owns. It answers container commands
//! ([`Agent::handle_command`]), makes the runtime match the node twin's `desired.containers`
//! ([`Agent::reconcile`]), produces the retained status ([`Agent::status`]) and counts what it
//! does ([`Agent::metrics`], a plain snapshot the node maps to prometheus-client).
//!
//! The agent holds no container state of its own: the runtime is the truth, read again for every
//! reconcile and status, so a node restart needs nothing but the same desired set (the runtime's
//! containers carry the labels that tie them to the agent). The only file is the command id store
//! (see [`crate::commands`]). The one thing kept in memory is how often the agent itself
//! restarted each declared container, for its restart back-off and crash-loop verdict
//! ([`crate::crashloop`]); losing it on a node restart costs at most one early restart.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::commands::{now_ms, CommandHandler, IdStore, StoreError};
use crate::crashloop::{self, AgentRestarts, BackoffPolicy, RestartDecision};
use crate::reconcile::{plan, report_with_errors, Action, DesiredContainer};
use crate::runtime::{ContainerInfo, ContainerRuntime, ContainerState, RuntimeError};
use crate::wire::{CommandResult, StatusMsg};

/// File name of the command id store inside the agent's data dir.
pub const STORE_FILE: &str = "commands.redb";

/// Why an agent could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data dir could not be created.
    #[error("container agent data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The command id store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened to one container during a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// Container name.
    pub name: String,
    /// The action tried ([`Action::kind`]).
    pub action: &'static str,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The result of one [`Agent::reconcile`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileReport {
    /// Every action tried, in order, with its error.
    pub outcomes: Vec<ReconcileOutcome>,
    /// The runtime could not be read at all (nothing was done).
    pub error: Option<String>,
    /// The containers after the reconcile (empty when the runtime could not be read).
    pub actual: Vec<ContainerInfo>,
    /// `reported.containers` for the node twin, with an `error` on each container whose action
    /// failed (see [`crate::reconcile::report_with_errors`]).
    pub reported: Value,
}

impl ReconcileReport {
    /// Number of failed actions (plus one when the runtime could not be read).
    pub fn error_count(&self) -> usize {
        self.outcomes.iter().filter(|o| o.error.is_some()).count()
            + usize::from(self.error.is_some())
    }
}

/// Counters and gauges of the agent at one moment (the node exports them as
/// `edgetwin_containers_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Containers per state at the last observation (status, list or reconcile); every state is
    /// present, zero when none.
    pub containers_by_state: BTreeMap<ContainerState, u64>,
    /// Command results by (action, outcome); action `unknown` when the command was unreadable,
    /// outcome `ok`, `invalid`, `image_not_present`, `name_taken`, `no_such_container`,
    /// `unreachable`, `runtime_error`. Duplicates are not counted here.
    pub command_results: BTreeMap<(&'static str, &'static str), u64>,
    /// Redelivered commands answered from the id store.
    pub command_duplicates: u64,
    /// Reconciles run.
    pub reconcile_runs: u64,
    /// Failed reconcile actions (and reconciles that could not read the runtime).
    pub reconcile_errors: u64,
    /// Restarts as observed: increases of a container's reported restart count between two
    /// observations (the runtime's restart-policy restarts plus, for declared containers, the
    /// agent's own; see [`crate::crashloop`]).
    pub restarts: u64,
}

#[derive(Default)]
struct Counters {
    snapshot: MetricsSnapshot,
    /// Last seen restart count per container id.
    restart_counts: HashMap<String, u64>,
}

/// The container agent.
pub struct Agent {
    runtime: Arc<dyn ContainerRuntime>,
    commands: CommandHandler,
    counters: Mutex<Counters>,
    reconciling: tokio::sync::Mutex<()>,
    backoff: BackoffPolicy,
    /// The agent's own restarts per declared container name.
    restarts: Mutex<BTreeMap<String, AgentRestarts>>,
    /// The node the agent declares containers for (label `edgetwin.node`); `None`: unlabelled.
    node: Option<String>,
}

impl Agent {
    /// An agent on `runtime` keeping its command id store in `data_dir/commands.redb`
    /// (created if missing). Opens a file: call it at startup or from a blocking thread.
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        data_dir: impl AsRef<Path>,
    ) -> Result<Self, AgentError> {
        let dir = data_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| AgentError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let store = IdStore::open(dir.join(STORE_FILE))?;
        Ok(Self::with_store(runtime, store))
    }

    /// An agent with an already opened store (e.g. with other bounds).
    pub fn with_store(runtime: Arc<dyn ContainerRuntime>, store: IdStore) -> Self {
        let mut counters = Counters::default();
        for s in ContainerState::ALL {
            counters.snapshot.containers_by_state.insert(s, 0);
        }
        Self {
            commands: CommandHandler::new(Arc::clone(&runtime), store),
            runtime,
            counters: Mutex::new(counters),
            reconciling: tokio::sync::Mutex::new(()),
            backoff: BackoffPolicy::default(),
            restarts: Mutex::new(BTreeMap::new()),
            node: None,
        }
    }

    /// Declares containers as node `node`'s (label `edgetwin.node`) and leaves every other
    /// node's declared containers alone, so nodes sharing one runtime do not remove each
    /// other's containers.
    pub fn with_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    /// The runtime's containers as this node sees them: another node's declared containers
    /// lose their managed label here (in memory only), so the reconciler neither changes nor
    /// reports them and a desired name they hold is a conflict.
    fn as_seen(&self, mut all: Vec<ContainerInfo>) -> Vec<ContainerInfo> {
        if let Some(node) = &self.node {
            for c in all.iter_mut().filter(|c| c.declared_by_other(node)) {
                c.labels.remove(crate::spec::LABEL_MANAGED);
            }
        }
        all
    }

    /// `desired` with this node's label on every spec (the fingerprint leaves labels out, so
    /// containers created before the label are not recreated for it).
    fn labelled(
        &self,
        desired: &BTreeMap<String, DesiredContainer>,
    ) -> BTreeMap<String, DesiredContainer> {
        let mut d = desired.clone();
        if let Some(node) = &self.node {
            for c in d.values_mut() {
                c.spec
                    .labels
                    .insert(crate::spec::LABEL_NODE.to_string(), node.clone());
            }
        }
        d
    }

    /// Spaces the agent's own restarts of declared containers by `policy` (default
    /// [`BackoffPolicy::default`]: 10 s doubling to 5 min, reset after a 10 min run).
    pub fn with_backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.runtime
    }

    /// Handles a raw `node/containers/cmd` payload; returns the JSON for
    /// `node/containers/result`.
    pub async fn handle_command(&self, payload: &[u8]) -> Vec<u8> {
        self.handle_command_result(payload).await.to_bytes()
    }

    /// Like [`Agent::handle_command`], typed.
    pub async fn handle_command_result(&self, payload: &[u8]) -> CommandResult {
        let h = self.commands.handle_detailed(payload).await;
        if let Ok(mut c) = self.counters.lock() {
            if h.duplicate {
                c.snapshot.command_duplicates += 1;
            } else {
                let action = h.action.map(|a| a.as_str()).unwrap_or("unknown");
                *c.snapshot
                    .command_results
                    .entry((action, h.outcome.as_str()))
                    .or_default() += 1;
            }
        }
        if let Some(list) = &h.result.containers {
            self.observe_states(list.iter().map(|s| s.state));
        }
        tracing::info!(id = %h.result.id, action = h.action.map(|a| a.as_str()).unwrap_or("unknown"),
            ok = h.result.ok, duplicate = h.duplicate, error = h.result.error.as_deref().unwrap_or(""),
            "container command");
        h.result
    }

    /// Makes the runtime match `desired` (see [`crate::reconcile`] for the rules). Every action
    /// is tried; a failure is reported for its container and the others go on. Reconciles are
    /// serialised.
    pub async fn reconcile(&self, desired: &BTreeMap<String, DesiredContainer>) -> ReconcileReport {
        let _one_at_a_time = self.reconciling.lock().await;
        self.bump(|s| s.reconcile_runs += 1);
        let actual = match self.runtime.list().await {
            Ok(a) => self.as_seen(a),
            Err(e) => {
                self.bump(|s| s.reconcile_errors += 1);
                tracing::warn!(error = %e, "reconcile: cannot read the container runtime");
                let errors: BTreeMap<String, String> =
                    desired.keys().map(|n| (n.clone(), e.to_string())).collect();
                return ReconcileReport {
                    outcomes: Vec::new(),
                    error: Some(e.to_string()),
                    actual: Vec::new(),
                    reported: report_with_errors(&[], desired, &errors),
                };
            }
        };
        let now = now_ms();
        if let Ok(mut memory) = self.restarts.lock() {
            crashloop::settle(&mut memory, desired, &actual, &self.backoff, now);
        }
        self.observe(&self.annotated(actual.clone(), now));
        let actions = plan(&self.labelled(desired), &actual);
        let mut outcomes = Vec::with_capacity(actions.len());
        let mut errors = BTreeMap::new();
        for action in &actions {
            if !self.may_apply(action, &actual, now) {
                continue;
            }
            let result = self.apply(action).await;
            let error = result.err();
            if let Some(e) = &error {
                tracing::warn!(container = action.name(), action = action.kind(), error = %e, "reconcile action failed");
                errors.insert(action.name().to_string(), e.clone());
            } else {
                tracing::info!(
                    container = action.name(),
                    action = action.kind(),
                    "reconcile action"
                );
            }
            outcomes.push(ReconcileOutcome {
                name: action.name().to_string(),
                action: action.kind(),
                error,
            });
        }
        let failed = outcomes.iter().filter(|o| o.error.is_some()).count() as u64;
        self.bump(|s| s.reconcile_errors += failed);
        let (actual, error) = match self.runtime.list().await {
            Ok(a) => (self.as_seen(a), None),
            Err(e) => (actual, Some(e.to_string())),
        };
        let actual = self.annotated(actual, now_ms());
        self.observe(&actual);
        ReconcileReport {
            reported: report_with_errors(&actual, desired, &errors),
            outcomes,
            error,
            actual,
        }
    }

    /// Whether `action` may run now, keeping the agent's restart memory: a start waits out the
    /// back-off, a create or recreate that starts begins a fresh count, anything else forgets.
    fn may_apply(&self, action: &Action, actual: &[ContainerInfo], now: i64) -> bool {
        let Ok(mut memory) = self.restarts.lock() else {
            return true;
        };
        let name = action.name();
        match action {
            Action::Start { name } => {
                let Some(info) = actual.iter().find(|c| &c.name == name) else {
                    return true;
                };
                match crashloop::decide_restart(&self.backoff, memory.get(name).copied(), info, now)
                {
                    RestartDecision::Start { next } => {
                        memory.insert(name.clone(), next);
                        true
                    }
                    RestartDecision::Wait { until, backoff } => {
                        tracing::debug!(container = %name, until, backoff_ms = backoff.as_millis() as u64,
                            "reconcile: restart held back");
                        false
                    }
                }
            }
            Action::Create { start: true, .. } | Action::Recreate { start: true, .. } => {
                memory.insert(
                    name.to_string(),
                    AgentRestarts {
                        count: 0,
                        last_start: now,
                    },
                );
                true
            }
            _ => {
                memory.remove(name);
                true
            }
        }
    }

    /// The containers as reported: crash loops named, the agent's restarts and back-off added.
    fn annotated(&self, actual: Vec<ContainerInfo>, now: i64) -> Vec<ContainerInfo> {
        let memory = self.restarts.lock().map(|m| m.clone()).unwrap_or_default();
        actual
            .into_iter()
            .map(|c| {
                let mine = c.managed().then(|| memory.get(&c.name).copied()).flatten();
                crashloop::annotate(c, mine, &self.backoff, now)
            })
            .collect()
    }

    async fn apply(&self, action: &Action) -> Result<(), String> {
        let rt = &self.runtime;
        let r = match action {
            Action::Create { spec, start: true } => rt.run(spec).await.map(|_| ()),
            Action::Create { spec, start: false } => rt.create(spec).await.map(|_| ()),
            Action::Recreate { spec, start } => match rt.remove(&spec.name, true).await {
                Ok(()) | Err(RuntimeError::NoSuchContainer { .. }) => {
                    if *start {
                        rt.run(spec).await.map(|_| ())
                    } else {
                        rt.create(spec).await.map(|_| ())
                    }
                }
                Err(e) => Err(e),
            },
            Action::Start { name } => rt.start(name).await,
            Action::Stop { name } => rt.stop(name, None, None).await,
            Action::Remove { name } => match rt.remove(name, true).await {
                Err(RuntimeError::NoSuchContainer { .. }) => Ok(()),
                other => other,
            },
            Action::Conflict { reason, .. } => return Err(reason.clone()),
        };
        r.map_err(|e| e.to_string())
    }

    /// The retained `node/containers/status`: every container of the runtime.
    pub async fn status(&self) -> Result<StatusMsg, RuntimeError> {
        let all = self.annotated(self.runtime.list().await?, now_ms());
        self.observe(&all);
        Ok(StatusMsg {
            ts: now_ms(),
            containers: all.iter().map(ContainerInfo::to_status).collect(),
        })
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.counters
            .lock()
            .map(|c| c.snapshot.clone())
            .unwrap_or_default()
    }

    fn bump(&self, f: impl FnOnce(&mut MetricsSnapshot)) {
        if let Ok(mut c) = self.counters.lock() {
            f(&mut c.snapshot);
        }
    }

    fn observe_states(&self, states: impl Iterator<Item = ContainerState>) {
        if let Ok(mut c) = self.counters.lock() {
            for v in c.snapshot.containers_by_state.values_mut() {
                *v = 0;
            }
            for s in states {
                *c.snapshot.containers_by_state.entry(s).or_default() += 1;
            }
        }
    }

    fn observe(&self, all: &[ContainerInfo]) {
        self.observe_states(all.iter().map(|i| i.state));
        if let Ok(mut c) = self.counters.lock() {
            let mut seen = HashMap::with_capacity(all.len());
            let mut restarts = 0;
            for i in all {
                let now = i.restart_count.unwrap_or(0);
                if let Some(before) = c.restart_counts.get(&i.id) {
                    restarts += now.saturating_sub(*before);
                }
                seen.insert(i.id.clone(), now);
            }
            c.restart_counts = seen;
            c.snapshot.restarts += restarts;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::parse_desired;
    use crate::spec::ContainerSpec;
    use async_trait::async_trait;
    use serde_json::json;
    use std::time::Duration;

    /// An in-memory runtime: enough to test the agent's bookkeeping without Docker.
    #[derive(Default)]
    struct Fake {
        containers: Mutex<BTreeMap<String, ContainerInfo>>,
        images: Vec<String>,
    }

    impl Fake {
        fn with_image(image: &str) -> Self {
            Self {
                images: vec![image.to_string()],
                ..Self::default()
            }
        }

        fn set(&self, name: &str, f: impl FnOnce(&mut ContainerInfo)) {
            f(self.containers.lock().unwrap().get_mut(name).unwrap());
        }
    }

    #[async_trait]
    impl ContainerRuntime for Fake {
        async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
            if !self.images.contains(&spec.image) {
                return Err(RuntimeError::ImageNotPresent {
                    image: spec.image.clone(),
                });
            }
            let mut all = self.containers.lock().unwrap();
            if all.contains_key(&spec.name) {
                return Err(RuntimeError::NameTaken {
                    name: spec.name.clone(),
                });
            }
            let info = ContainerInfo {
                id: format!("{}-{}", spec.name, all.len()),
                name: spec.name.clone(),
                image: spec.image.clone(),
                state: ContainerState::Created,
                exit_code: None,
                restart_count: Some(0),
                started_at: None,
                finished_at: None,
                restarting: false,
                labels: spec.labels.clone(),
                error: None,
                backoff_ms: None,
            };
            all.insert(spec.name.clone(), info.clone());
            Ok(info)
        }
        async fn run(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
            self.create(spec).await?;
            self.start(&spec.name).await?;
            self.inspect(&spec.name).await
        }
        async fn start(&self, name: &str) -> Result<(), RuntimeError> {
            self.inspect(name).await?;
            self.set(name, |c| c.state = ContainerState::Running);
            Ok(())
        }
        async fn stop(
            &self,
            name: &str,
            _signal: Option<&str>,
            _timeout: Option<Duration>,
        ) -> Result<(), RuntimeError> {
            self.inspect(name).await?;
            self.set(name, |c| {
                c.state = ContainerState::Exited;
                c.exit_code = Some(0);
            });
            Ok(())
        }
        async fn restart(&self, name: &str, _t: Option<Duration>) -> Result<(), RuntimeError> {
            self.start(name).await
        }
        async fn remove(&self, name: &str, _force: bool) -> Result<(), RuntimeError> {
            self.containers
                .lock()
                .unwrap()
                .remove(name)
                .map(|_| ())
                .ok_or(RuntimeError::NoSuchContainer { name: name.into() })
        }
        async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
            Ok(self.containers.lock().unwrap().values().cloned().collect())
        }
        async fn inspect(&self, name: &str) -> Result<ContainerInfo, RuntimeError> {
            self.containers
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .ok_or(RuntimeError::NoSuchContainer { name: name.into() })
        }
        async fn logs(
            &self,
            name: &str,
            _query: &crate::runtime::LogsQuery,
        ) -> Result<Vec<crate::wire::LogLine>, RuntimeError> {
            self.inspect(name).await.map(|_| Vec::new())
        }
    }

    fn agent(fake: Arc<Fake>) -> (tempfile::TempDir, Agent) {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new(fake, dir.path()).unwrap();
        (dir, agent)
    }

    #[test]
    fn agent_futures_are_send_so_the_node_can_spawn_them() {
        fn assert_send<T: Send>(_: &T) {}
        let (_dir, agent) = agent(Arc::new(Fake::default()));
        let desired = BTreeMap::new();
        assert_send(&agent.handle_command(b"{}"));
        assert_send(&agent.reconcile(&desired));
        assert_send(&agent.status());
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<Agent>();
    }

    #[tokio::test]
    async fn reconcile_reports_each_failure_on_its_container_and_carries_on() {
        let fake = Arc::new(Fake::with_image("img"));
        let (_dir, agent) = agent(fake.clone());
        let d = parse_desired(&json!({
            "a": {"image": "missing", "state": "running"},
            "b": {"image": "img", "state": "running"},
            "c": {"image": "img", "state": "stopped"}
        }))
        .unwrap();
        let rep = agent.reconcile(&d).await;
        assert_eq!(rep.error_count(), 1);
        assert_eq!(rep.outcomes.len(), 3);
        assert_eq!(rep.reported["a"]["state"], "unknown");
        assert!(rep.reported["a"]["error"]
            .as_str()
            .unwrap()
            .contains("image missing is not present"));
        assert_eq!(rep.reported["b"]["state"], "running");
        assert_eq!(rep.reported["c"]["state"], "created");
        let m = agent.metrics();
        assert_eq!((m.reconcile_runs, m.reconcile_errors), (1, 1));
        assert_eq!(m.containers_by_state[&ContainerState::Running], 1);
        assert_eq!(m.containers_by_state[&ContainerState::Created], 1);
    }

    #[tokio::test]
    async fn agents_of_two_nodes_on_one_runtime_each_keep_their_own_containers() {
        let fake = Arc::new(Fake::with_image("img"));
        let (_da, a) = agent(fake.clone());
        let (_db, b) = agent(fake.clone());
        let (a, b) = (a.with_node("node-a"), b.with_node("node-b"));
        let want = |name: &str| {
            parse_desired(&json!({ name: {"image": "img", "state": "running"} })).unwrap()
        };
        a.reconcile(&want("x")).await;
        let rep = b.reconcile(&want("y")).await;
        // b neither removed a's container nor reports it.
        let names: Vec<String> = fake.containers.lock().unwrap().keys().cloned().collect();
        assert_eq!(names, vec!["x".to_string(), "y".to_string()]);
        assert!(rep.reported.get("x").is_none(), "{}", rep.reported);
        assert_eq!(
            fake.containers.lock().unwrap()["y"].labels["edgetwin.node"],
            "node-b"
        );
        // a name another node declared is a conflict, left alone.
        let rep = b.reconcile(&want("x")).await;
        assert!(rep.reported["x"]["error"]
            .as_str()
            .unwrap()
            .contains("declared by another node"));
        let names: Vec<String> = fake.containers.lock().unwrap().keys().cloned().collect();
        assert_eq!(names, vec!["x".to_string()], "b removed only its own y");
        let rep = a.reconcile(&want("x")).await;
        assert_eq!(rep.reported["x"]["state"], "running");
    }

    #[tokio::test]
    async fn restarts_count_restart_count_increases_between_observations() {
        let fake = Arc::new(Fake::with_image("img"));
        let (_dir, agent) = agent(fake.clone());
        let d = parse_desired(&json!({"a": {"image": "img", "state": "running"}})).unwrap();
        agent.reconcile(&d).await;
        fake.set("a", |c| c.restart_count = Some(3));
        agent.status().await.unwrap();
        fake.set("a", |c| c.restart_count = Some(4));
        agent.status().await.unwrap();
        assert_eq!(agent.metrics().restarts, 4);
    }

    #[tokio::test]
    async fn command_results_are_counted_by_action_and_outcome() {
        let fake = Arc::new(Fake::with_image("img"));
        let (_dir, agent) = agent(fake);
        let run = br#"{"id":"1","action":"run","name":"a","image":"img"}"#;
        agent.handle_command(run).await;
        agent.handle_command(run).await;
        agent
            .handle_command(br#"{"id":"2","action":"stop","name":"nope"}"#)
            .await;
        agent.handle_command(b"garbage").await;
        let m = agent.metrics();
        assert_eq!(m.command_results[&("run", "ok")], 1);
        assert_eq!(m.command_results[&("stop", "no_such_container")], 1);
        assert_eq!(m.command_results[&("unknown", "invalid")], 1);
        assert_eq!(m.command_duplicates, 1);
    }
}
