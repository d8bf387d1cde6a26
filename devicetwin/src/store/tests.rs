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
        per_entry: false,
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
    t.apply_status(&DeviceStatusMsg {
        state: DeviceState::Online,
        ts: 31,
        message: Some("ok".into()),
    });
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
        let txn = store
            .current_db()
            .expect("open")
            .begin_write()
            .expect("txn");
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
        let txn = store
            .current_db()
            .expect("open")
            .begin_write()
            .expect("txn");
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
    let QuarantineKind::File { renamed_to, .. } = &q[0].kind else {
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

// ---- full disk: writes fail, health says so, freeing space recovers without a restart ----

#[test]
fn store_full_disk_turns_health_failing_and_freeing_space_recovers_without_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let budget = edgetwin_redbfile::faults::DiskBudget::unlimited();
    let opener = edgetwin_redbfile::faults::budget_opener(&path, budget.clone());
    let (store, _, _) = TwinStore::open_with(&path, opener).expect("open");
    let before = sample_twin("before");
    store.commit(&[&before]).expect("commit fits");
    assert_eq!(store.health(), Health::Ok);

    budget.fill();
    let lost = sample_twin("while-full");
    let err = store.commit(&[&lost]).expect_err("disk full");
    assert!(
        err.to_string()
            .starts_with(&format!("twin store {}:", path.display())),
        "{err}"
    );
    let Health::Failing { error, .. } = store.health() else {
        panic!("health must say failing while the disk is full")
    };
    assert!(error.contains(&path.display().to_string()), "{error}");
    // Probing while still full stays failing (and the next commit fails too).
    assert!(matches!(store.probe(), Health::Failing { .. }));
    assert!(store.commit(&[&lost]).is_err());

    budget.free();
    assert_eq!(store.probe(), Health::Ok, "space freed: the probe recovers");
    let after = sample_twin("after");
    store
        .commit(&[&after])
        .expect("commits work again in the same store");
    drop(store);

    let (_store, loaded, q) = TwinStore::open(&path).expect("reopen");
    assert!(q.is_empty(), "{q:?}");
    let loaded = by_device(loaded);
    assert_eq!(
        loaded.keys().cloned().collect::<Vec<_>>(),
        vec!["after".to_string(), "before".to_string()],
        "what was committed is kept, the failed batch is not there"
    );
}

#[test]
fn store_probe_writes_nothing_while_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let budget = edgetwin_redbfile::faults::DiskBudget::unlimited();
    let opener = edgetwin_redbfile::faults::budget_opener(&path, budget.clone());
    let (store, _, _) = TwinStore::open_with(&path, opener).expect("open");
    // With no budget at all, any write would fail: a healthy probe must not write.
    budget.fill();
    for _ in 0..10 {
        assert_eq!(store.probe(), Health::Ok);
    }
}

// ---- damaged files: restored from what can be salvaged and the last snapshot ----

fn numbered(name: &str, count: i64) -> Twin {
    let mut t = sample_twin(name);
    t.apply_desired(
        &model(),
        &patch(json!({"count": count})),
        Source::Local,
        100 + count,
    )
    .expect("ok");
    t
}

/// Ways a store file gets damaged on real media.
#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncatedToHalf,
    HeaderFlipped,
    PageFlipped(u64),
    PageZeroed(u64),
}

fn damage(path: &Path, how: Damage) {
    let mut bytes = std::fs::read(path).expect("read store");
    let page = |n: u64| {
        let start = (n as usize * 4096).min(bytes.len().saturating_sub(4096));
        start..(start + 4096).min(bytes.len())
    };
    match how {
        Damage::TruncatedToHalf => bytes.truncate(bytes.len() / 2),
        Damage::HeaderFlipped => bytes[..512].iter_mut().for_each(|b| *b ^= 0xFF),
        Damage::PageFlipped(n) => {
            let r = page(n);
            bytes[r].iter_mut().for_each(|b| *b ^= 0x5A)
        }
        Damage::PageZeroed(n) => {
            let r = page(n);
            bytes[r].iter_mut().for_each(|b| *b = 0)
        }
    }
    std::fs::write(path, bytes).expect("write damaged store");
}

#[test]
fn store_damage_corpus_restores_salvage_and_snapshot_and_counts_the_rest() {
    let mut cases = vec![Damage::TruncatedToHalf, Damage::HeaderFlipped];
    for n in 1..8 {
        cases.push(Damage::PageFlipped(n));
        cases.push(Damage::PageZeroed(n));
    }
    let mut restored = Vec::new();
    for how in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("twins.redb");
        // 100 twins at count 1, snapshot; then 10 of them move to count 2 and one new twin
        // arrives: those 11 changes are the ones a damaged file may lose.
        let snapshot_state: Vec<Twin> =
            (0..100).map(|i| numbered(&format!("d{i:03}"), 1)).collect();
        let late: Vec<Twin> = (0..10)
            .map(|i| numbered(&format!("d{i:03}"), 2))
            .chain([numbered("late", 2)])
            .collect();
        {
            let (store, _, _) = TwinStore::open(&path).expect("open");
            store
                .commit(&snapshot_state.iter().collect::<Vec<_>>())
                .expect("commit");
            let stats = store.snapshot().expect("snapshot");
            assert_eq!(stats.twins, 100);
            store
                .commit(&late.iter().collect::<Vec<_>>())
                .expect("commit");
        }
        damage(&path, how);

        let (_store, loaded, q) = TwinStore::open(&path).expect("a damaged file still opens");
        let loaded = by_device(loaded);
        let latest: BTreeMap<String, Twin> = by_device(snapshot_state.clone())
            .into_iter()
            .chain(by_device(late.clone()))
            .collect();
        let snap = by_device(snapshot_state.clone());
        // Whatever happened, every twin is either at its latest state or (counted) at its
        // snapshot state, and nothing unchanged since the snapshot is lost.
        for (d, twin) in &latest {
            match loaded.get(d) {
                Some(t) if t == twin => {}
                Some(t) => assert_eq!(
                    Some(t),
                    snap.get(d),
                    "{how:?} {d}: neither latest nor snapshot"
                ),
                None => assert!(
                    !snap.contains_key(d),
                    "{how:?} {d}: lost although in the snapshot"
                ),
            }
        }
        let behind = latest
            .iter()
            .filter(|(d, t)| loaded.get(*d) != Some(t))
            .count();
        match q.first().map(|q| &q.kind) {
            Some(QuarantineKind::File {
                renamed_to,
                restore,
            }) => {
                assert!(renamed_to.exists(), "{how:?}: damaged file kept aside");
                assert_eq!(
                    restore.salvaged + restore.from_snapshot,
                    loaded.len(),
                    "{how:?}"
                );
                assert!(restore.snapshot_taken_at_ms.is_some(), "{how:?}");
                assert!(
                    behind <= restore.from_snapshot + 1,
                    "{how:?}: {behind} behind, {restore:?}"
                );
                restored.push(format!("{how:?}: {restore:?}, {behind} behind"));
            }
            _ => assert_eq!(behind, 0, "{how:?}: undetected damage lost data: {q:?}"),
        }
    }
    // Page damage costs only the twins on that page: the rest are read back from the file.
    assert!(
        restored
            .iter()
            .any(|r| r.starts_with("Page") && !r.contains("salvaged: 0")),
        "{restored:#?}"
    );
    // The file-level damage must have been detected and restored, not only survived.
    assert!(
        restored.iter().any(|r| r.starts_with("TruncatedToHalf"))
            && restored.iter().any(|r| r.starts_with("HeaderFlipped")),
        "{restored:#?}"
    );
    println!("{restored:#?}");
}

#[test]
fn store_snapshot_line_damage_costs_only_that_twin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    let twins: Vec<Twin> = (0..20).map(|i| numbered(&format!("s{i:02}"), 1)).collect();
    {
        let (store, _, _) = TwinStore::open(&path).expect("open");
        store
            .commit(&twins.iter().collect::<Vec<_>>())
            .expect("commit");
        store.snapshot().expect("snapshot");
    }
    // Damage one line of the snapshot (a byte inside the 6th line), then the store file itself.
    let snap = snapshot_path(&path);
    let mut bytes = std::fs::read(&snap).expect("snapshot");
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    bytes[line_starts[5] + 20] ^= 0x01;
    std::fs::write(&snap, bytes).expect("write");
    std::fs::write(&path, vec![0xAB; 16 * 1024]).expect("destroy the store file");

    let (_store, loaded, q) = TwinStore::open(&path).expect("open");
    let Some(QuarantineKind::File { restore, .. }) = q.first().map(|q| &q.kind) else {
        panic!("expected a restore: {q:?}")
    };
    assert_eq!(restore.salvaged, 0);
    assert_eq!(restore.from_snapshot, 19);
    assert_eq!(restore.snapshot_damaged_lines, 1);
    assert_eq!(loaded.len(), 19);
}

#[test]
fn store_written_by_release_0_1_opens() {
    // A file written by edgetwin 0.1 (before the health table and snapshots existed), kept in the
    // repository so that every later release proves it still opens it.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/twins-0.1.redb");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twins.redb");
    std::fs::copy(&fixture, &path).expect("copy fixture");
    let (_store, loaded, q) = TwinStore::open(&path).expect("open 0.1 store");
    assert!(q.is_empty(), "{q:?}");
    let loaded = by_device(loaded);
    assert_eq!(loaded.len(), 3, "{:?}", loaded.keys());
    // 0.1 kept an integer reported on a float property as written, and set `lastSeen` on the
    // status's arrival; what it wrote is read as it is.
    let mut want = sample_twin("fixture-a");
    if let Some(e) = want.reported.get_mut("setpoint") {
        e.value = Some(json!(20));
    }
    want.status.last_seen = Some(32);
    assert_eq!(loaded.get("fixture-a"), Some(&want));
}
