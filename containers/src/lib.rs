//! The edgetwin container agent: carries out container commands from the cloud and keeps the
//! node's declared containers (`desired.containers` of the node's own twin) running on the node's
//! container runtime (Docker Engine API; Podman's compatible API socket works the same way).
//!
//! - [`wire`]: the JSON of `node/containers/cmd`, `node/containers/result` and
//!   `node/containers/status` (serde types; the only place their field names are spelled).
//! - [`spec`]: the validated internal container spec (ports, mounts, env, limits) and the
//!   labels the agent puts on containers it creates.
//! - [`runtime`]: the [`ContainerRuntime`] trait with typed errors and
//!   [`DockerRuntime`] on bollard.
//! - [`commands`]: [`CommandHandler`]: raw command payload → result,
//!   idempotent by command id through a small durable redb store.
//! - [`crashloop`]: the pure crash-loop rule and the agent's restart back-off.
//! - [`reconcile`]: the pure planner (`desired` + `actual` → actions), `parse_desired` and
//!   `report` for the node twin.
//! - [`agent`]: [`Agent`], what the node daemon owns: commands, reconcile, status and
//!   a metrics snapshot.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod commands;
pub mod crashloop;
pub mod reconcile;
pub mod runtime;
pub mod spec;
pub mod wire;

pub use agent::{Agent, AgentError, MetricsSnapshot, ReconcileOutcome, ReconcileReport};
pub use commands::{CommandHandler, IdStore, StoreError};
pub use crashloop::{BackoffPolicy, RestartDecision};
pub use reconcile::{
    parse_desired, plan, report, report_with_errors, Action, DesiredContainer, DesiredState,
};
pub use runtime::{
    ContainerInfo, ContainerRuntime, ContainerState, DockerRuntime, LogsQuery, RuntimeError,
};
pub use spec::ContainerSpec;
pub use wire::{
    CommandAction, CommandResult, ContainerCommand, ContainerStatus, LogLine, LogStream, StatusMsg,
};
