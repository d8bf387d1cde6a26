//! Durable append throughput of the outbox by batch size (group commit), plus ack/drain
//! throughput and file sizes. Run: `cargo run --release -p edgetwin-outbox --example
//! outbox_throughput [records] [dir]` (default 100000 records, a temporary directory; give a
//! directory on the disk you care about, since fsync cost is what this measures).

use std::path::PathBuf;
use std::time::Instant;

use edgetwin_outbox::{Limits, NewRecord, Outbox};

fn record(i: u64, ts_ms: i64) -> NewRecord {
    NewRecord {
        ts_ms,
        topic: format!("edgetwin/node-1/dt/meter-{}/reported", i % 50),
        payload: format!(
            "{{\"voltage\":{}.{},\"current\":{},\"ts\":{ts_ms}}}",
            200 + i % 40,
            i % 10,
            i % 17
        )
        .into_bytes(),
        qos: 1,
        retain: false,
        key: format!("meter-{}", i % 50),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map_or_else(|| tmp.path().to_path_buf(), PathBuf::from);
    let now = 1_700_000_000_000i64;

    println!(
        "records per run: {total}; record stored size: {} bytes",
        record(0, now).stored_len()
    );
    println!(
        "| batch | append records/s | commits/s | ack (1000/txn) records/s | file after append | after drain (auto-compacts at >= 8 MiB) | after compact() |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for batch in [1u64, 10, 100, 1000] {
        let path = dir.join(format!("outbox-throughput-{batch}.redb"));
        let _ = std::fs::remove_file(&path);
        let (outbox, _) = Outbox::open(&path, Limits::default())?;
        // Batch size 1 is slow (one fsync per record): measure it on a tenth of the records.
        let n = if batch == 1 { total / 10 } else { total };
        let started = Instant::now();
        let mut seqs = Vec::with_capacity(n as usize);
        let mut i = 0;
        while i < n {
            let b: Vec<NewRecord> = (i..(i + batch).min(n)).map(|j| record(j, now)).collect();
            i += b.len() as u64;
            let report = outbox.append(b, now)?;
            seqs.extend(report.seqs.into_iter().flatten());
        }
        let append_s = started.elapsed().as_secs_f64();
        let full = outbox.stats().file_bytes;
        let started = Instant::now();
        for chunk in seqs.chunks(1000) {
            outbox.ack(chunk)?;
        }
        let ack_s = started.elapsed().as_secs_f64();
        let drained = outbox.stats().file_bytes;
        let started = Instant::now();
        let compacted = outbox.compact()?.file_bytes_after;
        let compact_ms = started.elapsed().as_secs_f64() * 1000.0;
        println!(
            "| {batch} | {:.0} | {:.0} | {:.0} | {} | {} | {} ({compact_ms:.0} ms) |",
            n as f64 / append_s,
            (n as f64 / batch as f64) / append_s,
            n as f64 / ack_s,
            human(full),
            human(drained),
            human(compacted),
        );
        drop(outbox);
        let _ = std::fs::remove_file(&path);
    }
    steady_state(&dir, total, now)?;
    Ok(())
}

/// Space reuse: a standing backlog of 10,000 records while `total` more flow through in batches
/// of 100 (append 100, ack the oldest 100). The file must stop growing once the backlog is
/// reached; then compaction with 10% of the peak still live.
fn steady_state(
    dir: &std::path::Path,
    total: u64,
    now: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join("outbox-throughput-steady.redb");
    let _ = std::fs::remove_file(&path);
    let (outbox, _) = Outbox::open(&path, Limits::default())?;
    let mut queue = std::collections::VecDeque::new();
    let mut i = 0;
    let mut sizes = Vec::new();
    let started = Instant::now();
    while i < total + 10_000 {
        let b: Vec<NewRecord> = (i..i + 100).map(|j| record(j, now)).collect();
        i += 100;
        queue.extend(outbox.append(b, now)?.seqs.into_iter().flatten());
        if queue.len() > 10_000 {
            let acks: Vec<u64> = queue.drain(..100).collect();
            outbox.ack(&acks)?;
        }
        if i % (total / 5).max(100) == 0 {
            sizes.push(human(outbox.stats().file_bytes));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!();
    println!(
        "steady state (backlog 10,000, append 100 + ack 100 per step): {:.0} records/s through; file size every {} records: {}",
        (total + 10_000) as f64 / secs,
        (total / 5).max(100),
        sizes.join(", ")
    );
    // Drain to 1,000 live records (10% of the peak) and compact.
    let acks: Vec<u64> = queue.drain(..queue.len() - 1_000).collect();
    for chunk in acks.chunks(1000) {
        outbox.ack(chunk)?;
    }
    let before = outbox.stats().file_bytes;
    let started = Instant::now();
    let after = outbox.compact()?.file_bytes_after;
    println!(
        "compact with 1,000 records live: {} -> {} in {:.0} ms",
        human(before),
        human(after),
        started.elapsed().as_secs_f64() * 1000.0
    );
    drop(outbox);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}
