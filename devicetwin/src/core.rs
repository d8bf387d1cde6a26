//! The pure device-twin state machine: merge patches, per-property last-writer-wins registers,
//! versions, delta and model checks. No I/O and no clock reads: the caller passes `now_ms`.
//!
//! # Rules (docs/contract.md §3)
//!
//! - **Whole-patch validation first.** Every property of a patch is checked against the model
//!   before any property is applied, so a rejected patch changes nothing (not even `lastSeen`).
//! - **Desired checks**, per property in name order, first failure wins: the property exists
//!   ([`ErrorCode::UnknownProperty`]), is writable ([`ErrorCode::ReadOnly`]), `null` is always
//!   allowed (removal), the value has the model's type ([`ErrorCode::WrongType`]), a number lies in
//!   `minimum..=maximum` ([`ErrorCode::OutOfRange`]). Then `$version`, when present, must equal
//!   [`Twin::desired_version`] ([`ErrorCode::VersionConflict`]). Property errors are reported before
//!   a version conflict because retrying after a re-read would not fix them.
//! - **Reported checks**: the property exists and the value has its type (`null` removes). A
//!   `$version` in a reported patch is [`ErrorCode::InvalidPatch`].
//! - **Last-writer-wins per property.** The writer timestamp is the patch's `ts` if given, else
//!   `now_ms`. Each property (desired and reported separately) is a register ordered by the key
//!   `(ts, source id, canonical JSON of the value or "null" for a tombstone)`. A write whose key is
//!   not larger than the current entry's key lost and is ignored (it is not an error). An absent
//!   property behaves as a tombstone with the smallest key, so a removal that arrives before the
//!   write it supersedes still wins.
//! - **Equal value is not a change.** A winning write (larger key) whose value equals the current
//!   value (tombstone == tombstone == absent) does not bump the version and is not listed in
//!   [`Applied::changed`]; it still advances the entry's `ts`/`source` silently and is listed in
//!   [`Applied::touched`]. Without that silent advance, the final metadata would depend on the order
//!   of arrival; with it, the state of each property is the write with the largest key among all
//!   writes ever accepted, so **any order and duplication of the same patches converge** to the same
//!   values and the same `(ts, source)` metadata. (Per-property `version`s are local counters and
//!   do depend on order.) A silently advanced entry keeps its `version`. Persisting touched-only
//!   twins is the caller's choice: the values are unchanged, only tie-breaking metadata moved.
//! - **One version per patch.** An accepted patch that changes at least one value bumps
//!   [`Twin::version`] by exactly one, and every property it changed gets that new version. A
//!   desired change also sets [`Twin::desired_version`] to it. So `version` strictly increases on
//!   every accepted change, and a client holding version `v` knows it has seen every change `<= v`.
//! - **Readings set `lastSeen`.** Every accepted reported patch with a value (changing or not)
//!   sets `status.lastSeen` to the reading's time: its `ts`, or `now_ms` when it has none, never
//!   later than `now_ms` and never backwards; it reports [`Applied::refreshed`]. A reading of a
//!   `stale` device makes it `online` again. Desired patches and status messages never touch
//!   `lastSeen`: it says when the device was last *read*.
//! - **Stale**: [`Twin::mark_stale`] turns an `online` device `stale` when no reading came
//!   within the bound its caller derives from the profile; only the node sets it.
//! - **Status**: [`Twin::apply_status`] records the mapper's state, ts and message; a status
//!   whose `ts` is older than the current one is ignored. Status does not bump the version (it
//!   is not a property change).
//! - **Lasting property errors** (`status.errors`): a reported patch's `$errors` sets (or, with
//!   `null`, clears) a property's error; a repeat of the same code and operation keeps its
//!   `since`. A reading of the property clears its read error; a write error is cleared when the
//!   property reads back the desired value, or when desired changes (so the new value is tried).
//!   While a write error names the current desired value, the delta leaves that property out:
//!   the device is not written again until someone changes desired.
//! - **Per-entry properties** ([`PropertySpec::per_entry`], e.g. the node twin's `containers`):
//!   on the desired side each key of the object is its own last-writer-wins register, stored as
//!   `{property}.{key}` (property names never hold a `.`), so a patch `{"p": {"a": 1, "b": null}}`
//!   sets `a` and removes `b` and leaves every other entry alone, and two writers editing
//!   different entries both win. `{"p": null}` removes every entry. The document shows the
//!   entries as one object (`{}` once every entry is removed: an empty declared set, unlike a
//!   property never written), with metadata per entry (`p.a`) and for the whole (`p`: the
//!   newest entry's `ts` and `source`, the largest `version`). A value stored whole before the
//!   property became per-entry is split into entries, with its metadata, at the next patch.
//! - **Values are canonical.** Object values are stored with their keys sorted (recursively), so
//!   two patches with the same object in different key order store the same bytes.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use edgetwin_contract::{
    AccessMode, DeviceId, DeviceState, DeviceStatusMsg, ErrorCode, PropertyError,
    PropertyErrorReport, PropertyMeta, PropertyName, PropertyOp, PropertyType, Source, TwinDoc,
    TwinMetadata, TwinStatus, ERRORS_KEY, ID_KEY, TS_KEY, VERSION_KEY,
};

/// The longest `$id` a patch may carry (it is echoed in the answer).
pub const MAX_ID_LEN: usize = 256;
use serde_json::{Map, Value};

/// Value comparison lives in the contract: mappers compare read-backs the same way.
pub use edgetwin_contract::value::{canonical_json, same_value};

#[cfg(test)]
mod tests;

/// What the model says about one property.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertySpec {
    /// The value type.
    pub ty: PropertyType,
    /// Whether desired writes are allowed.
    pub access: AccessMode,
    /// Inclusive lower bound for numbers.
    pub minimum: Option<f64>,
    /// Inclusive upper bound for numbers.
    pub maximum: Option<f64>,
    /// An `object` property whose desired entries are separate registers (see the module doc's
    /// *Per-entry properties*); otherwise a value is replaced whole.
    pub per_entry: bool,
}

/// A device model as the twin needs it: its name and its properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The model name (`metadata.name` of the DeviceModel).
    pub name: String,
    /// Properties by name.
    pub properties: BTreeMap<String, PropertySpec>,
}

/// Why a patch was rejected; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason naming the property at fault, if any.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }

    fn property(code: ErrorCode, name: &str, detail: impl fmt::Display) -> Rejection {
        Rejection::new(code, format!("property {name:?}: {detail}"))
    }
}

/// A parsed merge patch (RFC 7386 at top level; object-typed values are replaced whole, not merged
/// key by key).
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// `$version`: the desired version the writer expects (desired patches only).
    pub expected_version: Option<u64>,
    /// `ts`: the writer's timestamp (ms); the receive time is used when absent.
    pub ts: Option<i64>,
    /// `$id`: the writer's request id, answered on `dt/{device}/desired/result`.
    pub id: Option<String>,
    /// Properties to set (`Some`) or remove (`None`, JSON `null`). Values are canonical.
    pub props: BTreeMap<PropertyName, Option<Value>>,
    /// `$errors` (reported patches only): per-property errors to set (`Some`) or clear (`None`).
    pub errors: BTreeMap<PropertyName, Option<PropertyErrorReport>>,
}

impl Patch {
    /// Parses a patch payload. Malformed JSON or a non-object is [`ErrorCode::MalformedJson`]; a
    /// `$version` that is not a u64, a `ts` that is not an i64, an `$errors` that is not an object
    /// of error reports, an invalid property name, neither properties nor errors, or more than
    /// `max_props` of either is [`ErrorCode::InvalidPatch`].
    pub fn parse(payload: &[u8], max_props: usize) -> Result<Patch, Rejection> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| Rejection::new(ErrorCode::MalformedJson, format!("not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Rejection::new(
                ErrorCode::MalformedJson,
                format!("a patch must be a JSON object, got {}", kind_of(&value)),
            ));
        };
        let mut patch = Patch {
            expected_version: None,
            ts: None,
            id: None,
            props: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        for (key, v) in map {
            if key == VERSION_KEY {
                patch.expected_version = Some(v.as_u64().ok_or_else(|| {
                    Rejection::new(
                        ErrorCode::InvalidPatch,
                        format!("{VERSION_KEY:?} must be a non-negative integer, got {v}"),
                    )
                })?);
            } else if key == TS_KEY {
                patch.ts = Some(v.as_i64().ok_or_else(|| {
                    Rejection::new(
                        ErrorCode::InvalidPatch,
                        format!("{TS_KEY:?} must be an integer of milliseconds, got {v}"),
                    )
                })?);
            } else if key == ID_KEY {
                match v {
                    Value::String(id) if id.len() <= MAX_ID_LEN => patch.id = Some(id),
                    other => {
                        return Err(Rejection::new(
                            ErrorCode::InvalidPatch,
                            format!("{ID_KEY:?} must be a string of at most {MAX_ID_LEN} bytes, got {other}"),
                        ))
                    }
                }
            } else if key == ERRORS_KEY {
                patch.errors = parse_errors(v)?;
            } else {
                let name = PropertyName::new(key.as_str())
                    .map_err(|e| Rejection::new(ErrorCode::InvalidPatch, e.to_string()))?;
                let v = match v {
                    Value::Null => None,
                    other => Some(canonicalize(other)),
                };
                patch.props.insert(name, v);
            }
        }
        if patch.props.is_empty() && patch.errors.is_empty() {
            return Err(Rejection::new(
                ErrorCode::InvalidPatch,
                "the patch names no property",
            ));
        }
        let named = patch.props.len().max(patch.errors.len());
        if named > max_props {
            return Err(Rejection::new(
                ErrorCode::InvalidPatch,
                format!("the patch names {named} properties, at most {max_props} are allowed"),
            ));
        }
        Ok(patch)
    }
}

fn parse_errors(
    v: Value,
) -> Result<BTreeMap<PropertyName, Option<PropertyErrorReport>>, Rejection> {
    let Value::Object(map) = v else {
        return Err(Rejection::new(
            ErrorCode::InvalidPatch,
            format!(
                "{ERRORS_KEY:?} must be an object of property errors, got {}",
                kind_of(&v)
            ),
        ));
    };
    let mut out = BTreeMap::new();
    for (key, v) in map {
        let name = PropertyName::new(key.as_str())
            .map_err(|e| Rejection::new(ErrorCode::InvalidPatch, format!("{ERRORS_KEY}: {e}")))?;
        let report = match v {
            Value::Null => None,
            other => Some(serde_json::from_value::<PropertyErrorReport>(other).map_err(|e| {
                Rejection::new(
                    ErrorCode::InvalidPatch,
                    format!(
                        "{ERRORS_KEY} of {key:?} must be {{\"code\", \"message\", \"op\", \"value\"?}}: {e}"
                    ),
                )
            })?),
        };
        out.insert(name, report);
    }
    Ok(out)
}

/// One property register: its value (or tombstone) and the metadata of the write that set it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The value; `None` is a tombstone (removed, kept for last-writer-wins).
    pub value: Option<Value>,
    /// The twin version at which the value last changed.
    pub version: u64,
    /// The winning writer's timestamp (ms).
    pub ts: i64,
    /// The winning writer.
    pub source: Source,
}

impl Entry {
    /// The last-writer-wins key of this entry: `(ts, source id, canonical value)`.
    pub fn lww_key(&self) -> (i64, String, String) {
        (
            self.ts,
            self.source.id(),
            canonical_opt(self.value.as_ref()),
        )
    }
}

/// What an accepted patch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Properties whose value changed (they share the twin's new version).
    pub changed: Vec<String>,
    /// Whether `status.lastSeen` was refreshed (every accepted reported patch with a value).
    pub refreshed: bool,
    /// Whether the status (state, message or property errors) changed: the document must be
    /// stored and published again even if no value changed.
    pub status_changed: bool,
    /// Properties whose value stayed the same but whose `ts`/`source` advanced (a newer write of
    /// the same value); no version bump, no republish needed.
    pub touched: Vec<String>,
}

impl Applied {
    /// Whether any value changed (the twin version was bumped).
    pub fn is_change(&self) -> bool {
        !self.changed.is_empty()
    }
}

/// The twin of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// The device.
    pub device: DeviceId,
    /// Its model name.
    pub model: String,
    /// Per-device version, bumped by one for every accepted patch that changes a value.
    pub version: u64,
    /// Version of the last accepted desired change (what `$version` is checked against).
    pub desired_version: u64,
    /// Desired properties, tombstones included.
    pub desired: BTreeMap<String, Entry>,
    /// Reported properties, tombstones included.
    pub reported: BTreeMap<String, Entry>,
    /// Connection state and last-seen.
    pub status: TwinStatus,
}

/// Which half of a twin a write goes to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// Desired properties: written by local clients and the cloud.
    Desired,
    /// Reported properties: written by the device's mapper.
    Reported,
}

impl Side {
    /// Where a write from `source` goes: mappers report, everyone else desires.
    pub fn written_by(source: &Source) -> Side {
        match source {
            Source::Mapper(_) => Side::Reported,
            Source::Local | Source::Cloud => Side::Desired,
        }
    }

    /// The label value (`desired`, `reported`).
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Desired => "desired",
            Side::Reported => "reported",
        }
    }
}

impl Twin {
    /// An empty twin at version 0 with unknown status.
    pub fn new(device: DeviceId, model: String) -> Twin {
        Twin {
            device,
            model,
            version: 0,
            desired_version: 0,
            desired: BTreeMap::new(),
            reported: BTreeMap::new(),
            status: TwinStatus {
                state: DeviceState::Unknown,
                ts: None,
                last_seen: None,
                message: None,
                errors: BTreeMap::new(),
            },
        }
    }

    /// Validates and applies a desired patch (see the module doc for the rules).
    pub fn apply_desired(
        &mut self,
        model: &ModelSpec,
        patch: &Patch,
        source: Source,
        now_ms: i64,
    ) -> Result<Applied, Rejection> {
        for (name, value) in &patch.props {
            check_desired(model, name.as_str(), value.as_ref())?;
        }
        if let Some(expected) = patch.expected_version {
            if expected != self.desired_version {
                return Err(Rejection::new(
                    ErrorCode::VersionConflict,
                    format!(
                        "{VERSION_KEY} {expected} does not match the current desired version {}",
                        self.desired_version
                    ),
                ));
            }
        }
        if !patch.errors.is_empty() {
            return Err(Rejection::new(
                ErrorCode::InvalidPatch,
                format!("{ERRORS_KEY} is only allowed in reported patches"),
            ));
        }
        let writes = self.per_entry(model, &typed(model, patch));
        let mut applied = self.merge(Side::Desired, writes, patch.ts, source, now_ms);
        // A new desired value is tried again, whatever became of the last one.
        for name in &applied.changed {
            let write_failed = self
                .status
                .errors
                .get(name)
                .is_some_and(|e| e.op == PropertyOp::Write);
            if write_failed {
                self.status.errors.remove(name);
                applied.status_changed = true;
            }
        }
        Ok(applied)
    }

    /// Validates and applies a reported patch (see the module doc for the rules).
    pub fn apply_reported(
        &mut self,
        model: &ModelSpec,
        patch: &Patch,
        source: Source,
        now_ms: i64,
    ) -> Result<Applied, Rejection> {
        if patch.expected_version.is_some() {
            return Err(Rejection::new(
                ErrorCode::InvalidPatch,
                format!("{VERSION_KEY} is only allowed in desired patches"),
            ));
        }
        for (name, value) in &patch.props {
            check_reported(model, name.as_str(), value.as_ref())?;
        }
        for name in patch.errors.keys() {
            spec_of(model, name.as_str())?;
        }
        let patch = &typed(model, patch);
        let writes = patch
            .props
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect();
        let mut applied = self.merge(Side::Reported, writes, patch.ts, source, now_ms);
        let at = patch.ts.unwrap_or(now_ms).min(now_ms);
        if !patch.props.is_empty() {
            self.status.last_seen = Some(self.status.last_seen.map_or(at, |seen| seen.max(at)));
            applied.refreshed = true;
            if self.status.state == DeviceState::Stale {
                self.status.state = DeviceState::Online;
                self.status.message = None;
                applied.status_changed = true;
            }
        }
        applied.status_changed |= self.settle_errors(patch, at);
        Ok(applied)
    }

    /// Applies what a reported patch says of property errors; returns whether any changed.
    fn settle_errors(&mut self, patch: &Patch, at: i64) -> bool {
        let mut changed = false;
        for (name, value) in &patch.props {
            let Some(err) = self.status.errors.get(name.as_str()) else {
                continue;
            };
            let desired = self
                .desired
                .get(name.as_str())
                .and_then(|e| e.value.as_ref());
            let cleared = match err.op {
                // It read: whatever kept it from reading is over.
                PropertyOp::Read => value.is_some(),
                // The device holds what is desired after all.
                PropertyOp::Write => match (value, desired) {
                    (Some(have), Some(want)) => same_value(have, want),
                    _ => false,
                },
            };
            if cleared {
                self.status.errors.remove(name.as_str());
                changed = true;
            }
        }
        for (name, report) in &patch.errors {
            let name = name.as_str();
            match report {
                None => changed |= self.status.errors.remove(name).is_some(),
                Some(r) => {
                    let since = match self.status.errors.get(name) {
                        Some(e) if e.code == r.code && e.op == r.op => e.since,
                        _ => at,
                    };
                    let new = PropertyError {
                        code: r.code,
                        message: r.message.clone(),
                        op: r.op,
                        value: r.value.clone().map(canonicalize),
                        since,
                    };
                    if self.status.errors.get(name) != Some(&new) {
                        self.status.errors.insert(name.to_string(), new);
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    /// Whether an `online` device's last reading (or, before any, its `online` status) is more
    /// than `bound_ms` old at `now_ms`.
    pub fn is_quiet(&self, bound_ms: i64, now_ms: i64) -> bool {
        self.status.state == DeviceState::Online
            && self
                .status
                .last_seen
                .max(self.status.ts)
                .is_some_and(|since| now_ms.saturating_sub(since) > bound_ms)
    }

    /// Marks the device `stale` when [`Twin::is_quiet`]; `message` says why. Returns whether it
    /// changed. The next reading makes it `online` again.
    pub fn mark_stale(
        &mut self,
        bound_ms: i64,
        now_ms: i64,
        message: impl FnOnce() -> String,
    ) -> bool {
        if !self.is_quiet(bound_ms, now_ms) {
            return false;
        }
        self.status.state = DeviceState::Stale;
        self.status.message = Some(message());
        true
    }

    /// Records a device status message; returns whether the twin document's state or message
    /// changed. A status older than the current one is ignored. `lastSeen` is left alone: a
    /// status says what the mapper thinks, not that the device was read.
    pub fn apply_status(&mut self, msg: &DeviceStatusMsg) -> bool {
        if self.status.ts.is_some_and(|ts| msg.ts < ts) {
            return false;
        }
        let changed = self.status.state != msg.state || self.status.message != msg.message;
        self.status.state = msg.state;
        self.status.ts = Some(msg.ts);
        self.status.message.clone_from(&msg.message);
        changed
    }

    /// Marks the device offline because its mapper is gone (the mapper's will, or its clean
    /// stop): the mapper can no longer say so itself, and its last `online` would stand for ever.
    /// `lastSeen` stays: nothing was heard from the device. The mapper's next status replaces
    /// this one (it is stamped later). Returns whether the state or message changed.
    pub fn mark_mapper_gone(&mut self, message: &str, now_ms: i64) -> bool {
        let changed = self.status.state != DeviceState::Offline
            || self.status.message.as_deref() != Some(message);
        if changed {
            self.status.state = DeviceState::Offline;
            self.status.ts = Some(self.status.ts.map_or(now_ms, |ts| ts.max(now_ms)));
            self.status.message = Some(message.to_string());
        }
        changed
    }

    /// Desired properties (not removed) whose reported value differs or is absent, except those
    /// whose write of this very value failed for good (a lasting write error naming it).
    pub fn delta(&self) -> Map<String, Value> {
        let mut delta = Map::new();
        let mut per_entry = false;
        for (name, entry) in &self.desired {
            if name.contains('.') {
                per_entry = true;
                continue;
            }
            let Some(want) = &entry.value else { continue };
            let given_up = self.status.errors.get(name).is_some_and(|e| {
                e.op == PropertyOp::Write && e.value.as_ref().is_some_and(|v| same_value(v, want))
            });
            if given_up {
                continue;
            }
            let have = self.reported.get(name).and_then(|e| e.value.as_ref());
            if have.is_none_or(|have| !same_value(have, want)) {
                delta.insert(name.clone(), want.clone());
            }
        }
        if per_entry {
            // Per-entry properties compare as the object their entries make.
            let (desired, _) = side_doc(&self.desired);
            for (name, want) in desired {
                let registers = format!("{name}.");
                if delta.contains_key(&name)
                    || !self.desired.keys().any(|k| k.starts_with(&registers))
                {
                    continue;
                }
                let have = self.reported.get(&name).and_then(|e| e.value.as_ref());
                if have.is_none_or(|have| !same_value(have, &want)) {
                    delta.insert(name, want);
                }
            }
        }
        delta
    }

    /// The desired value of `name` as the document shows it (a per-entry property's entries as
    /// one object); `None` when never set or removed.
    pub fn desired_value(&self, name: &str) -> Option<Value> {
        if let Some(e) = self.desired.get(name) {
            return e.value.clone();
        }
        let registers = format!("{name}.");
        let mut entries = self.desired.range(registers.clone()..);
        if !entries
            .next()
            .is_some_and(|(k, _)| k.starts_with(&registers))
        {
            return None;
        }
        side_doc(&self.desired).0.remove(name)
    }

    /// The wire twin document; tombstones are omitted from values and metadata.
    pub fn to_doc(&self) -> TwinDoc {
        let (desired, desired_meta) = side_doc(&self.desired);
        let (reported, reported_meta) = side_doc(&self.reported);
        TwinDoc {
            device: self.device.clone(),
            model: self.model.clone(),
            version: self.version,
            desired_version: self.desired_version,
            desired,
            reported,
            metadata: TwinMetadata {
                desired: desired_meta,
                reported: reported_meta,
            },
            status: self.status.clone(),
        }
    }

    /// The patch with every per-entry property's object turned into one write per entry
    /// register (`null` for the property: a removal of each entry there is). A value of such a
    /// property still stored whole is split into registers first, keeping its metadata.
    fn per_entry(&mut self, model: &ModelSpec, patch: &Patch) -> Vec<(String, Option<Value>)> {
        let mut out: BTreeMap<String, Option<Value>> = patch
            .props
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect();
        for (name, spec) in &model.properties {
            if !spec.per_entry {
                continue;
            }
            let Some(value) = out.remove(name) else {
                continue;
            };
            if let Some(whole) = self.desired.remove(name) {
                if let Some(Value::Object(map)) = &whole.value {
                    for (key, v) in map {
                        self.desired.insert(
                            format!("{name}.{key}"),
                            Entry {
                                value: Some(v.clone()),
                                ..whole.clone()
                            },
                        );
                    }
                }
            }
            let writes: Vec<(String, Option<Value>)> = match value {
                Some(Value::Object(map)) => map
                    .into_iter()
                    .map(|(k, v)| (k, (!v.is_null()).then_some(v)))
                    .collect(),
                _ => {
                    let prefix = format!("{name}.");
                    self.desired
                        .iter()
                        .filter(|(k, e)| k.starts_with(&prefix) && e.value.is_some())
                        .map(|(k, _)| (k[prefix.len()..].to_string(), None))
                        .collect()
                }
            };
            for (key, v) in writes {
                // Entry keys come from a JSON object: any string. The register name is an
                // internal key; only its first `.` is read back (by `side_doc`).
                out.insert(format!("{name}.{key}"), v);
            }
        }
        out.into_iter().collect()
    }

    fn merge(
        &mut self,
        side: Side,
        writes: Vec<(String, Option<Value>)>,
        patch_ts: Option<i64>,
        source: Source,
        now_ms: i64,
    ) -> Applied {
        let new_version = self.version.saturating_add(1);
        let src_id = source.id();
        let mut applied = Applied::default();
        let entries = match side {
            Side::Desired => &mut self.desired,
            Side::Reported => &mut self.reported,
        };
        for (name, value) in &writes {
            let name = name.as_str();
            let new_canon = canonical_opt(value.as_ref());
            let current = entries.get(name);
            let ts = patch_ts.unwrap_or_else(|| node_stamp(current.map(|c| c.ts), now_ms));
            let wins = current.is_none_or(|cur| {
                let (cur_ts, cur_src, cur_canon) = cur.lww_key();
                (ts, src_id.as_str(), new_canon.as_str()).cmp(&(
                    cur_ts,
                    cur_src.as_str(),
                    cur_canon.as_str(),
                )) == Ordering::Greater
            });
            if !wins {
                continue;
            }
            let unchanged = match (current.and_then(|c| c.value.as_ref()), value.as_ref()) {
                (Some(a), Some(b)) => same_value(a, b),
                (None, None) => true,
                _ => false,
            };
            let (version, is_change) = if unchanged {
                (current.map_or(0, |c| c.version), false)
            } else {
                (new_version, true)
            };
            entries.insert(
                name.to_string(),
                Entry {
                    value: value.clone(),
                    version,
                    ts,
                    source: source.clone(),
                },
            );
            if is_change {
                applied.changed.push(name.to_string());
            } else {
                applied.touched.push(name.to_string());
            }
        }
        if applied.is_change() {
            self.version = new_version;
            if matches!(side, Side::Desired) {
                self.desired_version = new_version;
            }
        }
        applied
    }
}

/// The patch with every integer written to a `float` property made a float (`30` is `30.0`), so
/// the twin holds one JSON form per value whichever a writer used.
fn typed(model: &ModelSpec, patch: &Patch) -> Patch {
    let mut out = patch.clone();
    for (name, value) in out.props.iter_mut() {
        let is_float = model
            .properties
            .get(name.as_str())
            .is_some_and(|p| p.ty == PropertyType::Float);
        if let (true, Some(Value::Number(n))) = (is_float, value.as_ref()) {
            if !n.is_f64() {
                if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                    *value = Some(Value::Number(f));
                }
            }
        }
    }
    out
}

/// How far a node-stamped write may be put ahead of the node's clock to come after the value
/// it replaces (see [`node_stamp`]).
pub const STAMP_LEAD_MS: i64 = 1000;

/// The `ts` the node gives a write that carries none: its clock, or, when the property's
/// current value is stamped in the same millisecond or later, one millisecond after it, but
/// never more than [`STAMP_LEAD_MS`] ahead of the clock. Without this, two writes in one
/// millisecond tie on `ts` and the tie-break (source, value) let the earlier one win when its
/// value sorted higher; with it the later arrival wins, and the stamps still converge (they are
/// stored with the value). At the bound (a flood of more than `STAMP_LEAD_MS` writes to one
/// property ahead of the clock) writes tie again and the value decides, as before.
fn node_stamp(current_ts: Option<i64>, now_ms: i64) -> i64 {
    match current_ts {
        Some(cur) if cur >= now_ms => cur.saturating_add(1).min(now_ms + STAMP_LEAD_MS),
        _ => now_ms,
    }
}

fn side_doc(
    entries: &BTreeMap<String, Entry>,
) -> (Map<String, Value>, BTreeMap<String, PropertyMeta>) {
    let mut values = Map::new();
    let mut meta = BTreeMap::new();
    let meta_of = |e: &Entry| PropertyMeta {
        version: e.version,
        ts: e.ts,
        source: e.source.clone(),
    };
    for (name, entry) in entries {
        let Some((prop, key)) = name.split_once('.') else {
            if let Some(v) = &entry.value {
                values.insert(name.clone(), v.clone());
                meta.insert(name.clone(), meta_of(entry));
            }
            continue;
        };
        // An entry register of a per-entry property: tombstones count too (an emptied set is
        // `{}`, not absent), and the whole's metadata is the newest entry's.
        let slot = values
            .entry(prop.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let (Value::Object(map), Some(v)) = (slot, &entry.value) {
            map.insert(key.to_string(), v.clone());
            meta.insert(name.clone(), meta_of(entry));
        }
        let whole = meta
            .entry(prop.to_string())
            .or_insert_with(|| meta_of(entry));
        if (entry.ts, entry.source.id()) > (whole.ts, whole.source.id()) {
            whole.ts = entry.ts;
            whole.source = entry.source.clone();
        }
        whole.version = whole.version.max(entry.version);
    }
    (values, meta)
}

fn spec_of<'m>(model: &'m ModelSpec, name: &str) -> Result<&'m PropertySpec, Rejection> {
    model.properties.get(name).ok_or_else(|| {
        Rejection::property(
            ErrorCode::UnknownProperty,
            name,
            format_args!("model {:?} has no such property", model.name),
        )
    })
}

fn check_type(spec: &PropertySpec, name: &str, v: &Value) -> Result<(), Rejection> {
    if spec.ty.admits(v) {
        Ok(())
    } else {
        Err(Rejection::property(
            ErrorCode::WrongType,
            name,
            format_args!("expected {}, got {} {v}", spec.ty, kind_of(v)),
        ))
    }
}

fn check_desired(model: &ModelSpec, name: &str, value: Option<&Value>) -> Result<(), Rejection> {
    let spec = spec_of(model, name)?;
    if spec.access == AccessMode::ReadOnly {
        return Err(Rejection::property(
            ErrorCode::ReadOnly,
            name,
            "is read-only; only the device reports it",
        ));
    }
    let Some(v) = value else { return Ok(()) };
    check_type(spec, name, v)?;
    if let Some(x) = v.as_f64() {
        if let Some(min) = spec.minimum {
            if x < min {
                return Err(Rejection::property(
                    ErrorCode::OutOfRange,
                    name,
                    format_args!("{v} is below minimum {min}"),
                ));
            }
        }
        if let Some(max) = spec.maximum {
            if x > max {
                return Err(Rejection::property(
                    ErrorCode::OutOfRange,
                    name,
                    format_args!("{v} is above maximum {max}"),
                ));
            }
        }
    }
    Ok(())
}

fn check_reported(model: &ModelSpec, name: &str, value: Option<&Value>) -> Result<(), Rejection> {
    let spec = spec_of(model, name)?;
    match value {
        Some(v) => check_type(spec, name, v),
        None => Ok(()),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Returns `v` with every object's keys sorted (recursively), so equal values serialize equally.
pub fn canonicalize(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut pairs: Vec<(String, Value)> = map.into_iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k, canonicalize(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize).collect()),
        other => other,
    }
}

fn canonical_opt(v: Option<&Value>) -> String {
    v.map_or_else(|| "null".to_string(), canonical_json)
}
