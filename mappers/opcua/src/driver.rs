//! [`OpcuaDriver`]: the SDK `Driver` for OPC UA servers over async-opcua's client.
//!
//! * **Session**: one session per device. `connect` fetches the server's endpoints, picks the
//!   one matching the profile's security policy and mode (no match is a `Config` error naming
//!   what the server offers), and opens the session with an anonymous or user/password token.
//!   async-opcua's own reconnect is disabled: when the session or channel is lost, the next
//!   `read`/`write` returns [`DriverError::Link`] and the SDK reconnects with its backoff.
//! * **Subscriptions**: every property with a valid node id and `poll: false` gets a monitored
//!   item (sampling interval `samplingInterval`, else the property's `collectCycle`; absolute
//!   `deadband` as a data change filter; queue size 1) on one subscription whose publishing
//!   interval is the shortest sampling interval. Each notification is pushed to the runtime as it
//!   arrives ([`Driver::pushed`]), so a data change reaches the twin within one publishing
//!   interval, not at the next collect cycle; it is also kept in a per-connection cache with its
//!   arrival time, and `read` answers subscribed properties from it as kept values (reported
//!   once, with that time). A property that is polled, has no notification yet, could not be
//!   monitored, or was just written is read directly (all of them in one Read request).
//! * **Values**: converted per the model property type by [`codec::variant_to_json`]; a write is
//!   encoded as the node's own type (the variant type of its current value, else its `DataType`
//!   attribute, looked up once per connection) by [`codec::json_to_variant`].
//! * **Errors**: a Bad status of a node is [`DriverError::Device`] for that property, naming the
//!   status (`BadNodeIdUnknown`, `BadTypeMismatch`, ...); a node id that does not parse or a value
//!   that does not convert is [`DriverError::Config`] for that property only; a whole service
//!   call that fails (session or channel gone) or takes longer than the device `timeout` is
//!   [`DriverError::Link`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use edgetwin_contract::{now_ms, PropertyType, TimestampMs};
use edgetwin_profile::protocol::{SecurityMode, SecurityPolicy};
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use opcua::client::{
    Client, ClientBuilder, DataChangeCallback, IdentityToken, Session, SessionPollResult,
};
use opcua::crypto::{CertificateStore, SecurityPolicy as UaPolicy};
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, DataChangeFilter, DataChangeTrigger,
    DataValue, DeadbandType, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeClass, NodeId, ReadValueId, ReferenceTypeId,
    StatusCode, TimestampsToReturn, VariantScalarTypeId, WriteValue,
};
use serde_json::Value;

use crate::codec::{self, CodecError, NodeAddress};
use crate::config::{self, ConfigError, ConnSettings, Identity};
use crate::discover;
use edgetwin_mapper_sdk::{
    read_result, written, Discovered, Driver, DriverError, LinkLost, PropertyResult, Pushed,
    ReadResult, Reading, PUSH_QUEUE,
};
use tokio::sync::mpsc;

/// The application URI the client presents (and that a client certificate should carry).
pub const APPLICATION_URI: &str = "urn:edgetwin:mapper-opcua";

/// Client-wide options that are not part of a device profile.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Where async-opcua keeps its PKI folders (`trusted/`, `rejected/` server certificates).
    pub pki_dir: PathBuf,
    /// Accept a server certificate that is not in `pki_dir/trusted` (it is still checked for
    /// validity and stored under `trusted/`). `false`: only pre-trusted server certificates.
    pub trust_server_certs: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            pki_dir: std::env::temp_dir().join("edgetwin-mapper-opcua-pki"),
            trust_server_certs: true,
        }
    }
}

/// The OPC UA driver. One value serves every OPC UA device of the mapper.
#[derive(Debug, Default)]
pub struct OpcuaDriver {
    options: ClientOptions,
}

impl OpcuaDriver {
    /// A driver with the given client options.
    pub fn new(options: ClientOptions) -> Self {
        OpcuaDriver { options }
    }
}

/// What the connection knows about one property.
#[derive(Debug)]
struct PropState {
    /// The resolved node, or why it cannot be used (reported for this property only).
    node: Result<NodeId, DriverError>,
    /// The node id as written in the profile, for messages.
    text: String,
    ty: PropertyType,
    /// Client handle of its monitored item when it is subscribed.
    handle: Option<u32>,
    /// The node's type for writes, once looked up.
    write_type: Option<VariantScalarTypeId>,
}

/// Latest data values delivered by the subscription (with when they arrived), by client handle.
type Latest = Arc<StdMutex<HashMap<u32, (DataValue, TimestampMs)>>>;

/// An open session to one device's server.
pub struct OpcuaConn {
    session: Arc<Session>,
    event_loop: tokio::task::JoinHandle<()>,
    /// Why the session is gone (set by the event loop task or after a failed call).
    lost: Arc<StdMutex<Option<String>>>,
    timeout: Duration,
    url: String,
    props: HashMap<String, PropState>,
    latest: Latest,
    /// Properties to read directly on their next read (just written).
    fresh: HashSet<String>,
    subscription: Option<u32>,
    /// Data changes as they arrive, until the runtime takes the receiver.
    pushed: Option<mpsc::Receiver<Pushed>>,
    requests: u64,
}

impl std::fmt::Debug for OpcuaConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcuaConn")
            .field("url", &self.url)
            .field("subscription", &self.subscription)
            .field("requests", &self.requests)
            .finish()
    }
}

impl Drop for OpcuaConn {
    fn drop(&mut self) {
        self.event_loop.abort();
    }
}

impl OpcuaConn {
    /// OPC UA service requests sent on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The subscription's id on the server, when any property is subscribed.
    pub fn subscription_id(&self) -> Option<u32> {
        self.subscription
    }

    /// Properties that are served from monitored items.
    pub fn subscribed(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .props
            .iter()
            .filter(|(_, p)| p.handle.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn check_link(&self) -> Result<(), DriverError> {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        match &*lost {
            Some(why) => Err(DriverError::Link(format!("{}: {why}", self.url))),
            None => Ok(()),
        }
    }

    fn mark_lost(&self, why: &str) {
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        lost.get_or_insert_with(|| why.to_string());
    }

    /// Runs one service call bounded by the device timeout. `Ok(Err(status))`: the server
    /// refused this request; `Err(Link)`: the session is unusable (and marked so).
    async fn call<T>(
        &mut self,
        what: &str,
        fut: impl Future<Output = Result<T, opcua::types::Error>>,
    ) -> Result<Result<T, StatusCode>, DriverError> {
        self.check_link()?;
        self.requests += 1;
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                let why = format!("{what}: no answer within {:?}", self.timeout);
                self.mark_lost(&why);
                Err(DriverError::Link(format!("{}: {why}", self.url)))
            }
            Ok(Err(e)) if codec::is_link_status(e.status()) => {
                let why = format!("{what}: {}", e.status());
                self.mark_lost(&why);
                Err(DriverError::Link(format!("{}: {why}", self.url)))
            }
            Ok(Err(e)) => Ok(Err(e.status())),
            Ok(Ok(v)) => Ok(Ok(v)),
        }
    }

    /// The node's variant type for writes: the type of its current value, else its DataType.
    async fn write_type(
        &mut self,
        name: &str,
        node: &NodeId,
    ) -> Result<VariantScalarTypeId, DriverError> {
        if let Some(t) = self.props.get(name).and_then(|p| p.write_type) {
            return Ok(t);
        }
        let ids = [
            read_id(node, AttributeId::Value),
            read_id(node, AttributeId::DataType),
        ];
        let session = self.session.clone();
        let text = self
            .props
            .get(name)
            .map(|p| p.text.clone())
            .unwrap_or_default();
        let values = match self
            .call(
                "reading the data type",
                session.read(&ids, TimestampsToReturn::Neither, 0.0),
            )
            .await?
        {
            Ok(v) => v,
            Err(status) => return Err(refused(status, "reading the data type of", &text)),
        };
        let [value, data_type] = values.as_slice() else {
            return Err(self.mismatch("read"));
        };
        if let Some(status) = value.status.filter(|s| s.is_bad()) {
            return Err(refused(status, "reading", &text));
        }
        let from_value = value
            .value
            .as_ref()
            .filter(|v| !matches!(v, opcua::types::Variant::Array(_)))
            .and_then(|v| v.scalar_type_id());
        let from_data_type = || match &data_type.value {
            Some(opcua::types::Variant::NodeId(id)) => VariantScalarTypeId::try_from(&**id).ok(),
            _ => None,
        };
        let t = from_value.or_else(from_data_type).ok_or_else(|| {
            DriverError::Config(format!(
                "property {name}: node {text} has a data type the mapper cannot write ({:?})",
                data_type.value
            ))
        })?;
        if let Some(p) = self.props.get_mut(name) {
            p.write_type = Some(t);
        }
        Ok(t)
    }

    fn mismatch(&self, what: &str) -> DriverError {
        let why = format!("the {what} answer does not match the request");
        self.mark_lost(&why);
        DriverError::Link(format!("{}: {why}", self.url))
    }
}

fn read_id(node: &NodeId, attr: AttributeId) -> ReadValueId {
    ReadValueId {
        node_id: node.clone(),
        attribute_id: attr as u32,
        ..ReadValueId::default()
    }
}

/// The `Device` error for a Bad status, naming it and the node.
fn refused(status: StatusCode, doing: &str, node: &str) -> DriverError {
    DriverError::Device(format!("OPC UA {status} {doing} node {node}"))
}

fn config_err(e: ConfigError) -> DriverError {
    DriverError::Config(e.to_string())
}

fn codec_err(prop: &str, e: CodecError) -> DriverError {
    DriverError::Config(format!("property {prop}: {e}"))
}

/// The JSON value of a data value from a read or a notification.
fn value_of(name: &str, p: &PropState, dv: &DataValue) -> Result<Value, DriverError> {
    let status = dv.status.unwrap_or(StatusCode::Good);
    if status.is_bad() {
        return Err(refused(status, "reading", &p.text));
    }
    match &dv.value {
        Some(v) => codec::variant_to_json(v, p.ty).map_err(|e| codec_err(name, e)),
        None => Err(codec_err(name, CodecError::Empty)),
    }
}

fn ua_policy(p: SecurityPolicy) -> UaPolicy {
    match p {
        SecurityPolicy::None => UaPolicy::None,
        SecurityPolicy::Basic256Sha256 => UaPolicy::Basic256Sha256,
    }
}

fn ua_mode(m: SecurityMode) -> MessageSecurityMode {
    match m {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}

/// Status codes of a failed session activation that no retry will fix.
fn is_rejection(status: StatusCode) -> bool {
    [
        StatusCode::BadUserAccessDenied,
        StatusCode::BadIdentityTokenInvalid,
        StatusCode::BadIdentityTokenRejected,
        StatusCode::BadSecurityPolicyRejected,
        StatusCode::BadCertificateInvalid,
        StatusCode::BadCertificateUntrusted,
        StatusCode::BadCertificateUriInvalid,
        StatusCode::BadCertificateUseNotAllowed,
        StatusCode::BadCertificateHostNameInvalid,
        StatusCode::BadCertificateTimeInvalid,
        StatusCode::BadCertificateRevoked,
        StatusCode::BadNoValidCertificates,
        StatusCode::BadSecurityModeRejected,
    ]
    .iter()
    .any(|r| r.sub_code() == status.sub_code())
}

fn identity(s: &ConnSettings) -> Result<IdentityToken, DriverError> {
    Ok(match &s.identity {
        Identity::Anonymous => IdentityToken::Anonymous,
        Identity::Password { user, password } => {
            IdentityToken::new_user_name(user.clone(), password.clone())
        }
        Identity::PasswordFile { user, path } => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                DriverError::Config(format!("cannot read passwordFile {}: {e}", path.display()))
            })?;
            let password = text.trim_end_matches(['\r', '\n']).to_string();
            IdentityToken::new_user_name(user.clone(), password)
        }
    })
}

impl OpcuaDriver {
    fn client(&self, s: &ConnSettings) -> Result<Client, DriverError> {
        let mut b = ClientBuilder::new()
            .application_name("edgetwin OPC UA mapper")
            .application_uri(APPLICATION_URI)
            .product_uri("urn:edgetwin")
            .create_sample_keypair(false)
            .pki_dir(self.options.pki_dir.clone())
            .trust_server_certs(self.options.trust_server_certs)
            .session_retry_limit(0)
            .request_timeout(s.timeout)
            .publish_timeout(s.timeout.max(Duration::from_secs(10)))
            .session_timeout(60_000)
            .keep_alive_interval(Duration::from_secs(5));
        if let Some((cert, key)) = &s.keypair {
            // Check them here to give a clear Config error (async-opcua would only log).
            CertificateStore::read_cert(cert)
                .map_err(|e| DriverError::Config(format!("certificate {}: {e}", cert.display())))?;
            CertificateStore::read_pkey(key)
                .map_err(|e| DriverError::Config(format!("privateKey {}: {e}", key.display())))?;
            b = b
                .certificate_path(cert.clone())
                .private_key_path(key.clone());
        }
        b.client().map_err(|errs| {
            DriverError::Config(format!("OPC UA client configuration: {}", errs.join("; ")))
        })
    }

    /// Opens the session and waits until it is activated.
    async fn open(&self, s: &ConnSettings) -> Result<OpcuaConnCore, DriverError> {
        let token = identity(s)?;
        let client = self.client(s)?;
        let link = |what: String| DriverError::Link(format!("{}: {what}", s.url));
        let endpoints = tokio::time::timeout(
            s.timeout,
            client.get_server_endpoints_from_url(s.url.as_str()),
        )
        .await
        .map_err(|_| link(format!("no endpoints within {:?}", s.timeout)))?
        .map_err(|e| link(format!("getting endpoints: {e}")))?;
        let policy = ua_policy(s.policy);
        let mode = ua_mode(s.mode);
        let Some(endpoint) = Client::find_matching_endpoint(&endpoints, &s.url, policy, mode)
        else {
            let offered: Vec<String> = endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{} {:?}",
                        UaPolicy::from_uri(e.security_policy_uri.as_ref()),
                        e.security_mode
                    )
                })
                .collect();
            return Err(DriverError::Config(format!(
                "{}: the server offers no endpoint with securityPolicy {:?} and securityMode {:?} (it offers: {})",
                s.url,
                s.policy,
                s.mode,
                offered.join(", ")
            )));
        };
        let (session, event_loop) = client
            .session_builder()
            .with_endpoints(endpoints)
            .connect_to_endpoint_directly(endpoint)
            .map_err(|e| DriverError::Config(format!("{}: {e}", s.url)))?
            .user_identity_token(token)
            .build(client.certificate_store().clone())
            .map_err(|e| DriverError::Config(format!("{}: {e}", s.url)))?;
        session.disable_reconnects();

        let lost: Arc<StdMutex<Option<String>>> = Arc::new(StdMutex::new(None));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), StatusCode>>();
        let lost2 = lost.clone();
        let url = s.url.clone();
        let task = tokio::spawn(async move {
            use futures_util::StreamExt;
            let stream = event_loop.enter();
            let mut stream = std::pin::pin!(stream);
            let mut first = Some(first_tx);
            let why = loop {
                match stream.next().await {
                    Some(Ok(SessionPollResult::Reconnected(_))) => {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Err(code));
                        }
                        break format!("connecting failed: {code}");
                    }
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => {
                        break format!("connection lost: {code}")
                    }
                    Some(Ok(_)) => {}
                    Some(Err(code)) => {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Err(code));
                        }
                        break format!("session ended: {code}");
                    }
                    None => break "session closed".to_string(),
                }
            };
            tracing::debug!(url = %url, reason = %why, "OPC UA session event loop ended");
            let mut l = lost2.lock().unwrap_or_else(|p| p.into_inner());
            l.get_or_insert(why);
        });
        // From here on the task owns the event loop: abort it on any early return.
        let core = OpcuaConnCore {
            session,
            event_loop: task,
            lost,
        };
        match tokio::time::timeout(s.timeout.max(Duration::from_secs(1)) * 2, first_rx).await {
            Err(_) => Err(link(format!(
                "session not activated within {:?}",
                s.timeout * 2
            ))),
            Ok(Err(_)) => Err(link("session event loop ended while connecting".into())),
            Ok(Ok(Err(code))) if is_rejection(code) => Err(DriverError::Config(format!(
                "{}: the server rejected the session: {code}",
                s.url
            ))),
            Ok(Ok(Err(code))) => Err(link(format!("opening the session: {code}"))),
            Ok(Ok(Ok(()))) => Ok(core),
        }
    }
}

/// A session and its event loop task before the properties are set up. Aborts the task when
/// dropped unused.
struct OpcuaConnCore {
    session: Arc<Session>,
    event_loop: tokio::task::JoinHandle<()>,
    lost: Arc<StdMutex<Option<String>>>,
}

impl Drop for OpcuaConnCore {
    fn drop(&mut self) {
        self.event_loop.abort();
    }
}

impl Driver for OpcuaDriver {
    type Conn = OpcuaConn;

    fn protocol(&self) -> &'static str {
        "opcua"
    }

    async fn discover(&self, target: &Value) -> Result<Discovered, String> {
        let req: discover::BrowseRequest = serde_json::from_value(target.clone())
            .map_err(|e| format!("the browse request: {e}"))?;
        let vars = self.browse(&req).await?;
        let found = vars
            .iter()
            .map(|v| {
                format!(
                    "{} {} ({}{})",
                    v.node_id,
                    v.browse_name,
                    v.ty,
                    if v.writable { ", writable" } else { "" }
                )
            })
            .collect();
        Ok(Discovered {
            profile: discover::draft(&req, &vars)?,
            found,
        })
    }

    fn requests_made(&self, conn: &OpcuaConn) -> Option<u64> {
        Some(conn.requests())
    }

    async fn connect(&self, device: &ResolvedDevice) -> Result<OpcuaConn, DriverError> {
        let s = config::settings(device).map_err(config_err)?;
        let core = self.open(&s).await?;
        // Move the parts out of the guard (it would abort the task when dropped).
        let session = core.session.clone();
        let lost = core.lost.clone();
        let event_loop = {
            let mut core = core;
            std::mem::replace(&mut core.event_loop, tokio::spawn(async {}))
        };
        let mut conn = OpcuaConn {
            session,
            event_loop,
            lost,
            timeout: s.timeout,
            url: s.url.clone(),
            props: HashMap::new(),
            latest: Arc::new(StdMutex::new(HashMap::new())),
            fresh: HashSet::new(),
            subscription: None,
            pushed: None,
            requests: 0,
        };

        // Resolve every property's node (namespace URIs against the server's namespace array).
        let mut to_monitor: Vec<(String, NodeId, Duration, Option<f64>)> = Vec::new();
        for p in &device.device.spec.properties {
            let name = p.name.as_str().to_string();
            let (v, ty) = match config::property(device, p) {
                Ok(x) => x,
                Err(e) => {
                    conn.props.insert(
                        name,
                        PropState {
                            node: Err(config_err(e)),
                            text: String::new(),
                            ty: PropertyType::Object,
                            handle: None,
                            write_type: None,
                        },
                    );
                    continue;
                }
            };
            let node = match codec::parse_node_id(&v.node_id) {
                Ok(NodeAddress::Id(id)) => Ok(id),
                Ok(NodeAddress::Uri { uri, rest }) => {
                    let session = conn.session.clone();
                    match conn
                        .call("reading the namespace array", session.get_namespace_index(&uri))
                        .await?
                    {
                        Ok(ns) => codec::node_in_namespace(ns, &rest).map_err(|e| codec_err(&name, e)),
                        Err(status) => Err(DriverError::Config(format!(
                            "property {name}: namespace {uri:?} of node {} is not on the server ({status})",
                            v.node_id
                        ))),
                    }
                }
                Err(e) => Err(codec_err(&name, e)),
            };
            if let (Ok(id), false) = (&node, v.poll) {
                to_monitor.push((
                    name.clone(),
                    id.clone(),
                    config::sampling_interval(p, v),
                    v.deadband,
                ));
            }
            conn.props.insert(
                name,
                PropState {
                    node,
                    text: v.node_id.clone(),
                    ty,
                    handle: None,
                    write_type: None,
                },
            );
        }
        if let Some(interval) = config::publishing_interval(to_monitor.iter().map(|m| m.2)) {
            subscribe(&mut conn, device, interval, &to_monitor).await?;
        }
        tracing::info!(
            device = %device.id(),
            url = %s.url,
            subscribed = ?conn.subscribed(),
            "OPC UA session open"
        );
        Ok(conn)
    }

    async fn read(
        &self,
        conn: &mut OpcuaConn,
        device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> ReadResult {
        read_result(props.len(), self.read_values(conn, device, props).await)
    }

    async fn write(
        &self,
        conn: &mut OpcuaConn,
        device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<PropertyResult<()>, LinkLost> {
        written(self.write_value(conn, device, prop, value).await)
    }

    fn pushed(&self, conn: &mut OpcuaConn) -> Option<mpsc::Receiver<Pushed>> {
        conn.pushed.take()
    }

    async fn disconnect(&self, conn: OpcuaConn) {
        if conn.check_link().is_ok() {
            let _ = tokio::time::timeout(conn.timeout, conn.session.disconnect()).await;
        }
        // Dropping `conn` aborts the event loop task.
    }
}

impl OpcuaDriver {
    /// Every property's value in the order of `props`; `Err` only for the link.
    async fn read_values(
        &self,
        conn: &mut OpcuaConn,
        _device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> Result<Vec<Result<Reading, DriverError>>, DriverError> {
        conn.check_link()?;
        let mut results: Vec<Option<Result<Reading, DriverError>>> = vec![None; props.len()];
        // (index in props, node) of the properties read directly.
        let mut direct: Vec<(usize, NodeId)> = Vec::new();
        {
            let latest = conn.latest.lock().unwrap_or_else(|p| p.into_inner());
            for (i, p) in props.iter().enumerate() {
                let name = p.name.as_str();
                let Some(st) = conn.props.get(name) else {
                    results[i] = Some(Err(DriverError::Config(format!(
                        "property {name} was not in the profile when the device was connected"
                    ))));
                    continue;
                };
                let node = match &st.node {
                    Ok(n) => n,
                    Err(e) => {
                        results[i] = Some(Err(e.clone()));
                        continue;
                    }
                };
                let cached = st
                    .handle
                    .filter(|_| !conn.fresh.contains(name))
                    .and_then(|h| latest.get(&h));
                match cached {
                    Some((dv, at)) => {
                        let at = *at;
                        results[i] = Some(value_of(name, st, dv).map(|v| Reading::kept(v, at)));
                    }
                    None => direct.push((i, node.clone())),
                }
            }
        }
        if !direct.is_empty() {
            let ids: Vec<ReadValueId> = direct
                .iter()
                .map(|(_, n)| read_id(n, AttributeId::Value))
                .collect();
            let session = conn.session.clone();
            let answer = conn
                .call("read", session.read(&ids, TimestampsToReturn::Both, 0.0))
                .await?;
            match answer {
                Ok(values) if values.len() == direct.len() => {
                    let mut latest = conn.latest.lock().unwrap_or_else(|p| p.into_inner());
                    for ((i, _), dv) in direct.iter().zip(values) {
                        let name = props[*i].name.as_str();
                        let Some(st) = conn.props.get(name) else {
                            continue;
                        };
                        results[*i] = Some(value_of(name, st, &dv).map(Reading::fresh));
                        conn.fresh.remove(name);
                        if let Some(h) = st.handle {
                            // Keep the newest of this read and the last notification.
                            let newer = latest
                                .get(&h)
                                .is_none_or(|(old, _)| codec::is_newer(old, &dv));
                            if newer && !dv.status.is_some_and(|s| s.is_bad()) {
                                latest.insert(h, (dv, now_ms()));
                            }
                        }
                    }
                }
                Ok(_) => return Err(conn.mismatch("read")),
                Err(status) => {
                    for (i, _) in &direct {
                        let text = conn
                            .props
                            .get(props[*i].name.as_str())
                            .map(|p| p.text.clone())
                            .unwrap_or_default();
                        results[*i] = Some(Err(refused(status, "reading", &text)));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(DriverError::Config("property was not read".into()))))
            .collect())
    }

    async fn write_value(
        &self,
        conn: &mut OpcuaConn,
        _device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<(), DriverError> {
        conn.check_link()?;
        let name = prop.name.as_str();
        let Some(st) = conn.props.get(name) else {
            return Err(DriverError::Config(format!(
                "property {name} was not in the profile when the device was connected"
            )));
        };
        let node = st.node.clone()?;
        let text = st.text.clone();
        let ty = conn.write_type(name, &node).await?;
        let variant = codec::json_to_variant(value, ty).map_err(|e| codec_err(name, e))?;
        let wv = WriteValue {
            node_id: node,
            attribute_id: AttributeId::Value as u32,
            value: DataValue::value_only(variant),
            ..WriteValue::default()
        };
        let session = conn.session.clone();
        let statuses = match conn.call("write", session.write(&[wv])).await? {
            Ok(s) => s,
            Err(status) => return Err(refused(status, "writing", &text)),
        };
        let [status] = statuses.as_slice() else {
            return Err(conn.mismatch("write"));
        };
        if status.is_bad() {
            return Err(refused(*status, "writing", &text));
        }
        // The read-back must see the new value, not a notification from before the write.
        conn.fresh.insert(name.to_string());
        Ok(())
    }
}

/// Creates the device's subscription and its monitored items. A server that refuses the
/// subscription or an item leaves those properties polled (with a warning).
async fn subscribe(
    conn: &mut OpcuaConn,
    device: &ResolvedDevice,
    interval: Duration,
    items: &[(String, NodeId, Duration, Option<f64>)],
) -> Result<(), DriverError> {
    let latest = conn.latest.clone();
    // What each handle's notifications are, to push them as values.
    let pushes: HashMap<u32, (String, PropState)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, (name, _, _, _))| {
            let st = conn.props.get(name)?;
            let lite = PropState {
                node: Err(DriverError::Config(String::new())),
                text: st.text.clone(),
                ty: st.ty,
                handle: None,
                write_type: None,
            };
            Some((handle_of(i), (name.clone(), lite)))
        })
        .collect();
    let (push, pushed) = mpsc::channel(PUSH_QUEUE);
    let callback = DataChangeCallback::new(move |dv, item| {
        let h = item.client_handle();
        let at = now_ms();
        let mut latest = latest.lock().unwrap_or_else(|p| p.into_inner());
        let newer = latest
            .get(&h)
            .is_none_or(|(old, _)| codec::is_newer(old, &dv));
        if !newer {
            return;
        }
        if let Some((name, st)) = pushes.get(&h) {
            let reading = value_of(name, st, &dv)
                .map(|v| Reading::kept(v, at))
                .map_err(DriverError::refusal);
            // A full queue drops the push; the cache keeps the value for the next read.
            let _ = push.try_send(Pushed {
                property: name.clone(),
                reading,
            });
        }
        latest.insert(h, (dv, at));
    });
    // Keep-alive every ~10 intervals (at least 1 s); lifetime 3 keep-alives, per the spec.
    let keep_alive =
        u32::try_from((Duration::from_secs(1).as_millis() / interval.as_millis().max(1)).max(10))
            .unwrap_or(10);
    let session = conn.session.clone();
    let created = conn
        .call(
            "creating the subscription",
            session.create_subscription(interval, keep_alive * 3, keep_alive, 0, 0, true, callback),
        )
        .await?;
    let sub_id = match created {
        Ok(id) => id,
        Err(status) => {
            tracing::warn!(device = %device.id(), %status, "OPC UA subscription refused; polling every property");
            return Ok(());
        }
    };
    conn.subscription = Some(sub_id);
    // Only now: a refused subscription drops the callback, and a closed channel would read as
    // a lost link.
    conn.pushed = Some(pushed);
    let requests: Vec<MonitoredItemCreateRequest> = items
        .iter()
        .enumerate()
        .map(
            |(i, (_, node, sampling, deadband))| MonitoredItemCreateRequest {
                item_to_monitor: read_id(node, AttributeId::Value),
                monitoring_mode: MonitoringMode::Reporting,
                requested_parameters: MonitoringParameters {
                    client_handle: handle_of(i),
                    sampling_interval: sampling.as_secs_f64() * 1000.0,
                    filter: deadband
                        .map(|d| {
                            ExtensionObject::from_message(DataChangeFilter {
                                trigger: DataChangeTrigger::StatusValue,
                                deadband_type: DeadbandType::Absolute as u32,
                                deadband_value: d,
                            })
                        })
                        .unwrap_or_else(ExtensionObject::null),
                    queue_size: 1,
                    discard_oldest: true,
                },
            },
        )
        .collect();
    let session = conn.session.clone();
    let results = match conn
        .call(
            "creating monitored items",
            session.create_monitored_items(sub_id, TimestampsToReturn::Both, requests),
        )
        .await?
    {
        Ok(r) => r,
        Err(status) => {
            tracing::warn!(device = %device.id(), %status, "OPC UA monitored items refused; polling every property");
            return Ok(());
        }
    };
    for (i, ((name, _, _, _), r)) in items.iter().zip(results.iter()).enumerate() {
        let status = r.result.status_code;
        if status.is_bad() {
            tracing::warn!(device = %device.id(), property = %name, %status, "OPC UA monitored item refused; polling the property");
            continue;
        }
        if let Some(p) = conn.props.get_mut(name) {
            p.handle = Some(handle_of(i));
        }
    }
    Ok(())
}

/// Client handles are 1-based (async-opcua replaces 0 with its own).
fn handle_of(i: usize) -> u32 {
    u32::try_from(i + 1).unwrap_or(u32::MAX)
}

impl OpcuaDriver {
    /// The variables under the request's root (see [`crate::discover`]): their node ids, browse
    /// names, model types and whether they can be written.
    pub async fn browse(
        &self,
        req: &discover::BrowseRequest,
    ) -> Result<Vec<discover::Variable>, String> {
        // The connection settings as a device profile would give them, checked the same way.
        let section = req.section();
        let resolved: ResolvedDevice = serde_json::from_value(serde_json::json!({
            "device": {"apiVersion": "edgetwin/v1", "kind": "Device", "metadata": {"name": "browse"},
                "spec": {"deviceModelRef": "browse", "protocol": {"opcua": section}, "properties": []}},
            "model": {"apiVersion": "edgetwin/v1", "kind": "DeviceModel", "metadata": {"name": "browse"},
                "spec": {"protocol": "opcua", "properties": []}},
        }))
        .map_err(|e| format!("the server settings: {e}"))?;
        let s = config::settings(&resolved).map_err(|e| e.to_string())?;
        let core = self.open(&s).await.map_err(|e| e.to_string())?;
        let session = core.session.clone();
        let root = match codec::parse_node_id(req.root.as_deref().unwrap_or("i=85")) {
            Ok(NodeAddress::Id(id)) => id,
            _ => {
                return Err(format!(
                    "root {:?} is not a node id like i=85 or ns=2;s=Plant",
                    req.root
                ))
            }
        };
        let (depth, max) = (req.depth.unwrap_or(4), req.max_nodes.unwrap_or(500));
        let wait = s.timeout.max(Duration::from_secs(1)) * 4;
        let mut frontier = vec![root];
        let mut seen: HashSet<NodeId> = HashSet::new();
        let mut vars: Vec<(NodeId, String)> = Vec::new();
        'levels: for _ in 0..=depth {
            if frontier.is_empty() {
                break;
            }
            let descs: Vec<BrowseDescription> = frontier
                .iter()
                .map(|n| BrowseDescription {
                    node_id: n.clone(),
                    browse_direction: BrowseDirection::Forward,
                    reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                    include_subtypes: true,
                    node_class_mask: NodeClass::Object as u32 | NodeClass::Variable as u32,
                    result_mask: 0x3f,
                })
                .collect();
            let mut next = Vec::new();
            for chunk in descs.chunks(100) {
                let results = tokio::time::timeout(wait, session.browse(chunk, 1000, None))
                    .await
                    .map_err(|_| format!("{}: no answer to Browse within {wait:?}", s.url))?
                    .map_err(|e| format!("{}: Browse failed: {e}", s.url))?;
                for r in results {
                    for rd in r.references.unwrap_or_default() {
                        let id = rd.node_id.node_id.clone();
                        // Another server's node, or the standard Server object's: not the
                        // plant's.
                        if rd.node_id.server_index != 0 || id.namespace == 0 {
                            continue;
                        }
                        if !seen.insert(id.clone()) {
                            continue;
                        }
                        if seen.len() > max {
                            tracing::warn!(max, "browse stopped at its node limit");
                            break 'levels;
                        }
                        if rd.node_class == NodeClass::Variable {
                            vars.push((id.clone(), rd.browse_name.name.to_string()));
                        }
                        next.push(id);
                    }
                }
            }
            frontier = next;
        }
        // Each variable's type and access level, in one Read per hundred.
        let mut out = Vec::new();
        for chunk in vars.chunks(50) {
            let ids: Vec<ReadValueId> = chunk
                .iter()
                .flat_map(|(id, _)| {
                    [
                        read_id(id, AttributeId::DataType),
                        read_id(id, AttributeId::AccessLevel),
                    ]
                })
                .collect();
            let values =
                tokio::time::timeout(wait, session.read(&ids, TimestampsToReturn::Neither, 0.0))
                    .await
                    .map_err(|_| format!("{}: no answer to Read within {wait:?}", s.url))?
                    .map_err(|e| format!("{}: Read failed: {e}", s.url))?;
            for ((id, name), pair) in chunk.iter().zip(values.chunks(2)) {
                let ty = match pair.first().and_then(|d| d.value.as_ref()) {
                    Some(opcua::types::Variant::NodeId(t)) if t.namespace == 0 => {
                        match &t.identifier {
                            opcua::types::Identifier::Numeric(n) => discover::model_type(*n),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let Some(ty) = ty else {
                    tracing::debug!(node = %id, "variable of a type a profile cannot hold; left out");
                    continue;
                };
                let writable = matches!(
                    pair.get(1).and_then(|d| d.value.as_ref()),
                    Some(opcua::types::Variant::Byte(b)) if b & 2 != 0
                );
                out.push(discover::Variable {
                    node_id: id.to_string(),
                    browse_name: name.clone(),
                    ty,
                    writable,
                });
            }
        }
        let _ = tokio::time::timeout(s.timeout, session.disconnect()).await;
        Ok(out)
    }
}
