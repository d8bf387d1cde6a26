//! The validated container spec the agent hands to a runtime, shared by commands (`run`) and
//! the declarative desired set, and the labels the agent puts on containers it creates.
//!
//! Text formats (the same in commands and in `desired.containers`):
//! - ports: `"[ip:]host_port:container_port[/tcp|udp|sctp]"`, e.g. `"8080:80/tcp"`,
//!   `"127.0.0.1:8080:80"` (protocol defaults to tcp);
//! - mounts: `"source:/container/path[:ro|rw]"` where `source` is an absolute host path or a
//!   named volume (`[A-Za-z0-9][A-Za-z0-9_.-]*`); the default mode is `rw`;
//! - container names: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}` (Docker's rule, with the node id length
//!   bound of docs/contract.md §2).
//!
//! Every validator returns all problems it finds, each as `"path: message"`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Label on every container the reconciler owns; only such containers are ever changed or
/// removed by [`crate::reconcile`].
pub const LABEL_MANAGED: &str = "edgetwin.managed";
/// Label holding [`ContainerSpec::fingerprint`] of the spec a container was created from.
pub const LABEL_SPEC_HASH: &str = "edgetwin.spec-hash";
/// Label naming the node whose agent declared a container. Two nodes on one runtime (a shared
/// Docker host) each own only their own: a managed container of another node is left alone as if
/// unmanaged. A managed container without it (created before the label existed) is taken as
/// this node's.
pub const LABEL_NODE: &str = "edgetwin.node";
/// Label holding the id of the command that created a container (commands' `run`).
pub const LABEL_COMMAND_ID: &str = "edgetwin.command-id";

/// Restart policy of a container (Docker's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub enum RestartPolicy {
    /// Never restart (`"no"`, the default).
    #[default]
    No,
    /// Always restart (`"always"`).
    Always,
    /// Restart when the exit code is not 0 (`"on-failure"`).
    OnFailure,
    /// Always restart unless stopped by a user (`"unless-stopped"`).
    UnlessStopped,
}

impl RestartPolicy {
    /// Parses Docker's spelling: `no`, `always`, `on-failure`, `unless-stopped`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "no" => Some(Self::No),
            "always" => Some(Self::Always),
            "on-failure" => Some(Self::OnFailure),
            "unless-stopped" => Some(Self::UnlessStopped),
            _ => None,
        }
    }

    /// Docker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::UnlessStopped => "unless-stopped",
        }
    }
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PortProtocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl PortProtocol {
    /// Lower-case name as Docker spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// A published port: `[host_ip:]host_port:container_port/protocol`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortMapping {
    /// Host address to bind (all addresses when absent).
    pub host_ip: Option<String>,
    /// Host port.
    pub host_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// Protocol.
    pub protocol: PortProtocol,
}

impl PortMapping {
    /// Parses `"[ip:]host:container[/proto]"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (a, p),
            None => (s, "tcp"),
        };
        let protocol = match proto {
            "tcp" => PortProtocol::Tcp,
            "udp" => PortProtocol::Udp,
            "sctp" => PortProtocol::Sctp,
            other => return Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
        };
        let parts: Vec<&str> = addr.rsplitn(3, ':').collect();
        let port = |p: &str, what: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{what} port {p:?} is not a number in 1..=65535")),
            }
        };
        match parts.as_slice() {
            [c, h] => Ok(Self {
                host_ip: None,
                host_port: port(h, "host")?,
                container_port: port(c, "container")?,
                protocol,
            }),
            [c, h, ip] if !ip.is_empty() => Ok(Self {
                host_ip: Some((*ip).to_string()),
                host_port: port(h, "host")?,
                container_port: port(c, "container")?,
                protocol,
            }),
            _ => Err(format!(
                "{s:?} is not \"[ip:]host_port:container_port[/tcp|udp|sctp]\""
            )),
        }
    }

    /// Docker's key for the container side: `"80/tcp"`.
    pub fn container_key(&self) -> String {
        format!("{}/{}", self.container_port, self.protocol.as_str())
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = &self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.container_port,
            self.protocol.as_str()
        )
    }
}

/// A bind mount or named volume: `source:/target[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Mount {
    /// Absolute host path or volume name.
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Mount {
    /// Parses `"source:/target[:ro|rw]"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            [_, _, mode] => return Err(format!("mount mode {mode:?} is not \"ro\" or \"rw\"")),
            _ => return Err(format!("{s:?} is not \"source:/container/path[:ro|rw]\"")),
        };
        let volume_name = source
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !(source.starts_with('/') || volume_name) {
            return Err(format!(
                "mount source {source:?} is neither an absolute path nor a volume name"
            ));
        }
        if !target.starts_with('/') {
            return Err(format!("mount target {target:?} is not an absolute path"));
        }
        Ok(Self {
            source: source.to_string(),
            target: target.to_string(),
            read_only,
        })
    }
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.read_only { "ro" } else { "rw" };
        write!(f, "{}:{}:{mode}", self.source, self.target)
    }
}

/// Resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in CPUs (e.g. `0.5`).
    pub cpus: Option<f64>,
}

/// Everything needed to create a container. Built only through validation ([`crate::wire`]
/// commands or [`crate::reconcile::parse_desired`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference, as present on the node (the agent never pulls).
    pub image: String,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Command and arguments (the image's default command when empty).
    pub args: Vec<String>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Resource limits.
    pub limits: Limits,
    /// Labels put on the container (the agent's own `edgetwin.*` labels included).
    pub labels: BTreeMap<String, String>,
}

/// The parts of a spec that, when changed, require recreating the container.
#[derive(Serialize)]
struct Fingerprinted<'a> {
    image: &'a str,
    env: &'a BTreeMap<String, String>,
    args: &'a [String],
    ports: Vec<String>,
    mounts: Vec<String>,
    restart: &'static str,
    memory_bytes: Option<u64>,
    cpus: Option<f64>,
}

impl ContainerSpec {
    /// A spec with only a name and an image.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            env: BTreeMap::new(),
            args: Vec::new(),
            ports: Vec::new(),
            mounts: Vec::new(),
            restart: RestartPolicy::No,
            limits: Limits::default(),
            labels: BTreeMap::new(),
        }
    }

    /// A stable hash (FNV-1a 64, hex) of image, env, args, ports, mounts, restart and limits
    /// (not name or labels). Stored in [`LABEL_SPEC_HASH`] so the reconciler can tell a changed
    /// spec without comparing the runtime's expanded configuration (which merges image env).
    pub fn fingerprint(&self) -> String {
        let f = Fingerprinted {
            image: &self.image,
            env: &self.env,
            args: &self.args,
            ports: self.ports.iter().map(ToString::to_string).collect(),
            mounts: self.mounts.iter().map(ToString::to_string).collect(),
            restart: self.restart.as_str(),
            memory_bytes: self.limits.memory_bytes,
            cpus: self.limits.cpus,
        };
        let text = serde_json::to_string(&f).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.as_bytes() {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Whether `name` is a valid container name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks a container name; the error is `"{path}: message"`.
pub fn check_name(path: &str, name: &str, errors: &mut Vec<String>) {
    if !valid_name(name) {
        errors.push(format!(
            "{path}: {name:?} is not a valid container name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}})"
        ));
    }
}

/// Checks an environment variable name (non-empty, no `=`, no NUL).
pub fn check_env_key(path: &str, key: &str, errors: &mut Vec<String>) {
    if key.is_empty() || key.contains('=') || key.contains('\0') {
        errors.push(format!(
            "{path}: {key:?} is not a valid environment variable name"
        ));
    }
}

/// Parses port strings; errors carry `"{path}[i]"`.
pub fn parse_ports(path: &str, ports: &[String], errors: &mut Vec<String>) -> Vec<PortMapping> {
    ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match PortMapping::parse(p) {
            Ok(m) => Some(m),
            Err(e) => {
                errors.push(format!("{path}[{i}]: {e}"));
                None
            }
        })
        .collect()
}

/// Parses mount strings; errors carry `"{path}[i]"`.
pub fn parse_mounts(path: &str, mounts: &[String], errors: &mut Vec<String>) -> Vec<Mount> {
    mounts
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match Mount::parse(m) {
            Ok(m) => Some(m),
            Err(e) => {
                errors.push(format!("{path}[{i}]: {e}"));
                None
            }
        })
        .collect()
}

/// Checks limits (positive memory, positive finite cpus).
pub fn check_limits(path: &str, limits: &Limits, errors: &mut Vec<String>) {
    if limits.memory_bytes == Some(0) {
        errors.push(format!("{path}.memory_bytes: must be greater than 0"));
    }
    if let Some(c) = limits.cpus {
        if !(c.is_finite() && c > 0.0) {
            errors.push(format!("{path}.cpus: must be a number greater than 0"));
        }
    }
    if limits
        .memory_bytes
        .is_some_and(|m| i64::try_from(m).is_err())
    {
        errors.push(format!("{path}.memory_bytes: too large"));
    }
}

/// The unvalidated parts of a spec as read from JSON (a command or a desired entry).
#[derive(Debug, Clone, Default)]
pub(crate) struct RawSpec {
    pub image: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub args: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub mounts: Option<Vec<String>>,
    pub restart: Option<String>,
    pub limits: Option<crate::wire::WireLimits>,
}

/// Validates a raw spec; errors are `"{prefix}{field}: message"` (`prefix` ends with `.` or is
/// empty).
pub(crate) fn build_spec(
    prefix: &str,
    name: &str,
    raw: RawSpec,
    errors: &mut Vec<String>,
) -> ContainerSpec {
    let image_given = raw.image.is_some();
    let mut spec = ContainerSpec::new(name, raw.image.unwrap_or_default());
    // A missing image is the caller's error to report (it knows the field is required).
    if image_given && (spec.image.is_empty() || spec.image.chars().any(char::is_whitespace)) {
        errors.push(format!(
            "{prefix}image: {:?} is not an image reference",
            spec.image
        ));
    }
    spec.env = raw.env.unwrap_or_default();
    for k in spec.env.keys() {
        check_env_key(&format!("{prefix}env.{k}"), k, errors);
    }
    spec.args = raw.args.unwrap_or_default();
    spec.ports = parse_ports(
        &format!("{prefix}ports"),
        &raw.ports.unwrap_or_default(),
        errors,
    );
    spec.mounts = parse_mounts(
        &format!("{prefix}mounts"),
        &raw.mounts.unwrap_or_default(),
        errors,
    );
    if let Some(r) = raw.restart {
        match RestartPolicy::parse(&r) {
            Some(p) => spec.restart = p,
            None => errors.push(format!(
                "{prefix}restart: {r:?} is not one of no, always, on-failure, unless-stopped"
            )),
        }
    }
    if let Some(l) = raw.limits {
        spec.limits = Limits {
            memory_bytes: l.memory_bytes,
            cpus: l.cpus,
        };
        check_limits(&format!("{prefix}limits"), &spec.limits, errors);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_parses_host_container_and_protocol() {
        let p = PortMapping::parse("8080:80/udp").unwrap();
        assert_eq!((p.host_port, p.container_port), (8080, 80));
        assert_eq!(p.protocol, PortProtocol::Udp);
        assert_eq!(p.host_ip, None);
        let p = PortMapping::parse("127.0.0.1:8080:80").unwrap();
        assert_eq!(p.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(p.to_string(), "127.0.0.1:8080:80/tcp");
        assert_eq!(p.container_key(), "80/tcp");
    }

    #[test]
    fn port_rejects_bad_numbers_protocols_and_shapes() {
        assert!(PortMapping::parse("80").is_err());
        assert!(PortMapping::parse("0:80").is_err());
        assert!(PortMapping::parse("70000:80").is_err());
        assert!(PortMapping::parse("8080:80/icmp")
            .unwrap_err()
            .contains("icmp"));
    }

    #[test]
    fn mount_parses_paths_volumes_and_modes() {
        let m = Mount::parse("/data:/var/lib/x:ro").unwrap();
        assert!(m.read_only);
        assert_eq!(m.to_string(), "/data:/var/lib/x:ro");
        assert!(!Mount::parse("vol1:/x").unwrap().read_only);
        assert!(Mount::parse("rel/path:/x").is_err());
        assert!(Mount::parse("/a:b").is_err());
        assert!(Mount::parse("/a:/b:rx").is_err());
    }

    #[test]
    fn names_follow_dockers_rule() {
        assert!(valid_name("web-1.a_b"));
        assert!(!valid_name("-web"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(129)));
    }

    #[test]
    fn fingerprint_changes_with_image_env_args_ports_but_not_labels() {
        let base = ContainerSpec::new("a", "img:1");
        let fp = base.fingerprint();
        let mut labelled = base.clone();
        labelled.labels.insert("x".into(), "y".into());
        assert_eq!(labelled.fingerprint(), fp);
        let mut s = base.clone();
        s.image = "img:2".into();
        assert_ne!(s.fingerprint(), fp);
        let mut s = base.clone();
        s.env.insert("K".into(), "V".into());
        assert_ne!(s.fingerprint(), fp);
        let mut s = base.clone();
        s.args.push("x".into());
        assert_ne!(s.fingerprint(), fp);
        let mut s = base.clone();
        s.ports.push(PortMapping::parse("1:2").unwrap());
        assert_ne!(s.fingerprint(), fp);
        assert_eq!(base.fingerprint(), fp, "stable across calls");
    }
}
