//! Deduplication within one image: a block whose content this image already stores gets an
//! entry pointing at those bytes instead of a second copy. Two halves, so that deciding and
//! writing can run in different pipeline stages: `Dedup` decides in block order which contents
//! are stored and which are copies (it needs only the hashes), `Stored` remembers where the
//! writer put each remembered content. Memory is bounded: past `MAX_REMEMBERED` contents, new
//! ones are no longer remembered (later duplicates of them are stored again, which is only larger).

use std::collections::{HashMap, HashSet};

use strata_format::IndexEntry;

/// About 150 bytes each over both halves, and up to twice that while a table grows: 128 Ki
/// contents (8 GiB of distinct 64 KiB blocks, 512 MiB of 4 KiB ones) cost at most ~40 MiB, which
/// keeps a backup's peak under 128 MiB whatever the source (BENCHMARKS.md, memory).
pub const MAX_REMEMBERED: usize = 128 << 10;

/// What to do with one changed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Store its bytes; when `remember`, later blocks with the same content point at them.
    Store { remember: bool },
    /// Point at the stored copy of the same content earlier in this image.
    Copy,
    /// Store it as a patch against the parent's block (never remembered: a patch means its
    /// content only at its own block).
    Patch,
}

#[derive(Default)]
pub struct Dedup {
    remembered: HashSet<[u8; 32]>,
}

impl Dedup {
    /// Decides for the next changed block in block order, with content hash `hash`; `patchable`
    /// when it has a patch (a copy is cheaper still).
    pub fn decide(&mut self, hash: &[u8; 32], patchable: bool) -> Decision {
        if self.remembered.contains(hash) {
            return Decision::Copy;
        }
        if patchable {
            return Decision::Patch;
        }
        let remember = self.remembered.len() < MAX_REMEMBERED;
        if remember {
            self.remembered.insert(*hash);
        }
        Decision::Store { remember }
    }
}

/// Where this image stores each content `Dedup` remembered.
#[derive(Default)]
pub struct Stored {
    entries: HashMap<[u8; 32], IndexEntry>,
}

impl Stored {
    /// Remembers where `entry`'s content is stored (the first place wins).
    pub fn remember(&mut self, entry: &IndexEntry) {
        self.entries.entry(entry.hash).or_insert(*entry);
    }

    /// The entry of the stored copy of `hash`, which `Dedup` decided is a copy.
    pub fn find(&self, hash: &[u8; 32]) -> Option<&IndexEntry> {
        self.entries.get(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_block_of_a_content_is_stored_and_later_ones_are_copies() {
        let mut dedup = Dedup::default();
        assert_eq!(dedup.decide(&[1; 32], false), Decision::Store { remember: true });
        assert_eq!(dedup.decide(&[2; 32], false), Decision::Store { remember: true });
        assert_eq!(dedup.decide(&[1; 32], false), Decision::Copy);
    }

    #[test]
    fn a_patch_is_never_remembered_and_a_copy_beats_it() {
        let mut dedup = Dedup::default();
        assert_eq!(dedup.decide(&[1; 32], true), Decision::Patch);
        assert_eq!(dedup.decide(&[1; 32], false), Decision::Store { remember: true });
        assert_eq!(dedup.decide(&[1; 32], true), Decision::Copy);
    }

    #[test]
    fn past_the_cap_new_contents_are_stored_every_time() {
        let mut dedup = Dedup::default();
        for i in 0..MAX_REMEMBERED as u32 {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            dedup.decide(&h, false);
        }
        assert_eq!(dedup.decide(&[0xff; 32], false), Decision::Store { remember: false });
        assert_eq!(dedup.decide(&[0xff; 32], false), Decision::Store { remember: false });
        assert_eq!(dedup.decide(&[0; 32], false), Decision::Copy);
    }
}
