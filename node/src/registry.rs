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
use edgetwin_profile::cache::{Fingerprint, ParsedCache};
use edgetwin_profile::{Document, ProfileError, ProfileSet};
use rumqttd::Forward;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::twin_service::{Input, RegistryUpdate};
use edgetwin_broker::{LocalClient, Message};

/// A rejected file: key, the fingerprint of the text that failed, and its errors.
type Rejected = (String, Fingerprint, Vec<String>);

/// One profile file as last accepted. The documents are shared, so copying an entry between
/// the accepted map and a would-be one is cheap. The text itself is not kept here (each
/// document's source keeps one shared copy for error lines); its fingerprint says whether a
/// file still holds it.
#[derive(Clone)]
struct Accepted {
    fingerprint: Fingerprint,
    docs: Arc<[Document]>,
}

/// What is known of a file to merge: its text, or its documents if they are parsed already.
enum Body {
    Text(String),
    Parsed(Arc<[Document]>),
}

/// A profile file to merge: key, fingerprint of its text, and its body.
type Incoming = (String, Fingerprint, Body);

/// Where the parsed-document cache lives, and which build may read it.
struct CacheFile {
    path: PathBuf,
    build: String,
}

/// Profile files currently loaded, by a key that names where they came from.
pub struct Registry {
    devices_dir: PathBuf,
    applied_dir: PathBuf,
    accepted: BTreeMap<String, Accepted>,
    /// Files that failed last time, with the text that failed, so the error is logged once.
    rejected: BTreeMap<String, (Fingerprint, Vec<String>)>,
    /// The set last handed to the twin service, shared with it (one copy of every device).
    current: Arc<ProfileSet>,
    metrics: Arc<Metrics>,
    cache: Option<CacheFile>,
    /// Documents read from the cache at start, taken file by file by the first scan.
    cached: ParsedCache,
    /// The accepted files changed since the cache was last written.
    cache_dirty: bool,
    /// Files parsed from YAML and files taken from the cache, since the start.
    parsed_files: usize,
    cached_files: usize,
}

impl Registry {
    /// An empty registry over the two folders.
    pub fn new(devices_dir: PathBuf, applied_dir: PathBuf, metrics: Arc<Metrics>) -> Registry {
        Registry {
            devices_dir,
            applied_dir,
            accepted: BTreeMap::new(),
            rejected: BTreeMap::new(),
            current: Arc::default(),
            metrics,
            cache: None,
            cached: ParsedCache::default(),
            cache_dirty: false,
            parsed_files: 0,
            cached_files: 0,
        }
    }

    /// Keeps parsed documents in `path` between runs, so a restart with unchanged files does
    /// not parse their YAML again. Reads what an earlier run of this build left there; anything
    /// else there is ignored (and replaced at the next [`Registry::save_cache`]).
    pub fn with_cache(mut self, path: PathBuf) -> Registry {
        let build = build_id();
        match std::fs::read(&path) {
            Ok(bytes) => match ParsedCache::decode(&build, &bytes) {
                Ok(c) => {
                    info!(file = %path.display(), files = c.len(), "profile cache loaded");
                    self.cached = c;
                }
                Err(e) => info!(file = %path.display(), "profile cache not used: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "cannot read the profile cache"),
        }
        // Nothing read (no file, another build): written after the first scan.
        self.cache_dirty = self.cached.is_empty();
        self.cache = Some(CacheFile { path, build });
        self
    }

    /// The cache file and its new bytes if what it should hold changed since it was written:
    /// a file parsed from its text, added, replaced or removed, or cached entries the first
    /// scan did not use.
    fn cache_update(&mut self) -> Option<(PathBuf, Vec<u8>)> {
        let cache = self.cache.as_ref()?;
        if !self.cache_dirty && self.cached.is_empty() {
            return None;
        }
        self.cache_dirty = false;
        self.cached = ParsedCache::default();
        let files = self
            .accepted
            .iter()
            .map(|(k, a)| (k.as_str(), a.fingerprint, &*a.docs));
        match edgetwin_profile::cache::encode(&cache.build, files) {
            Ok(bytes) => Some((cache.path.clone(), bytes)),
            Err(e) => {
                warn!(file = %cache.path.display(), error = %e, "cannot encode the profile cache");
                None
            }
        }
    }

    /// Writes the parsed-document cache if it changed (on a blocking thread: it can be
    /// megabytes, synced). The cache only saves time at the next start, so a failure is
    /// logged, not returned.
    pub async fn save_cache(&mut self) {
        let Some((path, bytes)) = self.cache_update() else {
            return;
        };
        let shown = path.display().to_string();
        match tokio::task::spawn_blocking(move || write_file_atomically(&path, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(file = %shown, error = %format!("{e:#}"), "cannot write the profile cache")
            }
            Err(e) => warn!(file = %shown, error = %e, "profile cache writer failed"),
        }
    }

    /// Rescans both folders; returns the new set if anything changed.
    pub fn scan(&mut self) -> Option<Arc<ProfileSet>> {
        let mut on_disk: BTreeMap<String, String> = BTreeMap::new();
        for dir in [&self.devices_dir, &self.applied_dir] {
            // A folder that is not there (yet) holds no profile.
            for path in yaml_files(dir).unwrap_or_default() {
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
        let on_disk: BTreeMap<String, (Fingerprint, String)> = on_disk
            .into_iter()
            .map(|(k, t)| (k, (Fingerprint::of(&t), t)))
            .collect();
        self.rejected
            .retain(|k, (f, _)| on_disk.get(k).is_some_and(|(d, _)| d == f));
        // A file is unchanged if it holds the text last accepted or last rejected: nothing is
        // merged again until some file changes (a file rejected because of another is retried
        // then, as only a change elsewhere can make it valid).
        let same = |k: &String, f: &Fingerprint| {
            self.accepted.get(k).is_some_and(|a| a.fingerprint == *f)
                || self.rejected.get(k).is_some_and(|(rf, _)| rf == f)
        };
        let unchanged = on_disk.iter().all(|(k, (f, _))| same(k, f))
            && self.accepted.keys().all(|k| on_disk.contains_key(k));
        if unchanged {
            return None;
        }
        let (next, errors, set) = self.merge(
            on_disk
                .into_iter()
                .map(|(k, (f, t))| (k, f, Body::Text(t)))
                .collect(),
        );
        for (file, fingerprint, errs) in errors {
            let seen = self
                .rejected
                .get(&file)
                .is_some_and(|(f, _)| *f == fingerprint);
            if !seen {
                self.metrics.profile_errors.inc();
                for e in &errs {
                    error!(file = %file, "profile rejected: {e}");
                }
                self.rejected.insert(file, (fingerprint, errs));
            }
        }
        self.install(next, set)
    }

    /// Validates files to add or replace (by key) against everything else loaded; returns the
    /// would-be accepted map, the rejected files, and the set of the would-be map if it was
    /// found valid (`None`: not validated as it stands).
    fn merge(
        &mut self,
        files: Vec<Incoming>,
    ) -> (
        BTreeMap<String, Accepted>,
        Vec<Rejected>,
        Option<ProfileSet>,
    ) {
        let mut next: BTreeMap<String, Accepted> = BTreeMap::new();
        let mut errors = Vec::new();
        // Files removed from disk are dropped; files still present are re-parsed if changed.
        for (key, fingerprint, body) in files {
            if let Some(a) = self
                .accepted
                .get(&key)
                .filter(|a| a.fingerprint == fingerprint)
            {
                next.insert(key, a.clone());
                continue;
            }
            let parsed = match body {
                Body::Parsed(docs) => Ok(docs),
                Body::Text(text) => match self.cached.take(&key, &text) {
                    Some(docs) => {
                        self.cached_files += 1;
                        Ok(Arc::from(docs))
                    }
                    None => {
                        self.cache_dirty = true;
                        self.parsed_files += 1;
                        edgetwin_profile::parse_str(&key, &text).map(Arc::from)
                    }
                },
            };
            match parsed {
                Ok(docs) => {
                    next.insert(key, Accepted { fingerprint, docs });
                }
                Err(errs) => {
                    if let Some(old) = self.accepted.get(&key) {
                        next.insert(key.clone(), old.clone());
                    }
                    let errs = errs.iter().map(ToString::to_string).collect();
                    errors.push((key, fingerprint, errs));
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
                        let fingerprint = next
                            .get(&file)
                            .map_or_else(|| Fingerprint::of(""), |a| a.fingerprint);
                        match self.accepted.get(&file) {
                            Some(old) if old.fingerprint != fingerprint => {
                                next.insert(file.clone(), old.clone());
                            }
                            _ => {
                                next.remove(&file);
                            }
                        }
                        errors.push((file, fingerprint, msgs));
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
    ) -> Option<Arc<ProfileSet>> {
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
            .retain(|k, (f, _)| next.get(k).is_none_or(|a| a.fingerprint != *f));
        // Added files were parsed (dirty already) or came from the cache; a removed one is to
        // leave the cache too.
        if self.accepted.keys().any(|k| !next.contains_key(k)) {
            self.cache_dirty = true;
        }
        self.accepted = next;
        self.metrics.profile_files.set(self.accepted.len() as i64);
        if set == *self.current {
            return None;
        }
        info!(
            models = set.models.len(),
            devices = set.devices.len(),
            files = self.accepted.len(),
            parsed = self.parsed_files,
            from_cache = self.cached_files,
            "device registry updated"
        );
        self.current = Arc::new(set);
        Some(self.current.clone())
    }

    /// Applies profile files sent by `edgetwin device apply`: all valid or nothing written.
    pub fn apply(&mut self, req: &ApplyRequest) -> Result<Arc<ProfileSet>, Vec<String>> {
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
        let mut files: BTreeMap<String, (Fingerprint, Arc<[Document]>)> = self
            .accepted
            .iter()
            .map(|(k, a)| (k.clone(), (a.fingerprint, a.docs.clone())))
            .collect();
        for (key, _, text, docs) in &staged {
            files.insert(key.clone(), (Fingerprint::of(text), docs.clone()));
        }
        // The staged documents were parsed from their text: the cache is to learn them.
        self.cache_dirty |= !staged.is_empty();
        let (next, errs, set) = self.merge(
            files
                .into_iter()
                .map(|(k, (f, docs))| (k, f, Body::Parsed(docs)))
                .collect(),
        );
        let staged_keys: HashSet<&String> = staged.iter().map(|(k, _, _, _)| k).collect();
        // An error of an applied file refuses the apply; so does one that the applied files
        // cause in a file already loaded (a model or device defined twice is reported at
        // whichever definition comes second): applying must never unload a working file.
        let would_break = |k: &String| {
            self.accepted
                .get(k)
                .is_some_and(|a| next.get(k).map(|n| n.fingerprint) != Some(a.fingerprint))
        };
        let relevant: Vec<String> = errs
            .into_iter()
            .filter(|(k, _, _)| staged_keys.contains(k) || would_break(k))
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

/// The profile files of a folder as the node loads them: its `.yaml` and `.yml` files (not those
/// of subfolders), sorted. Also what `edgetwin device validate DIR` checks.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    Ok(out)
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
    write_file_atomically(&dir.join(name), text.as_bytes())
}

/// [`edgetwin_redbfile::write_atomically`], creating the folder first.
fn write_file_atomically(dest: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    edgetwin_redbfile::write_atomically(dest, bytes)
        .with_context(|| format!("write {}", dest.display()))
}

/// Which build wrote a profile cache: the release and the program file's size and change
/// time, so a rebuilt or upgraded binary never reads documents an older parser made.
fn build_id() -> String {
    let exe = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| {
            let changed = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}-{changed}", m.len())
        })
        .unwrap_or_else(|_| "unknown".into());
    format!("edgetwin {} ({exe})", env!("CARGO_PKG_VERSION"))
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
        // After the first tick at the latest, so a start is not slowed down by writing it.
        registry.save_cache().await;
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

    fn cached_registry(dir: &Path) -> Registry {
        registry(dir).with_cache(dir.join("profiles.cache"))
    }

    #[tokio::test]
    async fn a_restart_with_unchanged_files_takes_their_documents_from_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), MODEL).unwrap();
        std::fs::write(dir.join("a.yaml"), device("d1")).unwrap();
        std::fs::write(dir.join("b.yaml"), device("d2")).unwrap();
        let mut first = cached_registry(tmp.path());
        let set = first.scan().unwrap();
        assert_eq!((first.parsed_files, first.cached_files), (3, 0));
        first.save_cache().await;
        let cache = tmp.path().join("profiles.cache");
        let written = std::fs::metadata(&cache).unwrap().modified().unwrap();

        // Unchanged files: none parsed, the same set, and the cache is not written again.
        let mut second = cached_registry(tmp.path());
        assert_eq!(second.scan().unwrap(), set);
        assert_eq!((second.parsed_files, second.cached_files), (0, 3));
        second.save_cache().await;
        assert_eq!(
            std::fs::metadata(&cache).unwrap().modified().unwrap(),
            written
        );

        // A file changed while the node was down is parsed from its text, the rest is cached.
        std::fs::write(dir.join("b.yaml"), device("d3")).unwrap();
        let mut third = cached_registry(tmp.path());
        assert_eq!(names(&third.scan().unwrap()), ["d1", "d3"]);
        assert_eq!((third.parsed_files, third.cached_files), (1, 2));
    }

    #[tokio::test]
    async fn cached_documents_still_name_their_line_in_a_later_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), MODEL).unwrap();
        let text = format!("# comment\n{}", device("d1"));
        std::fs::write(dir.join("a.yaml"), &text).unwrap();
        let mut first = cached_registry(tmp.path());
        first.scan().unwrap();
        first.save_cache().await;

        let mut second = cached_registry(tmp.path());
        second.scan().unwrap();
        assert_eq!(second.cached_files, 2);
        // The model goes away: the cached device is now in error, on the line of its model ref.
        std::fs::remove_file(dir.join("m.yaml")).unwrap();
        assert!(second.scan().is_some());
        let errors = second.list("x".into()).errors;
        let line = 1 + text
            .lines()
            .position(|l| l.contains("deviceModelRef"))
            .unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("a.yaml:{line}: "))),
            "{errors:?}"
        );
    }

    #[test]
    fn an_apply_that_clashes_with_a_folder_file_is_refused_and_the_folder_device_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), MODEL).unwrap();
        std::fs::write(dir.join("a.yaml"), device("d1")).unwrap();
        let mut r = registry(tmp.path());
        r.scan().unwrap();
        // The applied file defines model `m` again.
        let req = ApplyRequest {
            id: "1".into(),
            files: vec![ApplyFile {
                name: "other.yaml".into(),
                content: format!("{MODEL}---\n{}", device("d2")),
            }],
        };
        let errors = r.apply(&req).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("already defined") && e.contains("m.yaml")),
            "{errors:?}"
        );
        assert_eq!(names(&r.current), ["d1"]);
        assert!(
            !tmp.path().join("applied/other.yaml").exists(),
            "nothing stored"
        );
        // The next folder scan finds nothing to change: the folder device stays.
        assert!(r.scan().is_none());
        assert_eq!(names(&r.current), ["d1"]);
    }

    #[test]
    fn a_damaged_or_foreign_cache_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("devices");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), format!("{MODEL}---\n{}", device("d1"))).unwrap();
        for junk in [
            &b"\x00\xffnot json"[..],
            br#"{"format":1,"build":"other","files":{}}"#,
        ] {
            std::fs::write(tmp.path().join("profiles.cache"), junk).unwrap();
            let mut r = cached_registry(tmp.path());
            assert_eq!(names(&r.scan().unwrap()), ["d1"]);
            assert_eq!(r.parsed_files, 1);
            assert!(r.cache_dirty, "a cache that was not used is written again");
        }
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
