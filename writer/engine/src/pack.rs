//! Packs the blocks a backup or a merge stores into what an image holds: a run of adjacent
//! stored blocks becomes a group (one zstd frame of up to `GROUP_TARGET_BYTES`), a lone block
//! its own frame, and what zstd cannot shrink is kept raw. Compression runs on all cores, each
//! with a compressor of its own that lives as long as the thread.

use std::cell::RefCell;

use rayon::prelude::*;
use strata_format::block::compress_into;
use strata_format::layout::GROUP_MAX_BLOCKS;
use strata_format::{Encoding, ImageWriter, IndexEntry};

/// How much one group decodes to at most. Larger groups compress better (64 KiB frames lose
/// about 10% against a stream, 256 KiB about 5%) but a read of one block decodes its whole
/// group; see BENCHMARKS.md for the figures behind this choice.
pub const GROUP_TARGET_BYTES: usize = 1 << 20;

enum Packed {
    Zstd(Vec<u8>),
    Raw,
}

/// `len` adjacent blocks starting at batch block `first`, as they will be stored.
pub struct Unit {
    first: usize,
    len: usize,
    packed: Packed,
}

/// Runs `f` with this thread's zstd compressor for `level`. A compressor holds about a megabyte
/// of match tables; one made per task cost a backup 2–3% of its CPU in allocating them and
/// faulting their pages in.
pub fn with_compressor<R>(level: i32, f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> R) -> R {
    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((kept, _)) if *kept == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).expect("zstd compressor")));
        }
        let (_, compressor) = slot.as_mut().expect("set above");
        f(compressor)
    })
}

/// Groups the blocks of `buf` (blocks of `bs` bytes, the first of them source block `block0`)
/// whose `store` flag is set into runs of adjacent blocks and compresses each run as one frame.
/// A group never crosses a multiple of the group size on the disk (1 MiB with 64 KiB blocks):
/// a reader's 1 MiB requests, which the kernel aligns to 1 MiB, then take whole groups,
/// decoded straight into the reply, rather than two parts of each, decoded into the cache and
/// copied out.
pub fn pack(buf: &[u8], bs: usize, block0: u64, store: &[bool], level: i32) -> Vec<Unit> {
    let max = (GROUP_TARGET_BYTES / bs).clamp(1, GROUP_MAX_BLOCKS as usize);
    let boundary = |i: usize| (block0 + i as u64).is_multiple_of(max as u64);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < store.len() {
        if !store[i] {
            i += 1;
            continue;
        }
        let first = i;
        i += 1;
        while i < store.len() && store[i] && !boundary(i) {
            i += 1;
        }
        runs.push((first, i - first));
    }
    runs.into_par_iter()
        .map(|(first, len)| {
            let mut frame = Vec::new();
            let encoding =
                with_compressor(level, |c| compress_into(c, &buf[first * bs..(first + len) * bs], &mut frame));
            let packed = match encoding {
                Encoding::Zstd => Packed::Zstd(frame),
                _ => Packed::Raw,
            };
            Unit { first, len, packed }
        })
        .collect()
}

impl Unit {
    pub fn first(&self) -> usize {
        self.first
    }

    /// Appends the unit's blocks to `writer`: block `first + i` of the batch is source block
    /// `block0 + first + i` with hash `hashes[first + i]`. Pushes their entries to `entries`.
    pub fn write(
        &self,
        writer: &mut ImageWriter,
        block0: u64,
        buf: &[u8],
        bs: usize,
        hashes: &[[u8; 32]],
        entries: &mut Vec<IndexEntry>,
    ) -> strata_format::Result<()> {
        let block = |i: usize| (block0 + i as u64, hashes[i]);
        match &self.packed {
            Packed::Zstd(frame) if self.len == 1 => {
                let (b, h) = block(self.first);
                entries.push(writer.append_block(b, Encoding::Zstd, frame, h)?);
            }
            Packed::Zstd(frame) => {
                let blocks: Vec<(u64, [u8; 32])> = (self.first..self.first + self.len).map(block).collect();
                writer.append_group(&blocks, frame, entries)?;
            }
            Packed::Raw => {
                for i in self.first..self.first + self.len {
                    let (b, h) = block(i);
                    entries.push(writer.append_block(b, Encoding::Raw, &buf[i * bs..(i + 1) * bs], h)?);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_never_cross_a_group_size_boundary_of_the_disk() {
        let bs = 64 << 10; // 16 blocks to a group
        let buf = vec![7u8; 40 * bs];
        let mut store = vec![true; 40];
        // the batch starts at block 100: boundaries at blocks 112 and 128 (batch blocks 12, 28)
        let runs = |store: &[bool]| -> Vec<(usize, usize)> {
            pack(&buf, bs, 100, store, 1).iter().map(|u| (u.first, u.len)).collect()
        };
        assert_eq!(runs(&store), [(0, 12), (12, 16), (28, 12)]);
        store[5] = false;
        store[30] = false;
        assert_eq!(runs(&store), [(0, 5), (6, 6), (12, 16), (28, 2), (31, 9)]);
    }
}
