//! `edgetwin fleet`: the cloud operator's view. It talks to the cloud broker only (the same
//! options as the node tools: `--broker` is the cloud broker here, with TLS and credentials), and
//! reads and writes what the nodes' bridges publish there: `{root}{node}/node/status` (presence),
//! `{root}{node}/node/health`, the twin documents, and the answers to desired patches and
//! container commands. With `--sign-key`, what it sends is signed for nodes that require it
//! (`bridge.signatures`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use edgetwin_contract::{
    now_ms, DesiredResult, ErrorMsg, NodeHealthMsg, NodePresenceMsg, PatchOutcome, ID_KEY,
};
use serde_json::Value;

use crate::cli::{ago, build_patch, request_id, BrokerArgs, Session};

/// Where the nodes are at the cloud, and how to sign.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The cloud broker and how to log in (`--broker` is the cloud broker's `host:port`).
    #[command(flatten)]
    pub cloud: BrokerArgs,
    /// The part of the nodes' `bridge.topic_prefix` before the node name (their default prefix
    /// is `edgetwin/{node_id}/`).
    #[arg(long, default_value = "edgetwin/")]
    pub root: String,
    /// Sign what is sent with this private key (`edgetwin key generate`), for nodes that require
    /// signatures.
    #[arg(long, requires = "key_id")]
    pub sign_key: Option<PathBuf>,
    /// The signing key's id in the nodes' `bridge.signatures.keys`.
    #[arg(long, requires = "sign_key")]
    pub key_id: Option<String>,
}

impl FleetArgs {
    fn node_topic(&self, node: &str, rest: &str) -> String {
        format!("{}{node}/{rest}", self.root)
    }

    /// The payload to publish on `topic`: the message itself, or its signed envelope.
    fn payload(&self, topic: &str, msg: &str) -> anyhow::Result<Vec<u8>> {
        let (Some(file), Some(id)) = (&self.sign_key, &self.key_id) else {
            return Ok(msg.as_bytes().to_vec());
        };
        let key = std::fs::read(file).with_context(|| format!("--sign-key {}", file.display()))?;
        let signer = edgetwin_bridge::signed::Signer::from_pkcs8(&key)
            .map_err(|e| anyhow!("--sign-key {}: {e}", file.display()))?;
        // Ten minutes: long enough for a node a little behind, short for a replay.
        let exp = now_ms() + 600_000;
        Ok(serde_json::to_vec(&signer.seal(id, topic, exp, msg))?)
    }
}

/// One node as the cloud sees it.
#[derive(Debug, Default, serde::Serialize)]
pub struct NodeView {
    /// Its presence, if it ever connected.
    pub presence: Option<NodePresenceMsg>,
    /// Its last health document.
    pub health: Option<NodeHealthMsg>,
}

/// Reads the retained presence and health of every node under `root` (until they stop coming).
async fn nodes(s: &mut Session, root: &str) -> anyhow::Result<BTreeMap<String, NodeView>> {
    s.subscribe(&[
        format!("{root}+/node/status"),
        format!("{root}+/node/health"),
    ])
    .await?;
    let mut out: BTreeMap<String, NodeView> = BTreeMap::new();
    let quiet = Duration::from_millis(500);
    while let Ok(Ok((topic, payload))) =
        tokio::time::timeout(quiet, s.next_message("node states")).await
    {
        let Some(rest) = topic.strip_prefix(root) else {
            continue;
        };
        let Some((node, what)) = rest.split_once('/') else {
            continue;
        };
        let view = out.entry(node.to_string()).or_default();
        match what {
            "node/status" => view.presence = serde_json::from_slice(&payload).ok(),
            "node/health" => view.health = serde_json::from_slice(&payload).ok(),
            _ => {}
        }
    }
    Ok(out)
}

/// The `fleet list` table.
pub fn fleet_table(nodes: &BTreeMap<String, NodeView>, now: i64) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING).set_header([
        "NODE",
        "STATE",
        "SINCE",
        "VERSION",
        "READY",
        "DEVICES",
        "MAPPERS",
        "CONTAINERS",
        "OUTBOX",
        "HEALTH FROM",
    ]);
    for (name, v) in nodes {
        let (state, since, version) = match &v.presence {
            Some(p) => {
                let state = match &p.reason {
                    Some(r) => format!("{} ({r})", p.state.as_str()),
                    None => p.state.as_str().to_string(),
                };
                (state, ago(now - p.ts), p.version.clone())
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        let h = v.health.as_ref();
        let ready = h.map_or("-".to_string(), |h| {
            if h.ready {
                "yes".to_string()
            } else {
                format!("no: {}", h.failing.join("; "))
            }
        });
        let devices = h.map_or("-".to_string(), |h| {
            let total: u64 = h.devices.values().sum();
            let online = h.devices.get("online").copied().unwrap_or(0);
            format!("{online}/{total} online")
        });
        let mappers = h.map_or("-".to_string(), |h| {
            let up = h
                .mappers
                .values()
                .filter(|m| **m == edgetwin_contract::MapperState::Online)
                .count();
            format!("{up}/{} online", h.mappers.len())
        });
        let containers = h
            .and_then(|h| h.containers.as_ref())
            .map_or("-".to_string(), |c| {
                let total: u64 = c.values().sum();
                format!("{}/{total} running", c.get("running").copied().unwrap_or(0))
            });
        let outbox = h
            .and_then(|h| h.outbox.as_ref())
            .map_or("-".to_string(), |o| format!("{} waiting", o.records));
        let from = h.map_or("-".to_string(), |h| ago(now - h.ts));
        t.add_row([
            name.clone(),
            state,
            since,
            version,
            ready,
            devices,
            mappers,
            containers,
            outbox,
            from,
        ]);
    }
    t.trim_fmt()
}

/// `edgetwin fleet list`.
pub async fn list(args: &FleetArgs, json: bool) -> anyhow::Result<()> {
    let mut s = Session::connect(&args.cloud).await?;
    let nodes = nodes(&mut s, &args.root).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else if nodes.is_empty() {
        println!("no node has connected under {}", args.root);
    } else {
        println!("{}", fleet_table(&nodes, now_ms()));
    }
    Ok(())
}

/// `edgetwin fleet twin NODE DEVICE`: the twin document as the cloud holds it.
pub async fn twin(args: &FleetArgs, node: &str, device: &str) -> anyhow::Result<()> {
    let mut s = Session::connect(&args.cloud).await?;
    let topic = args.node_topic(node, &format!("dt/{device}/twin"));
    s.subscribe(std::slice::from_ref(&topic)).await?;
    let waiting = format!("retained twin document on {topic} (is the node's bridge up?)");
    let (_, payload) = s.next_message(&waiting).await?;
    let doc: Value = serde_json::from_slice(&payload)
        .with_context(|| format!("{topic} does not hold a JSON document"))?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// `edgetwin fleet watch NODE [--device D]`: a node's twin documents, statuses, errors, health
/// and container results as they reach the cloud, until Ctrl-C.
pub async fn watch(
    args: &FleetArgs,
    node: &str,
    device: Option<&str>,
    pretty: bool,
) -> anyhow::Result<()> {
    let mut s = Session::connect(&args.cloud).await?;
    let filters = match device {
        Some(d) => vec![args.node_topic(node, &format!("dt/{d}/#"))],
        None => vec![
            args.node_topic(node, "dt/#"),
            args.node_topic(node, "node/#"),
        ],
    };
    s.subscribe(&filters).await?;
    loop {
        let next = tokio::select! {
            m = s.next_message_forever() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let (topic, payload) = next?;
        if pretty {
            println!(
                "{}",
                crate::cli::pretty_message(std::time::SystemTime::now(), &topic, &payload)
            );
        } else {
            println!("{topic} {}", String::from_utf8_lossy(&payload));
        }
    }
}

/// `edgetwin fleet set NODE DEVICE prop=value ...`: a desired patch through the cloud, answered
/// by the node's twin service on `dt/{device}/desired/result` (or refused on `dt/{device}/error`).
pub async fn set(
    args: &FleetArgs,
    node: &str,
    device: &str,
    patch: &[String],
) -> anyhow::Result<()> {
    let mut patch = build_patch(patch)?;
    let id = match patch.get(ID_KEY) {
        Some(Value::String(id)) => id.clone(),
        _ => {
            let id = request_id();
            patch.insert(ID_KEY.into(), Value::String(id.clone()));
            id
        }
    };
    let mut s = Session::connect(&args.cloud).await?;
    let result_topic = args.node_topic(node, &format!("dt/{device}/desired/result"));
    let error_topic = args.node_topic(node, &format!("dt/{device}/error"));
    s.subscribe(&[result_topic.clone(), error_topic.clone()])
        .await?;
    let topic = args.node_topic(node, &format!("dt/{device}/desired"));
    let msg = serde_json::to_string(&patch)?;
    s.publish(topic.clone(), args.payload(&topic, &msg)?)
        .await?;
    let waiting = format!("answer from {node} on {result_topic} (is the node online?)");
    loop {
        let (t, payload) = s.next_message(&waiting).await?;
        if t == error_topic {
            if let Ok(e) = serde_json::from_slice::<ErrorMsg>(&payload) {
                if e.id.as_deref() == Some(id.as_str()) {
                    bail!("{node}/{device}: {} ({})", e.message, e.code);
                }
            }
            continue;
        }
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
        return match r.result {
            PatchOutcome::Applied => {
                println!("{node}/{device}: accepted{version}");
                Ok(())
            }
            PatchOutcome::Unchanged => {
                println!("{node}/{device}: unchanged, desired already holds these values{version}");
                Ok(())
            }
            PatchOutcome::Rejected => bail!(
                "{node}/{device}: rejected: {} ({})",
                r.message.unwrap_or_default(),
                r.code.map_or_else(|| "no code".into(), |c| c.to_string())
            ),
        };
    }
}

/// `edgetwin fleet containers NODE '{"action": ...}'`: a container command through the cloud;
/// prints the node's result and fails when it says `ok: false`.
pub async fn containers(args: &FleetArgs, node: &str, command: &str) -> anyhow::Result<()> {
    let mut cmd: serde_json::Map<String, Value> = match serde_json::from_str(command) {
        Ok(Value::Object(m)) => m,
        Ok(_) => bail!("the command must be a JSON object"),
        Err(e) => bail!("the command is not valid JSON: {e}"),
    };
    let id = match cmd.get("id") {
        Some(Value::String(id)) => id.clone(),
        _ => {
            let id = request_id();
            cmd.insert("id".into(), Value::String(id.clone()));
            id
        }
    };
    let mut s = Session::connect(&args.cloud).await?;
    let result_topic = args.node_topic(node, "node/containers/result");
    s.subscribe(std::slice::from_ref(&result_topic)).await?;
    let topic = args.node_topic(node, "node/containers/cmd");
    let msg = serde_json::to_string(&cmd)?;
    s.publish(topic.clone(), args.payload(&topic, &msg)?)
        .await?;
    let waiting = format!(
        "result from {node} on {result_topic} (is the node online, with a container agent?)"
    );
    loop {
        let (_, payload) = s.next_message(&waiting).await?;
        let Ok(r) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        if r["id"].as_str() != Some(id.as_str()) {
            continue;
        }
        println!("{}", serde_json::to_string_pretty(&r)?);
        if r["ok"] == Value::Bool(true) {
            return Ok(());
        }
        bail!(
            "{node}: {} ({})",
            r["error"].as_str().unwrap_or("failed"),
            r["code"].as_str().unwrap_or("no code")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgetwin_contract::{DiskHealth, MapperState};

    #[test]
    fn fleet_table_shows_presence_and_health_of_each_node() {
        let now = 1_767_225_600_000;
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "plant-7".to_string(),
            NodeView {
                presence: Some(NodePresenceMsg {
                    state: MapperState::Online,
                    ts: now - 3_000,
                    version: "0.1.0".into(),
                    boot: now - 60_000,
                    reason: None,
                }),
                health: Some(NodeHealthMsg {
                    ts: now - 1_000,
                    version: "0.1.0".into(),
                    uptime_s: 60,
                    ready: true,
                    failing: vec![],
                    cpu_percent: 1.0,
                    memory_rss_bytes: 1,
                    disk: DiskHealth {
                        free_bytes: 1,
                        total_bytes: 2,
                    },
                    outbox: None,
                    mappers: BTreeMap::from([("modbus".to_string(), MapperState::Online)]),
                    devices: BTreeMap::from([("online".to_string(), 3), ("stale".to_string(), 1)]),
                    containers: None,
                }),
            },
        );
        nodes.insert(
            "plant-8".to_string(),
            NodeView {
                presence: Some(NodePresenceMsg {
                    state: MapperState::Offline,
                    ts: now - 7_200_000,
                    version: "0.1.0".into(),
                    boot: now - 9_000_000,
                    reason: Some("connection lost".into()),
                }),
                health: None,
            },
        );
        let t = fleet_table(&nodes, now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].trim_start().starts_with("NODE"), "{t}");
        assert!(
            lines[1].contains("plant-7") && lines[1].contains("online"),
            "{t}"
        );
        assert!(
            lines[1].contains("3/4 online") && lines[1].contains("1/1 online"),
            "{t}"
        );
        assert!(
            lines[2].contains("offline (connection lost)") && lines[2].contains("2 h ago"),
            "{t}"
        );
    }
}
