//! A repository folder built from arbitrary bytes: an identity file and up to three images (the
//! input is split at 0xFF 0x00 0xFF markers). Opening, scanning, checking indexes, working out
//! every version's chain and health, and opening each restorable version must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_format::Repository;

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(3).position(|w| w == [0xFF, 0x00, 0xFF]) {
        parts.push(&rest[..i]);
        rest = &rest[i + 3..];
    }
    parts.push(rest);
    parts
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("strata.repo"), parts[0]).unwrap();
    for (i, image) in parts.iter().skip(1).take(3).enumerate() {
        std::fs::write(dir.path().join(format!("v{:08}.strata", i + 1)), image).unwrap();
    }
    let Ok(repo) = Repository::open(dir.path()) else { return };
    let Ok(mut state) = repo.scan() else { return };
    state.check_indexes();
    for status in state.statuses() {
        let small = status.image.as_ref().is_some_and(|i| i.header.block_count() <= 1 << 25);
        if status.restorable() && small {
            if let Ok(reader) = state.open_version(status.id) {
                if reader.block_count() <= 4096 {
                    let _ = reader.digest_from_index();
                }
            }
        }
    }
    let _ = state.latest_restorable();
    let _ = repo.next_version_id(&state);
});
