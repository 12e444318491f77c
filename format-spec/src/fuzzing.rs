//! What the `open_image` fuzz target does with its input, shared with the regression test that
//! replays the corpus and every input a fuzzer crashed on (`tests/fuzz_regressions.rs`), so that
//! both drive the same calls: open, index check, version resolution, and every block read
//! through `read_plan::read_window` and the frame cache, the one read path of the mount and
//! restore (block by block, as restore and merge ask, and in 128 KiB windows decoded on all
//! cores with hash checks, as the mount serves them). Each must end in data or an error, never
//! a panic, a huge allocation or a hang.

use std::path::Path;
use std::sync::Arc;

use crate::frame_cache::FrameCache;
use crate::read_plan::read_window;
use crate::{ImageFile, VersionReader};

/// Opens `path` as the only image of a version and reads everything of it there is to read.
pub fn open_and_read(path: &Path) {
    let Ok(image) = ImageFile::open(path) else { return };
    let _ = image.check_index();
    // Block maps of huge claimed sources are refused or allocated by design (8 bytes a block);
    // past 32 Mi blocks that is the allocator's business, not the parser's.
    if image.header.block_count() > 1 << 25 {
        return;
    }
    let Ok(reader) = VersionReader::from_chain(vec![Arc::new(image)]) else { return };
    if reader.block_count() > 4096 {
        return;
    }
    let mut out = vec![0u8; reader.block_size() as usize];
    let blocks = FrameCache::new(0, reader.block_size(), false);
    for b in 0..reader.block_count() {
        let _ = reader.read_block(b, &blocks, &mut out);
    }
    let cache = FrameCache::new(0, reader.block_size(), true);
    let mut window = vec![0u8; 128 << 10];
    let mut at = 0;
    while at < reader.source_size() {
        let _ = read_window(&reader, &cache, 0, reader.source_size(), at, &mut window, true);
        at += window.len() as u64;
    }
    let _ = reader.digest_from_index();
}
