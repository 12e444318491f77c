//! What the `decode_structures`, `open_image` and `open_repository` fuzz targets do with their
//! input, shared with
//! the regression test that replays their corpora and every input a fuzzer crashed on
//! (`tests/fuzz_regressions.rs`), so that both drive the same calls: open, index check, version
//! resolution, and every block read through `read_plan::read_window` and the frame cache, the
//! one read path of the mount and restore (block by block, as restore and merge ask, and in
//! 128 KiB windows decoded on all cores with hash checks, as the mount serves them). A lone
//! image is a full; a repository's deltas bring patches and patch groups over their bases. Each
//! must end in data or an error, never a panic, a huge allocation or a hang.

use std::path::Path;
use std::sync::Arc;

use crate::crypto::KeySlots;
use crate::footer::ImageFooter;
use crate::frame_cache::FrameCache;
use crate::index::{EntryLimits, IndexEntry};
use crate::layout::{FOOTER_SIZE, INDEX_ENTRY_SIZE};
use crate::read_plan::read_window;
use crate::{ImageFile, ImageHeader, Loc, Repository, VersionReader};

/// Decodes `data` as a header, a footer, an index entry (under limits taken from its bytes)
/// and, when it is UTF-8, a key slots file. Returns whether it parsed as a key slots file.
pub fn decode_structures(data: &[u8]) -> bool {
    let loc = Loc::file(Path::new("fuzz"));
    let _ = ImageHeader::decode(data, &loc);
    if let Some(b) = data.get(..FOOTER_SIZE) {
        let _ = ImageFooter::decode(b.try_into().expect("FOOTER_SIZE bytes"), &loc, 0);
    }
    if let Some(word) = data.get(INDEX_ENTRY_SIZE..INDEX_ENTRY_SIZE + 8) {
        let n = |i: u32| u64::from_le_bytes(word.try_into().expect("8 bytes")).rotate_left(i);
        let limits = EntryLimits {
            block_count: n(0),
            block_size: n(7) as u32,
            data_start: n(13),
            data_end: n(29),
            max_stored: n(41) as u32,
            zero_entries: data[0] & 1 == 0,
            groups: data[0] & 2 == 0,
            group_max_bytes: n(53),
            patches: data[0] & 4 == 0,
            patch_groups: data[0] & 8 == 0,
        };
        let _ = IndexEntry::decode(&data[..INDEX_ENTRY_SIZE], &loc, n(3), &limits);
    }
    std::str::from_utf8(data).is_ok_and(|text| KeySlots::parse(text).is_ok())
}

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
    read_version(&reader);
}

/// Reads every block of `reader` (at most 4096 blocks) as restore and the mount do.
fn read_version(reader: &VersionReader) {
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
        let _ = read_window(reader, &cache, 0, reader.source_size(), at, &mut window, true);
        at += window.len() as u64;
    }
    let _ = reader.digest_from_index();
}

/// Splits `data` at 0xFF 0x00 0xFF markers into an identity file and up to three images, puts
/// them in a repository folder, and opens, scans, checks and reads every restorable version;
/// returns how many versions it read.
pub fn open_repository_and_read(data: &[u8]) -> usize {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(3).position(|w| w == [0xFF, 0x00, 0xFF]) {
        parts.push(&rest[..i]);
        rest = &rest[i + 3..];
    }
    parts.push(rest);
    let Ok(dir) = tempfile::tempdir() else { return 0 };
    let _ = std::fs::write(dir.path().join("strata.repo"), parts[0]);
    for (i, image) in parts.iter().skip(1).take(3).enumerate() {
        let _ = std::fs::write(dir.path().join(format!("v{:08}.strata", i + 1)), image);
    }
    let Ok(repo) = Repository::open(dir.path()) else { return 0 };
    let Ok(mut state) = repo.scan() else { return 0 };
    state.check_indexes();
    let mut read = 0;
    for status in state.statuses() {
        let small = status.image.as_ref().is_some_and(|i| i.header.block_count() <= 1 << 25);
        if status.restorable() && small {
            if let Ok(reader) = state.open_version(status.id) {
                if reader.block_count() <= 4096 {
                    let _ = reader.digest_from_index();
                    read_version(&reader);
                    read += 1;
                }
            }
        }
    }
    let _ = state.latest_restorable();
    let _ = repo.next_version_id(&state);
    read
}
