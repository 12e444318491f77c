//! An arbitrary file opened as an image: open, index check, version resolution and reading every
//! block (for small sources) must end in data or an error, never a panic, a huge allocation or
//! a hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use strata_format::{ImageFile, ReadScratch, VersionReader};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v00000001.strata");
    std::fs::write(&path, data).unwrap();
    let Ok(image) = ImageFile::open(&path) else { return };
    let _ = image.check_index();
    // Block maps of huge claimed sources are refused or allocated by design (8 bytes a block);
    // past 32 Mi blocks that is the allocator's business, not the parser's.
    if image.header.block_count() > 1 << 25 {
        return;
    }
    let Ok(reader) = VersionReader::from_chain(vec![Arc::new(image)]) else { return };
    if reader.block_count() <= 4096 {
        let mut out = vec![0u8; reader.block_size() as usize];
        let mut scratch = ReadScratch::new();
        for b in 0..reader.block_count() {
            let _ = reader.read_block(b, &mut scratch, &mut out);
        }
        let _ = reader.digest_from_index();
    }
});
