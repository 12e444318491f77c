//! A repository folder built from arbitrary bytes: an identity file and up to three images (the
//! input is split at 0xFF 0x00 0xFF markers). Opening, scanning, checking indexes, working out
//! every version's chain and health, and reading each restorable version through the read path
//! (`strata_format::fuzzing::open_repository_and_read`) must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_format::fuzzing::open_repository_and_read(data);
});
