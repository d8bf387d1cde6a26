//! The edgetwin node as a library: [`serve`] runs one node (embedded broker, twin service, device
//! registry, bridge, container agent, gate, HTTP) until its [`Control`] says stop; the
//! `edgetwin` binary is a thin `main` plus the field engineer's CLI around it. Tests run a node
//! in-process with the same function and drive it with third-party clients over TCP.
//!
//! The start and stop order, and what SIGHUP reloads, are in [`serve`]'s module.

mod canary;
pub mod config;
mod container_agent;
mod exposition;
mod health;
pub mod history;
mod http;
#[cfg(test)]
mod inprocess;
mod intake;
pub mod logging;
mod mapper_metrics;
mod metrics;
mod node_health;
#[cfg(test)]
mod node_tests;
mod registry;
mod retained;
pub mod serve;
mod sessions;
mod systemd;
mod twin_service;

pub use config::NodeConfig;
pub use registry::yaml_files;
pub use serve::{serve, Control};

/// `serve` must stay spawnable on a multi-threaded runtime (a library user's, or a test's).
#[allow(dead_code)]
fn serve_is_send(cfg: NodeConfig, control: Control) -> impl std::future::Future + Send {
    serve(cfg, control)
}
