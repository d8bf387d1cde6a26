//! The edgetwin mapper SDK: a new protocol is one [`Driver`] implementation plus a five-line
//! `main.rs`:
//!
//! ```no_run
//! # struct MyDriver;
//! # impl edgetwin_mapper_sdk::Driver for MyDriver {
//! #     type Conn = ();
//! #     fn protocol(&self) -> &'static str { "serial" }
//! #     async fn connect(&self, _: &edgetwin_profile::ResolvedDevice) -> Result<(), edgetwin_mapper_sdk::DriverError> { Ok(()) }
//! #     async fn read(&self, _: &mut (), _: &edgetwin_profile::ResolvedDevice, _: &[&edgetwin_profile::DeviceProperty]) -> edgetwin_mapper_sdk::ReadResult { Ok(vec![]) }
//! #     async fn write(&self, _: &mut (), _: &edgetwin_profile::ResolvedDevice, _: &edgetwin_profile::DeviceProperty, _: &serde_json::Value) -> Result<edgetwin_mapper_sdk::PropertyResult<()>, edgetwin_mapper_sdk::LinkLost> { Ok(Ok(())) }
//! #     async fn disconnect(&self, _: ()) {}
//! # }
//! fn main() -> std::process::ExitCode {
//!     edgetwin_mapper_sdk::main_with(MyDriver)
//! }
//! ```
//!
//! - [`driver`]: the trait a protocol implements, and its error kinds.
//! - [`runtime`]: MQTT, assignments, per-device tasks, status, metrics, shutdown.
//! - [`schedule`] and [`report`]: the pure poll schedule and report-on-change rules.
//! - [`compliance`]: the shared test every mapper runs against a real node.
//!
//! See `mappers/sdk/README.md` for the topic contract (for mappers in other languages).

pub use edgetwin_retry as backoff;
pub mod compliance;
pub mod driver;
pub mod metrics;
pub mod report;
pub mod runtime;
pub mod schedule;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
pub use driver::{
    ordered, read_result, shortest_f32, written, Discovered, Driver, DriverError, LinkLost,
    PropertyResult, Pushed, ReadResult, Reading, Refusal, PUSH_QUEUE,
};
pub use runtime::{run, RuntimeError, RuntimeOptions, TlsFiles};
use tokio_util::sync::CancellationToken;

/// Command line of every mapper built on the SDK.
#[derive(Debug, Parser)]
struct Cli {
    /// The node's MQTT broker (MQTT 3.1.1 listener), host:port.
    #[arg(long, env = "EDGETWIN_BROKER", default_value = "127.0.0.1:1883")]
    broker: String,
    /// How often the mapper publishes its counters on mappers/{protocol}/metrics, in ms.
    #[arg(long, env = "EDGETWIN_METRICS_INTERVAL_MS", default_value_t = 5000)]
    metrics_interval_ms: u64,
    /// User to log in as: a `mapper` user of the node's protocol (`edgetwin user add NAME --role
    /// mapper --protocol P`). Without it the mapper connects anonymously, which a node takes from
    /// its own host only and not at all once it has users.
    #[arg(long, env = "EDGETWIN_USERNAME", requires = "password_file")]
    username: Option<String>,
    /// File holding the user's password (a trailing line break is ignored).
    #[arg(long, env = "EDGETWIN_PASSWORD_FILE", requires = "username")]
    password_file: Option<std::path::PathBuf>,
    /// Connect with TLS, checking the node's certificate against this CA bundle (PEM).
    #[arg(long, env = "EDGETWIN_CAFILE")]
    cafile: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a node that logs mappers in by certificate; needs `--key`.
    #[arg(long, env = "EDGETWIN_CERT", requires_all = ["key", "cafile"])]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "EDGETWIN_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
}

/// The whole `main` of a mapper: parses `--broker host:port` (env `EDGETWIN_BROKER`, default
/// `127.0.0.1:1883`), logs to stderr filtered by `EDGETWIN_LOG` (default `info`), runs `driver`
/// until SIGTERM or SIGINT, then shuts down cleanly. Exit code 0 after a clean shutdown.
pub fn main_with<D: Driver>(driver: D) -> ExitCode {
    let name = format!("edgetwin-mapper-{}", driver.protocol());
    // clap keeps command names as `&'static str`; this runs once per process.
    let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
    let cmd = Cli::command()
        .name(static_name)
        .about(format!("edgetwin {} mapper", driver.protocol()));
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGETWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: journald and redirected files get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let login = match (&cli.username, &cli.password_file) {
        (Some(user), Some(file)) => match edgetwin_contract::read_password_file(file) {
            Ok(password) => Some((user.clone(), password)),
            Err(e) => {
                eprintln!("{name}: --password-file {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let tls = match &cli.cafile {
        None => None,
        Some(ca) => {
            let read =
                |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let files = read(ca).and_then(|ca| {
                let client = match (&cli.cert, &cli.key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                };
                Ok(TlsFiles { ca, client })
            });
            match files {
                Ok(files) => Some(files),
                Err(e) => {
                    eprintln!("{name}: --cafile/--cert/--key: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let result = rt.block_on(async {
        let mut opts = RuntimeOptions::new(cli.broker);
        opts.login = login;
        opts.tls = tls;
        opts.metrics_interval = std::time::Duration::from_millis(cli.metrics_interval_ms);
        let token = opts.shutdown.clone();
        let signals = tokio::spawn(wait_for_signal(token.clone()));
        let r = run(driver, opts).await;
        signals.abort();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, mapper = %name, "mapper failed");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn wait_for_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the mapper");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
