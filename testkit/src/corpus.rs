//! Stable-toolchain replay of the committed fuzz corpora (`fuzz/corpus/{target}/`): every
//! committed input, then seeded mutations of them (bit flips, truncations, splices) and seeded
//! random inputs, through the same property the cargo-fuzz target checks
//! (`fuzz/props/{target}.rs`). cargo-fuzz needs nightly; this runs in the test command.

use std::path::PathBuf;

/// The committed inputs of `target`, sorted by file name.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

/// Runs `check` over the corpus of `target` and `rounds` seeded variations of it. A failing
/// input is written to `target/fuzz-replay-{target}.bin` and named in the panic, so it can be
/// added to the corpus once fixed.
pub fn replay(target: &str, rounds: usize, check: fn(&[u8])) {
    let inputs = corpus(target);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ target.len() as u64;
    let mut next = move || {
        // xorshift64*: enough to vary inputs; the sequence is fixed by the target name.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let run = |what: String, data: Vec<u8>| {
        let r = std::panic::catch_unwind(|| check(&data));
        if r.is_err() {
            let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(format!("fuzz-replay-{target}.bin"));
            let _ = std::fs::write(&out, &data);
            panic!(
                "{target}: the property failed on {what} (input saved to {})",
                out.display()
            );
        }
    };
    for (name, data) in &inputs {
        run(format!("corpus file {name}"), data.clone());
    }
    for round in 0..rounds {
        let (name, base) = &inputs[(next() as usize) % inputs.len()];
        let mut data = base.clone();
        match next() % 4 {
            0 if !data.is_empty() => {
                for _ in 0..=(next() % 4) {
                    let i = (next() as usize) % data.len();
                    data[i] ^= 1 << (next() % 8);
                }
            }
            1 => data.truncate((next() as usize) % (data.len() + 1)),
            2 => {
                let (_, other) = &inputs[(next() as usize) % inputs.len()];
                let cut = (next() as usize) % (other.len() + 1);
                data.extend_from_slice(&other[cut..]);
            }
            _ => {
                let len = (next() as usize) % 512;
                data = (0..len).map(|_| next() as u8).collect();
            }
        }
        run(format!("variation {round} of {name}"), data);
    }
}
