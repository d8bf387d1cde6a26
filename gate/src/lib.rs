//! `edgetwin-gate`: the node's MQTT front door.
//!
//! The gate terminates client connections (plain TCP and TLS), authenticates them (password hashes
//! or a verified client certificate), enforces per-client topic permissions ([`acl`]), hands
//! publishes on stored topics to the node's stores first ([`intake`]: a PUBACK means durable), and
//! relays the allowed traffic to the embedded broker through in-process pipes (or to any MQTT 5
//! broker over TCP), logging in with the node's per-start login ([`Upstream`]).
//!
//! # Why a gate in front of rumqttd
//!
//! rumqttd 0.20 has an authentication hook (`ConnectionSettings::set_auth_handler(client_id, user,
//! pass) -> bool`) but **no per-topic authorization hook**, does not set `TCP_NODELAY` (Nagle
//! costs tens of milliseconds of latency at p99 on loopback), and serves MQTT 3.1.1 and 5 on
//! separate ports. A gate we own fixes all three: one public port for both versions (it reads
//! the CONNECT protocol level and speaks MQTT 5 to the broker for both), `TCP_NODELAY` on every
//! client connection, and topic ACLs with counted, logged denials. It reaches the broker through
//! [`upstream`]: in-process pipes for the node's embedded rumqttd, or TCP.
//!
//! # Shape
//!
//! - [`Gate::bind`] reads the credentials and TLS files and binds every listener (errors here, not
//!   in a log); [`Gate::run`] accepts until the shutdown token fires, then closes every relayed
//!   connection (v5 clients get DISCONNECT 0x8B) and returns once all connection tasks ended.
//! - Per connection: TLS handshake and CONNECT within `limits.connect_timeout_ms`;
//!   authentication; the upstream dial with the CONNECT re-encoded without credentials; then
//!   the relay (see the `relay` module). Packets are framed and parsed with rumqttc's maintained
//!   codecs ([`packet`]); allowed packets are forwarded as their raw bytes.
//! - Metrics: [`GateMetrics`], registered by the node with [`GateMetrics::register`].

pub mod acks;
pub mod acl;
pub mod client_ids;
pub mod config;
pub mod credentials;
pub mod intake;
mod keeper;
pub mod logins;
pub mod metrics;
pub mod origin;
pub mod packet;
mod relay;
pub mod sessions;
pub mod subscribing;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use acl::{DeviceDirectory, Role};
pub use config::{GateConfig, LimitsConfig, ListenerConfig, TlsConfig};
pub use credentials::{add_user, hash_password, CredentialsError, RoleName};
pub use intake::{Commit, Intake, NotStored, NothingStored, Submitted};
pub use metrics::GateMetrics;
pub use sessions::{NoSessionStore, Queued, SessionStore, StoredSession, ToQueue, Written};

use credentials::Credentials;
use relay::Shared;

/// Why the gate cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The configuration breaks its rules (every problem, with its path).
    #[error("gate config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The credentials file cannot be used.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// A listener's TLS files cannot be used.
    #[error("gate listener {listen}: TLS: {message}")]
    Tls {
        /// The listener.
        listen: SocketAddr,
        /// What is wrong.
        message: String,
    },
    /// A listener cannot bind.
    #[error("gate listener {listen}: cannot listen: {source}")]
    Bind {
        /// The listener.
        listen: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Reloads the gate's credentials file; see [`Gate::reloader`].
#[derive(Clone)]
pub struct CredentialsReloader(Arc<Shared>);

impl CredentialsReloader {
    /// Reads the configured credentials file again and puts it in force for new connections
    /// (connections already authenticated keep their identity). On error the previous set stays
    /// in force. Returns the number of users, or `None` without a credentials file.
    pub fn reload(&self) -> Result<Option<usize>, GateError> {
        let Some(path) = &self.0.cfg.credentials_file else {
            return Ok(None);
        };
        let creds = Credentials::load(path)?;
        let users = creds.len();
        *self
            .0
            .credentials
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(creds));
        Ok(Some(users))
    }
}

/// Client ids the gate remembers the holder of (connected ones, and kept sessions').
const MAX_CLIENT_IDS: usize = 100_000;

/// The broker behind the gate: its internal MQTT 5 listener (the gate speaks MQTT 5 to it for
/// every client, 3.1.1 ones included, see [`origin`]) and the login it requires, which the gate
/// puts in every CONNECT it passes on.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The broker, speaking MQTT 5.
    pub broker: upstream::Broker,
    /// Username and password for the broker (the node makes a fresh one at every start); the
    /// node's own clients (its readiness canary) log in to the gate with it too.
    pub login: Option<(String, String)>,
}

/// A bound gate, ready to [`run`](Gate::run).
pub struct Gate {
    listeners: Vec<(TcpListener, Option<TlsAcceptor>)>,
    shared: Arc<Shared>,
}

impl Gate {
    /// Checks the config, loads credentials and TLS material, and binds every listener.
    /// Publishes on topics the `intake` stores reach the `upstream` broker only once committed.
    pub async fn bind(
        cfg: GateConfig,
        upstream: Upstream,
        directory: Arc<dyn DeviceDirectory>,
        intake: Arc<dyn Intake>,
    ) -> Result<Gate, GateError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(GateError::Config(problems));
        }
        let credentials = match &cfg.credentials_file {
            Some(p) => Some(Credentials::load(p)?),
            None => None,
        };
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let acceptor = match &l.tls {
                None => None,
                Some(t) => Some(TlsAcceptor::from(tls::server_config(t).map_err(
                    |message| GateError::Tls {
                        listen: l.listen,
                        message,
                    },
                )?)),
            };
            let listener = TcpListener::bind(l.listen)
                .await
                .map_err(|source| GateError::Bind {
                    listen: l.listen,
                    source,
                })?;
            listeners.push((listener, acceptor));
        }
        let filters = relay::NameBudget::new(cfg.limits.max_distinct_filters);
        let topics = relay::NameBudget::new(cfg.limits.max_distinct_topics);
        let logins = std::sync::Mutex::new(logins::Logins::new(logins::Policy {
            free_failures: cfg.limits.login_free_failures,
            max: std::time::Duration::from_millis(cfg.limits.login_max_delay_ms),
            ..logins::Policy::default()
        }));
        Ok(Gate {
            listeners,
            shared: Arc::new(Shared {
                cfg,
                credentials: std::sync::RwLock::new(credentials.map(Arc::new)),
                upstream,
                dir: directory,
                intake,
                metrics: GateMetrics::default(),
                filters,
                topics,
                logins,
                client_ids: std::sync::Mutex::new(client_ids::ClientIds::new(MAX_CLIENT_IDS)),
                sessions: std::sync::Mutex::new(sessions::Sessions::default()),
                session_store: std::sync::OnceLock::new(),
                subscribing: subscribing::Subscribing::default(),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                keepers: keeper::Keepers::default(),
            }),
        })
    }

    /// The bound addresses, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// Keeps the session table in `store` across restarts (without it, sessions end with the
    /// process). Set once, before [`run`](Gate::run).
    pub fn keep_sessions_in(&self, store: Arc<dyn sessions::SessionStore>) {
        let _ = self.shared.session_store.set(store);
    }

    /// A handle that reloads the credentials file while the gate runs (SIGHUP).
    pub fn reloader(&self) -> CredentialsReloader {
        CredentialsReloader(self.shared.clone())
    }

    /// The gate's metrics (shared counters); register them with [`GateMetrics::register`].
    pub fn metrics(&self) -> GateMetrics {
        self.shared.metrics.clone()
    }

    /// Restores the kept sessions at the broker (before any client is taken), then accepts and
    /// relays clients until `shutdown` fires; then closes every connection, lets the keepers of
    /// absent clients' sessions queue what the broker still has for them, and returns once all
    /// of them have ended.
    pub async fn run(self, shutdown: CancellationToken) {
        relay::restore_sessions(&self.shared).await;
        let tracker = TaskTracker::new();
        tracker.spawn(relay::end_expired_sessions(
            self.shared.clone(),
            shutdown.clone(),
        ));
        for (listener, tls) in self.listeners {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let conns = tracker.clone();
            tracker.spawn(async move {
                let addr = listener.local_addr().ok();
                info!(listen = ?addr, tls = tls.is_some(), "gate listening");
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = shutdown.cancelled() => break,
                    };
                    match accepted {
                        Ok((tcp, peer)) => {
                            conns.spawn(relay::serve(
                                shared.clone(),
                                tcp,
                                peer,
                                tls.clone(),
                                shutdown.clone(),
                            ));
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            warn!(listen = ?addr, error = %e, "gate accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        // Connections that end for the shutdown leave their sessions to the broker: no keeper
        // starts from here on.
        let keepers = self.shared.clone();
        let closing = shutdown.clone();
        tracker.spawn(async move {
            closing.cancelled().await;
            keepers.keepers.refuse_new();
        });
        tracker.close();
        tracker.wait().await;
        // Then the keepers acknowledge what they read and leave the broker.
        self.shared.keepers.close().await;
    }
}
