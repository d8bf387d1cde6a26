//! `edgetwin`: the node daemon (`serve`) and the field engineer's tools (`twin`, `device`).

mod cli;
mod fleet;

use edgetwin_node::{config, serve};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use edgetwin_node::logging::{self, LogFormat};

/// The version with the commit it was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGETWIN_COMMIT"),
    ")"
);

/// edgetwin: the edge node daemon and its command-line tools.
#[derive(Parser)]
#[command(name = "edgetwin", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node (embedded broker, twin service, HTTP metrics).
    Serve {
        /// Node config YAML; without it the embedded default runs (broker :1883, HTTP :8080,
        /// data in ./edgetwin-data, profiles from ./devices).
        #[arg(long, env = "EDGETWIN_CONFIG")]
        config: Option<PathBuf>,
        /// A folder of config fragments (`*.yaml`, merged over `--config` in name order), e.g.
        /// `/etc/edgetwin/conf.d`; a missing folder is no fragments.
        #[arg(long, env = "EDGETWIN_CONFIG_DIR", requires = "config")]
        config_dir: Option<PathBuf>,
        /// Print the config in force as YAML (defaults filled in) and exit.
        #[arg(long)]
        print_config: bool,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "EDGETWIN_LOG_FORMAT")]
        log_format: LogFormat,
        /// Append the log to this file instead of standard error; SIGHUP reopens it (for
        /// logrotate). Under systemd leave it out: journald takes standard error.
        #[arg(long, env = "EDGETWIN_LOG_FILE")]
        log_file: Option<PathBuf>,
    },
    /// Read and write device twins on a node.
    Twin {
        #[command(subcommand)]
        command: TwinCommand,
    },
    /// Check and manage device profiles.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Find devices for commissioning: the protocol's mapper scans and answers with a draft
    /// profile to edit and apply.
    Discover {
        #[command(subcommand)]
        command: DiscoverCommand,
    },
    /// Manage the gate's users (credentials file with hashed passwords).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// The cloud operator's view of many nodes, through the cloud broker only: presence and
    /// health, twins, desired patches and container commands with their answers.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Ed25519 keys for signed cloud commands (`bridge.signatures`).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print a shell completion script (e.g. `edgetwin completions bash >
    /// /etc/bash_completion.d/edgetwin`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per command) into a folder.
    #[command(hide = true)]
    Man {
        /// The folder (created when missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Every node the cloud broker knows, with its presence and health.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// A device's twin document as the cloud holds it.
    Twin {
        /// The node (the name in its topic prefix).
        node: String,
        /// The device.
        device: String,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// A node's twin documents, statuses, errors, health and container results as they arrive,
    /// until Ctrl-C.
    Watch {
        /// The node.
        node: String,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Each with its arrival time and its JSON indented.
        #[arg(long)]
        pretty: bool,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Send a desired patch to a node's device and wait for the node's answer.
    Set {
        /// The node.
        node: String,
        /// The device.
        device: String,
        /// `property=value` pairs (values are JSON, else strings) or one JSON object.
        #[arg(required = true)]
        patch: Vec<String>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Send a container command (JSON, as on `node/containers/cmd`) and wait for its result.
    Containers {
        /// The node.
        node: String,
        /// The command, e.g. `{"action": "list"}` (an `id` is added when missing).
        command: String,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a signing key: writes the private key (PKCS#8 PEM, mode 0600; never overwrites) and
    /// prints the public key for the nodes' `bridge.signatures.keys`.
    Generate {
        /// Where the private key goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a command or desired patch for one node's cloud topic; prints the envelope to
    /// publish on that topic instead of the message.
    Sign {
        /// The private key file (`key generate`).
        #[arg(long)]
        key: PathBuf,
        /// The key's id in the nodes' `bridge.signatures.keys`.
        #[arg(long)]
        id: String,
        /// The full cloud topic, prefix included (e.g. `edgetwin/plant-7/node/containers/cmd`).
        #[arg(long)]
        topic: String,
        /// How long the envelope is valid (e.g. `10m`; at most the node's `max_validity_s`).
        #[arg(long, default_value = "10m")]
        valid_for: humantime::Duration,
        /// The message (JSON); read from standard input when absent.
        message: Option<String>,
    },
}

#[derive(Subcommand)]
enum DiscoverCommand {
    /// Browse an OPC UA server's address space for variables (bounded: from --root, at most
    /// --depth levels and --max-nodes nodes; the standard Server object left out). The node's
    /// OPC UA mapper does the browse.
    Opcua {
        /// The server, `opc.tcp://host:port/path`.
        #[arg(long)]
        url: String,
        /// Security policy: None or Basic256Sha256.
        #[arg(long)]
        security_policy: Option<String>,
        /// Security mode: None, Sign or SignAndEncrypt.
        #[arg(long)]
        security_mode: Option<String>,
        /// User name at the server.
        #[arg(long)]
        server_user: Option<String>,
        /// File with that user's password, on the mapper's host.
        #[arg(long, requires = "server_user")]
        server_password_file: Option<String>,
        /// Where to start browsing (default the Objects folder, i=85).
        #[arg(long)]
        root: Option<String>,
        /// Levels below the root.
        #[arg(long, default_value_t = 4)]
        depth: u32,
        /// Nodes in all.
        #[arg(long, default_value_t = 500)]
        max_nodes: usize,
        /// Name of the draft's model and device.
        #[arg(long, default_value = "discovered-opcua")]
        name: String,
        /// Write the draft profile here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
    /// Scan a Modbus TCP endpoint or serial line for unit ids and registers (bounded: the unit
    /// ids and ranges given, at most 2000 requests, a pause between them). The node's Modbus
    /// mapper does the scan (on RTU it already holds the line).
    Modbus {
        /// `host:port` of a Modbus TCP device or gateway.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        tcp: Option<String>,
        /// A serial port (Modbus RTU), as the mapper's host sees it.
        #[arg(long)]
        serial: Option<String>,
        /// Baud rate of the serial line.
        #[arg(long, requires = "serial")]
        baud: Option<u32>,
        /// Unit ids to try: `1-10`, `1,3,7`.
        #[arg(long, default_value = "1-10")]
        units: String,
        /// Holding registers to scan, e.g. `0-99` (default, with input 0-99, when no range is given).
        #[arg(long)]
        holding: Option<String>,
        /// Input registers to scan.
        #[arg(long)]
        input: Option<String>,
        /// Coils to scan.
        #[arg(long)]
        coils: Option<String>,
        /// Discrete inputs to scan.
        #[arg(long)]
        discrete: Option<String>,
        /// Prefix of the draft's model and device names.
        #[arg(long, default_value = "discovered")]
        name: String,
        /// Write the draft profile here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user, or replace the one of the same name; the password is read from standard input
    /// (one line), never from the command line.
    Add {
        /// User name (a client certificate's CN maps to it too).
        name: String,
        /// admin, engineer, app or mapper.
        #[arg(long)]
        role: edgetwin_gate::RoleName,
        /// The protocol a mapper serves (mappers only).
        #[arg(long)]
        protocol: Option<edgetwin_contract::ProtocolName>,
        /// The credentials file named in the node config's `gate.credentials_file`.
        #[arg(long)]
        credentials: PathBuf,
    },
}

#[derive(Subcommand)]
enum TwinCommand {
    /// Print a device's twin document.
    Get {
        /// Device name.
        device: String,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
    /// Set desired properties: `prop=value ...` or one JSON object; waits for the node's verdict.
    Set {
        /// Device name.
        device: String,
        /// `prop=value` pairs (values are JSON, else strings) or one JSON merge patch.
        #[arg(required = true)]
        patch: Vec<String>,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
    /// Print every twin message of a device as it happens.
    Watch {
        /// Device name.
        device: String,
        /// Each message on its own lines: the time it arrived, its topic, its JSON indented.
        #[arg(long)]
        pretty: bool,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Check profile files locally; prints every error with file, line and field path.
    Validate {
        /// Profile YAML files, or folders (their `.yaml`/`.yml` files, as the node loads them).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert KubeEdge devices.kubeedge.io/v1beta1 DeviceModel and Device YAML to edgetwin
    /// profile YAML (standard output, or --output); a note per field that has no equal goes
    /// to standard error.
    Convert {
        /// KubeEdge YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// This node's name: devices whose spec.nodeName names another node are left out.
        #[arg(long)]
        node: Option<String>,
        /// Write the profile here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Send profile files to a node; all are applied or none.
    Apply {
        /// Profile YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
    /// List the devices registered on a node.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: cli::BrokerArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (format, file) = match &cli.command {
        Command::Serve {
            log_format,
            log_file,
            ..
        } => (*log_format, log_file.as_deref()),
        _ => (LogFormat::Text, None),
    };
    let log_file = match logging::init(format, file) {
        Ok(f) => f,
        Err(e) => {
            let path = file.map(|f| f.display().to_string()).unwrap_or_default();
            eprintln!("error: cannot open the log file {path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, log_file)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, log_file: Option<std::sync::Arc<logging::LogFile>>) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            config_dir,
            print_config,
            ..
        } => {
            let cfg = match &config {
                Some(path) => config::NodeConfig::load_with_fragments(path, config_dir.as_deref())?,
                None => config::NodeConfig::default(),
            };
            if print_config {
                print!("{}", serde_norway::to_string(&cfg.effective())?);
                return Ok(());
            }
            tracing::info!(version = VERSION, "edgetwin starting");
            let control = serve::Control::from_signals_with(move || {
                if let Some(f) = &log_file {
                    match f.reopen() {
                        Ok(()) => tracing::info!(file = %f.path().display(), "log file reopened"),
                        Err(e) => {
                            tracing::error!(file = %f.path().display(), error = %e, "cannot reopen the log file; writing on to the old one")
                        }
                    }
                }
            })?;
            serve::serve(cfg, control).await
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "edgetwin",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => write_man_pages(&out),
        Command::Twin { command } => match command {
            TwinCommand::Get { device, broker } => cli::twin_get(&device, &broker).await,
            TwinCommand::Set {
                device,
                patch,
                broker,
            } => cli::twin_set(&device, &patch, &broker).await,
            TwinCommand::Watch {
                device,
                pretty,
                broker,
            } => cli::twin_watch(&device, pretty, &broker).await,
        },
        Command::User {
            command:
                UserCommand::Add {
                    name,
                    role,
                    protocol,
                    credentials,
                },
        } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).map_err(|e| {
                anyhow::anyhow!("cannot read the password from standard input: {e}")
            })?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("empty password on standard input");
            }
            edgetwin_gate::add_user(&credentials, &name, role, protocol, password)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("user {name} saved in {}", credentials.display());
            Ok(())
        }
        Command::Discover {
            command:
                DiscoverCommand::Opcua {
                    url,
                    security_policy,
                    security_mode,
                    server_user,
                    server_password_file,
                    root,
                    depth,
                    max_nodes,
                    name,
                    output,
                    broker,
                },
        } => {
            let mut target = serde_json::json!({"url": url, "depth": depth, "maxNodes": max_nodes, "name": name});
            for (key, v) in [
                ("securityPolicy", security_policy),
                ("securityMode", security_mode),
                ("userName", server_user),
                ("passwordFile", server_password_file),
                ("root", root),
            ] {
                if let Some(v) = v {
                    target[key] = v.into();
                }
            }
            cli::discover("opcua", target, output.as_deref(), &broker).await
        }
        Command::Discover {
            command:
                DiscoverCommand::Modbus {
                    tcp,
                    serial,
                    baud,
                    units,
                    holding,
                    input,
                    coils,
                    discrete,
                    name,
                    output,
                    broker,
                },
        } => {
            let mut target = serde_json::json!({"units": units, "name": name});
            if let Some(t) = tcp {
                target["tcp"] = t.into();
            }
            if let Some(path) = serial {
                target["serial"] = serde_json::json!({"path": path, "baudRate": baud});
            }
            for (key, range) in [
                ("holding", holding),
                ("input", input),
                ("coils", coils),
                ("discrete", discrete),
            ] {
                if let Some(r) = range {
                    target[key] = r.into();
                }
            }
            cli::discover("modbus", target, output.as_deref(), &broker).await
        }
        Command::Fleet { command } => match command {
            FleetCommand::List { json, fleet } => fleet::list(&fleet, json).await,
            FleetCommand::Twin {
                node,
                device,
                fleet,
            } => fleet::twin(&fleet, &node, &device).await,
            FleetCommand::Watch {
                node,
                device,
                pretty,
                fleet,
            } => fleet::watch(&fleet, &node, device.as_deref(), pretty).await,
            FleetCommand::Set {
                node,
                device,
                patch,
                fleet,
            } => fleet::set(&fleet, &node, &device, &patch).await,
            FleetCommand::Containers {
                node,
                command,
                fleet,
            } => fleet::containers(&fleet, &node, &command).await,
        },
        Command::Key {
            command: KeyCommand::Generate { out },
        } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let pem = edgetwin_bridge::signed::generate().map_err(|e| anyhow::anyhow!(e))?;
            let signer = edgetwin_bridge::signed::Signer::from_pkcs8(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!(e))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
            f.write_all(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            println!("{}", signer.public_key());
            eprintln!(
                "private key written to {}; put the line above in bridge.signatures.keys",
                out.display()
            );
            Ok(())
        }
        Command::Key {
            command:
                KeyCommand::Sign {
                    key,
                    id,
                    topic,
                    valid_for,
                    message,
                },
        } => {
            let der = std::fs::read(&key)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", key.display()))?;
            let signer = edgetwin_bridge::signed::Signer::from_pkcs8(&der)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
            let message = match message {
                Some(m) => m,
                None => std::io::read_to_string(std::io::stdin()).map_err(|e| {
                    anyhow::anyhow!("cannot read the message from standard input: {e}")
                })?,
            };
            let message = message.trim_end_matches(['\r', '\n']);
            serde_json::from_str::<serde_json::Value>(message)
                .map_err(|e| anyhow::anyhow!("the message is not JSON: {e}"))?;
            let valid_ms =
                i64::try_from(std::time::Duration::from(valid_for).as_millis()).unwrap_or(i64::MAX);
            let exp = edgetwin_contract::now_ms().saturating_add(valid_ms);
            let envelope = signer.seal(&id, &topic, exp, message);
            println!("{}", serde_json::to_string(&envelope)?);
            Ok(())
        }
        Command::Device { command } => match command {
            DeviceCommand::Validate { files } => cli::device_validate(&files),
            DeviceCommand::Convert {
                files,
                node,
                output,
            } => cli::device_convert(&files, node, output.as_deref()),
            DeviceCommand::Apply { files, broker } => cli::device_apply(&files, &broker).await,
            DeviceCommand::List { json, broker } => cli::device_list(&broker, json).await,
        },
    }
}

/// One man page per command and subcommand (`edgetwin.1`, `edgetwin-serve.1`,
/// `edgetwin-twin-get.1`, ...), the version without the commit so that a rebuild of the same
/// release writes the same pages.
fn write_man_pages(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let cmd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(cmd, out)
        .map_err(|e| anyhow::anyhow!("cannot write man pages into {}: {e}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_cover_every_command() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        super::write_man_pages(dir.path()).unwrap();
        for page in [
            "edgetwin.1",
            "edgetwin-serve.1",
            "edgetwin-twin-get.1",
            "edgetwin-fleet-list.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        let serve = std::fs::read_to_string(dir.path().join("edgetwin-serve.1")).unwrap();
        assert!(
            serve.contains("log\\-file"),
            "serve's options missing:\n{serve}"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
