//! The field engineer's commands: `edgetwin twin get|set|watch` and `edgetwin device
//! validate|apply|list`. Everything except `validate` talks MQTT 3.1.1 to a node, through the same
//! topic API any other client uses.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use edgetwin_contract::{
    ApplyFile, ApplyRequest, ApplyResult, DesiredResult, DeviceId, ErrorMsg, GetResult,
    ListRequest, ListResult, PatchOutcome, Topic, ID_KEY,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Map, Value};

/// How to reach a node.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The node's MQTT listener, `host:port`.
    #[arg(long, default_value = "127.0.0.1:1883", env = "EDGETWIN_BROKER")]
    pub broker: String,
    /// How long to wait for the node's answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// User to log in as (a user of the node's credentials file, `edgetwin user add`); without
    /// it the tools connect anonymously, which a node takes from its own host only and not at
    /// all once it has users.
    #[arg(long, env = "EDGETWIN_USERNAME", requires = "password_file")]
    pub username: Option<String>,
    /// File holding the user's password (a trailing line break is ignored).
    #[arg(long, env = "EDGETWIN_PASSWORD_FILE", requires = "username")]
    pub password_file: Option<std::path::PathBuf>,
    /// Connect with TLS, checking the node's certificate against this CA bundle (PEM); for a
    /// `gate.listeners` entry with `tls:`.
    #[arg(long, env = "EDGETWIN_CAFILE")]
    pub cafile: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a node that logs users in by certificate; needs `--key`
    /// and `--cafile`.
    #[arg(long, env = "EDGETWIN_CERT", requires_all = ["key", "cafile"])]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "EDGETWIN_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

struct Session {
    client: AsyncClient,
    events: EventLoop,
    /// Messages that arrived while waiting for an acknowledgement (a retained message can come
    /// before the SUBACK is seen).
    backlog: std::collections::VecDeque<(String, Vec<u8>)>,
    broker: String,
    timeout: Duration,
}

impl Session {
    async fn connect(args: &BrokerArgs) -> anyhow::Result<Session> {
        let (host, port) = args
            .broker
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("--broker {:?}: expected host:port", args.broker))?;
        let port: u16 = port
            .parse()
            .map_err(|_| anyhow!("--broker {:?}: port must be a number", args.broker))?;
        let id = format!(
            "edgetwin-cli-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut opts =
            MqttOptions::new(id, host.trim_start_matches('[').trim_end_matches(']'), port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        if let Some(ca) = &args.cafile {
            let client = args.cert.as_deref().zip(args.key.as_deref());
            let tls = edgetwin_bridge::client_tls(ca, client).context("--cafile/--cert/--key")?;
            opts.set_transport(rumqttc::Transport::tls_with_config(tls));
        }
        if let (Some(user), Some(file)) = (&args.username, &args.password_file) {
            let password = edgetwin_contract::read_password_file(file)
                .with_context(|| format!("--password-file {}", file.display()))?;
            opts.set_credentials(user.clone(), password);
        }
        let (client, events) = AsyncClient::new(opts, 64);
        let mut s = Session {
            client,
            events,
            backlog: Default::default(),
            broker: args.broker.clone(),
            timeout: Duration::from_millis(args.timeout_ms),
        };
        s.until("CONNACK", |e| {
            matches!(e, Event::Incoming(Packet::ConnAck(_))).then_some(())
        })
        .await
        .with_context(|| format!("cannot connect to the node's broker at {}", args.broker))?;
        Ok(s)
    }

    /// Polls events until `f` picks one, or the timeout passes; `waiting` names what did not come.
    async fn until<T>(
        &mut self,
        waiting: &str,
        mut f: impl FnMut(&Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.poll())
                .await
                .map_err(|_| {
                    anyhow!(
                        "no {waiting} from {} within {:?} (--timeout-ms)",
                        self.broker,
                        self.timeout
                    )
                })?
                .map_err(|e| anyhow!("connection to {} failed: {e}", self.broker))?;
            if let Some(t) = f(&ev) {
                return Ok(t);
            }
            if let Event::Incoming(Packet::Publish(p)) = ev {
                self.backlog
                    .push_back((p.topic.to_string(), p.payload.to_vec()));
            }
        }
    }

    async fn subscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
        for f in filters {
            self.client.subscribe(f.clone(), QoS::AtLeastOnce).await?;
        }
        let mut acks = 0;
        self.until("SUBACK", |e| {
            if matches!(e, Event::Incoming(Packet::SubAck(_))) {
                acks += 1;
            }
            (acks == filters.len()).then_some(())
        })
        .await
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        self.until("PUBACK", |e| {
            matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
        })
        .await
    }

    /// Waits for the next publish on any subscribed topic; `waiting` names the answer awaited.
    async fn next_message(&mut self, waiting: &str) -> anyhow::Result<(String, Vec<u8>)> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        self.until(waiting, |e| match e {
            Event::Incoming(Packet::Publish(p)) => Some((p.topic.to_string(), p.payload.to_vec())),
            _ => None,
        })
        .await
    }
}

fn request_id() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

fn parse_device(d: &str) -> anyhow::Result<DeviceId> {
    DeviceId::new(d).map_err(|e| anyhow!("{e}"))
}

/// `edgetwin twin get DEVICE`: prints the twin document.
pub async fn twin_get(device: &str, args: &BrokerArgs) -> anyhow::Result<()> {
    let device = parse_device(device)?;
    let mut s = Session::connect(args).await?;
    let result_topic = Topic::GetResult(device.clone()).to_topic_string();
    let error_topic = Topic::Error(device.clone()).to_topic_string();
    s.subscribe(&[result_topic.clone(), error_topic.clone()])
        .await?;
    let id = request_id();
    s.publish(
        Topic::Get(device.clone()).to_topic_string(),
        serde_json::to_vec(&serde_json::json!({ "id": id }))?,
    )
    .await?;
    let waiting = format!("answer on {result_topic} (the node's twin service)");
    loop {
        let (topic, payload) = s.next_message(&waiting).await?;
        if topic == result_topic {
            if let Ok(r) = serde_json::from_slice::<GetResult>(&payload) {
                if r.id.as_deref() == Some(id.as_str()) {
                    println!("{}", serde_json::to_string_pretty(&r.twin)?);
                    return Ok(());
                }
            }
        } else if topic == error_topic {
            if let Ok(e) = serde_json::from_slice::<ErrorMsg>(&payload) {
                if e.id.as_deref() == Some(id.as_str()) {
                    bail!("{device}: {} ({})", e.message, e.code);
                }
            }
        }
    }
}

/// Builds a desired patch from `key=value` pairs (values parsed as JSON, else taken as strings)
/// or from one JSON object argument.
pub fn build_patch(args: &[String]) -> anyhow::Result<Map<String, Value>> {
    if let [one] = args {
        if one.trim_start().starts_with('{') {
            return match serde_json::from_str::<Value>(one) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => bail!("the patch must be a JSON object"),
                Err(e) => bail!("the patch is not valid JSON: {e}"),
            };
        }
    }
    let mut m = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow!("{a:?}: expected property=value or one JSON object"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), value);
    }
    if m.is_empty() {
        bail!("nothing to set: give property=value pairs or a JSON object");
    }
    Ok(m)
}

/// `edgetwin twin set DEVICE prop=value ...`: publishes a desired patch with an `$id` and waits
/// for the node's answer on `dt/{device}/desired/result`: applied (at which version), unchanged
/// (desired already held these values; so re-running a commissioning script succeeds at once),
/// or rejected (why).
pub async fn twin_set(device: &str, patch: &[String], args: &BrokerArgs) -> anyhow::Result<()> {
    let device = parse_device(device)?;
    let mut patch = build_patch(patch)?;
    let id = match patch.get(ID_KEY) {
        Some(Value::String(id)) => id.clone(),
        _ => {
            let id = request_id();
            patch.insert(ID_KEY.into(), Value::String(id.clone()));
            id
        }
    };
    let mut s = Session::connect(args).await?;
    let result_topic = Topic::DesiredResult(device.clone()).to_topic_string();
    s.subscribe(std::slice::from_ref(&result_topic)).await?;
    s.publish(
        Topic::Desired(device.clone()).to_topic_string(),
        serde_json::to_vec(&patch)?,
    )
    .await?;
    let waiting =
        format!("answer to the desired patch on {result_topic} (the node's twin service)");
    loop {
        let (_, payload) = s.next_message(&waiting).await?;
        let Ok(r) = serde_json::from_slice::<DesiredResult>(&payload) else {
            continue;
        };
        if r.id != id {
            continue;
        }
        let version = r
            .version
            .map(|v| format!(" at version {v}"))
            .unwrap_or_default();
        match r.result {
            PatchOutcome::Applied => println!("{device}: accepted{version}"),
            PatchOutcome::Unchanged => {
                println!("{device}: unchanged, desired already holds these values{version}")
            }
            PatchOutcome::Rejected => bail!(
                "{device}: rejected: {} ({})",
                r.message.unwrap_or_default(),
                r.code.map_or_else(|| "no code".into(), |c| c.to_string())
            ),
        }
        return Ok(());
    }
}

/// `edgetwin twin watch DEVICE`: prints every twin message of the device until interrupted.
pub async fn twin_watch(device: &str, args: &BrokerArgs) -> anyhow::Result<()> {
    let device = parse_device(device)?;
    let mut s = Session::connect(args).await?;
    s.subscribe(&[format!("dt/{device}/#")]).await?;
    loop {
        let ev = tokio::select! {
            ev = s.events.poll() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let body = String::from_utf8_lossy(&p.payload);
                println!("{} {}", p.topic, body);
            }
            Ok(_) => {}
            Err(e) => bail!("connection to {} lost: {e}", s.broker),
        }
    }
}

/// `edgetwin device validate FILE...`: checks profile files locally; prints every error.
pub fn device_validate(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {name}"))?;
        match edgetwin_profile::parse_str(&name, &text) {
            Ok(d) => docs.push((name, d)),
            Err(e) => errors.extend(e.iter().map(ToString::to_string)),
        }
    }
    if errors.is_empty() {
        match edgetwin_profile::validate(&docs, &Default::default()) {
            Ok(set) => {
                println!(
                    "ok: {} model(s), {} device(s) in {} file(s)",
                    set.models.len(),
                    set.devices.len(),
                    files.len()
                );
                return Ok(());
            }
            Err(e) => errors.extend(e.iter().map(ToString::to_string)),
        }
    }
    for e in &errors {
        eprintln!("{e}");
    }
    bail!("{} error(s)", errors.len())
}

/// `edgetwin device apply FILE...`: sends profile files to the node; all or nothing.
pub async fn device_apply(files: &[PathBuf], args: &BrokerArgs) -> anyhow::Result<()> {
    let mut req = ApplyRequest {
        id: request_id(),
        files: vec![],
    };
    for f in files {
        let content =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        req.files.push(ApplyFile {
            name: f.display().to_string(),
            content,
        });
    }
    let mut s = Session::connect(args).await?;
    s.subscribe(&[Topic::DevicesApplyResult.to_topic_string()])
        .await?;
    s.publish(
        Topic::DevicesApply.to_topic_string(),
        serde_json::to_vec(&req)?,
    )
    .await?;
    let waiting = format!(
        "answer on {} (the node's device registry)",
        Topic::DevicesApplyResult.to_topic_string()
    );
    loop {
        let (_, payload) = s.next_message(&waiting).await?;
        let Ok(r) = serde_json::from_slice::<ApplyResult>(&payload) else {
            continue;
        };
        if r.id != req.id {
            continue;
        }
        if r.ok {
            println!(
                "applied; {} device(s) registered: {}",
                r.devices.len(),
                r.devices.join(", ")
            );
            return Ok(());
        }
        for e in &r.errors {
            eprintln!("{e}");
        }
        bail!("apply rejected; nothing was changed");
    }
}

/// `edgetwin device list`: prints the node's registered devices.
pub async fn device_list(args: &BrokerArgs, json: bool) -> anyhow::Result<()> {
    let mut s = Session::connect(args).await?;
    s.subscribe(&[Topic::DevicesListResult.to_topic_string()])
        .await?;
    let req = ListRequest { id: request_id() };
    s.publish(
        Topic::DevicesList.to_topic_string(),
        serde_json::to_vec(&req)?,
    )
    .await?;
    let waiting = format!(
        "answer on {} (the node's device registry)",
        Topic::DevicesListResult.to_topic_string()
    );
    loop {
        let (_, payload) = s.next_message(&waiting).await?;
        let Ok(r) = serde_json::from_slice::<ListResult>(&payload) else {
            continue;
        };
        if r.id != req.id {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!("{:<32} {:<24} {:<10} FILE", "DEVICE", "MODEL", "PROTOCOL");
        for d in &r.devices {
            println!(
                "{:<32} {:<24} {:<10} {}",
                d.name, d.model, d.protocol, d.file
            );
        }
        for e in &r.errors {
            eprintln!("rejected profile: {e}");
        }
        return Ok(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_patch_from_pairs_parses_json_values() {
        let m = build_patch(&["a=1".into(), "b=true".into(), "c=hello".into()]).expect("valid");
        assert_eq!(
            Value::Object(m),
            serde_json::json!({"a": 1, "b": true, "c": "hello"})
        );
    }

    #[test]
    fn cli_patch_rejects_json_that_is_not_an_object() {
        assert!(build_patch(&["[1]".into()]).is_err());
        assert!(build_patch(&["{bad".into()]).is_err());
    }
}
