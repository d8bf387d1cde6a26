//! The device registry: profile YAML from the devices folder (rescanned for changes) and from
//! `edgetwin device apply` (kept under the data dir so applied devices survive a restart).
//!
//! A file with any error is rejected whole and whatever that file defined before stays loaded,
//! so a typo in one file never unregisters devices. Every accepted change is handed to the twin
//! service as a complete [`ProfileSet`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgetwin_contract::{ApplyRequest, ApplyResult, ListRequest, ListResult, ListedDevice, Topic};
use edgetwin_profile::{Document, ProfileError, ProfileSet};
use rumqttd::Forward;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::twin_service::{Input, RegistryUpdate};
use edgetwin_broker::{LocalClient, Message};

/// A rejected file: key, the text that failed, and its errors.
type Rejected = (String, String, Vec<String>);

/// One profile file as last accepted. The documents are shared, so copying an entry between
/// the accepted map and a would-be one is cheap.
#[derive(Clone)]
struct Accepted {
    text: String,
    docs: Arc<[Document]>,
}

/// A file's documents if they are parsed already.
type Parsed = Option<Arc<[Document]>>;

/// A profile file to merge: key, text, and its documents if they are parsed already.
type Incoming = (String, String, Parsed);

/// Profile files currently loaded, by a key that names where they came from.
pub struct Registry {
    devices_dir: PathBuf,
    applied_dir: PathBuf,
    accepted: BTreeMap<String, Accepted>,
    /// Files that failed last time, with the text that failed, so the error is logged once.
    rejected: BTreeMap<String, (String, Vec<String>)>,
    current: ProfileSet,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// An empty registry over the two folders.
    pub fn new(devices_dir: PathBuf, applied_dir: PathBuf, metrics: Arc<Metrics>) -> Registry {
        Registry {
            devices_dir,
            applied_dir,
            accepted: BTreeMap::new(),
            rejected: BTreeMap::new(),
            current: ProfileSet::default(),
            metrics,
        }
    }

    /// Rescans both folders; returns the new set if anything changed.
    pub fn scan(&mut self) -> Option<ProfileSet> {
        let mut on_disk: BTreeMap<String, String> = BTreeMap::new();
        for dir in [&self.devices_dir, &self.applied_dir] {
            for path in yaml_files(dir) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        on_disk.insert(path.display().to_string(), text);
                    }
                    Err(e) => warn!(file = %path.display(), error = %e, "cannot read profile file"),
                }
            }
        }
        // A rejection stands while the file holds the text that failed (a file fixed, reverted
        // or removed since is no longer listed as rejected).
        self.rejected.retain(|k, (t, _)| on_disk.get(k) == Some(t));
        // A file is unchanged if it holds the text last accepted or last rejected: nothing is
        // merged again until some file changes (a file rejected because of another is retried
        // then, as only a change elsewhere can make it valid).
        let same = |k: &String, t: &String| {
            self.accepted.get(k).is_some_and(|a| &a.text == t)
                || self.rejected.get(k).is_some_and(|(rt, _)| rt == t)
        };
        let unchanged = on_disk.iter().all(|(k, t)| same(k, t))
            && self.accepted.keys().all(|k| on_disk.contains_key(k));
        if unchanged {
            return None;
        }
        let (next, errors, set) =
            self.merge(on_disk.into_iter().map(|(k, t)| (k, t, None)).collect());
        for (file, text, errs) in errors {
            let seen = self.rejected.get(&file).is_some_and(|(t, _)| *t == text);
            if !seen {
                self.metrics.profile_errors.inc();
                for e in &errs {
                    error!(file = %file, "profile rejected: {e}");
                }
                self.rejected.insert(file, (text, errs));
            }
        }
        self.install(next, set)
    }

    /// Validates files to add or replace (by key) against everything else loaded; returns the
    /// would-be accepted map, the rejected files, and the set of the would-be map if it was
    /// found valid (`None`: not validated as it stands).
    fn merge(
        &self,
        files: Vec<Incoming>,
    ) -> (
        BTreeMap<String, Accepted>,
        Vec<Rejected>,
        Option<ProfileSet>,
    ) {
        let mut next: BTreeMap<String, Accepted> = BTreeMap::new();
        let mut errors = Vec::new();
        // Files removed from disk are dropped; files still present are re-parsed if changed.
        for (key, text, parsed) in files {
            if let Some(a) = self.accepted.get(&key).filter(|a| a.text == text) {
                next.insert(key, a.clone());
                continue;
            }
            let parsed = match parsed {
                Some(docs) => Ok(docs),
                None => edgetwin_profile::parse_str(&key, &text).map(Arc::from),
            };
            match parsed {
                Ok(docs) => {
                    next.insert(key, Accepted { text, docs });
                }
                Err(errs) => {
                    if let Some(old) = self.accepted.get(&key) {
                        next.insert(key.clone(), old.clone());
                    }
                    errors.push((key, text, errs.iter().map(ToString::to_string).collect()));
                }
            }
        }
        // Cross-file validation; a file at fault falls back to what it was before, until the
        // whole set is consistent (bounded: each round removes at least one file's change).
        let mut set = None;
        for _ in 0..=next.len() {
            let result = {
                let docs: Vec<(&str, &[Document])> =
                    next.iter().map(|(k, a)| (k.as_str(), &*a.docs)).collect();
                edgetwin_profile::validate_refs(&docs, &BTreeMap::new())
            };
            match result {
                Ok(valid) => {
                    set = Some(valid);
                    break;
                }
                Err(errs) => {
                    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for e in &errs {
                        by_file.entry(file_of(e)).or_default().push(e.to_string());
                    }
                    for (file, msgs) in by_file {
                        let text = next.get(&file).map(|a| a.text.clone()).unwrap_or_default();
                        match self.accepted.get(&file) {
                            Some(old) if old.text != text => {
                                next.insert(file.clone(), old.clone());
                            }
                            _ => {
                                next.remove(&file);
                            }
                        }
                        errors.push((file, text, msgs));
                    }
                }
            }
        }
        (next, errors, set)
    }

    /// Makes `next` the accepted map; `set` is its validated set if `merge` found one.
    fn install(
        &mut self,
        next: BTreeMap<String, Accepted>,
        set: Option<ProfileSet>,
    ) -> Option<ProfileSet> {
        let validated = match set {
            Some(set) => Ok(set),
            None => {
                let docs: Vec<(&str, &[Document])> =
                    next.iter().map(|(k, a)| (k.as_str(), &*a.docs)).collect();
                edgetwin_profile::validate_refs(&docs, &BTreeMap::new())
            }
        };
        let set = match validated {
            Ok(set) => set,
            Err(errs) => {
                for e in errs {
                    error!("profile set inconsistent, keeping the previous one: {e}");
                }
                return None;
            }
        };
        self.rejected
            .retain(|k, (t, _)| next.get(k).is_none_or(|a| a.text != *t));
        self.accepted = next;
        self.metrics.profile_files.set(self.accepted.len() as i64);
        if set == self.current {
            return None;
        }
        info!(
            models = set.models.len(),
            devices = set.devices.len(),
            files = self.accepted.len(),
            "device registry updated"
        );
        self.current = set.clone();
        Some(set)
    }

    /// Applies profile files sent by `edgetwin device apply`: all valid or nothing written.
    pub fn apply(&mut self, req: &ApplyRequest) -> Result<ProfileSet, Vec<String>> {
        let mut errors = Vec::new();
        let mut staged: Vec<(String, String, String, Arc<[Document]>)> = Vec::new();
        for f in &req.files {
            let Some(name) = safe_file_name(&f.name) else {
                errors.push(format!("{}: file name must end in .yaml or .yml", f.name));
                continue;
            };
            let key = self.applied_dir.join(&name).display().to_string();
            // Parsed once: merge takes these documents instead of parsing the text again.
            match edgetwin_profile::parse_str(&f.name, &f.content) {
                Ok(docs) => staged.push((key, name, f.content.clone(), Arc::from(docs))),
                Err(errs) => errors.extend(errs.iter().map(ToString::to_string)),
            }
        }
        if !errors.is_empty() {
            self.metrics.profile_errors.inc();
            return Err(errors);
        }
        // Everything accepted, with the staged files added or replacing theirs (a later file of
        // the same name replaces an earlier one).
        let mut files: BTreeMap<String, (String, Parsed)> = self
            .accepted
            .iter()
            .map(|(k, a)| (k.clone(), (a.text.clone(), None)))
            .collect();
        for (key, _, text, docs) in &staged {
            files.insert(key.clone(), (text.clone(), Some(docs.clone())));
        }
        let (next, errs, set) = self.merge(
            files
                .into_iter()
                .map(|(k, (t, docs))| (k, t, docs))
                .collect(),
        );
        let staged_keys: HashSet<&String> = staged.iter().map(|(k, _, _, _)| k).collect();
        let relevant: Vec<String> = errs
            .into_iter()
            .filter(|(k, _, _)| staged_keys.contains(k))
            .flat_map(|(_, _, m)| m)
            .collect();
        if !relevant.is_empty() {
            self.metrics.profile_errors.inc();
            return Err(relevant);
        }
        for (key, name, text, _) in &staged {
            if let Err(e) = write_atomically(&self.applied_dir, name, text) {
                return Err(vec![format!("{key}: cannot store applied profile: {e:#}")]);
            }
        }
        self.install(next, set);
        Ok(self.current.clone())
    }

    /// The registered devices, for `edgetwin device list`.
    pub fn list(&self, id: String) -> ListResult {
        let mut devices = Vec::new();
        for (file, a) in &self.accepted {
            for doc in a.docs.iter() {
                if let Document::Device(d) = doc {
                    if let Some(dev) = self.current.devices.get(d.id()) {
                        let model = dev.model_ref().to_string();
                        let protocol = match self.current.models.get(&model) {
                            Some(m) => m.protocol().clone(),
                            None => continue,
                        };
                        devices.push(ListedDevice {
                            name: d.id().clone(),
                            model,
                            protocol,
                            file: file.clone(),
                        });
                    }
                }
            }
        }
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        let errors = self
            .rejected
            .values()
            .flat_map(|(_, e)| e.clone())
            .collect();
        ListResult {
            id,
            devices,
            errors,
        }
    }
}

fn file_of(e: &ProfileError) -> String {
    e.file.to_string()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    out
}

fn safe_file_name(name: &str) -> Option<String> {
    let base = Path::new(name).file_name()?.to_str()?;
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (clean.ends_with(".yaml") || clean.ends_with(".yml")).then_some(clean)
}

fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(name);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("rename to {}", dest.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What the registry subscribes.
pub const FILTERS: [&str; 2] = ["node/devices/apply", "node/devices/list"];

/// Runs the registry: periodic rescans (and one at once whenever `rescan` is notified, which
/// SIGHUP does), apply and list requests from the broker.
pub async fn run(
    mut registry: Registry,
    mut link: LocalClient,
    mut requests: mpsc::Receiver<Forward>,
    updates: mpsc::Sender<Input>,
    scan_interval: Duration,
    rescan: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(scan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let scan = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => true,
            _ = rescan.notified() => {
                info!("rescanning profiles (reload requested)");
                true
            }
            Some(f) = requests.recv() => {
                let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                match Topic::parse(&topic) {
                    Some(Topic::DevicesApply) => {
                        let result = handle_apply(&mut registry, &f.publish.payload, &updates).await;
                        link.publish(Message::json(Topic::DevicesApplyResult.to_topic_string(), &result)).await;
                    }
                    Some(Topic::DevicesList) => {
                        let id = serde_json::from_slice::<ListRequest>(&f.publish.payload)
                            .map(|r| r.id)
                            .unwrap_or_default();
                        let result = registry.list(id);
                        link.publish(Message::json(Topic::DevicesListResult.to_topic_string(), &result)).await;
                    }
                    _ => {}
                }
                false
            }
        };
        if scan {
            if let Some(set) = registry.scan() {
                if updates
                    .send(Input::Registry(RegistryUpdate { set, done: None }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

async fn handle_apply(
    registry: &mut Registry,
    payload: &[u8],
    updates: &mpsc::Sender<Input>,
) -> ApplyResult {
    let req: ApplyRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return ApplyResult {
                id: String::new(),
                ok: false,
                errors: vec![format!("node/devices/apply: malformed request: {e}")],
                devices: vec![],
            }
        }
    };
    let names: Vec<String> = req.files.iter().map(|f| f.name.clone()).collect();
    match registry.apply(&req) {
        Err(errors) => ApplyResult {
            id: req.id,
            ok: false,
            errors,
            devices: vec![],
        },
        Ok(set) => {
            let (tx, rx) = oneshot::channel();
            let devices: Vec<String> = set.devices.keys().map(ToString::to_string).collect();
            if updates
                .send(Input::Registry(RegistryUpdate {
                    set,
                    done: Some(tx),
                }))
                .await
                .is_err()
            {
                return ApplyResult {
                    id: req.id,
                    ok: false,
                    errors: vec!["node is shutting down".into()],
                    devices: vec![],
                };
            }
            match rx.await {
                Ok(Ok(())) => {
                    info!(files = ?names, "profiles applied");
                    ApplyResult {
                        id: req.id,
                        ok: true,
                        errors: vec![],
                        devices,
                    }
                }
                Ok(Err(e)) => ApplyResult {
                    id: req.id,
                    ok: false,
                    errors: vec![format!(
                        "stored profile but twins could not be created: {e:#}"
                    )],
                    devices: vec![],
                },
                Err(_) => ApplyResult {
                    id: req.id,
                    ok: false,
                    errors: vec!["node is shutting down".into()],
                    devices: vec![],
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use edgetwin_contract::ApplyFile;

    use super::*;

    const MODEL: &str = "apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: m}
spec:
  protocol: modbus
  properties: [{name: v, type: float, accessMode: ReadOnly}]
";

    fn device(name: &str) -> String {
        format!(
            "apiVersion: edgetwin/v1
kind: Device
metadata: {{name: {name}}}
spec:
  deviceModelRef: m
  protocol:
    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: 502, slaveID: 1}}
  properties:
    - name: v
      visitors:
        modbus: {{register: HoldingRegister, offset: 0, limit: 2, dataType: float32}}
"
        )
    }

    fn registry(dir: &Path) -> Registry {
        Registry::new(
            dir.join("devices"),
            dir.join("applied"),
            Arc::new(Metrics::new()),
        )
    }

    fn names(set: &ProfileSet) -> Vec<String> {
        set.devices.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn a_rejected_file_stays_rejected_until_it_changes_and_keeps_what_it_had() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), format!("{MODEL}---\n{}", device("d1"))).unwrap();
        let mut r = registry(tmp.path());
        assert_eq!(names(&r.scan().unwrap()), ["d1"]);
        assert!(r.scan().is_none());

        std::fs::write(
            dir.join("a.yaml"),
            format!("{MODEL}---\n{}a: b: c\n", device("d2")),
        )
        .unwrap();
        assert!(r.scan().is_none(), "the bad version changes nothing");
        let listed = r.list("x".into());
        assert_eq!(listed.devices.len(), 1);
        assert_eq!(listed.errors.len(), 1);
        assert!(
            listed.errors[0].contains("a.yaml:19: "),
            "{:?}",
            listed.errors
        );
        assert!(r.scan().is_none(), "still the same bad version");
        assert_eq!(r.list("x".into()).errors, listed.errors);

        std::fs::write(dir.join("a.yaml"), format!("{MODEL}---\n{}", device("d2"))).unwrap();
        assert_eq!(names(&r.scan().unwrap()), ["d2"]);
        assert!(r.list("x".into()).errors.is_empty());
    }

    #[test]
    fn a_file_rejected_because_of_another_is_retried_when_that_one_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.yaml"), device("d1")).unwrap();
        let mut r = registry(tmp.path());
        assert!(r.scan().is_none());
        let errors = r.list("x".into()).errors;
        assert!(
            errors.iter().any(|e| e.contains("unknown device model")),
            "{errors:?}"
        );
        assert!(r.scan().is_none());

        std::fs::write(dir.join("a.yaml"), MODEL).unwrap();
        assert_eq!(names(&r.scan().unwrap()), ["d1"]);
        assert!(r.list("x".into()).errors.is_empty());
    }

    #[test]
    fn apply_stores_valid_files_and_rejects_bad_ones_by_their_given_name() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = registry(tmp.path());
        let request = |name: &str, content: String| ApplyRequest {
            id: "1".into(),
            files: vec![ApplyFile {
                name: name.into(),
                content,
            }],
        };
        let bad = format!("{MODEL}---\n{}", device("d1").replace("502", "abc"));
        let errors = r.apply(&request("my/p.yaml", bad)).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("my/p.yaml:14: "), "{errors:?}");
        assert!(!tmp.path().join("applied/p.yaml").exists());

        let good = format!("{MODEL}---\n{}", device("d1"));
        let set = r.apply(&request("my/p.yaml", good.clone())).unwrap();
        assert_eq!(names(&set), ["d1"]);
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("applied/p.yaml")).unwrap(),
            good
        );
        assert!(r.scan().is_none(), "the stored file is what was applied");

        let other = request("q.yaml", device("d2"));
        assert_eq!(names(&r.apply(&other).unwrap()), ["d1", "d2"]);
        let listed = r.list("x".into());
        assert_eq!(listed.devices.len(), 2);
        assert!(listed.devices[1].file.ends_with("q.yaml"));
    }
}
