//! The field engineer's commands: `edgetwin twin get|set|watch` and `edgetwin device
//! validate|apply|list`. Everything except `validate` talks MQTT 3.1.1 to a node, through the same
//! topic API any other client uses.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use edgetwin_contract::{
    ApplyFile, ApplyRequest, ApplyResult, DesiredResult, DeviceId, ErrorMsg, GetResult,
    ListRequest, ListResult, PatchOutcome, Topic, TwinDoc, ID_KEY,
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

pub(crate) struct Session {
    pub(crate) client: AsyncClient,
    pub(crate) events: EventLoop,
    /// Messages that arrived while waiting for an acknowledgement (a retained message can come
    /// before the SUBACK is seen).
    backlog: std::collections::VecDeque<(String, Vec<u8>)>,
    pub(crate) broker: String,
    timeout: Duration,
}

impl Session {
    pub(crate) async fn connect(args: &BrokerArgs) -> anyhow::Result<Session> {
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

    pub(crate) async fn subscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
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

    pub(crate) async fn publish(&mut self, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        self.until("PUBACK", |e| {
            matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
        })
        .await
    }

    /// Waits for the next publish on any subscribed topic, however long it takes.
    pub(crate) async fn next_message_forever(&mut self) -> anyhow::Result<(String, Vec<u8>)> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        loop {
            match self.events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return Ok((p.topic.to_string(), p.payload.to_vec()))
                }
                Ok(_) => {}
                Err(e) => bail!("connection to {} lost: {e}", self.broker),
            }
        }
    }

    /// Waits for the next publish on any subscribed topic; `waiting` names the answer awaited.
    pub(crate) async fn next_message(
        &mut self,
        waiting: &str,
    ) -> anyhow::Result<(String, Vec<u8>)> {
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

pub(crate) fn request_id() -> String {
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

/// `edgetwin twin watch DEVICE`: prints every twin message of the device until interrupted; with
/// `pretty`, each with the time it arrived and its JSON indented.
pub async fn twin_watch(device: &str, pretty: bool, args: &BrokerArgs) -> anyhow::Result<()> {
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
                if pretty {
                    println!(
                        "{}",
                        pretty_message(std::time::SystemTime::now(), &p.topic, &p.payload)
                    );
                } else {
                    println!("{} {}", p.topic, String::from_utf8_lossy(&p.payload));
                }
            }
            Ok(_) => {}
            Err(e) => bail!("connection to {} lost: {e}", s.broker),
        }
    }
}

/// One message as `twin watch --pretty` prints it: arrival time (UTC, ms) and topic, then the
/// payload's JSON indented (or its text, when it is not JSON; `(empty)` for a cleared retained
/// message).
pub fn pretty_message(at: std::time::SystemTime, topic: &str, payload: &[u8]) -> String {
    let body = if payload.is_empty() {
        "(empty)".to_string()
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(payload).into_owned(),
        }
    };
    format!("{} {topic}\n{body}", humantime::format_rfc3339_millis(at))
}

/// The profile files named on the command line: files as given, folders as the node reads
/// them (their `.yaml`/`.yml` files, sorted).
fn profile_files(args: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for a in args {
        if a.is_dir() {
            let found = edgetwin_node::yaml_files(a)
                .with_context(|| format!("cannot read folder {}", a.display()))?;
            if found.is_empty() {
                bail!("{}: no .yaml or .yml file in this folder", a.display());
            }
            files.extend(found);
        } else {
            files.push(a.clone());
        }
    }
    Ok(files)
}

/// `edgetwin device validate FILE|DIR...`: checks profile files locally, together (as the node
/// would load them); prints every error.
pub fn device_validate(args: &[PathBuf]) -> anyhow::Result<()> {
    let files = profile_files(args)?;
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {name}"))?;
        match edgetwin_profile::parse_str(&name, &text) {
            Ok(d) => docs.push((name, d)),
            Err(e) => errors.extend(e.iter().map(ToString::to_string)),
        }
    }
    // Cross-file checks run on what parsed, so one run shows every error of every file.
    match edgetwin_profile::validate(&docs, &Default::default()) {
        Ok(set) if errors.is_empty() => {
            println!(
                "ok: {} model(s), {} device(s) in {} file(s)",
                set.models.len(),
                set.devices.len(),
                files.len()
            );
            return Ok(());
        }
        Ok(_) => {}
        Err(e) => errors.extend(e.iter().map(ToString::to_string)),
    }
    for e in &errors {
        eprintln!("{e}");
    }
    bail!("{} error(s) in {} file(s)", errors.len(), files.len())
}

/// `edgetwin device convert FILE... [--node N] [-o OUT]`: KubeEdge v1beta1 YAML to an edgetwin
/// profile, checked as the node would load it; the notes go to standard error.
pub fn device_convert(
    files: &[PathBuf],
    node: Option<String>,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let opts = edgetwin_profile::kubeedge::ConvertOptions { node };
    let mut yaml = String::new();
    let mut errors = Vec::new();
    let (mut models, mut devices) = (0, 0);
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {name}"))?;
        match edgetwin_profile::kubeedge::convert(&name, &text, &opts) {
            Ok(c) => {
                for n in &c.notes {
                    eprintln!("note: {n}");
                }
                if !yaml.is_empty() {
                    yaml.push_str("---\n");
                }
                yaml.push_str(&c.yaml);
                models += c.models;
                devices += c.devices;
            }
            Err(e) => errors.extend(e.iter().map(ToString::to_string)),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!("{} error(s); nothing converted", errors.len());
    }
    // What it made, checked as the node will load it (a coil read into a float, say, is a
    // problem KubeEdge does not see).
    let out_name = output.map_or_else(|| "converted.yaml".to_string(), |p| p.display().to_string());
    let problems = match edgetwin_profile::parse_str(&out_name, &yaml) {
        Ok(docs) => {
            match edgetwin_profile::validate(&[(out_name.clone(), docs)], &Default::default()) {
                Ok(_) => vec![],
                // Models from files not converted here are not an error of the conversion.
                Err(e) => e
                    .iter()
                    .filter(|e| !e.message.starts_with("unknown device model"))
                    .map(ToString::to_string)
                    .collect(),
            }
        }
        Err(e) => e.iter().map(ToString::to_string).collect(),
    };
    match output {
        Some(p) => {
            std::fs::write(p, &yaml).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{yaml}"),
    }
    for p in &problems {
        eprintln!("to fix before loading: {p}");
    }
    eprintln!("converted {models} model(s) and {devices} device(s)");
    if !problems.is_empty() {
        bail!(
            "{} problem(s) to fix before the node loads it",
            problems.len()
        );
    }
    Ok(())
}

/// `edgetwin discover PROTOCOL ...`: asks the protocol's mapper to scan `target` and prints (or
/// writes) the draft profile it answers with; what it found goes to standard error.
pub async fn discover(
    protocol: &str,
    target: Value,
    output: Option<&std::path::Path>,
    args: &BrokerArgs,
) -> anyhow::Result<()> {
    let protocol = edgetwin_contract::ProtocolName::new(protocol).map_err(|e| anyhow!("{e}"))?;
    let mut s = Session::connect(args).await?;
    // No mapper, no scan: say so now rather than after the scan's timeout.
    let status_topic = Topic::MapperStatus(protocol.clone()).to_topic_string();
    s.subscribe(std::slice::from_ref(&status_topic)).await?;
    let waiting = format!("retained {status_topic} (is the {protocol} mapper running?)");
    let (_, status) = s.next_message(&waiting).await?;
    let online = serde_json::from_slice::<edgetwin_contract::MapperStatusMsg>(&status)
        .is_ok_and(|m| m.state == edgetwin_contract::MapperState::Online);
    if !online {
        bail!("the {protocol} mapper is not online on this node ({status_topic}); start it first");
    }
    let result_topic = Topic::MapperDiscoverResult(protocol.clone()).to_topic_string();
    s.subscribe(std::slice::from_ref(&result_topic)).await?;
    let id = request_id();
    s.publish(
        Topic::MapperDiscover(protocol.clone()).to_topic_string(),
        serde_json::to_vec(&edgetwin_contract::DiscoverRequest {
            id: id.clone(),
            target,
        })?,
    )
    .await?;
    // A scan takes as long as it takes (the mapper gives up after 120 s).
    s.timeout = s.timeout.max(Duration::from_secs(130));
    let waiting = format!("answer on {result_topic} (the {protocol} mapper's scan)");
    let r = loop {
        let (_, payload) = s.next_message(&waiting).await?;
        match serde_json::from_slice::<edgetwin_contract::DiscoverResult>(&payload) {
            Ok(r) if r.id == id => break r,
            _ => continue,
        }
    };
    if !r.ok {
        bail!("scan failed: {}", r.error.unwrap_or_default());
    }
    for f in &r.found {
        eprintln!("found: {f}");
    }
    if r.found.is_empty() {
        eprintln!("found nothing");
    }
    let profile = r.profile.unwrap_or_default();
    match output {
        Some(p) => {
            std::fs::write(p, &profile).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{profile}"),
    }
    Ok(())
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

/// `edgetwin device list`: the node's registered devices with their state now: status,
/// when last read, and lasting property errors (from the retained twin documents).
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
    let list = loop {
        let (_, payload) = s.next_message(&waiting).await?;
        match serde_json::from_slice::<ListResult>(&payload) {
            Ok(r) if r.id == req.id => break r,
            _ => continue,
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let twins = twin_documents(&mut s, &list).await?;
    println!(
        "{}",
        device_table(&list, &twins, edgetwin_contract::now_ms())
    );
    for e in &list.errors {
        eprintln!("rejected profile: {e}");
    }
    Ok(())
}

/// The retained twin documents of the listed devices (those that have one within the timeout).
async fn twin_documents(
    s: &mut Session,
    list: &ListResult,
) -> anyhow::Result<std::collections::HashMap<String, TwinDoc>> {
    let mut twins = std::collections::HashMap::new();
    if list.devices.is_empty() {
        return Ok(twins);
    }
    s.subscribe(&["dt/+/twin".to_string()]).await?;
    let wanted: std::collections::HashSet<&str> =
        list.devices.iter().map(|d| d.name.as_str()).collect();
    // Retained messages come right after the SUBACK; a device without a document yet is shown
    // without status once they stop coming.
    let quiet = Duration::from_millis(300);
    while twins.len() < wanted.len() {
        let next = tokio::time::timeout(quiet, s.next_message("twin documents")).await;
        let Ok(Ok((topic, payload))) = next else {
            break;
        };
        if let Ok(doc) = serde_json::from_slice::<TwinDoc>(&payload) {
            if topic.ends_with("/twin") && wanted.contains(doc.device.as_str()) {
                twins.insert(doc.device.to_string(), doc);
            }
        }
    }
    Ok(twins)
}

/// The `device list` table: one row per device, columns aligned.
pub fn device_table(
    list: &ListResult,
    twins: &std::collections::HashMap<String, TwinDoc>,
    now_ms: i64,
) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING).set_header([
        "DEVICE",
        "MODEL",
        "PROTOCOL",
        "STATUS",
        "LAST SEEN",
        "ERRORS",
        "FILE",
    ]);
    for d in &list.devices {
        let doc = twins.get(d.name.as_str());
        let status = doc.map_or("-".to_string(), |t| t.status.state.as_str().to_string());
        let seen = doc
            .and_then(|t| t.status.last_seen)
            .map_or("never".to_string(), |s| ago(now_ms - s));
        let errors = doc.map_or(String::new(), |t| {
            t.status
                .errors
                .iter()
                .map(|(p, e)| format!("{p}: {}", e.code))
                .collect::<Vec<_>>()
                .join(", ")
        });
        t.add_row([
            d.name.to_string(),
            d.model.clone(),
            d.protocol.to_string(),
            status,
            seen,
            errors,
            d.file.clone(),
        ]);
    }
    t.trim_fmt()
}

/// `3 s ago`, `5 min ago`, `2 h ago`, `4 d ago`.
pub(crate) fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
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
    fn cli_device_table_aligns_columns_and_shows_status_last_seen_and_errors() {
        let list: ListResult = serde_json::from_value(serde_json::json!({
            "id": "1",
            "devices": [
                {"name": "meter-1", "model": "sdm630", "protocol": "modbus", "file": "devices/a.yaml"},
                {"name": "boiler-long-name-7", "model": "boiler", "protocol": "opcua", "file": "devices/b.yaml"}
            ]
        }))
        .expect("list");
        let doc: TwinDoc = serde_json::from_value(serde_json::json!({
            "device": "meter-1", "model": "sdm630", "version": 3, "desiredVersion": 0,
            "desired": {}, "reported": {}, "metadata": {"desired": {}, "reported": {}},
            "status": {"state": "stale", "lastSeen": 1_000,
                "errors": {"voltage": {"code": "device_refused", "message": "x", "op": "read", "since": 1}}}
        }))
        .expect("doc");
        let twins = [("meter-1".to_string(), doc)].into_iter().collect();
        let out = device_table(&list, &twins, 8_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(
            lines[1].contains("stale") && lines[1].contains("7 s ago"),
            "{out}"
        );
        assert!(lines[1].contains("voltage: device_refused"), "{out}");
        assert!(lines[2].contains("never"), "{out}");
        // Aligned: every row's MODEL starts in the same column as the header's.
        let col = lines[0].find("MODEL").expect("header");
        assert_eq!(lines[1].find("sdm630"), Some(col), "{out}");
        assert_eq!(lines[2].find("boiler "), Some(col), "{out}");
    }

    #[test]
    fn cli_pretty_message_has_time_topic_and_indented_json() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123);
        let out = pretty_message(at, "dt/m-1/reported", br#"{"v":1}"#);
        assert_eq!(
            out,
            "2026-11-30T00:53:20.123Z dt/m-1/reported\n{\n  \"v\": 1\n}"
        );
        assert!(pretty_message(at, "dt/m-1/twin", b"").ends_with("(empty)"));
    }

    #[test]
    fn cli_patch_rejects_json_that_is_not_an_object() {
        assert!(build_patch(&["[1]".into()]).is_err());
        assert!(build_patch(&["{bad".into()]).is_err());
    }
}
