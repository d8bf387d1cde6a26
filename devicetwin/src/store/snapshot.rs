//! The twin store's snapshot file: a consistent copy of every twin record, one line each, every
//! line checked by its own CRC-32C, so that a damaged store file (or a damaged snapshot) costs
//! as few twins as possible. Format in the store's module doc.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::decode_record;
use crate::core::Twin;

const FORMAT: u32 = 1;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Where the snapshot of the store at `store` lives: `{file name}.snapshot` beside it.
pub fn snapshot_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".snapshot");
    PathBuf::from(name)
}

/// What one snapshot wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Twins written.
    pub twins: usize,
    /// Size of the file.
    pub bytes: u64,
    /// When it was taken (unix ms).
    pub taken_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    format: u32,
    taken_at: i64,
    twins: usize,
}

fn line(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(format!("{:08x} ", CRC.checksum(body)).as_bytes());
    out.extend_from_slice(body);
    out.push(b'\n');
}

/// Writes `records` (encoded twin records) to `target` atomically: temporary file, fsync,
/// rename, fsync of the folder.
pub(super) fn write(target: &Path, records: &[Vec<u8>]) -> std::io::Result<SnapshotStats> {
    let taken_at_ms = edgetwin_contract::now_ms();
    let header = Header {
        format: FORMAT,
        taken_at: taken_at_ms,
        twins: records.len(),
    };
    let mut out = Vec::with_capacity(records.iter().map(|r| r.len() + 10).sum::<usize>() + 64);
    line(&mut out, &serde_json::to_vec(&header)?);
    for r in records {
        line(&mut out, r);
    }
    edgetwin_redbfile::write_atomically(target, &out)?;
    Ok(SnapshotStats {
        twins: records.len(),
        bytes: out.len() as u64,
        taken_at_ms,
    })
}

/// What [`read`] found.
#[derive(Debug, Default)]
pub(super) struct Read {
    pub twins: Vec<Twin>,
    pub taken_at_ms: Option<i64>,
    /// Lines that failed their checksum or did not decode, and twins the header promised but
    /// the file no longer holds (a truncated snapshot).
    pub damaged_lines: usize,
}

/// Reads the snapshot at `path`; a missing or unreadable file is an empty snapshot.
pub(super) fn read(path: &Path) -> Read {
    let Ok(bytes) = std::fs::read(path) else {
        return Read::default();
    };
    let mut out = Read::default();
    let mut promised = None;
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let Some(body) = checked(raw) else {
            out.damaged_lines += 1;
            continue;
        };
        if i == 0 {
            match serde_json::from_slice::<Header>(body) {
                Ok(h) if h.format == FORMAT => {
                    out.taken_at_ms = Some(h.taken_at);
                    promised = Some(h.twins);
                }
                _ => out.damaged_lines += 1,
            }
            continue;
        }
        match decode_record(body) {
            Ok(t) => out.twins.push(t),
            Err(_) => out.damaged_lines += 1,
        }
    }
    if let Some(n) = promised {
        out.damaged_lines = out.damaged_lines.max(n.saturating_sub(out.twins.len()));
    }
    out
}

/// The body of a line whose checksum matches.
fn checked(raw: &[u8]) -> Option<&[u8]> {
    let (crc, body) = (raw.get(..8)?, raw.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    (raw.get(8) == Some(&b' ') && CRC.checksum(body) == crc).then_some(body)
}
