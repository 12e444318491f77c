//! Deduplication within one image: remembers where this image stores each block content (by
//! BLAKE3 hash) so that a block whose content is already stored gets an entry pointing at those
//! bytes instead of a second copy. Memory is bounded: past `MAX_REMEMBERED` contents, new ones
//! are no longer remembered (later duplicates of them are stored again, which is only larger).

use std::collections::HashMap;

use strata_format::IndexEntry;

/// About 100 bytes each: 512 Ki contents (32 GiB of distinct 64 KiB blocks) cost ~50 MiB.
pub const MAX_REMEMBERED: usize = 512 << 10;

#[derive(Default)]
pub struct Dedup {
    stored: HashMap<[u8; 32], IndexEntry>,
}

impl Dedup {
    /// The entry of a block already stored in this image with content hash `hash`.
    pub fn find(&self, hash: &[u8; 32]) -> Option<&IndexEntry> {
        self.stored.get(hash)
    }

    /// Remembers where `entry`'s content is stored (the first place wins).
    pub fn remember(&mut self, entry: &IndexEntry) {
        if self.stored.len() < MAX_REMEMBERED {
            self.stored.entry(entry.hash).or_insert(*entry);
        }
    }
}
