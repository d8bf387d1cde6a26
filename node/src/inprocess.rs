//! In-process node tests: the real router, the real twin service and stores, driven through
//! in-process links and (for the canary) the real front door on a free loopback port. rumqttd's
//! router thread cannot be stopped, so each test's router lives until the test binary exits;
//! every test gets its own.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgetwin_devicetwin::store::TwinStore;
use rumqttd::Forward;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::twin_service::{self, Input, TwinService, TwinServiceConfig};
use edgetwin_broker::EmbeddedBroker;
use edgetwin_broker::MqttConfig;
use edgetwin_broker::{LocalClient, Message};

/// A model with one writable string property and devices `names`.
pub fn profiles(names: &[&str]) -> edgetwin_profile::ProfileSet {
    let mut yaml = String::from(
        "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: m}\nspec:\n  protocol: modbus\n  properties:\n    - {name: mode, type: string, accessMode: ReadWrite}\n",
    );
    for n in names {
        yaml.push_str(&format!(
            "---\napiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: {n}}}\nspec:\n  deviceModelRef: m\n  protocol:\n    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: 5020, slaveID: 1}}\n"
        ));
    }
    let docs = edgetwin_profile::parse_str("test.yaml", &yaml).unwrap();
    edgetwin_profile::validate(&[("test.yaml".to_string(), docs)], &Default::default()).unwrap()
}

/// The default broker settings.
pub fn mqtt_config() -> MqttConfig {
    MqttConfig::default()
}

/// A running twin service on its own router.
pub struct Harness {
    pub broker: EmbeddedBroker,
    pub cfg: MqttConfig,
    /// The way the front door hands clients' twin patches to the service.
    pub front: crate::intake::NodeIntake,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub tracker: TaskTracker,
    pub intake: CancellationToken,
    pub service_stop: CancellationToken,
    pub service: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// Router + twin service over `store` with devices `names` registered.
    pub async fn start(store: TwinStore, names: &[&str]) -> Harness {
        let cfg = mqtt_config();
        let broker = EmbeddedBroker::start_router(&cfg, &[]);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let tracker = TaskTracker::new();
        let intake = CancellationToken::new();
        let (tx, rx) = mpsc::channel::<Input>(1024);
        let front = crate::intake::NodeIntake {
            twins: tx.clone(),
            upstream: None,
            retained: None,
        };
        let link = LocalClient::connect_into(
            &broker,
            "twin-service",
            &twin_service::FILTERS,
            tx,
            intake.clone(),
            &tracker,
        )
        .await
        .unwrap();
        let mut service = TwinService::new(
            link,
            Arc::new(store),
            Vec::new(),
            TwinServiceConfig {
                max_batch: 64,
                max_properties_per_patch: 16,
                snapshot_every: Duration::from_secs(3600),
            },
            None,
            twin_service::Reports {
                history: None,
                metrics: metrics.clone(),
                health: health.clone(),
                directory: Arc::new(twin_service::Directory::default()),
            },
        )
        .unwrap();
        service.apply_registry_now(&profiles(names)).await.unwrap();
        let service_stop = CancellationToken::new();
        let service = Some(tokio::spawn(service.run(rx, service_stop.clone())));
        Harness {
            broker,
            cfg,
            front,
            metrics,
            health,
            tracker,
            intake,
            service_stop,
            service,
        }
    }

    /// Starts a front door (the gate, as `serve` sets it up) on a free loopback port in front
    /// of the broker; returns its address and the node's own login.
    pub async fn front_door(&self) -> (SocketAddr, (String, String)) {
        let login = edgetwin_broker::fresh_login();
        let pipes = self.broker.serve_in_process(&self.cfg, &login).unwrap();
        let gate = edgetwin_gate::Gate::bind(
            edgetwin_gate::GateConfig::plain(SocketAddr::from(([127, 0, 0, 1], 0))),
            edgetwin_gate::Upstream {
                broker: edgetwin_gate::upstream::Broker::InProcess(Arc::new(move || {
                    pipes.connect()
                })),
                login: Some(login.clone()),
            },
            Arc::new(twin_service::Directory::default()),
            Arc::new(crate::intake::NodeIntake {
                twins: self.front.twins.clone(),
                upstream: None,
                retained: None,
            }),
        )
        .await
        .unwrap();
        let addr = gate.local_addrs()[0];
        self.tracker.spawn(gate.run(self.intake.clone()));
        (addr, login)
    }

    /// Publishes as a front-door client does on a stored topic: handed to the twin service
    /// first; returns once the front door could acknowledge it (`Err`: it would not).
    pub async fn publish_stored(
        &self,
        topic: &str,
        payload: &str,
    ) -> Result<(), edgetwin_gate::NotStored> {
        use edgetwin_gate::Intake;
        let commit = self
            .front
            .submit(topic, Bytes::from(payload.to_string()), false)
            .await
            .unwrap_or_else(|| panic!("{topic} is not a stored topic"));
        commit.await
    }

    /// An in-process client subscribed to `filters`.
    pub async fn client(
        &self,
        name: &'static str,
        filters: &[&str],
    ) -> (LocalClient, mpsc::Receiver<Forward>) {
        LocalClient::connect(
            &self.broker,
            name,
            filters,
            1024,
            self.intake.clone(),
            &self.tracker,
        )
        .await
        .unwrap()
    }
}

/// Publishes `payload` on `topic`.
pub async fn publish(c: &mut LocalClient, topic: &str, payload: &str) {
    c.publish(Message::new(topic, Bytes::from(payload.to_string())))
        .await;
}

/// The next message whose topic is `topic`, as JSON (panics after 10 s).
pub async fn next_on(rx: &mut mpsc::Receiver<Forward>, topic: &str) -> serde_json::Value {
    let wait = async {
        loop {
            let f = rx.recv().await.unwrap();
            if f.publish.topic == topic.as_bytes() {
                return serde_json::from_slice(&f.publish.payload).unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("nothing on {topic} within 10 s"))
}

/// Waits (up to 15 s) until `cond` holds.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
