//! JSON payloads of the local topic API. These are wire types: field names and shapes are the
//! contract of docs/contract.md §2, so renaming anything here is a breaking change.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{DeviceId, ProtocolName};

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

/// Top-level key of a desired patch carrying the expected current desired version.
pub const VERSION_KEY: &str = "$version";
/// Top-level key of a patch carrying the writer's timestamp (ms) instead of the receive time.
pub const TS_KEY: &str = "ts";
/// Top-level key of a patch carrying the writer's request id: the node answers a desired patch
/// that has one on `dt/{device}/desired/result` ([`DesiredResult`]).
pub const ID_KEY: &str = "$id";
/// Top-level key of a reported patch carrying the mapper's per-property errors
/// ([`PropertyErrorReport`] by property name; `null` clears one).
pub const ERRORS_KEY: &str = "$errors";

/// The value type of a property, as declared in a device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    /// JSON `true`/`false`.
    Boolean,
    /// A JSON number without fraction that fits in an i64.
    Int,
    /// Any JSON number.
    Float,
    /// A JSON string.
    String,
    /// A JSON object (replaced as a whole; never merged key by key).
    Object,
}

impl PropertyType {
    /// Whether `v` has this type. `Float` accepts integers too; `Int` accepts `3.0`-free integers only.
    pub fn admits(self, v: &Value) -> bool {
        match self {
            PropertyType::Boolean => v.is_boolean(),
            PropertyType::Int => {
                v.is_i64() || v.is_u64() && v.as_u64().is_some_and(|u| i64::try_from(u).is_ok())
            }
            PropertyType::Float => v.is_number(),
            PropertyType::String => v.is_string(),
            PropertyType::Object => v.is_object(),
        }
    }
}

impl fmt::Display for PropertyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PropertyType::Boolean => "boolean",
            PropertyType::Int => "int",
            PropertyType::Float => "float",
            PropertyType::String => "string",
            PropertyType::Object => "object",
        })
    }
}

/// Who may write a property (KubeEdge's `accessMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    /// Reported by the device only; desired writes are rejected.
    ReadOnly,
    /// Desired writes are carried to the device.
    ReadWrite,
}

/// Where an accepted change came from; also the tie-breaker of last-writer-wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A local client of the node's broker (engineer, app).
    Local,
    /// The cloud, through the bridge.
    Cloud,
    /// A protocol mapper.
    Mapper(ProtocolName),
}

impl Source {
    /// The source id as written in metadata (`local`, `cloud`, `mapper:{protocol}`).
    pub fn id(&self) -> String {
        match self {
            Source::Local => "local".into(),
            Source::Cloud => "cloud".into(),
            Source::Mapper(p) => format!("mapper:{p}"),
        }
    }

    /// The kind of writer without the protocol (`local`, `cloud`, `mapper`): a bounded label.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Cloud => "cloud",
            Source::Mapper(_) => "mapper",
        }
    }

    /// Parses a source id.
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "local" => Some(Source::Local),
            "cloud" => Some(Source::Cloud),
            _ => s
                .strip_prefix("mapper:")
                .and_then(|p| ProtocolName::new(p).ok())
                .map(Source::Mapper),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id())
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Source::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown source {s:?}")))
    }
}

impl JsonSchema for Source {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Source".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^(local|cloud|mapper:[A-Za-z0-9][A-Za-z0-9_.-]*)$"})
    }
}

/// Metadata of one property in a twin document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PropertyMeta {
    /// The device version at which this property last changed.
    pub version: u64,
    /// The writer's timestamp of the change (ms).
    pub ts: TimestampMs,
    /// Who wrote it.
    pub source: Source,
}

/// Per-property metadata of both sides of a twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TwinMetadata {
    /// Metadata of desired properties.
    pub desired: BTreeMap<String, PropertyMeta>,
    /// Metadata of reported properties.
    pub reported: BTreeMap<String, PropertyMeta>,
}

/// Connection state of a device: as its mapper sees it (`dt/{device}/status`), and in the twin
/// document as the node sees it (`stale` is the node's alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// No mapper has said anything yet (twin document only).
    Unknown,
    /// The mapper talks to the device.
    Online,
    /// The device (or its mapper) is unreachable.
    Offline,
    /// The mapper reaches the device but it misbehaves.
    Error,
    /// (twin document only) The mapper last said `online`, but no reading arrived within the
    /// device's bound (derived from its profile's cycles); set by the node, whatever the mapper
    /// says, and left at the next reading.
    Stale,
}

impl DeviceState {
    /// The state as it appears on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Unknown => "unknown",
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Error => "error",
            DeviceState::Stale => "stale",
        }
    }

    /// Every state, for pre-registering metric label values.
    pub const ALL: [DeviceState; 5] = [
        DeviceState::Unknown,
        DeviceState::Online,
        DeviceState::Offline,
        DeviceState::Error,
        DeviceState::Stale,
    ];
}

/// Which operation on a property failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropertyOp {
    /// Reading the property from the device.
    Read,
    /// Writing a desired value to the device.
    Write,
}

/// One property's error as a mapper reports it, under `$errors` in `dt/{device}/reported`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertyErrorReport {
    /// Machine-readable reason (`device_refused`, `write_failed`, `write_not_held`,
    /// `device_config`, `silent`).
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// What failed.
    pub op: PropertyOp,
    /// For a write: the desired value that could not be written. The node leaves the property
    /// out of the delta while desired still is this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// A lasting per-property error in the twin document's `status.errors`: it stays until the
/// property reads again (a read error), until it reads back the desired value or desired
/// changes (a write error), or the mapper clears it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PropertyError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// What failed.
    pub op: PropertyOp,
    /// For a write: the desired value that could not be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// When the mapper first reported this error (ms); a repeat of the same code and operation
    /// keeps it.
    pub since: TimestampMs,
}

/// `dt/{device}/status`, published by the device's mapper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceStatusMsg {
    /// The state (`unknown` is not sent by mappers).
    pub state: DeviceState,
    /// When the state was observed (ms).
    pub ts: TimestampMs,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The `status` object inside a twin document: state plus when the device was last heard of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwinStatus {
    /// Last state a mapper published, `unknown` before any.
    pub state: DeviceState,
    /// When that state was published (ms), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<TimestampMs>,
    /// When the last reading was taken (ms): the `ts` of the newest reported patch with a value
    /// (the node's receive time when it has none, never later than that), if ever. A reading
    /// that repeats the current value still advances it; status messages do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<TimestampMs>,
    /// Detail from the last status message (or why the node set `stale`/`offline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Lasting per-property errors, by property name (absent when there are none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, PropertyError>,
}

/// `dt/{device}/twin` (retained) and the `twin` of a get result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwinDoc {
    /// The device.
    pub device: DeviceId,
    /// The device's model name.
    pub model: String,
    /// Per-device version, strictly increasing on every accepted change.
    pub version: u64,
    /// Version of the last accepted desired change; what `$version` in a desired patch is checked against.
    pub desired_version: u64,
    /// Desired properties.
    pub desired: Map<String, Value>,
    /// Reported properties.
    pub reported: Map<String, Value>,
    /// Per-property version, timestamp and source.
    pub metadata: TwinMetadata,
    /// Connection state and last-seen.
    pub status: TwinStatus,
}

/// `dt/{device}/delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeltaMsg {
    /// The device.
    pub device: DeviceId,
    /// The twin version this delta was computed at; a client ignores deltas older than the twin it has.
    pub version: u64,
    /// Desired values that reported does not match.
    pub delta: Map<String, Value>,
    /// When the delta was computed (ms).
    pub ts: TimestampMs,
}

/// `dt/{device}/get` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GetRequest {
    /// Opaque request id echoed in the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `dt/{device}/get/result` (or the MQTT 5 response topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GetResult {
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The twin document.
    pub twin: TwinDoc,
}

/// `dt/{device}/history/get` request: one property's recent history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    /// Opaque request id echoed in the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The property.
    pub property: String,
    /// Only points of buckets that end after this time (ms); default: all that are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<TimestampMs>,
    /// Most points, the newest ones; default and most: 10,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// One point of a history: the readings of one bucket of `resolutionMs`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryPoint {
    /// Start of the bucket (ms).
    pub t: TimestampMs,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Mean of the readings.
    pub avg: f64,
    /// The latest reading.
    pub last: f64,
    /// How many readings.
    pub count: u32,
}

/// `dt/{device}/history/result` (or the MQTT 5 response topic), and the body of
/// `GET /api/devices/{device}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryResult {
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device.
    pub device: DeviceId,
    /// The property.
    pub property: String,
    /// Width of each point's bucket (ms).
    pub resolution_ms: i64,
    /// Oldest first.
    pub points: Vec<HistoryPoint>,
}

/// `{prefix}node/status` at the cloud (retained): the node's presence, published by its bridge on
/// every connection (`online`), at a clean stop (`offline`, reason `stopped`), and as its MQTT will
/// (`offline`, reason `connection lost`) when the connection dies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodePresenceMsg {
    /// `online` or `offline`.
    pub state: MapperState,
    /// When it was said (ms); for the will, when the node connected.
    pub ts: TimestampMs,
    /// The node's version.
    pub version: String,
    /// When the node process started (ms): a new value is a restart.
    pub boot: TimestampMs,
    /// Why the node is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `node/health` (retained, locally and as `{prefix}node/health` at the cloud): the node's health,
/// derived from the same metrics registry `/metrics` serves, published when something in it
/// changed (see docs/contract.md §2.8) and at least every minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeHealthMsg {
    /// When it was measured (ms).
    pub ts: TimestampMs,
    /// The node's version.
    pub version: String,
    /// Seconds since the node process started.
    pub uptime_s: u64,
    /// What `/readyz` answers.
    pub ready: bool,
    /// The failing readiness checks (`name: why`), or the phase (`starting`, `stopping`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<String>,
    /// CPU used by the node process since the previous sample, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the node process.
    pub memory_rss_bytes: u64,
    /// The filesystem holding the data dir.
    pub disk: DiskHealth,
    /// The bridge's outbox; absent without a bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxHealth>,
    /// Every mapper that ever announced itself, by protocol, with its state.
    pub mappers: BTreeMap<String, MapperState>,
    /// Registered devices by twin status (`online`, `offline`, `stale`, `error`, `unknown`).
    pub devices: BTreeMap<String, u64>,
    /// Containers of the runtime by state; absent without a container agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<BTreeMap<String, u64>>,
}

/// Free space where the node keeps its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiskHealth {
    /// Bytes an unprivileged writer can still use.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
}

/// The durable outbox towards the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutboxHealth {
    /// Records waiting.
    pub records: u64,
    /// Their stored size.
    pub bytes: u64,
    /// Age of the oldest waiting record, seconds (0 when empty).
    pub oldest_age_s: u64,
    /// Records dropped since the node started (outbox limits, damage).
    pub dropped: u64,
}

impl NodeHealthMsg {
    /// The JSON payload.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Strings, numbers and maps of them always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl NodePresenceMsg {
    /// The JSON payload.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `mappers/{protocol}/discover`: a commissioning scan for that protocol's mapper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiscoverRequest {
    /// Request id, echoed in the result.
    pub id: String,
    /// What to scan, in the protocol's terms (the Modbus mapper: `tcp` or `serial`, `units`,
    /// register ranges).
    pub target: Value,
}

/// `mappers/{protocol}/discover/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiscoverResult {
    /// The request's id.
    pub id: String,
    /// Whether the scan ran (finding nothing is still `true`).
    pub ok: bool,
    /// A draft profile (YAML) of what was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// What was found, in words (one line each).
    #[serde(default)]
    pub found: Vec<String>,
    /// Why the scan could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What became of a desired patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PatchOutcome {
    /// Committed: desired changed, at the twin version given.
    Applied,
    /// Desired already held these values; nothing changed (the patch is idempotent).
    Unchanged,
    /// Refused; nothing changed (`code` and `message` say why).
    Rejected,
}

/// `dt/{device}/desired/result`: the answer to a desired patch that carried `$id`, sent once it is
/// committed (or refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DesiredResult {
    /// The patch's `$id`.
    pub id: String,
    /// What became of it.
    pub result: PatchOutcome,
    /// The twin version after it (applied or unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Why it was refused, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why a patch or request was rejected.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not JSON, or not a JSON object where one is needed.
    MalformedJson,
    /// No device of that name is registered on this node.
    UnknownDevice,
    /// The device's model has no such property.
    UnknownProperty,
    /// A desired write to a `ReadOnly` property.
    ReadOnly,
    /// The value does not have the property's type.
    WrongType,
    /// The value lies outside the property's minimum/maximum.
    OutOfRange,
    /// `$version` did not match the current desired version.
    VersionConflict,
    /// The patch is structurally wrong (bad `$version`/`ts`, empty, too many properties).
    InvalidPatch,
    /// The payload exceeds the configured size limit.
    TooLarge,
    /// The node could not store the change; nothing was changed.
    StoreFailed,
    /// (mapper) The device answered a read with a refusal (Modbus exception, OPC UA bad status).
    DeviceRefused,
    /// (mapper) A desired value could not be written to the device.
    WriteFailed,
    /// (mapper) The device's profile cannot work with the hardware (wrong visitor, unencodable value).
    DeviceConfig,
    /// (mapper) The device took the write but read back another value, attempt after attempt
    /// (it clamps or ignores the value); the mapper stopped writing it.
    WriteNotHeld,
    /// (mapper) A value the device pushes sent nothing within its `silenceTimeout`.
    Silent,
    /// (bridge) A message from the cloud lacked a valid signature by a key the node trusts
    /// (`bridge.signatures`); nothing was done.
    Unauthenticated,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::UnknownProperty => "unknown_property",
            ErrorCode::ReadOnly => "read_only",
            ErrorCode::WrongType => "wrong_type",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::InvalidPatch => "invalid_patch",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::DeviceRefused => "device_refused",
            ErrorCode::WriteFailed => "write_failed",
            ErrorCode::DeviceConfig => "device_config",
            ErrorCode::WriteNotHeld => "write_not_held",
            ErrorCode::Silent => "silent",
            ErrorCode::Unauthenticated => "unauthenticated",
        }
    }

    /// Every code, for pre-registering metric label values.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::MalformedJson,
        ErrorCode::UnknownDevice,
        ErrorCode::UnknownProperty,
        ErrorCode::ReadOnly,
        ErrorCode::WrongType,
        ErrorCode::OutOfRange,
        ErrorCode::VersionConflict,
        ErrorCode::InvalidPatch,
        ErrorCode::TooLarge,
        ErrorCode::StoreFailed,
        ErrorCode::DeviceRefused,
        ErrorCode::WriteFailed,
        ErrorCode::DeviceConfig,
        ErrorCode::WriteNotHeld,
        ErrorCode::Silent,
        ErrorCode::Unauthenticated,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `dt/{device}/error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorMsg {
    /// The request id, when the rejected message carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason, naming the property where one is at fault.
    pub message: String,
    /// The topic the rejected message arrived on.
    pub topic: String,
}

/// `dt/{device}/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TelemetryMsg {
    /// When the values were read (ms).
    pub ts: TimestampMs,
    /// The readings.
    pub values: Map<String, Value>,
}

/// State of a mapper process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MapperState {
    /// Connected and serving its devices.
    Online,
    /// Stopped cleanly or lost (will message).
    Offline,
}

impl MapperState {
    /// The state as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MapperState::Online => "online",
            MapperState::Offline => "offline",
        }
    }
}

/// `mappers/{protocol}/status` (retained; also the mapper's will).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MapperStatusMsg {
    /// The mapper's state.
    pub state: MapperState,
    /// When it was published (ms).
    pub ts: TimestampMs,
    /// The mapper's version string.
    #[serde(default)]
    pub version: String,
}

/// `mappers/{protocol}/metrics`: cumulative counters of a mapper since it started, published
/// every few seconds (not retained); the node re-exports them on its `/metrics` so operators have
/// one scrape target per node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MapperMetricsMsg {
    /// When the snapshot was taken (ms).
    pub ts: TimestampMs,
    /// Counters per device the mapper serves.
    pub devices: BTreeMap<String, DeviceCounters>,
}

/// Cumulative counters of one device in a mapper.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceCounters {
    /// Property reads attempted.
    pub reads: u64,
    /// Property reads that failed (link or device).
    pub read_errors: u64,
    /// Writes attempted.
    pub writes: u64,
    /// Writes that failed.
    pub write_errors: u64,
    /// Poll cycles that started late because the previous one overran.
    pub poll_overruns: u64,
    /// Requests sent to the device (after coalescing).
    #[serde(default)]
    pub requests: u64,
    /// Read latency histogram (one observation per read request).
    pub read_latency: LatencyHistogram,
}

/// A cumulative histogram in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LatencyHistogram {
    /// Sum of all observations (s).
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// `(upper bound in s, cumulative count)`, increasing bounds, without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

/// `node/devices/apply`: profile files sent by `edgetwin device apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApplyRequest {
    /// Request id echoed in the result.
    pub id: String,
    /// The files, by name (used in error messages and as the stored file name).
    pub files: Vec<ApplyFile>,
}

/// One profile file of an apply request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApplyFile {
    /// File name as the user gave it.
    pub name: String,
    /// YAML text.
    pub content: String,
}

/// `node/devices/apply/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApplyResult {
    /// The request's id.
    pub id: String,
    /// True when every file was valid and applied.
    pub ok: bool,
    /// Every error found, each with file, line and field path.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Devices now registered from these files.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// `node/devices/list` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListRequest {
    /// Request id echoed in the result.
    #[serde(default)]
    pub id: String,
}

/// One registered device in a list result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListedDevice {
    /// The device.
    pub name: DeviceId,
    /// Its model.
    pub model: String,
    /// Its protocol (which mapper serves it).
    pub protocol: ProtocolName,
    /// The profile file it came from.
    pub file: String,
}

/// `node/devices/list/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListResult {
    /// The request's id.
    pub id: String,
    /// Every registered device, sorted by name.
    pub devices: Vec<ListedDevice>,
    /// Profile files currently rejected, with their errors (the devices they defined before stay).
    #[serde(default)]
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn source_id_round_trips() {
        for s in ["local", "cloud", "mapper:modbus"] {
            assert_eq!(Source::parse(s).map(|x| x.id()), Some(s.to_string()));
        }
        assert_eq!(Source::parse("mapper:"), None);
        assert_eq!(Source::parse("cloudy"), None);
    }

    #[test]
    fn property_type_admits_only_its_json_kind() {
        assert!(PropertyType::Int.admits(&json!(3)));
        assert!(!PropertyType::Int.admits(&json!(3.5)));
        assert!(!PropertyType::Int.admits(&json!(u64::MAX)));
        assert!(PropertyType::Float.admits(&json!(3)));
        assert!(!PropertyType::Float.admits(&json!("3")));
        assert!(PropertyType::Boolean.admits(&json!(false)));
        assert!(PropertyType::Object.admits(&json!({})));
        assert!(!PropertyType::String.admits(&json!(null)));
    }

    #[test]
    fn error_code_serializes_as_snake_case() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).ok(), Some(json!(c.as_str())));
        }
    }
}
