//! Node configuration: a YAML file with `deny_unknown_fields`, every field defaulted so that an empty
//! file (or no file) is the embedded default of docs/contract.md §6.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use edgetwin_broker::MqttConfig;
use edgetwin_contract::NodeId;
use serde::{Deserialize, Serialize};

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id; names the node upstream (`edgetwin/{node}/...`). Default `edgetwin-node`.
    pub node_id: NodeId,
    /// Where the twin store and applied profiles live. Default `./edgetwin-data`.
    pub data_dir: PathBuf,
    /// Folder of device profile YAML files, watched for changes. Default `./devices` (used only if present).
    pub devices_dir: PathBuf,
    /// How often the devices folder is rescanned for changes, in milliseconds. Default 2000.
    pub devices_scan_interval_ms: u64,
    /// The embedded MQTT broker.
    pub mqtt: MqttConfig,
    /// The HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub http: HttpConfig,
    /// The twin service.
    pub twin: TwinConfig,
    /// Readiness checks.
    pub health: HealthConfig,
    /// The short local history of reported numeric values.
    pub history: crate::history::HistoryConfig,
    /// The upstream bridge to a cloud MQTT broker; absent = no upstream.
    pub bridge: Option<edgetwin_bridge::BridgeConfig>,
    /// The container agent; absent = no container management.
    pub containers: Option<ContainersConfig>,
    /// The MQTT front door's settings (TLS listeners, users, per-client topic permissions,
    /// limits). The front door always runs and serves `mqtt.listen` and `mqtt.listen_v5` too;
    /// absent, it takes anonymous clients from this host only.
    pub gate: Option<edgetwin_gate::GateConfig>,
}

/// The readiness canary: a client that asks the twin service for a twin through the broker's
/// listener; `/readyz` fails while it goes unanswered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between the canary's requests, in milliseconds. Default 2000.
    pub canary_interval_ms: u64,
    /// Longest wait for an answer, in milliseconds. Default 3000.
    pub canary_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            canary_interval_ms: 2000,
            canary_timeout_ms: 3000,
        }
    }
}

/// The container agent: the node's container runtime and how often it is reconciled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// Docker Engine API socket (Podman: `podman system service` socket). Default
    /// `unix:///var/run/docker.sock`.
    pub runtime_socket: String,
    /// How often the runtime is checked against the declared containers, in milliseconds.
    /// Default 10000.
    pub reconcile_interval_ms: u64,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        ContainersConfig {
            runtime_socket: "unix:///var/run/docker.sock".into(),
            reconcile_interval_ms: 10_000,
        }
    }
}

/// The HTTP endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8080` (`/metrics` names every device; a Prometheus on
    /// another host needs an address given here).
    pub listen: SocketAddr,
    /// Time a client has to send a request's headers, and the longest an idle keep-alive
    /// connection is kept, in milliseconds. Default 5000.
    pub header_timeout_ms: u64,
    /// Most connections open at once; past it a new connection is closed at once (counted in
    /// `edgetwin_http_connections_refused_total`). Default 64.
    pub max_connections: usize,
}

/// Twin service limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwinConfig {
    /// Most messages folded into one store commit (group commit). Default 1024.
    pub max_batch: usize,
    /// Most properties in one patch. Default 256.
    pub max_properties_per_patch: usize,
    /// How often the twin store's snapshot is rewritten while twins change, in seconds; a
    /// damaged store file is restored from it, so this is the loss window of media damage (it is
    /// also written at start and at shutdown). Each snapshot writes every twin once: 10,000 twins
    /// of 1 KB are 10 MB per snapshot. Default 3600.
    pub snapshot_interval_s: u64,
}

/// The node id when the config names none: the host name when it makes a valid id (as most do),
/// else `edgetwin-` and the first 12 digits of the machine id, else `edgetwin-node`. One fixed
/// default would give every node of a fleet the same name at the cloud.
pub fn default_node_id(hostname: Option<&str>, machine_id: Option<&str>) -> NodeId {
    if let Some(h) = hostname
        .map(str::trim)
        .filter(|h| !h.is_empty() && *h != "localhost")
    {
        if let Ok(id) = NodeId::new(h) {
            return id;
        }
    }
    if let Some(m) = machine_id.map(str::trim).filter(|m| m.len() >= 12) {
        if let Ok(id) = NodeId::new(format!("edgetwin-{}", &m[..12])) {
            return id;
        }
    }
    NodeId::new("edgetwin-node").expect("constant id is valid")
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: default_node_id(
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .as_deref(),
                std::fs::read_to_string("/etc/machine-id").ok().as_deref(),
            ),
            data_dir: PathBuf::from("./edgetwin-data"),
            devices_dir: PathBuf::from("./devices"),
            devices_scan_interval_ms: 2000,
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            twin: TwinConfig::default(),
            history: crate::history::HistoryConfig::default(),
            health: HealthConfig::default(),
            bridge: None,
            containers: None,
            gate: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_timeout_ms: 5000,
            max_connections: 64,
        }
    }
}

impl Default for TwinConfig {
    fn default() -> Self {
        TwinConfig {
            max_batch: 1024,
            max_properties_per_patch: 256,
            snapshot_interval_s: 3600,
        }
    }
}

impl NodeConfig {
    /// Reads and checks a config file; errors name the file, line and field.
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Reads `path`, then merges every `*.yaml` of `fragments` (when that folder exists) over
    /// it in file-name order: a mapping key of a later file replaces or, for mappings, merges
    /// into the earlier value; anything else replaces it. So a package's `node.yaml` stays as
    /// shipped and local changes live in `conf.d/` files of their own. Errors name the file
    /// (and the line, where serde knows it) and the field.
    pub fn load_with_fragments(
        path: &Path,
        fragments: Option<&Path>,
    ) -> anyhow::Result<NodeConfig> {
        let files = match fragments {
            Some(dir) if dir.is_dir() => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .with_context(|| format!("cannot read config folder {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                            && !p
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                files.sort();
                files
            }
            _ => Vec::new(),
        };
        if files.is_empty() {
            return Self::load(path);
        }
        let mut layers = Vec::new();
        let mut errors = Vec::new();
        for file in std::iter::once(path.to_path_buf()).chain(files) {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read config file {}", file.display()))?;
            match serde_norway::from_str::<serde_norway::Value>(&text) {
                Ok(serde_norway::Value::Null) => {}
                Ok(v @ serde_norway::Value::Mapping(_)) => layers.push((file, v)),
                Ok(_) => errors.push(format!("config file {}: not a mapping", file.display())),
                Err(e) => {
                    let line = e
                        .location()
                        .map(|l| format!("line {}: ", l.line()))
                        .unwrap_or_default();
                    errors.push(format!("config file {}: {line}{e}", file.display()));
                }
            }
        }
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("\n"));
        }
        let mut merged = serde_norway::Value::Mapping(Default::default());
        for (_, layer) in &layers {
            merge_yaml(&mut merged, layer.clone());
        }
        let cfg = read_collecting(merged, |field| {
            let from = layers
                .iter()
                .rev()
                .find(|(_, v)| yaml_has_path(v, field))
                .or(layers.first())
                .map(|(f, _)| f.display().to_string())
                .unwrap_or_default();
            format!("config file {from}: ")
        })
        .map_err(|errors| anyhow::anyhow!("{}", errors.join("\n")))?;
        cfg.check().map_err(|e| {
            let names: Vec<String> = layers
                .iter()
                .map(|(f, _)| f.display().to_string())
                .collect();
            anyhow::anyhow!("config files {}: {e}", names.join(" + "))
        })?;
        Ok(cfg)
    }

    /// The config as the node runs it, for `--print-config`: values that default from others
    /// (the bridge's client id and topic prefix from the node id; the front door's listeners
    /// from `mqtt.listen` and `mqtt.listen_v5`, and its packet limit from the broker's) filled
    /// in, so what is printed is what is in force, and reads back to the same node.
    pub fn effective(&self) -> NodeConfig {
        let mut cfg = self.clone();
        let node = cfg.node_id.as_str().to_string();
        if let Some(b) = cfg.bridge.as_mut() {
            b.client_id = Some(b.client_id(&node));
            b.topic_prefix = Some(b.topic_prefix(&node));
        }
        cfg.gate = Some(self.front_door());
        cfg
    }

    /// The front door's configuration: the `gate:` section (or every default) serving, besides
    /// its own listeners, `mqtt.listen` and `mqtt.listen_v5`, unless a gate listener already
    /// covers one (same port, same or unspecified address).
    pub fn front_door(&self) -> edgetwin_gate::GateConfig {
        let mut gate = self.gate.clone().unwrap_or_else(|| {
            let mut every_default = edgetwin_gate::GateConfig::plain(self.mqtt.listen);
            every_default.listeners.clear();
            every_default
        });
        let mut extra = Vec::new();
        for a in std::iter::once(self.mqtt.listen).chain(self.mqtt.listen_v5) {
            let covered = gate.listeners.iter().chain(&extra).any(|l| {
                l.listen.port() == a.port()
                    && (l.listen.ip() == a.ip() || l.listen.ip().is_unspecified())
            });
            if !covered {
                extra.push(edgetwin_gate::ListenerConfig {
                    listen: a,
                    tls: None,
                });
            }
        }
        // After the section's own, so problems name `gate.listeners[i]` as written.
        gate.listeners.extend(extra);
        // The broker drops a connection whose packet exceeds its limit without a word; the
        // front door checks the same limit first and answers as MQTT says (v5: DISCONNECT 0x95).
        gate.limits.max_packet_bytes = gate
            .limits
            .max_packet_bytes
            .min(self.mqtt.max_payload_bytes);
        gate
    }

    /// Front-door listeners that could not all bind: one port asked for twice on overlapping
    /// addresses that the first does not cover.
    fn front_door_clashes(&self) -> Vec<String> {
        let listeners = self.front_door().listeners;
        let mut errors = Vec::new();
        for (i, a) in listeners.iter().enumerate() {
            for b in &listeners[i + 1..] {
                let (a, b) = (a.listen, b.listen);
                let overlap =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() == b.port() && overlap {
                    errors.push(format!(
                        "MQTT listeners {a} and {b} (mqtt.listen, mqtt.listen_v5, gate.listeners) share a port; give one of them another port, or listen once on {}",
                        if a.ip().is_unspecified() { a } else { b }
                    ));
                }
            }
        }
        errors
    }

    /// Parses config text (empty text is the default config).
    pub fn parse(text: &str) -> Result<NodeConfig, String> {
        if text.trim().is_empty() {
            return Ok(NodeConfig::default());
        }
        // Syntax errors stop the parse (one, with its line); type errors are collected: each
        // field serde refuses is reported and taken out, and the rest is read again, so a file
        // with five mistakes takes one round, not five.
        let value: serde_norway::Value = serde_norway::from_str(text).map_err(|e| {
            let line = e
                .location()
                .map(|l| format!("line {}: ", l.line()))
                .unwrap_or_default();
            format!("{line}{e}")
        })?;
        let cfg = read_collecting(value, |path| {
            edgetwin_profile::yaml_line_of(text, path)
                .map(|l| format!("line {l}: "))
                .unwrap_or_default()
        })
        .map_err(|errors| errors.join("\n"))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.health.canary_interval_ms == 0 || self.health.canary_timeout_ms == 0 {
            errors.push(
                "health: canary_interval_ms and canary_timeout_ms must be at least 1".to_string(),
            );
        }
        if self.twin.snapshot_interval_s == 0 {
            errors.push("twin.snapshot_interval_s: must be at least 1".to_string());
        }
        errors.extend(self.history.problems());
        if self.twin.max_batch == 0 {
            errors.push("twin.max_batch: must be at least 1".to_string());
        }
        if self.twin.max_properties_per_patch == 0 {
            errors.push("twin.max_properties_per_patch: must be at least 1".to_string());
        }
        if self.mqtt.max_payload_bytes < 1024 {
            errors.push("mqtt.max_payload_bytes: must be at least 1024".to_string());
        }
        if self
            .containers
            .as_ref()
            .is_some_and(|c| c.reconcile_interval_ms < 100)
        {
            errors.push("containers.reconcile_interval_ms: must be at least 100".to_string());
        }
        // Checked as the front door runs it: with mqtt.listen and listen_v5 among its listeners.
        errors.extend(
            self.front_door()
                .problems()
                .into_iter()
                .map(|p| format!("gate.{p}")),
        );
        errors.extend(self.front_door_clashes());
        if self.http.header_timeout_ms < 100 {
            errors.push("http.header_timeout_ms: must be at least 100".to_string());
        }
        if self.http.max_connections == 0 {
            errors.push("http.max_connections: must be at least 1".to_string());
        }
        if self.devices_scan_interval_ms < 100 {
            errors.push("devices_scan_interval_ms: must be at least 100".to_string());
        }
        if Some(self.mqtt.listen) == self.mqtt.listen_v5 {
            errors.push("mqtt.listen_v5: must differ from mqtt.listen".to_string());
        }
        if let Some(b) = &self.bridge {
            errors.extend(b.check());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The redb file of the twin store.
    pub fn twin_store_path(&self) -> PathBuf {
        self.data_dir.join("twins.redb")
    }

    /// Where the container agent keeps its command id store.
    pub fn containers_dir(&self) -> PathBuf {
        self.data_dir.join("containers")
    }

    /// Where profiles sent by `edgetwin device apply` are kept, so they survive a restart.
    pub fn applied_profiles_dir(&self) -> PathBuf {
        self.data_dir.join("applied-profiles")
    }

    /// Parsed profile documents kept for the next start (see `Registry::with_cache`).
    pub fn profile_cache_path(&self) -> PathBuf {
        self.data_dir.join("profiles.cache")
    }
}

/// Type errors reported from one config file at most (past that, fix some first).
const MAX_CONFIG_ERRORS: usize = 32;

/// Reads a config from its YAML value, collecting every type error instead of the first: each
/// field serde refuses is reported (prefixed by `place(field path)`) and taken out, and the rest
/// is read again.
fn read_collecting(
    mut value: serde_norway::Value,
    place: impl Fn(&str) -> String,
) -> Result<NodeConfig, Vec<String>> {
    let mut errors = Vec::new();
    for _ in 0..MAX_CONFIG_ERRORS {
        match serde_path_to_error::deserialize::<_, NodeConfig>(value.clone()) {
            Ok(cfg) if errors.is_empty() => return Ok(cfg),
            Ok(_) => break,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                errors.push(format!("{}{path}: {inner}", place(&path)));
                if !remove_yaml_path(&mut value, &path, &inner) {
                    break;
                }
            }
        }
    }
    Err(errors)
}

/// Takes the field serde refused out of `v`, so the next read gets past it: the field at
/// `path` (`a.b[2].c`), or, for an unknown field, that key of the mapping at `path`.
/// `false` when nothing could be taken out (the next read would fail the same way).
fn remove_yaml_path(v: &mut serde_norway::Value, path: &str, message: &str) -> bool {
    use edgetwin_profile::FieldSeg;
    use serde_norway::Value;
    let mut segs = yaml_steps(path);
    // serde's "unknown field `x`" names the key; the path may stop at the mapping holding it.
    if let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
    {
        if !matches!(segs.last(), Some(FieldSeg::Key(k)) if k == key) {
            segs.push(FieldSeg::Key(key.to_string()));
        }
    }
    let Some(last) = segs.pop() else {
        return false;
    };
    let Some(at) = yaml_at_mut(v, &segs) else {
        return false;
    };
    match (last, at) {
        (FieldSeg::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        (FieldSeg::Index(i), Value::Sequence(q)) if i < q.len() => {
            q.remove(i);
            true
        }
        _ => false,
    }
}

/// The steps of a serde_path_to_error path, without its `?` (a place it could not name).
fn yaml_steps(path: &str) -> Vec<edgetwin_profile::FieldSeg> {
    edgetwin_profile::field_path(path)
        .into_iter()
        .filter(|s| !matches!(s, edgetwin_profile::FieldSeg::Key(k) if k == "?"))
        .collect()
}

/// The value at `steps` in `v`.
fn yaml_at_mut<'a>(
    mut v: &'a mut serde_norway::Value,
    steps: &[edgetwin_profile::FieldSeg],
) -> Option<&'a mut serde_norway::Value> {
    use edgetwin_profile::FieldSeg;
    use serde_norway::Value;
    for s in steps {
        v = match (s, v) {
            (FieldSeg::Key(k), Value::Mapping(m)) => m.get_mut(k.as_str())?,
            (FieldSeg::Index(i), Value::Sequence(q)) => q.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Merges `over` into `base`: mappings key by key (recursively), anything else replaced.
fn merge_yaml(base: &mut serde_norway::Value, over: serde_norway::Value) {
    use serde_norway::Value;
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_yaml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Whether `v` holds the field `path` (serde_path_to_error's `a.b[2].c`).
fn yaml_has_path(v: &serde_norway::Value, path: &str) -> bool {
    let steps = yaml_steps(path);
    !steps.is_empty() && yaml_at(v, &steps).is_some()
}

/// The value at `steps` in `v` ([`yaml_at_mut`] to change it).
fn yaml_at<'a>(
    mut v: &'a serde_norway::Value,
    steps: &[edgetwin_profile::FieldSeg],
) -> Option<&'a serde_norway::Value> {
    use edgetwin_profile::FieldSeg;
    use serde_norway::Value;
    for s in steps {
        v = match (s, v) {
            (FieldSeg::Key(k), Value::Mapping(m)) => m.get(k.as_str())?,
            (FieldSeg::Index(i), Value::Sequence(q)) => q.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_example_with_every_section_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/config/node-full.yaml"
        );
        let cfg = NodeConfig::load(Path::new(path)).expect("example config is valid");
        assert!(cfg.gate.is_some() && cfg.bridge.is_some() && cfg.containers.is_some());
    }

    #[test]
    fn config_default_opens_nothing_to_other_hosts() {
        let cfg = NodeConfig::parse("").expect("empty file is the default");
        let mut addrs = vec![cfg.mqtt.listen, cfg.http.listen];
        addrs.extend(cfg.mqtt.listen_v5);
        assert_eq!(addrs.len(), 3);
        for a in addrs {
            assert!(a.ip().is_loopback(), "{a} is reachable from other hosts");
        }
        assert!(cfg.gate.is_none() && cfg.bridge.is_none());
    }

    #[test]
    fn config_front_door_serves_the_mqtt_listeners_and_the_gate_listeners() {
        let addrs = |cfg: &NodeConfig| -> Vec<String> {
            cfg.front_door()
                .listeners
                .iter()
                .map(|l| l.listen.to_string())
                .collect()
        };
        // No gate section: the front door serves mqtt.listen and listen_v5 with every default.
        let cfg = NodeConfig::parse("").expect("default");
        assert_eq!(addrs(&cfg), ["127.0.0.1:1883", "127.0.0.1:1884"]);
        // A gate listener on all addresses covers the default loopback one on the same port.
        let cfg = NodeConfig::parse("gate:\n  listeners: [{listen: 0.0.0.0:1883}]\n")
            .expect("gate on 0.0.0.0:1883");
        assert_eq!(addrs(&cfg), ["0.0.0.0:1883", "127.0.0.1:1884"]);
        // An mqtt.listen on all addresses and a gate listener on loopback cannot both bind.
        let err = NodeConfig::parse(
            "mqtt:\n  listen: 0.0.0.0:8883\ngate:\n  listeners: [{listen: 127.0.0.1:8883}]\n",
        )
        .expect_err("port clash");
        assert!(
            err.contains("share a port") && err.contains("0.0.0.0:8883"),
            "{err}"
        );
        // Old configs that kept the broker on other loopback ports behind the gate still load.
        NodeConfig::parse(
            "mqtt:\n  listen: 127.0.0.1:11883\n  listen_v5: 127.0.0.1:11884\ngate:\n  listeners: [{listen: 0.0.0.0:1883}]\n",
        )
        .expect("old gate config");
    }

    #[test]
    fn config_printed_effective_has_every_default_filled_in_and_reads_back_the_same() {
        let cfg =
            NodeConfig::parse("node_id: plant-7\nbridge:\n  url: mqtt://cloud.example:1883\n")
                .expect("valid");
        let shown = cfg.effective();
        let bridge = shown.bridge.as_ref().expect("bridge kept");
        assert_eq!(bridge.client_id.as_deref(), Some("edgetwin-plant-7"));
        assert_eq!(bridge.topic_prefix.as_deref(), Some("edgetwin/plant-7/"));
        let yaml = serde_norway::to_string(&shown).expect("serialises");
        for key in ["client_id", "topic_prefix"] {
            assert!(
                !yaml.contains(&format!("{key}: null")),
                "{key} left unresolved:\n{yaml}"
            );
        }
        assert!(
            yaml.contains("127.0.0.1:1883"),
            "front door not shown:\n{yaml}"
        );
        let again = NodeConfig::parse(&yaml).expect("the printed config is valid");
        assert_eq!(
            serde_norway::to_string(&again.effective()).expect("serialises"),
            yaml,
            "printing the printed config changes it"
        );
    }

    #[test]
    fn config_fragments_merge_over_the_file_in_name_order_and_errors_name_their_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let main = dir.path().join("node.yaml");
        let conf = dir.path().join("conf.d");
        std::fs::create_dir(&conf).expect("mkdir");
        std::fs::write(
            &main,
            "node_id: shipped\nmqtt:\n  listen: 127.0.0.1:1883\nhttp:\n  listen: 127.0.0.1:8080\n",
        )
        .expect("write");
        std::fs::write(
            conf.join("10-site.yaml"),
            "node_id: plant-7\nmqtt:\n  listen: 0.0.0.0:1883\n",
        )
        .expect("write");
        std::fs::write(
            conf.join("20-http.yaml"),
            "http:\n  listen: 127.0.0.1:9090\n",
        )
        .expect("write");
        std::fs::write(conf.join(".hidden.yaml"), "node_id: nope\n").expect("write");
        std::fs::write(conf.join("README"), "not yaml: [").expect("write");
        let cfg = NodeConfig::load_with_fragments(&main, Some(&conf)).expect("valid");
        assert_eq!(cfg.node_id.as_str(), "plant-7");
        assert_eq!(cfg.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert_eq!(cfg.http.listen.to_string(), "127.0.0.1:9090");

        std::fs::write(conf.join("30-bad.yaml"), "twin:\n  max_batch: lots\n").expect("write");
        let e = NodeConfig::load_with_fragments(&main, Some(&conf))
            .expect_err("bad type")
            .to_string();
        assert!(
            e.contains("30-bad.yaml") && e.contains("twin.max_batch"),
            "{e}"
        );

        std::fs::write(conf.join("30-bad.yaml"), "twin: [\n").expect("write");
        std::fs::write(conf.join("40-bad.yaml"), "http: {listen: \n  - [\n").expect("write");
        let e = NodeConfig::load_with_fragments(&main, Some(&conf))
            .expect_err("bad yaml")
            .to_string();
        assert!(
            e.contains("30-bad.yaml") && e.contains("40-bad.yaml"),
            "both files named: {e}"
        );

        // An error inside a list names the fragment that wrote the list.
        std::fs::remove_file(conf.join("30-bad.yaml")).expect("rm");
        std::fs::remove_file(conf.join("40-bad.yaml")).expect("rm");
        std::fs::write(
            conf.join("50-bridge.yaml"),
            "bridge:\n  url: mqtt://c:1883\n  up:\n    - {filter: a/b, retain: maybe}\n",
        )
        .expect("write");
        let e = NodeConfig::load_with_fragments(&main, Some(&conf))
            .expect_err("bad type in a list")
            .to_string();
        assert!(
            e.contains("50-bridge.yaml") && e.contains("bridge.up[0].retain"),
            "{e}"
        );
        std::fs::remove_file(conf.join("50-bridge.yaml")).expect("rm");

        // No folder: the file alone.
        let alone =
            NodeConfig::load_with_fragments(&main, Some(&dir.path().join("none"))).expect("valid");
        assert_eq!(alone.node_id.as_str(), "shipped");
    }

    #[test]
    fn config_empty_text_is_the_embedded_default() {
        let cfg = NodeConfig::parse("").expect("empty config is valid");
        assert_eq!(cfg.mqtt.listen.port(), 1883);
        assert_eq!(cfg.http.listen.port(), 8080);
        assert_eq!(cfg.data_dir, PathBuf::from("./edgetwin-data"));
    }

    #[test]
    fn config_reports_every_type_error_at_once_each_with_its_line() {
        let text = "node_id: ok-node\nmqtt:\n  listen: not-an-address\n  lisen_v5: x\nhttp:\n  listen: 127.0.0.1:8080\n  max_connections: many\ntwin:\n  max_batch: -1\nbridge:\n  url: mqtt://c:1883\n  up:\n    - {filter: a/b, retain: maybe}\n";
        let err = NodeConfig::parse(text).expect_err("five mistakes");
        let lines: Vec<&str> = err.lines().collect();
        for (line, field) in [
            ("line 3", "mqtt.listen"),
            ("line 4", "lisen_v5"),
            ("line 7", "http.max_connections"),
            ("line 9", "twin.max_batch"),
            ("line 13", "bridge.up[0].retain"),
        ] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(line) && l.contains(field)),
                "no {line} {field} in:\n{err}"
            );
        }
        assert_eq!(lines.len(), 5, "{err}");
    }

    #[test]
    fn config_rejects_unknown_field_with_line_and_path() {
        let err = NodeConfig::parse("mqtt:\n  listen: 127.0.0.1:1\n  lisen_v5: x\n")
            .expect_err("unknown field");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("lisen_v5"), "{err}");
    }

    #[test]
    fn config_default_node_id_is_the_host_name_else_the_machine_id() {
        let id = |h, m| default_node_id(h, m).to_string();
        assert_eq!(id(Some("plant-7\n"), None), "plant-7");
        assert_eq!(
            id(
                Some("localhost"),
                Some("4b2c1f0a9e8d7c6b5a4f3e2d1c0b9a88\n")
            ),
            "edgetwin-4b2c1f0a9e8d"
        );
        assert_eq!(
            id(Some("bad/name"), Some("4b2c1f0a9e8d7c6b")),
            "edgetwin-4b2c1f0a9e8d"
        );
        assert_eq!(id(None, None), "edgetwin-node");
    }

    #[test]
    fn config_rejects_invalid_node_id() {
        let err = NodeConfig::parse("node_id: a/b\n").expect_err("bad id");
        assert!(err.contains("node_id"), "{err}");
    }

    #[test]
    fn config_bridge_section_gets_defaults_from_node_id() {
        let cfg = NodeConfig::parse("node_id: n-9\nbridge:\n  url: mqtt://127.0.0.1:1999\n")
            .expect("valid");
        let b = cfg.bridge.expect("bridge section");
        assert_eq!(b.client_id("n-9"), "edgetwin-n-9");
        assert_eq!(b.topic_prefix("n-9"), "edgetwin/n-9/");
        assert!(b.up.iter().any(|r| r.filter == "dt/+/twin" && r.retain));
        assert_eq!(b.down, vec!["dt/+/desired", "node/containers/cmd"]);
        assert_eq!(b.outbox.max_age_s, 86_400);
    }

    #[test]
    fn config_bridge_errors_name_their_fields() {
        let err = NodeConfig::parse(
            "bridge:\n  url: http://x\n  up: [{filter: 'dt/#/x'}]\n  reconnect: {initial_ms: 0, max_ms: 1}\n",
        )
        .expect_err("bad");
        for field in ["bridge.url", "bridge.up[0].filter", "bridge.reconnect"] {
            assert!(err.contains(field), "{field} missing: {err}");
        }
        let err = NodeConfig::parse("bridge:\n  url: mqtt://x\n  outbox: {max_byte: 1}\n")
            .expect_err("unknown field");
        assert!(err.contains("max_byte"), "{err}");
    }

    #[test]
    fn config_reports_every_range_error_at_once() {
        let err = NodeConfig::parse("twin: {max_batch: 0, max_properties_per_patch: 0}\n")
            .expect_err("bad");
        assert!(
            err.contains("max_batch") && err.contains("max_properties_per_patch"),
            "{err}"
        );
    }
}
