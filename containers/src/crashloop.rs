//! Crash loops and the agent's restart back-off (pure: time is a parameter).
//!
//! A container that exits right after every start used to be reported `running` with a growing
//! `restart_count` (Docker counts a container its restart policy is about to start again as
//! running). Like Kubernetes' `CrashLoopBackOff`, the agent reports such a container as
//! [`ContainerState::CrashLoop`] ([`classify`]):
//!
//! - **the runtime's restart policy** (`always`, `on-failure`, `unless-stopped`) restarted it at
//!   least [`CRASH_LOOP_RESTARTS`] times and its current or last run lasted less than
//!   [`SHORT_RUN`] (Docker resets its own back-off after a 10 s run, so does this rule); the
//!   runtime keeps its own back-off (Docker: 100 ms doubling to 1 min), which is not reported;
//! - **the agent's own restarts** of a declared `state: running` container (it starts an exited
//!   one at every reconcile, whatever its restart policy) happened at least
//!   [`CRASH_LOOP_RESTARTS`] times in a row, and it is exited (waiting for the next) or has run
//!   less than [`SHORT_RUN`] since. The back-off before the next start is reported.
//!
//! The agent backs off its own restarts ([`decide_restart`], [`BackoffPolicy`]): the first
//! restart is at once (a container stopped by hand or by a reboot comes back at the next
//! reconcile), then it waits 10 s, 20 s, 40 s … at most 5 min between two starts; a run of at
//! least 10 min resets the count. What it remembers ([`AgentRestarts`]) lives in memory only: a
//! node restart starts counting again, which at worst restarts a crashing container once at
//! once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::reconcile::{DesiredContainer, DesiredState};
use crate::runtime::ContainerInfo;
use crate::wire::{ContainerState, TimestampMs};

/// Restarts in a row from which a container that keeps exiting is in a crash loop.
pub const CRASH_LOOP_RESTARTS: u64 = 3;
/// A run shorter than this is a crash, for the runtime-policy rule.
pub const SHORT_RUN: Duration = Duration::from_secs(10);

/// How the agent spaces its own restarts of a declared container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Wait before the second restart in a row (the first is at once).
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// A run at least this long forgets the restarts before it.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    /// 10 s doubling to 5 min, reset after a 10 min run (Kubernetes' numbers).
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl BackoffPolicy {
    /// The wait before the next start after `restarts` restarts in a row: none after none,
    /// then `initial`, doubling, at most `max`.
    pub fn delay(&self, restarts: u32) -> Duration {
        if restarts == 0 {
            return Duration::ZERO;
        }
        let doublings = (restarts - 1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// What the agent remembers about its own restarts of one declared container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRestarts {
    /// Starts by the agent in a row that were followed by an exit (0 right after a create).
    pub count: u32,
    /// When the agent last started it, ms since the epoch.
    pub last_start: TimestampMs,
}

/// What [`decide_restart`] says about an exited declared container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start it now and remember `next`.
    Start {
        /// The memory after this start.
        next: AgentRestarts,
    },
    /// Leave it until `until` (ms since the epoch); `backoff` is the wait in force.
    Wait {
        /// Not before this.
        until: TimestampMs,
        /// The back-off.
        backoff: Duration,
    },
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How long the last finished run lasted (when the runtime says when it started and ended).
fn last_run(info: &ContainerInfo) -> Option<i64> {
    match (info.started_at, info.finished_at) {
        (Some(s), Some(f)) if f >= s => Some(f - s),
        _ => None,
    }
}

/// Whether the container's process runs now: Docker counts a container between two restarts
/// of its policy as running, but then its last exit is after its last start.
fn runs_now(info: &ContainerInfo) -> bool {
    info.state == ContainerState::Running && !info.restarting && last_run(info).is_none()
}

/// Whether the agent should start `info` (a declared `running` container found exited) now,
/// given what it remembers (`prev`) and the time `now`.
pub fn decide_restart(
    policy: &BackoffPolicy,
    prev: Option<AgentRestarts>,
    info: &ContainerInfo,
    now: TimestampMs,
) -> RestartDecision {
    let Some(prev) = prev else {
        return RestartDecision::Start {
            next: AgentRestarts {
                count: 1,
                last_start: now,
            },
        };
    };
    let stable = last_run(info).is_some_and(|run| run >= ms(policy.reset_after));
    let count = if stable { 0 } else { prev.count };
    let backoff = policy.delay(count);
    let until = prev.last_start.saturating_add(ms(backoff));
    if count > 0 && now < until {
        return RestartDecision::Wait { until, backoff };
    }
    RestartDecision::Start {
        next: AgentRestarts {
            count: count.saturating_add(1),
            last_start: now,
        },
    }
}

/// How a container is to be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// It is in a crash loop.
    pub crash_loop: bool,
    /// Restarts to report: the runtime's plus the agent's.
    pub restart_count: Option<u64>,
    /// The agent's wait before its next start (only while the agent holds it back).
    pub backoff: Option<Duration>,
}

/// Whether `info` is in a crash loop at `now` (see the module doc), given the agent's own
/// restarts of it (`agent`, for declared containers).
pub fn classify(
    info: &ContainerInfo,
    agent: Option<AgentRestarts>,
    policy: &BackoffPolicy,
    now: TimestampMs,
) -> Verdict {
    let short = ms(SHORT_RUN);
    let running = runs_now(info);
    let young = running
        && info
            .started_at
            .is_some_and(|s| now.saturating_sub(s) < short);
    let exited_or_between = matches!(info.state, ContainerState::Exited)
        || (info.state == ContainerState::Running && !running);
    let runtime_restarts = info.restart_count.unwrap_or(0);
    let runtime_loop = runtime_restarts >= CRASH_LOOP_RESTARTS
        && (young || (exited_or_between && last_run(info).is_some_and(|r| r < short)));
    let agent_count = agent.map_or(0, |a| a.count);
    let waiting = info.state == ContainerState::Exited;
    let agent_loop = u64::from(agent_count) >= CRASH_LOOP_RESTARTS && (waiting || young);
    Verdict {
        crash_loop: runtime_loop || agent_loop,
        restart_count: if agent_count > 0 {
            Some(runtime_restarts + u64::from(agent_count))
        } else {
            info.restart_count
        },
        backoff: (agent_count > 0 && waiting).then(|| policy.delay(agent_count)),
    }
}

/// `info` as it is reported: state `crash_loop` when [`classify`] says so, the restart count
/// with the agent's restarts, the back-off.
pub fn annotate(
    mut info: ContainerInfo,
    agent: Option<AgentRestarts>,
    policy: &BackoffPolicy,
    now: TimestampMs,
) -> ContainerInfo {
    let v = classify(&info, agent, policy, now);
    if v.crash_loop {
        info.state = ContainerState::CrashLoop;
    }
    info.restart_count = v.restart_count;
    info.backoff_ms = v
        .backoff
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    info
}

/// Forgets what no longer matters: containers not declared `running` any more, and those that
/// have run at least `reset_after` (their next exit starts a fresh count).
pub fn settle(
    memory: &mut BTreeMap<String, AgentRestarts>,
    desired: &BTreeMap<String, DesiredContainer>,
    actual: &[ContainerInfo],
    policy: &BackoffPolicy,
    now: TimestampMs,
) {
    memory.retain(|name, _| {
        let declared_running = desired
            .get(name)
            .is_some_and(|d| d.state == DesiredState::Running);
        let stable = actual.iter().find(|c| &c.name == name).is_some_and(|c| {
            runs_now(c)
                && c.started_at
                    .is_some_and(|s| now.saturating_sub(s) >= ms(policy.reset_after))
        });
        declared_running && !stable
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ContainerSpec;

    const S: i64 = 1000;
    const T0: i64 = 1_800_000_000_000;

    fn info(state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: "id".into(),
            name: "c".into(),
            image: "img".into(),
            state,
            exit_code: None,
            restart_count: Some(0),
            started_at: None,
            finished_at: None,
            restarting: false,
            labels: BTreeMap::new(),
            error: None,
            backoff_ms: None,
        }
    }

    /// Exited with code 3 after a run from `started` to `finished`.
    fn exited(started: i64, finished: i64) -> ContainerInfo {
        ContainerInfo {
            exit_code: Some(3),
            started_at: Some(started),
            finished_at: Some(finished),
            ..info(ContainerState::Exited)
        }
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy::default()
    }

    #[test]
    fn backoff_starts_at_once_then_doubles_from_10_s_to_5_min() {
        let p = policy();
        let secs: Vec<u64> = (0..8).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(p.delay(u32::MAX), p.max, "no overflow");
    }

    #[test]
    fn restart_first_exit_is_restarted_at_once() {
        let d = decide_restart(&policy(), None, &exited(T0, T0 + 50), T0 + S);
        assert_eq!(
            d,
            RestartDecision::Start {
                next: AgentRestarts {
                    count: 1,
                    last_start: T0 + S
                }
            }
        );
    }

    #[test]
    fn restart_waits_out_the_backoff_after_each_quick_exit() {
        let p = policy();
        // Started by the agent (restart 1) at T0, exited 50 ms later.
        let prev = AgentRestarts {
            count: 1,
            last_start: T0,
        };
        let c = exited(T0, T0 + 50);
        assert_eq!(
            decide_restart(&p, Some(prev), &c, T0 + 9 * S),
            RestartDecision::Wait {
                until: T0 + 10 * S,
                backoff: Duration::from_secs(10)
            }
        );
        assert_eq!(
            decide_restart(&p, Some(prev), &c, T0 + 10 * S),
            RestartDecision::Start {
                next: AgentRestarts {
                    count: 2,
                    last_start: T0 + 10 * S
                }
            }
        );
        // After 6 restarts in a row the wait is capped at 5 min.
        let prev = AgentRestarts {
            count: 6,
            last_start: T0,
        };
        assert!(matches!(
            decide_restart(&p, Some(prev), &c, T0 + 299 * S),
            RestartDecision::Wait { backoff, .. } if backoff == Duration::from_secs(300)
        ));
    }

    #[test]
    fn restart_count_resets_after_a_run_of_10_min() {
        let prev = AgentRestarts {
            count: 5,
            last_start: T0,
        };
        let ran_long = exited(T0, T0 + 600 * S);
        assert_eq!(
            decide_restart(&policy(), Some(prev), &ran_long, T0 + 600 * S + 1),
            RestartDecision::Start {
                next: AgentRestarts {
                    count: 1,
                    last_start: T0 + 600 * S + 1
                }
            }
        );
    }

    #[test]
    fn restart_after_create_is_at_once_and_counts_from_one() {
        let created = AgentRestarts {
            count: 0,
            last_start: T0,
        };
        assert!(matches!(
            decide_restart(&policy(), Some(created), &exited(T0, T0 + 10), T0 + 1),
            RestartDecision::Start { next } if next.count == 1
        ));
    }

    #[test]
    fn crash_loop_when_the_runtime_policy_restarted_it_3_times_after_short_runs() {
        let p = policy();
        // Docker between two restarts: Running, Restarting, last exit after last start.
        let between = ContainerInfo {
            state: ContainerState::Running,
            restarting: true,
            restart_count: Some(3),
            ..exited(T0, T0 + 40)
        };
        let v = classify(&between, None, &p, T0 + S);
        assert!(v.crash_loop);
        assert_eq!((v.restart_count, v.backoff), (Some(3), None));
        // Only twice: not yet.
        let twice = ContainerInfo {
            restart_count: Some(2),
            ..between.clone()
        };
        assert!(!classify(&twice, None, &p, T0 + S).crash_loop);
        // Restarted 8 times but each run lasted a minute: not a crash loop.
        let slow = ContainerInfo {
            restart_count: Some(8),
            ..exited(T0, T0 + 60 * S)
        };
        assert!(!classify(&slow, None, &p, T0 + 61 * S).crash_loop);
    }

    #[test]
    fn crash_loop_while_running_only_until_the_run_reaches_10_s() {
        let p = policy();
        let running = ContainerInfo {
            restart_count: Some(5),
            started_at: Some(T0),
            finished_at: Some(T0 - 2 * S), // the exit before this start
            ..info(ContainerState::Running)
        };
        assert!(classify(&running, None, &p, T0 + 9 * S).crash_loop);
        assert!(!classify(&running, None, &p, T0 + 10 * S).crash_loop);
    }

    #[test]
    fn crash_loop_when_the_agent_restarted_it_3_times_with_the_backoff_reported() {
        let p = policy();
        let c = exited(T0, T0 + 20);
        let agent = |count| {
            Some(AgentRestarts {
                count,
                last_start: T0,
            })
        };
        let v = classify(&c, agent(3), &p, T0 + S);
        assert!(v.crash_loop);
        assert_eq!(v.restart_count, Some(3));
        assert_eq!(v.backoff, Some(Duration::from_secs(40)));
        let v = classify(&c, agent(2), &p, T0 + S);
        assert!(!v.crash_loop);
        assert_eq!(v.backoff, Some(Duration::from_secs(20)));
        // Never started by the agent: a plain exited container.
        let v = classify(&c, None, &p, T0 + S);
        assert_eq!(
            v,
            Verdict {
                crash_loop: false,
                restart_count: Some(0),
                backoff: None
            }
        );
    }

    #[test]
    fn annotate_sets_the_crash_loop_state_count_and_backoff() {
        let a = annotate(
            exited(T0, T0 + 20),
            Some(AgentRestarts {
                count: 4,
                last_start: T0,
            }),
            &policy(),
            T0 + S,
        );
        assert_eq!(a.state, ContainerState::CrashLoop);
        assert_eq!(
            (a.restart_count, a.backoff_ms, a.exit_code),
            (Some(4), Some(80_000), Some(3))
        );
    }

    #[test]
    fn settle_forgets_undeclared_stopped_and_long_running_containers() {
        let p = policy();
        let mk = |name: &str, state| {
            (
                name.to_string(),
                DesiredContainer {
                    spec: ContainerSpec::new(name, "img"),
                    state,
                },
            )
        };
        let desired: BTreeMap<_, _> = [
            mk("crashing", DesiredState::Running),
            mk("stable", DesiredState::Running),
            mk("parked", DesiredState::Stopped),
        ]
        .into();
        let mem = AgentRestarts {
            count: 2,
            last_start: T0,
        };
        let mut memory: BTreeMap<String, AgentRestarts> = ["crashing", "stable", "parked", "gone"]
            .into_iter()
            .map(|n| (n.to_string(), mem))
            .collect();
        let stable = ContainerInfo {
            name: "stable".into(),
            started_at: Some(T0),
            ..info(ContainerState::Running)
        };
        let crashing = ContainerInfo {
            name: "crashing".into(),
            ..exited(T0, T0 + 5)
        };
        settle(&mut memory, &desired, &[stable, crashing], &p, T0 + 600 * S);
        assert_eq!(memory.keys().collect::<Vec<_>>(), vec!["crashing"]);
    }
}
