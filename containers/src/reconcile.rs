//! Declarative containers: the node's own twin carries `desired.containers.{name}` and the agent
//! makes the runtime match it. This module is pure (no I/O): [`parse_desired`] validates the
//! desired JSON, [`plan`] computes the actions that take the runtime's actual containers to the
//! desired set, [`report`] renders `reported.containers`.
//!
//! Desired entry: `{image, env?: {K: V}, args?: [..], ports?: ["8080:80/tcp"],
//! mounts?: ["/host:/ctr:ro"], restart?: "no"|"always"|"on-failure"|"unless-stopped",
//! limits?: {memory_bytes?, cpus?}, state: "running"|"stopped"}`; a `null` entry (a removed
//! desired property) means "not desired".
//!
//! Reported entry: `{image, state, exit_code?, restart_count?, started_at?, finished_at?,
//! backoff_ms?, error?}`; `state` may be `crash_loop` (see [`crate::crashloop`]).
//!
//! # Rules of [`plan`]
//!
//! The reconciler owns only containers labelled `edgetwin.managed=true`; it never changes or
//! removes any other container. For each desired name:
//! - missing → create it (and start it when `state` is `running`);
//! - managed, but created from another spec (label `edgetwin.spec-hash` differs from
//!   [`ContainerSpec::fingerprint`]: image, env, args, ports, mounts, restart or limits changed),
//!   or `dead`/`unknown` → recreate (remove, then create and maybe start);
//! - managed, `running` wanted: `created`/`exited` → start; `running`/`paused` → nothing;
//! - managed, `stopped` wanted: `running`/`paused` → stop; `created`/`exited` → nothing;
//! - the name is held by an unmanaged container → [`Action::Conflict`] (reported, nothing done).
//!
//! Managed containers whose name is not desired are removed (first, so they free ports and
//! names for what follows).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::runtime::{ContainerInfo, ContainerState};
use crate::spec::{self, ContainerSpec, RawSpec, LABEL_MANAGED, LABEL_SPEC_HASH};
use crate::wire;

/// Whether a desired container should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredState {
    /// Should be running.
    Running,
    /// Should exist but not run.
    Stopped,
}

/// One desired container.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredContainer {
    /// What to create.
    pub spec: ContainerSpec,
    /// Whether it should run.
    pub state: DesiredState,
}

impl DesiredContainer {
    /// The spec with the reconciler's labels (`edgetwin.managed`, `edgetwin.spec-hash`).
    pub fn managed_spec(&self) -> ContainerSpec {
        let mut s = self.spec.clone();
        s.labels
            .insert(LABEL_MANAGED.to_string(), "true".to_string());
        s.labels
            .insert(LABEL_SPEC_HASH.to_string(), self.spec.fingerprint());
        s
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create a missing container (with the managed labels), and start it when `start`.
    Create {
        /// Spec, labels included.
        spec: ContainerSpec,
        /// Start after creating.
        start: bool,
    },
    /// Remove the existing managed container and create it again from `spec`.
    Recreate {
        /// Spec, labels included.
        spec: ContainerSpec,
        /// Start after creating.
        start: bool,
    },
    /// Start an existing container.
    Start {
        /// Container name.
        name: String,
    },
    /// Stop a running container.
    Stop {
        /// Container name.
        name: String,
    },
    /// Remove a managed container that is no longer desired (forced).
    Remove {
        /// Container name.
        name: String,
    },
    /// A desired name is taken by a container the reconciler does not own: nothing is done.
    Conflict {
        /// Container name.
        name: String,
        /// Why.
        reason: String,
    },
}

impl Action {
    /// The container the action is about.
    pub fn name(&self) -> &str {
        match self {
            Action::Create { spec, .. } | Action::Recreate { spec, .. } => &spec.name,
            Action::Start { name }
            | Action::Stop { name }
            | Action::Remove { name }
            | Action::Conflict { name, .. } => name,
        }
    }

    /// Short label: `create`, `recreate`, `start`, `stop`, `remove`, `conflict`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Recreate { .. } => "recreate",
            Action::Start { .. } => "start",
            Action::Stop { .. } => "stop",
            Action::Remove { .. } => "remove",
            Action::Conflict { .. } => "conflict",
        }
    }
}

/// The actions that take `actual` to `desired` (see the module doc for the rules). Removals
/// come first, then one action at most per desired name, in name order.
pub fn plan(desired: &BTreeMap<String, DesiredContainer>, actual: &[ContainerInfo]) -> Vec<Action> {
    let by_name: BTreeMap<&str, &ContainerInfo> =
        actual.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut actions: Vec<Action> = actual
        .iter()
        .filter(|c| c.managed() && !desired.contains_key(&c.name))
        .map(|c| Action::Remove {
            name: c.name.clone(),
        })
        .collect();
    for (name, want) in desired {
        let start = want.state == DesiredState::Running;
        let Some(have) = by_name.get(name.as_str()) else {
            actions.push(Action::Create {
                spec: want.managed_spec(),
                start,
            });
            continue;
        };
        if !have.managed() {
            actions.push(Action::Conflict {
                name: name.clone(),
                reason: format!(
                    "the name {name} is taken by a container this node does not manage (without the label {LABEL_MANAGED}=true, or declared by another node); remove or rename it"
                ),
            });
            continue;
        }
        let same_spec = have.spec_hash() == Some(want.spec.fingerprint().as_str());
        let broken = matches!(have.state, ContainerState::Dead | ContainerState::Unknown);
        if !same_spec || broken {
            actions.push(Action::Recreate {
                spec: want.managed_spec(),
                start,
            });
            continue;
        }
        // crash_loop is only ever reported, but should one come in, it is being restarted.
        let running = matches!(
            have.state,
            ContainerState::Running | ContainerState::Paused | ContainerState::CrashLoop
        );
        match (want.state, running) {
            (DesiredState::Running, false) => actions.push(Action::Start { name: name.clone() }),
            (DesiredState::Stopped, true) => actions.push(Action::Stop { name: name.clone() }),
            _ => {}
        }
    }
    actions
}

const DESIRED_KEYS: &[&str] = &[
    "image", "env", "args", "ports", "mounts", "restart", "limits", "state",
];

/// Validates `desired.containers` (the value of that property of the node's twin: an object
/// name → entry; `null` or absent means none). Returns every problem as
/// `"containers.{name}.{field}: message"`.
pub fn parse_desired(value: &Value) -> Result<BTreeMap<String, DesiredContainer>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = BTreeMap::new();
    let entries = match value {
        Value::Null => return Ok(out),
        Value::Object(m) => m,
        _ => {
            return Err(vec![
                "containers: must be an object of name → container".into()
            ])
        }
    };
    for (name, entry) in entries {
        let prefix = format!("containers.{name}.");
        spec::check_name(&format!("containers.{name}"), name, &mut errors);
        let obj = match entry {
            Value::Null => continue,
            Value::Object(o) => o,
            _ => {
                errors.push(format!("containers.{name}: must be an object"));
                continue;
            }
        };
        if let Some(d) = parse_entry(&prefix, name, obj, &mut errors) {
            out.insert(name.clone(), d);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn parse_entry(
    prefix: &str,
    name: &str,
    obj: &Map<String, Value>,
    errors: &mut Vec<String>,
) -> Option<DesiredContainer> {
    let before = errors.len();
    for k in obj.keys() {
        if !DESIRED_KEYS.contains(&k.as_str()) {
            errors.push(format!("{prefix}{k}: unknown field"));
        }
    }
    let string = |key: &str, errors: &mut Vec<String>| -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                errors.push(format!("{prefix}{key}: must be a string"));
                None
            }
        }
    };
    let image = string("image", errors);
    if image.is_none() && obj.get("image").is_none_or(|v| v.is_null()) {
        errors.push(format!("{prefix}image: missing field"));
    }
    let state = match string("state", errors).as_deref() {
        Some("running") => Some(DesiredState::Running),
        Some("stopped") => Some(DesiredState::Stopped),
        Some(other) => {
            errors.push(format!(
                "{prefix}state: {other:?} is not \"running\" or \"stopped\""
            ));
            None
        }
        None => {
            if obj.get("state").is_none_or(|v| v.is_null()) {
                errors.push(format!("{prefix}state: missing field"));
            }
            None
        }
    };
    let present = |key: &str| obj.get(key).filter(|v| !v.is_null());
    let raw = RawSpec {
        image,
        env: present("env").and_then(|v| wire::str_map_at(&format!("{prefix}env"), v, errors)),
        args: present("args").and_then(|v| wire::str_list_at(&format!("{prefix}args"), v, errors)),
        ports: present("ports")
            .and_then(|v| wire::str_list_at(&format!("{prefix}ports"), v, errors)),
        mounts: present("mounts")
            .and_then(|v| wire::str_list_at(&format!("{prefix}mounts"), v, errors)),
        restart: string("restart", errors),
        limits: present("limits")
            .and_then(|v| wire::limits_at(&format!("{prefix}limits"), v, errors)),
    };
    let spec = spec::build_spec(prefix, name, raw, errors);
    match state {
        Some(state) if errors.len() == before => Some(DesiredContainer { spec, state }),
        _ => None,
    }
}

fn reported_entry(c: &ContainerInfo) -> Value {
    let mut m = Map::new();
    m.insert("image".into(), json!(c.image));
    m.insert("state".into(), json!(c.state.as_str()));
    if let Some(x) = c.exit_code {
        m.insert("exit_code".into(), json!(x));
    }
    if let Some(x) = c.restart_count {
        m.insert("restart_count".into(), json!(x));
    }
    if let Some(x) = c.started_at {
        m.insert("started_at".into(), json!(x));
    }
    if let Some(x) = c.finished_at {
        m.insert("finished_at".into(), json!(x));
    }
    if let Some(x) = c.backoff_ms {
        m.insert("backoff_ms".into(), json!(x));
    }
    if let Some(e) = &c.error {
        m.insert("error".into(), json!(e));
    }
    Value::Object(m)
}

/// `reported.containers`: every managed container as `{image, state, exit_code?,
/// restart_count?, started_at?, error?}`, keyed by name. Unmanaged containers are not part of
/// the node twin (they appear in `node/containers/status`).
pub fn report(actual: &[ContainerInfo]) -> Value {
    report_with_errors(actual, &BTreeMap::new(), &BTreeMap::new())
}

/// Like [`report`], plus `error` for each name in `errors`; a desired container that does not
/// exist (e.g. its image is missing) is reported as `{image, state: "unknown", error}`.
pub fn report_with_errors(
    actual: &[ContainerInfo],
    desired: &BTreeMap<String, DesiredContainer>,
    errors: &BTreeMap<String, String>,
) -> Value {
    let mut out = Map::new();
    let mut seen = BTreeSet::new();
    for c in actual.iter().filter(|c| c.managed()) {
        let mut entry = reported_entry(c);
        if let (Some(e), Value::Object(m)) = (errors.get(&c.name), &mut entry) {
            m.insert("error".into(), json!(e));
        }
        seen.insert(c.name.as_str());
        out.insert(c.name.clone(), entry);
    }
    for (name, e) in errors {
        if seen.contains(name.as_str()) {
            continue;
        }
        let image = desired
            .get(name)
            .map(|d| d.spec.image.clone())
            .or_else(|| {
                actual
                    .iter()
                    .find(|c| &c.name == name)
                    .map(|c| c.image.clone())
            })
            .unwrap_or_default();
        out.insert(
            name.clone(),
            json!({"image": image, "state": ContainerState::Unknown.as_str(), "error": e}),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desired(name: &str, image: &str, state: DesiredState) -> (String, DesiredContainer) {
        (
            name.to_string(),
            DesiredContainer {
                spec: ContainerSpec::new(name, image),
                state,
            },
        )
    }

    fn actual_from(d: &DesiredContainer, state: ContainerState) -> ContainerInfo {
        let spec = d.managed_spec();
        ContainerInfo {
            id: format!("id-{}", spec.name),
            name: spec.name.clone(),
            image: spec.image.clone(),
            state,
            exit_code: None,
            restart_count: Some(0),
            started_at: None,
            finished_at: None,
            restarting: false,
            labels: spec.labels,
            error: None,
            backoff_ms: None,
        }
    }

    fn unmanaged(name: &str) -> ContainerInfo {
        ContainerInfo {
            id: format!("id-{name}"),
            name: name.into(),
            image: "other".into(),
            state: ContainerState::Running,
            exit_code: None,
            restart_count: None,
            started_at: None,
            finished_at: None,
            restarting: false,
            labels: BTreeMap::new(),
            error: None,
            backoff_ms: None,
        }
    }

    #[test]
    fn plan_creates_missing_containers_started_only_when_running_wanted() {
        let d: BTreeMap<_, _> = [
            desired("a", "img", DesiredState::Running),
            desired("b", "img", DesiredState::Stopped),
        ]
        .into();
        let p = plan(&d, &[]);
        assert_eq!(p.len(), 2);
        assert!(
            matches!(&p[0], Action::Create { spec, start: true } if spec.name == "a" && spec.labels[LABEL_MANAGED] == "true")
        );
        assert!(matches!(&p[1], Action::Create { start: false, .. }));
    }

    #[test]
    fn plan_starts_stopped_and_stops_running_containers() {
        let d: BTreeMap<_, _> = [
            desired("a", "img", DesiredState::Running),
            desired("b", "img", DesiredState::Stopped),
        ]
        .into();
        let actual = vec![
            actual_from(&d["a"], ContainerState::Exited),
            actual_from(&d["b"], ContainerState::Running),
        ];
        assert_eq!(
            plan(&d, &actual),
            vec![
                Action::Start { name: "a".into() },
                Action::Stop { name: "b".into() }
            ]
        );
    }

    #[test]
    fn plan_recreates_when_image_env_args_or_ports_change() {
        let (_, old) = desired("a", "img:1", DesiredState::Running);
        let actual = vec![actual_from(&old, ContainerState::Running)];
        for change in 0..4 {
            let mut new = old.clone();
            match change {
                0 => new.spec.image = "img:2".into(),
                1 => {
                    new.spec.env.insert("K".into(), "V".into());
                }
                2 => new.spec.args = vec!["x".into()],
                _ => new
                    .spec
                    .ports
                    .push(spec::PortMapping::parse("1:2").unwrap()),
            }
            let d: BTreeMap<_, _> = [("a".to_string(), new)].into();
            let p = plan(&d, &actual);
            assert!(
                matches!(p.as_slice(), [Action::Recreate { start: true, .. }]),
                "change {change}: {p:?}"
            );
        }
    }

    #[test]
    fn plan_removes_undesired_managed_but_never_unmanaged_containers() {
        let (_, gone) = desired("gone", "img", DesiredState::Running);
        let actual = vec![
            actual_from(&gone, ContainerState::Running),
            unmanaged("theirs"),
        ];
        assert_eq!(
            plan(&BTreeMap::new(), &actual),
            vec![Action::Remove {
                name: "gone".into()
            }]
        );
    }

    #[test]
    fn plan_reports_a_conflict_when_an_unmanaged_container_holds_a_desired_name() {
        let d: BTreeMap<_, _> = [desired("theirs", "img", DesiredState::Running)].into();
        let p = plan(&d, &[unmanaged("theirs")]);
        assert!(matches!(p.as_slice(), [Action::Conflict { name, .. }] if name == "theirs"));
    }

    #[test]
    fn plan_recreates_dead_containers_and_leaves_paused_ones_running() {
        let d: BTreeMap<_, _> = [
            desired("a", "img", DesiredState::Running),
            desired("b", "img", DesiredState::Running),
        ]
        .into();
        let actual = vec![
            actual_from(&d["a"], ContainerState::Dead),
            actual_from(&d["b"], ContainerState::Paused),
        ];
        let p = plan(&d, &actual);
        assert!(matches!(p.as_slice(), [Action::Recreate { spec, .. }] if spec.name == "a"));
    }

    #[test]
    fn parse_desired_reads_every_field() {
        let v = json!({
            "web": {"image": "nginx:1", "env": {"A": "1"}, "args": ["x"], "ports": ["8080:80/tcp"],
                    "mounts": ["/d:/d:ro"], "restart": "always",
                    "limits": {"memory_bytes": 1048576, "cpus": 0.5}, "state": "running"},
            "removed": null
        });
        let d = parse_desired(&v).unwrap();
        assert_eq!(d.len(), 1);
        let web = &d["web"];
        assert_eq!(web.state, DesiredState::Running);
        assert_eq!(web.spec.restart, spec::RestartPolicy::Always);
        assert_eq!(web.spec.ports[0].host_port, 8080);
        assert_eq!(web.spec.limits.memory_bytes, Some(1_048_576));
        assert_eq!(parse_desired(&Value::Null).unwrap().len(), 0);
    }

    #[test]
    fn parse_desired_reports_every_error_with_its_path() {
        let v = json!({
            "web": {"env": {"A": 1}, "ports": ["x"], "state": "on", "bogus": 1},
            "-bad": {"image": "i", "state": "running"},
            "db": {"image": "i"}
        });
        let errors = parse_desired(&v).unwrap_err();
        let text = errors.join("\n");
        for needle in [
            "containers.web.image: missing field",
            "containers.web.env.A: must be a string",
            "containers.web.ports[0]:",
            "containers.web.state: \"on\"",
            "containers.web.bogus: unknown field",
            "containers.-bad: \"-bad\" is not a valid container name",
            "containers.db.state: missing field",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
    }

    #[test]
    fn report_lists_managed_containers_only_with_their_state() {
        let (_, a) = desired("a", "img", DesiredState::Stopped);
        let mut info = actual_from(&a, ContainerState::Exited);
        info.exit_code = Some(137);
        let r = report(&[info, unmanaged("theirs")]);
        assert_eq!(
            r,
            json!({"a": {"image": "img", "state": "exited", "exit_code": 137, "restart_count": 0}})
        );
    }

    #[test]
    fn report_with_errors_reports_desired_containers_that_could_not_be_created() {
        let d: BTreeMap<_, _> = [desired("a", "missing:1", DesiredState::Running)].into();
        let errors = [(
            "a".to_string(),
            "image missing:1 is not present".to_string(),
        )]
        .into();
        let r = report_with_errors(&[], &d, &errors);
        assert_eq!(
            r,
            json!({"a": {"image": "missing:1", "state": "unknown", "error": "image missing:1 is not present"}})
        );
    }

    // --- model-based property: one plan converges -------------------------------------------

    /// Applies a plan to a simulated runtime the way the agent applies it to a real one.
    fn apply(actual: &[ContainerInfo], actions: &[Action]) -> Vec<ContainerInfo> {
        let mut state: BTreeMap<String, ContainerInfo> =
            actual.iter().map(|c| (c.name.clone(), c.clone())).collect();
        let fresh = |spec: &ContainerSpec, start: bool| ContainerInfo {
            id: format!("new-{}", spec.name),
            name: spec.name.clone(),
            image: spec.image.clone(),
            state: if start {
                ContainerState::Running
            } else {
                ContainerState::Created
            },
            exit_code: None,
            restart_count: Some(0),
            started_at: None,
            finished_at: None,
            restarting: false,
            labels: spec.labels.clone(),
            error: None,
            backoff_ms: None,
        };
        for a in actions {
            match a {
                Action::Create { spec, start } => {
                    assert!(
                        !state.contains_key(&spec.name),
                        "create over an existing name"
                    );
                    state.insert(spec.name.clone(), fresh(spec, *start));
                }
                Action::Recreate { spec, start } => {
                    assert!(
                        state[&spec.name].managed(),
                        "recreated an unmanaged container"
                    );
                    state.insert(spec.name.clone(), fresh(spec, *start));
                }
                Action::Start { name } => {
                    let c = state.get_mut(name).unwrap();
                    assert!(c.managed());
                    c.state = ContainerState::Running;
                }
                Action::Stop { name } => {
                    let c = state.get_mut(name).unwrap();
                    assert!(c.managed());
                    c.state = ContainerState::Exited;
                    c.exit_code = Some(143);
                }
                Action::Remove { name } => {
                    assert!(
                        state.remove(name).unwrap().managed(),
                        "removed an unmanaged container"
                    );
                }
                Action::Conflict { .. } => {}
            }
        }
        state.into_values().collect()
    }

    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    fn arb_spec(name: &'static str) -> impl Strategy<Value = ContainerSpec> {
        (0..2usize, 0..2usize, 0..2usize).prop_map(move |(img, env, args)| {
            let mut s = ContainerSpec::new(name, ["img:1", "img:2"][img]);
            if env == 1 {
                s.env.insert("K".into(), "V".into());
            }
            if args == 1 {
                s.args = vec!["sleep".into(), "1".into()];
            }
            s
        })
    }

    fn arb_desired() -> impl Strategy<Value = BTreeMap<String, DesiredContainer>> {
        let entries: Vec<_> = NAMES
            .iter()
            .map(|n| {
                proptest::option::of((arb_spec(n), any::<bool>()).prop_map(|(spec, run)| {
                    DesiredContainer {
                        spec,
                        state: if run {
                            DesiredState::Running
                        } else {
                            DesiredState::Stopped
                        },
                    }
                }))
            })
            .collect();
        entries.prop_map(|v| {
            v.into_iter()
                .flatten()
                .map(|d| (d.spec.name.clone(), d))
                .collect()
        })
    }

    fn arb_actual() -> impl Strategy<Value = Vec<ContainerInfo>> {
        let entries: Vec<_> = NAMES
            .iter()
            .chain(["x", "y"].iter())
            .map(|n| {
                proptest::option::of((
                    arb_spec(n),
                    0..3usize,
                    proptest::sample::select(ContainerState::ALL.to_vec()),
                ))
                .prop_map(|o| {
                    o.map(|(spec, managed, state)| {
                        // 0: unmanaged, 1: managed with the spec's hash, 2: managed, no hash.
                        let mut labels = BTreeMap::new();
                        if managed > 0 {
                            labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
                        }
                        if managed == 1 {
                            labels.insert(LABEL_SPEC_HASH.to_string(), spec.fingerprint());
                        }
                        ContainerInfo {
                            id: format!("id-{}", spec.name),
                            name: spec.name.clone(),
                            image: spec.image.clone(),
                            state,
                            exit_code: None,
                            restart_count: Some(0),
                            started_at: None,
                            finished_at: None,
                            restarting: false,
                            labels,
                            error: None,
                            backoff_ms: None,
                        }
                    })
                })
            })
            .collect();
        entries.prop_map(|v| v.into_iter().flatten().collect())
    }

    fn converged(desired: &BTreeMap<String, DesiredContainer>, actual: &[ContainerInfo]) -> bool {
        let by_name: BTreeMap<&str, &ContainerInfo> =
            actual.iter().map(|c| (c.name.as_str(), c)).collect();
        let desired_ok = desired
            .iter()
            .all(|(name, d)| match by_name.get(name.as_str()) {
                None => false,
                Some(c) if !c.managed() => true, // a conflict: left alone by design
                Some(c) => {
                    c.spec_hash() == Some(d.spec.fingerprint().as_str())
                        && match d.state {
                            DesiredState::Running => matches!(
                                c.state,
                                ContainerState::Running
                                    | ContainerState::Paused
                                    | ContainerState::CrashLoop
                            ),
                            DesiredState::Stopped => {
                                matches!(c.state, ContainerState::Created | ContainerState::Exited)
                            }
                        }
                }
            });
        let no_strays = actual
            .iter()
            .all(|c| !c.managed() || desired.contains_key(&c.name));
        desired_ok && no_strays
    }

    proptest! {
        #[test]
        fn plan_applied_once_converges_and_then_plans_nothing(
            desired in arb_desired(),
            actual in arb_actual(),
        ) {
            let actions = plan(&desired, &actual);
            let after = apply(&actual, &actions);
            prop_assert!(converged(&desired, &after), "not converged: {after:?}");
            // Unmanaged containers are exactly as they were.
            let unmanaged_before: Vec<_> = actual.iter().filter(|c| !c.managed()).collect();
            let unmanaged_after: Vec<_> = after.iter().filter(|c| !c.managed()).collect();
            prop_assert_eq!(unmanaged_before, unmanaged_after);
            // A converged state plans nothing but the standing conflicts.
            let again = plan(&desired, &after);
            prop_assert!(again.iter().all(|a| matches!(a, Action::Conflict { .. })), "{again:?}");
            let conflicts_before: Vec<_> = actions.iter().filter(|a| matches!(a, Action::Conflict { .. })).collect();
            prop_assert_eq!(again.iter().collect::<Vec<_>>(), conflicts_before);
        }
    }
}
