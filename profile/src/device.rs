//! `kind: Device`: one physical device: its model, its connection (one protocol section) and,
//! per property, how often to read it, when to report it and where it lives on the device.

use std::collections::BTreeMap;

use edgetwin_contract::{DeviceId, PropertyName};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::ApiVersion;
use crate::protocol::{PropertyVisitor, ProtocolConfig};
use std::sync::Arc;

use crate::source::SourceDoc;
use crate::Duration;

/// The `kind` of a device document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeviceKind {
    /// `Device`.
    #[default]
    Device,
}

/// Name and labels of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceMetadata {
    /// The device id used in topics (`dt/{device}/...`): `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    pub name: DeviceId,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A device document (`kind: Device`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Device")]
pub struct Device {
    /// Always `edgetwin/v1`.
    pub api_version: ApiVersion,
    /// Always `Device`.
    pub kind: DeviceKind,
    /// Name (the device id) and labels.
    pub metadata: DeviceMetadata,
    /// Model, connection and properties.
    pub spec: DeviceSpec,
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) source: SourceDoc,
}

/// What a device document declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceSpec {
    /// Name of the device's `DeviceModel`.
    pub device_model_ref: String,
    /// Connection settings: exactly one of `modbus`, `opcua`, `ble`, `serial`, matching the
    /// model's `protocol`.
    pub protocol: ProtocolConfig,
    /// How each property is read and reported; every name must be a property of the model.
    /// Model properties left out here are not read from the device.
    #[serde(default)]
    pub properties: Vec<DeviceProperty>,
    /// What or where the device is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// How one property of a device is read, reported and addressed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceProperty {
    /// A property of the device's model.
    pub name: PropertyName,
    /// How often the mapper reads the value (`250ms`, `1s`, `5m`); the mapper's default (1s) when
    /// absent. Ignored for values the device pushes (BLE `notify`, OPC UA subscriptions, serial
    /// `unsolicited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<Duration>,
    /// Also report the current value at this period even when it has not changed (a heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<Duration>,
    /// Report a reading only when it differs from the last reported value (by more than
    /// `deadband` for numbers). Without it every reading is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_on_change: Option<ReportOnChange>,
    /// Also publish each reading on `dt/{device}/telemetry`, forwarded upstream. Default false.
    #[serde(default)]
    pub telemetry: bool,
    /// For a value the device pushes (BLE `notify`, OPC UA subscriptions, serial
    /// `unsolicited`): how long it may stay silent before the device counts as `stale` (when no
    /// other property is read) and the property carries a lasting error. Without it a pushed
    /// value may be silent for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence_timeout: Option<Duration>,
    /// Where the property lives on the device: exactly one entry, keyed by the device's protocol.
    pub visitors: PropertyVisitor,
}

/// Report-on-change settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportOnChange {
    /// A number is a change only when it differs from the last reported value by more than this
    /// (absolute, in the property's unit). Default 0: any difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
}

/// The mapper SDK's collect cycle for a property without `collectCycle`.
pub const DEFAULT_COLLECT_CYCLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Without `reportCycle`, a `reportOnChange` property is re-reported after this many collect
/// cycles even when unchanged (the heartbeat).
pub const DEFAULT_REPORT_CYCLE_FACTOR: u32 = 10;

/// A device counts as `stale` after this many of its shortest report intervals without a
/// reading: one missed poll is not yet silence.
pub const STALE_AFTER_INTERVALS: u32 = 2;

/// Slack added to the stale bound for the poll's own time and clock jitter.
pub const STALE_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

impl DeviceProperty {
    /// Whether the device pushes this value (no `collectCycle` polling).
    pub fn is_pushed(&self) -> bool {
        self.visitors.is_pushed()
    }

    /// How often the property is read: `collectCycle`, or [`DEFAULT_COLLECT_CYCLE`].
    pub fn collect_cycle(&self) -> std::time::Duration {
        self.collect_cycle
            .map(|d| d.as_std())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_COLLECT_CYCLE)
    }

    /// The report-on-change heartbeat: `reportCycle`, or [`DEFAULT_REPORT_CYCLE_FACTOR`] ×
    /// `collect`.
    pub fn heartbeat(&self, collect: std::time::Duration) -> std::time::Duration {
        self.report_cycle
            .map(|d| d.as_std())
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| collect.saturating_mul(DEFAULT_REPORT_CYCLE_FACTOR))
    }

    /// The longest a reading of this property may take to arrive while the device works: for
    /// a polled property its collect cycle, or its heartbeat under `reportOnChange` (a steady
    /// value is reported only then); for a pushed one its `silenceTimeout`, if any.
    pub fn report_interval(&self) -> Option<std::time::Duration> {
        if self.is_pushed() {
            return self
                .silence_timeout
                .map(|d| d.as_std())
                .filter(|d| !d.is_zero());
        }
        let collect = self.collect_cycle();
        Some(match self.report_on_change {
            Some(_) => self.heartbeat(collect).max(collect),
            None => collect,
        })
    }
}

impl DeviceSpec {
    /// How long a working device may go without any reading before the node marks it `stale`:
    /// [`STALE_AFTER_INTERVALS`] × its shortest [`DeviceProperty::report_interval`] plus
    /// [`STALE_SLACK`] (any reading shows the device works). `None` when no property has an
    /// interval (only pushed values without `silenceTimeout`): such a device is never stale.
    pub fn stale_after(&self) -> Option<std::time::Duration> {
        let shortest = self
            .properties
            .iter()
            .filter_map(DeviceProperty::report_interval)
            .min()?;
        Some(shortest.saturating_mul(STALE_AFTER_INTERVALS) + STALE_SLACK)
    }
}

impl Device {
    /// A device document named `name` with `spec`.
    pub fn new(name: DeviceId, spec: DeviceSpec) -> Device {
        Device {
            api_version: ApiVersion::V1,
            kind: DeviceKind::Device,
            metadata: DeviceMetadata {
                name,
                labels: BTreeMap::new(),
            },
            spec,
            source: SourceDoc::default(),
        }
    }

    /// The device id (`metadata.name`).
    pub fn id(&self) -> &DeviceId {
        &self.metadata.name
    }

    /// The model name it refers to.
    pub fn model_ref(&self) -> &str {
        &self.spec.device_model_ref
    }

    /// The protocol of its connection section (`modbus`, `opcua`, `ble`, `serial`).
    pub fn protocol_name(&self) -> &str {
        self.spec.protocol.name()
    }

    /// The device settings of the property called `name`, if any.
    pub fn property(&self, name: &str) -> Option<&DeviceProperty> {
        self.spec
            .properties
            .iter()
            .find(|p| p.name.as_str() == name)
    }

    pub(crate) fn source(&self) -> &SourceDoc {
        &self.source
    }

    /// The device as a parsed document: its source attached, the defaults that depend on other
    /// fields written out ([`Device::fill_defaults`]) and no spare capacity, in one shared
    /// allocation that the validated set takes over as it is (no second copy per device).
    pub(crate) fn into_document(mut self, source: SourceDoc) -> Arc<Device> {
        self.source = source;
        self.fill_defaults();
        self.spec.properties.shrink_to_fit();
        Arc::new(self)
    }

    /// Writes out defaults that depend on other fields (a Modbus visitor's `limit`), so the
    /// resolved device a mapper receives needs no knowledge of them.
    pub(crate) fn fill_defaults(&mut self) {
        for p in &mut self.spec.properties {
            if let PropertyVisitor::Modbus(v) = &mut p.visitors {
                if v.limit.is_none() {
                    v.limit = Some(v.register_count());
                }
            }
        }
    }
}
