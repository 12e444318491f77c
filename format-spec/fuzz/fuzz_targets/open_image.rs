//! An arbitrary file opened as an image and read through the mount's and restore's read path
//! (`strata_format::fuzzing::open_and_read`): data or an error, never a panic, a huge allocation
//! or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v00000001.strata");
    std::fs::write(&path, data).unwrap();
    strata_format::fuzzing::open_and_read(&path);
});
