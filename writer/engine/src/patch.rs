//! Patches (format 3, SPEC.md §3.2): a changed block that its parent version holds is stored as
//! only the parts (sixteenths: 4 KiB of a 64 KiB block, a file system page) that differ from
//! the block's base, when that leaves out at least one part. A database that rewrote one page
//! of a block so costs one page, not the block, and a read of the block decodes two frames at
//! most (the base and the patch) however long the chain.
//!
//! Patches never stack: a patch is always laid over the newest non-patch version of the block,
//! and its mask includes the mask of the patch it replaces. So every part outside the mask is
//! the same in the base, the parent and the new block, which keeps the patch meaning the same
//! bytes when a merge turns a version below it into a full.

use std::cell::RefCell;

use strata_format::layout::PATCH_PARTS;
use strata_format::{IndexEntry, ReadScratch, VersionReader};

/// A patch over a block that the parent holds whole names at most this many of its parts: any
/// part left out is a part not stored again (file systems that fill freed space put new data in
/// most pages of many blocks, not all of them).
pub const MAX_FIRST_PATCH_PARTS: u32 = PATCH_PARTS - 1;
/// A patch that replaces the parent's patch names at most this many parts. Its mask includes
/// the parent's, so a block whose pages change one at a time stores a growing patch in every
/// version: past half the block it is cheaper to store the block whole once, as the base of
/// short patches again, than to keep storing most of it.
pub const MAX_PATCH_PARTS: u32 = PATCH_PARTS / 2;

/// A block to store as a patch: the parts it names and their bytes, in order (compressed
/// with other patches' into a patch group by `pack`).
pub struct PatchFrame {
    pub mask: u16,
    pub parts: Vec<u8>,
}

/// The parts of `new` that differ from `base`.
pub fn changed_parts(new: &[u8], base: &[u8]) -> u16 {
    let part = new.len() / PATCH_PARTS as usize;
    new.chunks_exact(part)
        .zip(base.chunks_exact(part))
        .enumerate()
        .fold(0, |mask, (i, (n, b))| if n != b { mask | 1 << i } else { mask })
}

/// Makes patches against one parent version, on any number of threads.
pub struct Patcher<'v> {
    parent: &'v VersionReader,
}

/// What a thread makes patches with, kept for the thread's life: made per task, the decoder's
/// buffers were allocated and faulted in again for every 16 blocks. The scratch keeps the
/// parent's last decoded group (adjacent blocks of one group decode it once); it is named by
/// the opened image and offset, so it never stands for another image.
struct Tools {
    scratch: ReadScratch,
    base: Vec<u8>,
}

thread_local! {
    static TOOLS: RefCell<Tools> = RefCell::new(Tools { scratch: ReadScratch::new(), base: Vec::new() });
}

impl<'v> Patcher<'v> {
    pub fn new(parent: &'v VersionReader) -> Patcher<'v> {
        Patcher { parent }
    }

    /// The patch of `block`, whose new content is `new`, or `None` when it is to be stored
    /// whole: zero in the parent (nothing to lay parts over), changed in every part, or a patch
    /// in the parent that would grow past `MAX_PATCH_PARTS`.
    pub fn patch(&self, block: u64, new: &[u8]) -> strata_format::Result<Option<PatchFrame>> {
        if !new.len().is_multiple_of(PATCH_PARTS as usize) {
            return Ok(None);
        }
        TOOLS.with(|tools| self.patch_with(&mut tools.borrow_mut(), block, new))
    }

    fn patch_with(&self, tools: &mut Tools, block: u64, new: &[u8]) -> strata_format::Result<Option<PatchFrame>> {
        let Tools { scratch, base } = tools;
        base.resize(new.len(), 0);
        let Some(inherited) = self.parent.read_patch_base(block, scratch, base)? else { return Ok(None) };
        let mask = inherited | changed_parts(new, base);
        let limit = if inherited == 0 { MAX_FIRST_PATCH_PARTS } else { MAX_PATCH_PARTS };
        if mask == 0 || mask.count_ones() > limit {
            return Ok(None);
        }
        let part = IndexEntry::patch_part_len(self.parent.block_size());
        let mut parts = Vec::with_capacity(mask.count_ones() as usize * part);
        for (i, bytes) in new.chunks_exact(part).enumerate() {
            if mask & (1 << i) != 0 {
                parts.extend_from_slice(bytes);
            }
        }
        Ok(Some(PatchFrame { mask, parts }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_parts_names_each_sixteenth_that_differs() {
        let base = vec![7u8; 65536];
        let mut new = base.clone();
        assert_eq!(changed_parts(&new, &base), 0);
        new[0] = 1; // part 0
        new[4096 * 5 + 4095] = 1; // last byte of part 5
        new[65535] = 1; // part 15
        assert_eq!(changed_parts(&new, &base), 1 | 1 << 5 | 1 << 15);
    }
}
