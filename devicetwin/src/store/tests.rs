//! Store behaviour: round trips, group commit, quarantine, crash safety.

use super::*;
use crate::core::{ModelSpec, Patch, PropertySpec};
use edgetwin_contract::{AccessMode, DeviceStatusMsg, PropertyType, ProtocolName};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> ModelSpec {
    let rw = |ty| PropertySpec {
        ty,
        access: AccessMode::ReadWrite,
        minimum: None,
        maximum: None,
    };
    ModelSpec {
        name: "m".into(),
        properties: BTreeMap::from([
            ("setpoint".to_string(), rw(PropertyType::Float)),
            ("mode".to_string(), rw(PropertyType::String)),
            ("cfg".to_string(), rw(PropertyType::Object)),
            ("count".to_string(), rw(PropertyType::Int)),
        ]),
    }
}

fn patch(v: serde_json::Value) -> Patch {
    Patch::parse(v.to_string().as_bytes(), 64).expect("valid patch")
}

fn sample_twin(name: &str) -> Twin {
    let m = model();
    let mut t = Twin::new(DeviceId::new(name).expect("valid"), "m".into());
    t.apply_desired(
        &m,
        &patch(json!({"setpoint": 21.5, "mode": "eco", "cfg": {"b": 1, "a": [1, 2]}})),
        Source::Cloud,
        10,
    )
    .expect("ok");
    t.apply_desired(&m, &patch(json!({"mode": null})), Source::Local, 20)
        .expect("ok");
    let mapper = Source::Mapper(ProtocolName::new("modbus").expect("valid"));
    t.apply_reported(
        &m,
        &patch(json!({"ts": 25, "setpoint": 20, "count": 3})),
        mapper,
        30,
    )
    .expect("ok");
    t.apply_status(
        &DeviceStatusMsg {
            state: DeviceState::Online,
            ts: 31,
            message: Some("ok".into()),
        },
        32,
    );
    t
}

fn by_device(twins: Vec<Twin>) -> BTreeMap<String, Twin> {
    twins
        .into_iter()
        .map(|t| (t.device.to_string(), t))
        .collect()
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TwinStore>();
}

#[test]
fn store_round_trips_twins_with_tombstones_and_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let a = sample_twin("a-1");
    let b = sample_twin("b-2");
    assert_eq!(a.desired["mode"].value, None, "sample holds a tombstone");
    {
        let (store, twins, q) = TwinStore::open(&path).expect("open");
        assert!(twins.is_empty() && q.is_empty());
        let stats = store.commit(&[&a, &b]).expect("commit");
        assert_eq!(stats.twins, 2);
    }
    let (_store, twins, q) = TwinStore::open(&path).expect("reopen");
    assert!(q.is_empty());
    let twins = by_device(twins);
    assert_eq!(twins.len(), 2);
    assert_eq!(twins["a-1"], a);
    assert_eq!(twins["b-2"], b);
}

#[test]
fn store_commit_of_1000_twins_is_one_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let twins: Vec<Twin> = (0..1000)
        .map(|i| sample_twin(&format!("dev-{i}")))
        .collect();
    let refs: Vec<&Twin> = twins.iter().collect();
    {
        let (store, _, _) = TwinStore::open(&path).expect("open");
        let before = store.write_transactions();
        let stats = store.commit(&refs).expect("commit");
        assert_eq!(store.write_transactions(), before + 1);
        assert_eq!(stats.twins, 1000);
        assert!(stats.bytes > 1000 * 100);
    }
    let (_store, loaded, _) = TwinStore::open(&path).expect("reopen");
    assert_eq!(loaded.len(), 1000);
}

#[test]
fn store_commit_overwrites_and_remove_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let mut a = sample_twin("a-1");
    {
        let (store, _, _) = TwinStore::open(&path).expect("open");
        store.commit(&[&a]).expect("commit");
        a.apply_desired(&model(), &patch(json!({"setpoint": 30})), Source::Local, 99)
            .expect("ok");
        store.commit(&[&a]).expect("commit");
        store.commit(&[&sample_twin("b-2")]).expect("commit");
        store
            .remove(&DeviceId::new("b-2").expect("valid"))
            .expect("remove");
        store
            .remove(&DeviceId::new("never").expect("valid"))
            .expect("remove absent is fine");
    }
    let (_store, loaded, _) = TwinStore::open(&path).expect("reopen");
    assert_eq!(loaded, vec![a]);
}

#[test]
fn store_reopen_after_drop_without_close_keeps_every_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let twins: Vec<Twin> = (0..20).map(|i| sample_twin(&format!("d{i}"))).collect();
    {
        let (store, _, _) = TwinStore::open(&path).expect("open");
        for t in &twins {
            store.commit(&[t]).expect("commit");
        }
        // dropped here, no explicit close
    }
    let (_store, loaded, q) = TwinStore::open(&path).expect("reopen");
    assert!(q.is_empty());
    assert_eq!(by_device(loaded), by_device(twins));
}

#[test]
fn store_quarantines_a_corrupt_record_and_loads_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let good = sample_twin("good");
    {
        let (store, _, _) = TwinStore::open(&path).expect("open");
        store.commit(&[&good]).expect("commit");
        let txn = store.db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(TWINS).expect("table");
            t.insert(b"bad-json".as_slice(), b"{not json".as_slice())
                .expect("insert");
            t.insert(b"bad-format".as_slice(), br#"{"format":99}"#.as_slice())
                .expect("insert");
            t.insert(b"$bad key".as_slice(), b"{}".as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let (store, loaded, q) = TwinStore::open(&path).expect("reopen");
    assert_eq!(loaded, vec![good.clone()]);
    let keys: Vec<&str> = q.iter().map(|q| q.key.as_str()).collect();
    assert_eq!(keys, vec!["$bad key", "bad-format", "bad-json"]);
    for item in &q {
        assert!(matches!(item.kind, QuarantineKind::Record { .. }));
        assert!(!item.error.is_empty());
    }
    // The bytes are kept in the quarantine table, not deleted.
    {
        let txn = store.db.begin_write().expect("txn");
        {
            let qt = txn.open_table(QUARANTINE).expect("table");
            let QuarantineKind::Record { quarantine_key } = &q[2].kind else {
                panic!("record")
            };
            let v = qt
                .get(quarantine_key.as_bytes())
                .expect("get")
                .expect("present");
            assert_eq!(v.value(), b"{not json");
        }
        txn.abort().expect("abort");
    }
    drop(store);
    let (_store, loaded, q) = TwinStore::open(&path).expect("reopen again");
    assert_eq!(loaded, vec![good]);
    assert!(
        q.is_empty(),
        "quarantined records stay out of the twins table"
    );
}

#[test]
fn store_moves_a_corrupt_file_aside_and_starts_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    std::fs::write(&path, vec![0xAB; 64 * 1024]).expect("write garbage");
    let (store, loaded, q) = TwinStore::open(&path).expect("open starts empty");
    assert!(loaded.is_empty());
    assert_eq!(q.len(), 1);
    let QuarantineKind::File { renamed_to } = &q[0].kind else {
        panic!("expected a file quarantine, got {q:?}")
    };
    assert!(renamed_to
        .file_name()
        .expect("name")
        .to_string_lossy()
        .starts_with("twins.redb.corrupt-"));
    assert_eq!(
        std::fs::read(renamed_to).expect("kept"),
        vec![0xAB; 64 * 1024]
    );
    store.commit(&[&sample_twin("a")]).expect("new store works");
}

#[test]
fn store_error_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing-dir").join("twins.redb");
    let err = TwinStore::open(&path).expect_err("cannot create in a missing directory");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("twin store {}:", path.display())),
        "{msg}"
    );
}

const CHILD_ENV: &str = "EDGETWIN_TWIN_STORE_CRASH_CHILD";

/// Not a test on its own: when [`CHILD_ENV`] names a store file, it commits forever, printing
/// `committed {i}` after each commit returns, until the parent test SIGKILLs it.
#[test]
fn store_crash_child_commits_until_killed() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let (store, _, _) = TwinStore::open(Path::new(&path)).expect("child open");
    let m = model();
    let mut twins: Vec<Twin> = (0..5)
        .map(|d| {
            Twin::new(
                DeviceId::new(format!("crash-{d}")).expect("valid"),
                "m".into(),
            )
        })
        .collect();
    for i in 0i64.. {
        let t = &mut twins[(i % 5) as usize];
        t.apply_desired(&m, &patch(json!({"count": i})), Source::Local, i)
            .expect("ok");
        let other = twins[((i + 1) % 5) as usize].clone();
        store
            .commit(&[&twins[(i % 5) as usize], &other])
            .expect("commit");
        println!("committed {i}");
    }
}

#[test]
fn store_keeps_every_reported_commit_across_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "store::tests::store_crash_child_commits_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut last: Option<i64> = None;
    let started = Instant::now();
    // Let it commit a while, then kill it mid-stream.
    while last.is_none_or(|l| l < 60) && started.elapsed() < Duration::from_secs(60) {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(n) = line.strip_prefix("committed ") {
            last = Some(n.trim().parse().expect("number"));
        }
    }
    child.kill().expect("SIGKILL child");
    // Lines printed before the kill are still in the pipe: they count too.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("committed ") {
            if let Ok(n) = n.trim().parse() {
                last = Some(n);
            }
        }
    }
    let _ = child.wait();
    let last = last.expect("the child reported commits");
    assert!(last >= 10, "child committed only {last}");

    let (_store, loaded, q) = TwinStore::open(&path).expect("reopen after SIGKILL");
    assert!(q.is_empty(), "nothing quarantined after a crash: {q:?}");
    let loaded = by_device(loaded);
    // Every commit i wrote crash-{i % 5} with count = i; so for each device the stored count is at
    // least the last reported commit for it.
    for d in 0..5i64 {
        let expected = (0..=last).rev().find(|i| i % 5 == d);
        let Some(expected) = expected else { continue };
        let twin = loaded.get(&format!("crash-{d}")).expect("device present");
        let count = twin.desired["count"]
            .value
            .as_ref()
            .and_then(|v| v.as_i64())
            .expect("count");
        assert!(
            count >= expected,
            "crash-{d}: stored {count}, reported committed {expected}"
        );
    }
}
