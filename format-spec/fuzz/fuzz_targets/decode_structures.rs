//! Header, footer and index-entry decoding on arbitrary bytes: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_format::footer::ImageFooter;
use strata_format::index::{EntryLimits, IndexEntry};
use strata_format::layout::{FOOTER_SIZE, INDEX_ENTRY_SIZE};
use strata_format::{ImageHeader, Loc};

fuzz_target!(|data: &[u8]| {
    let loc = Loc::file(std::path::Path::new("fuzz"));
    let _ = ImageHeader::decode(data, &loc);
    if data.len() >= FOOTER_SIZE {
        let b: [u8; FOOTER_SIZE] = data[..FOOTER_SIZE].try_into().unwrap();
        let _ = ImageFooter::decode(&b, &loc, 0);
    }
    if data.len() >= INDEX_ENTRY_SIZE + 8 {
        let n = |i: usize| u64::from_le_bytes(data[INDEX_ENTRY_SIZE..INDEX_ENTRY_SIZE + 8].try_into().unwrap()).rotate_left(i as u32);
        let limits = EntryLimits {
            block_count: n(0),
            block_size: n(7) as u32,
            data_start: n(13),
            data_end: n(29),
            max_stored: n(41) as u32,
            zero_entries: data[0] & 1 == 0,
            groups: data[0] & 2 == 0,
            patches: data[0] & 4 == 0,
        };
        let _ = IndexEntry::decode(&data[..INDEX_ENTRY_SIZE], &loc, n(3), &limits);
    }
});
