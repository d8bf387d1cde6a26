//! In-process node tests (see `inprocess.rs`): what the process tests cannot reach — a failing
//! storage backend, a consumer that falls behind, a twin service that stops answering.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgetwin_devicetwin::store::TwinStore;
use edgetwin_redbfile::faults::{budget_opener, DiskBudget};

use crate::health::Verdict;
use crate::inprocess::{next_on, publish, until, Harness};
use edgetwin_broker::LinkLabels;
use edgetwin_broker::{LocalClient, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_store_failure_rolls_back_answers_store_failed_and_recovers_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("twins.redb");
    let budget = DiskBudget::unlimited();
    let (store, _, _) = TwinStore::open_with(&path, budget_opener(&path, budget.clone())).unwrap();
    let h = Harness::start(store, &["d-1"]).await;
    let (mut c, mut rx) = h
        .client(
            "registry",
            &["dt/d-1/twin", "dt/d-1/error", "dt/d-1/get/result"],
        )
        .await;

    h.publish_stored("dt/d-1/desired", r#"{"mode":"a"}"#)
        .await
        .expect("committed, so acknowledged");
    loop {
        if next_on(&mut rx, "dt/d-1/twin").await["desired"]["mode"] == "a" {
            break;
        }
    }

    budget.fill();
    let not_acked = h.publish_stored("dt/d-1/desired", r#"{"mode":"b"}"#).await;
    assert!(
        not_acked.is_err_and(|e| e.0.contains("twins.redb")),
        "a patch the store could not commit is not acknowledged"
    );
    let err = next_on(&mut rx, "dt/d-1/error").await;
    assert_eq!(err["code"], "store_failed", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("twins.redb"),
        "{err}"
    );
    let failing = |h: &Harness| {
        matches!(
            h.health.verdict(crate::twin_service::STORE_CHECK),
            Some(Verdict::Failing(_))
        )
    };
    assert!(
        failing(&h),
        "readiness must fail while the store cannot commit"
    );
    // Memory never runs ahead of disk: the twin still says "a".
    publish(&mut c, "dt/d-1/get", r#"{"id":"g1"}"#).await;
    let got = next_on(&mut rx, "dt/d-1/get/result").await;
    assert_eq!(got["twin"]["desired"]["mode"], "a", "{got}");

    // Space is freed; nobody publishes: the service's probe turns readiness back on.
    budget.free();
    until("the store check passes again", || !failing(&h)).await;
    h.publish_stored("dt/d-1/desired", r#"{"mode":"c"}"#)
        .await
        .expect("committed once space is back");
    loop {
        if next_on(&mut rx, "dt/d-1/twin").await["desired"]["mode"] == "c" {
            break;
        }
    }
    h.service_stop.cancel();
    h.intake.cancel();
    let _ = h.service.unwrap_or_else(|| unreachable!()).await;
    let (_, twins, _) = TwinStore::open(&path).unwrap();
    let mode = twins[0].desired["mode"].value.clone();
    assert_eq!(
        mode,
        Some(serde_json::json!("c")),
        "the store holds what was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_canary_turns_readiness_off_while_the_twin_service_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = TwinStore::open(&dir.path().join("twins.redb")).unwrap();
    let h = Harness::start(store, &["d-1"]).await;
    let (addr, login) = h.front_door().await;
    canary_follows_the_twin_service(h, crate::canary::Via::Listener(addr, login)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_canary_through_the_broker_link_turns_readiness_off_too() {
    // The way it asks where every listener wants TLS.
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = TwinStore::open(&dir.path().join("twins.redb")).unwrap();
    let h = Harness::start(store, &["d-1"]).await;
    let (client, rx) = LocalClient::connect(
        &h.broker,
        "edgetwin-canary",
        &[crate::canary::reply_filter().as_str()],
        16,
        h.intake.clone(),
        &h.tracker,
    )
    .await
    .unwrap();
    canary_follows_the_twin_service(h, crate::canary::Via::Broker(client, rx)).await;
}

/// The canary reports Ok while the twin service answers, then the silence once it stops.
async fn canary_follows_the_twin_service(mut h: Harness, via: crate::canary::Via) {
    let timing = crate::canary::Timing {
        every: Duration::from_millis(100),
        within: Duration::from_millis(500),
    };
    h.tracker.spawn(crate::canary::run(
        via,
        "t".into(),
        h.health.clone(),
        timing,
        h.intake.clone(),
    ));
    let verdict = |h: &Harness| h.health.verdict(crate::canary::CHECK);
    until("the canary gets its answer", || {
        verdict(&h) == Some(Verdict::Ok)
    })
    .await;
    // The canary's requests are not counted as rejections.
    assert!(h
        .metrics
        .encode()
        .unwrap()
        .contains("edgetwin_twin_updates_rejected_total{reason=\"unknown_device\"} 0"));

    // The twin service stops answering (here: it stopped; a stall looks the same from outside).
    h.service_stop.cancel();
    let _ = h.service.take().unwrap_or_else(|| unreachable!()).await;
    until(
        "the canary reports the silence",
        || matches!(verdict(&h), Some(Verdict::Failing(why)) if why.contains("did not answer")),
    )
    .await;
    h.intake.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_a_consumer_that_falls_behind_the_broker_log_is_detected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = TwinStore::open(&dir.path().join("twins.redb")).unwrap();
    let h = Harness::start(store, &[]).await;
    // A consumer that reads nothing while 30,000 messages (about 6 MB) pass: far more than its
    // log (INTERNAL_SEGMENT) and its queue in the router can hold.
    let (_slow, mut rx) = LocalClient::connect(
        &h.broker,
        "containers",
        &["slow/#"],
        1,
        h.intake.clone(),
        &h.tracker,
    )
    .await
    .unwrap();
    let (mut producer, _) = h.client("cloud-relay", &[]).await;
    const N: u64 = 30_000;
    for i in 0..N {
        producer
            .publish(Message::new(format!("slow/{}", i % 16), vec![b'x'; 180]))
            .await;
    }
    let mut received = 0u64;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
        received += 1;
    }
    let skipped = h
        .broker
        .metrics()
        .local_link_skipped
        .get_or_create(&LinkLabels {
            link: "containers".into(),
        })
        .get();
    assert!(
        skipped > 0,
        "the lag must be detected (received {received})"
    );
    assert_eq!(
        received + skipped,
        N,
        "every message is either delivered or counted as skipped"
    );
    h.intake.cancel();
}
