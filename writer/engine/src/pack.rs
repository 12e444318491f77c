//! Packs the blocks a backup stores into the frames an image holds. Frames are cut by the data
//! they hold, not by the span of disk they cover: a 2 MiB window of the disk whose every block is
//! stored is one group on its own (taken from the batch's buffer, not copied; a restore's 2 MiB
//! tasks decode it straight into their buffer); the stored blocks of the other windows gather,
//! in block order and across
//! batches, into one group until it holds `GROUP_TARGET_BYTES` at a window's end
//! (`layout::GROUP_MAX_BYTES` at most, and never over more than `GROUP_MAX_SPAN` of the disk). A
//! file system that uses a third of its blocks then compresses like one stream instead of
//! paying a fresh zstd history every 300 KiB. A lone block is its own frame, and what zstd
//! cannot shrink is kept raw. The parts of patches gather the same way, apart, into patch
//! groups (`strata_format::patch_group`): one small frame per patch paid a fresh history for a
//! few pages each. Compression runs on all cores, each with a compressor of its own that lives
//! as long as the thread.

use std::cell::RefCell;

use rayon::prelude::*;
use strata_format::block::compress_into;
use strata_format::layout::{GROUP_MAX_BLOCKS, GROUP_MAX_BYTES, PATCH_TABLE_ENTRY};
use strata_format::patch_group::{PatchGroupBuilder, PATCH_GROUP_MAX_PATCHES};
use strata_format::{Encoding, ImageWriter, IndexEntry};

use crate::patch::PatchFrame;

/// A group is closed at the end of a window once it holds this much data. Larger frames
/// compress better (on aged file systems, frames of 1 MiB of data cost 2.4–3.7% over one
/// stream, 2 MiB 1.2–1.9%, 4 MiB 0.6–0.8%), but a read of one block decodes its whole frame;
/// see BENCHMARKS.md for the figures behind this choice.
pub const GROUP_TARGET_BYTES: usize = 3 << 20;
/// The disk a group may spread over at most: it bounds how many entries a backup holds back
/// while the group is open.
pub const GROUP_MAX_SPAN: u64 = 64 << 20;
/// The windows of the disk that a group of all-stored blocks fills on its own. Frames of 2 MiB
/// of data cost 1.2–1.9% over one zstd stream on aged file systems, 1 MiB ones 2.4–3.7%; a
/// mount's 1 MiB requests take them through the frame cache either way.
pub const WINDOW_BYTES: usize = 2 << 20;
/// The disk a patch group may spread over at most. A reader keeps a decoded patch group from
/// its first patch to its last, so a sequential reader of a deep chain of scattered changes
/// holds one per layer at once, and a wider span costs it more memory to hold (fresh pages to
/// fault in); a narrower one compresses sparse patches worse. Measured both ways in
/// BENCHMARKS.md (used blocks, incrementals against the ideal).
pub const PATCH_GROUP_MAX_SPAN: u64 = 32 << 20;
/// What a patch group decodes to at most: room for zstd's worst case (incompressible parts)
/// within `GROUP_MAX_BYTES`, which bounds the stored frame too.
const PATCH_GROUP_MAX_BYTES: usize = GROUP_MAX_BYTES as usize - GROUP_MAX_BYTES as usize / 128;

enum Packed {
    Zstd(Vec<u8>),
    /// A patch group's frame (always zstd: a patch is never stored raw).
    Patches(Vec<u8>),
    /// zstd could not shrink it: the blocks' own bytes.
    Raw(Vec<u8>),
    /// zstd could not shrink a whole window: its bytes, where they lie in the batch's buffer.
    RawInBatch(std::ops::Range<usize>),
}

/// The bytes of a frame not compressed yet: gathered (copied: the blocks are not adjacent, or
/// come from several batches), or a whole window, read where it lies in the batch's buffer.
enum Bytes {
    Owned(Vec<u8>),
    InBatch(std::ops::Range<usize>),
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes::Owned(Vec::new())
    }
}

/// One frame to append: source blocks `blocks` (ascending, not always adjacent) and their
/// content hashes, whether later blocks of the same content may point at each (`remember`),
/// and how they are stored; for a patch group, each patch's mask (`masks`, else empty).
pub struct Unit {
    blocks: Vec<(u64, [u8; 32])>,
    remember: Vec<bool>,
    masks: Vec<u16>,
    packed: Packed,
}

/// Blocks gathered for one frame, not compressed yet.
#[derive(Default)]
struct Gathered {
    blocks: Vec<(u64, [u8; 32])>,
    remember: Vec<bool>,
    masks: Vec<u16>,
    bytes: Bytes,
}

/// Patches gathered for one patch group.
#[derive(Default)]
struct GatheredPatches {
    patches: Vec<(u64, [u8; 32])>,
    masks: Vec<u16>,
    parts: PatchGroupBuilder,
}

/// The packer of one image: what it gathered for the frame still open, across batches.
pub struct Packer {
    bs: usize,
    level: i32,
    window: u64,
    max_blocks: usize,
    target_blocks: usize,
    span_blocks: u64,
    patch_span_blocks: u64,
    open: Gathered,
    open_patches: GatheredPatches,
}

impl Packer {
    pub fn new(block_size: u32, level: i32) -> Packer {
        let bs = block_size as usize;
        let max_blocks = (GROUP_MAX_BYTES as usize / bs).clamp(1, GROUP_MAX_BLOCKS as usize);
        Packer {
            bs,
            level,
            window: (WINDOW_BYTES / bs).clamp(1, max_blocks) as u64,
            max_blocks,
            target_blocks: (GROUP_TARGET_BYTES / bs).clamp(1, max_blocks),
            span_blocks: (GROUP_MAX_SPAN / bs as u64).max(1),
            patch_span_blocks: (PATCH_GROUP_MAX_SPAN / bs as u64).max(1),
            open: Gathered::default(),
            open_patches: GatheredPatches::default(),
        }
    }

    /// Takes the blocks of one batch (`buf`, blocks from source block `block0`, content hashes
    /// `hashes`) whose `store` flag is set (`remember`: later copies may point at them), and the
    /// batch's patches (block, content hash, patch; ascending); returns the frames that closed
    /// (block frames in block order, then patch groups), see `compress`.
    pub fn pack(
        &mut self,
        buf: &[u8],
        block0: u64,
        hashes: &[[u8; 32]],
        store: &[bool],
        remember: &[bool],
        patches: Vec<(u64, [u8; 32], PatchFrame)>,
    ) -> Vec<Pending> {
        let bs = self.bs;
        let mut closed = Vec::new();
        let mut i = 0;
        while i < store.len() {
            let b = block0 + i as u64;
            let window_end = ((b / self.window + 1) * self.window - block0).min(store.len() as u64) as usize;
            let whole_window = b.is_multiple_of(self.window) && window_end - i == self.window as usize;
            if whole_window && self.window > 1 && store[i..window_end].iter().all(|&s| s) {
                closed.extend(self.close());
                let blocks = (b..b + self.window).zip(hashes[i..window_end].iter().copied()).collect();
                let bytes = Bytes::InBatch(i * bs..window_end * bs);
                closed.push(Gathered { blocks, remember: remember[i..window_end].to_vec(), masks: Vec::new(), bytes });
                i = window_end;
                continue;
            }
            for j in i..window_end {
                if !store[j] {
                    continue;
                }
                let block = block0 + j as u64;
                let full = self.open.blocks.len() == self.max_blocks;
                if full || self.open.blocks.first().is_some_and(|&(first, _)| block - first >= self.span_blocks) {
                    closed.extend(self.close());
                }
                self.open.blocks.push((block, hashes[j]));
                self.open.remember.push(remember[j]);
                if let Bytes::Owned(bytes) = &mut self.open.bytes {
                    bytes.extend_from_slice(&buf[j * bs..(j + 1) * bs]);
                }
            }
            if self.open.blocks.len() >= self.target_blocks {
                closed.extend(self.close());
            }
            i = window_end;
        }
        for (block, hash, patch) in patches {
            let open = &self.open_patches;
            let full = open.patches.len() == PATCH_GROUP_MAX_PATCHES
                || open.parts.decoded_len() + PATCH_TABLE_ENTRY + patch.parts.len() > PATCH_GROUP_MAX_BYTES;
            if full || open.patches.first().is_some_and(|&(first, _)| block - first >= self.patch_span_blocks) {
                closed.extend(self.close_patches());
            }
            let open = &mut self.open_patches;
            open.patches.push((block, hash));
            open.masks.push(patch.mask);
            open.parts.push(&patch.parts);
            if open.parts.decoded_len() >= GROUP_TARGET_BYTES {
                closed.extend(self.close_patches());
            }
        }
        self.compress(closed, buf)
    }

    /// The frames still open, at the end of the source.
    pub fn finish(&mut self) -> Vec<Pending> {
        let last = self.close().into_iter().chain(self.close_patches()).collect();
        self.compress(last, &[])
    }

    fn close(&mut self) -> Option<Gathered> {
        (!self.open.blocks.is_empty()).then(|| std::mem::take(&mut self.open))
    }

    fn close_patches(&mut self) -> Option<Gathered> {
        if self.open_patches.patches.is_empty() {
            return None;
        }
        let GatheredPatches { patches, masks, parts } = std::mem::take(&mut self.open_patches);
        let remember = vec![false; patches.len()];
        Some(Gathered { blocks: patches, remember, masks, bytes: Bytes::Owned(parts.finish()) })
    }

    /// Compresses `frames`, in their order; `buf` is the batch's buffer that windows lie in.
    /// The windows are compressed now, on all cores (they borrow `buf`, which the caller reuses
    /// once they are written). Gathered frames own their bytes and are compressed in the
    /// background while the caller packs the next batch: on a file system whose used blocks are
    /// scattered a batch closes one gathered frame or none, and compressing it before going on
    /// left a core idle.
    fn compress(&self, frames: Vec<Gathered>, buf: &[u8]) -> Vec<Pending> {
        let level = self.level;
        let mut pending = Vec::with_capacity(frames.len());
        let mut windows = Vec::new();
        for g in frames {
            match g.bytes {
                Bytes::InBatch(_) => {
                    windows.push((pending.len(), g));
                    pending.push(None);
                }
                Bytes::Owned(_) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    rayon::spawn(move || {
                        // A panic in a rayon job would abort the backup's process; here the
                        // appender finds the unit missing and fails the backup.
                        let unit =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compress_one(level, g, &[])));
                        let _ = tx.send(unit.ok());
                    });
                    pending.push(Some(Pending::Compressing(rx)));
                }
            }
        }
        let compressed: Vec<(usize, Unit)> =
            windows.into_par_iter().map(|(at, g)| (at, compress_one(level, g, buf))).collect();
        for (at, unit) in compressed {
            pending[at] = Some(Pending::Ready(unit));
        }
        pending.into_iter().map(|p| p.expect("every frame is compressed or being compressed")).collect()
    }
}

/// A frame `Packer` closed: compressed, or being compressed on another core.
pub enum Pending {
    Ready(Unit),
    Compressing(std::sync::mpsc::Receiver<Option<Unit>>),
}

impl Pending {
    /// The compressed frame, once it is; `None` if its compression failed (panicked).
    pub fn wait(self) -> Option<Unit> {
        match self {
            Pending::Ready(unit) => Some(unit),
            Pending::Compressing(rx) => rx.recv().ok().flatten(),
        }
    }
}

/// Compresses one gathered frame (`buf`: the batch's buffer, for a window that lies in it).
fn compress_one(level: i32, g: Gathered, buf: &[u8]) -> Unit {
    let bytes = match &g.bytes {
        Bytes::Owned(bytes) => bytes.as_slice(),
        Bytes::InBatch(range) => &buf[range.clone()],
    };
    let mut frame = Vec::new();
    if !g.masks.is_empty() {
        frame.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
        with_compressor(level, |c| c.compress_to_buffer(bytes, &mut frame))
            .expect("a buffer of zstd's bound holds any frame");
        return Unit { blocks: g.blocks, remember: g.remember, masks: g.masks, packed: Packed::Patches(frame) };
    }
    let packed = match (with_compressor(level, |c| compress_into(c, bytes, &mut frame)), g.bytes) {
        (Encoding::Zstd, _) => Packed::Zstd(frame),
        (_, Bytes::Owned(bytes)) => Packed::Raw(bytes),
        (_, Bytes::InBatch(range)) => Packed::RawInBatch(range),
    };
    Unit { blocks: g.blocks, remember: g.remember, masks: g.masks, packed }
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

impl Unit {
    /// Whether later blocks of the same content may point at block `blocks()[i]`.
    pub fn remember(&self, i: usize) -> bool {
        self.remember[i]
    }

    /// Writes the unit's stored bytes to `writer`; returns the entries of its blocks (not yet
    /// in the index: the caller puts them there in block order). `batch` is the buffer of the
    /// batch whose `Packer::pack` made the unit (empty for `finish`'s).
    pub fn write(&self, writer: &mut ImageWriter, batch: &[u8]) -> strata_format::Result<Vec<IndexEntry>> {
        let bs = writer.block_size() as usize;
        let raw = |bytes: &[u8], writer: &mut ImageWriter| -> strata_format::Result<Vec<IndexEntry>> {
            let blocks = self.blocks.iter().zip(bytes.chunks_exact(bs));
            blocks.map(|(&(b, h), raw)| writer.write_block(b, Encoding::Raw, raw, h)).collect()
        };
        match &self.packed {
            Packed::Zstd(frame) if self.blocks.len() == 1 => {
                let (b, h) = self.blocks[0];
                Ok(vec![writer.write_block(b, Encoding::Zstd, frame, h)?])
            }
            Packed::Zstd(frame) => writer.write_group(&self.blocks, frame),
            Packed::Patches(frame) => {
                let patches: Vec<(u64, u16, [u8; 32])> =
                    self.blocks.iter().zip(&self.masks).map(|(&(b, h), &m)| (b, m, h)).collect();
                writer.write_patch_group(&patches, frame)
            }
            Packed::Raw(bytes) => raw(bytes, writer),
            Packed::RawInBatch(range) => raw(&batch[range.clone()], writer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 64 << 10; // 32 blocks to a window

    fn wait(pending: Pending) -> Unit {
        pending.wait().expect("compressed")
    }

    /// The blocks of each frame `pack` and `finish` make of `batches` (each: first block and
    /// store flags), with incompressible data so that every frame is raw and easy to check.
    fn frames(batches: &[(u64, Vec<bool>)]) -> Vec<Vec<u64>> {
        let mut packer = Packer::new(BS as u32, 1);
        let mut out = Vec::new();
        for (block0, store) in batches {
            let buf = vec![7u8; store.len() * BS];
            let remember = vec![true; store.len()];
            let hashes = vec![[0u8; 32]; store.len()];
            out.extend(packer.pack(&buf, *block0, &hashes, store, &remember, Vec::new()).into_iter().map(wait));
        }
        out.extend(packer.finish().into_iter().map(wait));
        out.into_iter().map(|u| u.blocks.iter().map(|(b, _)| *b).collect()).collect()
    }

    #[test]
    fn a_window_whose_every_block_is_stored_is_a_frame_of_its_own() {
        let mut store = vec![true; 80];
        store[5] = false;
        // The batch starts at block 192: windows at 192, 224, 256.
        let f = frames(&[(192, store)]);
        let dense: Vec<u64> = (224..256).collect();
        assert!(f.contains(&dense), "{f:?}");
        let first: Vec<u64> = (192..197).chain(197 + 1..224).collect();
        assert_eq!(f[0], first, "the partial window before it is a frame: the dense one closes it");
        assert_eq!(f.last().unwrap(), &(256..272).collect::<Vec<u64>>(), "the rest, at the end");
    }

    #[test]
    fn sparse_windows_gather_across_batches_until_the_target_and_never_past_the_span() {
        // A third of the blocks stored, batches of 128 blocks (8 MiB).
        let batch = |b0: u64| (b0, (0..128).map(|i| i % 3 == 0).collect::<Vec<bool>>());
        let f = frames(&[batch(0), batch(128), batch(256), batch(384)]);
        let target = GROUP_TARGET_BYTES / BS;
        for frame in &f[..f.len() - 1] {
            assert!((target..target + 16).contains(&frame.len()), "{} blocks: {f:?}", frame.len());
            assert!(frame.windows(2).all(|w| w[0] < w[1]));
        }
        let all: Vec<u64> = f.iter().flatten().copied().collect();
        let expected: Vec<u64> = (0..512).filter(|i| (i % 128) % 3 == 0).collect();
        assert_eq!(all, expected, "every stored block, once, in order");
        assert!(f.iter().any(|frame| frame.first().unwrap() / 128 != frame.last().unwrap() / 128), "across batches");
        // Very sparse: one block in 600 reaches the span first.
        let sparse = frames(&[(0, (0..4096).map(|i| i % 600 == 0).collect())]);
        let span = (GROUP_MAX_SPAN / BS as u64) as usize;
        assert!(sparse.iter().all(|frame| (frame.last().unwrap() - frame[0]) < span as u64), "{sparse:?}");
    }

    /// The blocks of each patch group `pack` and `finish` make of batches of patches (block and
    /// number of 4 KiB parts), with nothing else stored.
    fn patch_groups(batches: &[Vec<(u64, u32)>]) -> Vec<Vec<u64>> {
        let mut packer = Packer::new(BS as u32, 1);
        let mut out = Vec::new();
        for batch in batches {
            let patches = batch
                .iter()
                .map(|&(b, parts)| {
                    let mask = (1u32 << parts) - 1;
                    (b, [0u8; 32], PatchFrame { mask: mask as u16, parts: vec![b as u8; parts as usize * 4096] })
                })
                .collect();
            out.extend(packer.pack(&[], batch[0].0, &[], &[], &[], patches).into_iter().map(wait));
        }
        out.extend(packer.finish().into_iter().map(wait));
        assert!(out.iter().all(|u| matches!(u.packed, Packed::Patches(_)) && u.masks.len() == u.blocks.len()));
        out.into_iter().map(|u| u.blocks.iter().map(|(b, _)| *b).collect()).collect()
    }

    #[test]
    fn patches_gather_into_groups_until_the_target_the_span_or_255_patches() {
        // 8 pages each (32 KiB): 96 to the 3 MiB target, across batches
        let batches: Vec<Vec<(u64, u32)>> = (0..4).map(|i| (i * 64..i * 64 + 64).map(|b| (b, 8)).collect()).collect();
        let g = patch_groups(&batches);
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), [96, 96, 64], "{g:?}");
        assert_eq!(g.concat(), (0..256).collect::<Vec<u64>>(), "every patch, once, in order");
        // one page each: 255 at most
        let g = patch_groups(&[(0..600).map(|b| (b, 1)).collect()]);
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), [255, 255, 90]);
        // one patch every 200 blocks (12.5 MiB): the 32 MiB span first
        let g = patch_groups(&[(0..10).map(|i| (i * 200, 1)).collect()]);
        let span = PATCH_GROUP_MAX_SPAN / BS as u64;
        assert!(g.iter().all(|group| group.last().unwrap() - group[0] < span) && g.len() == 4, "{g:?}");
    }

    #[test]
    fn a_patch_group_decodes_to_its_table_and_parts_and_declares_its_size() {
        let mut packer = Packer::new(BS as u32, 1);
        let patches = vec![
            (3, [1u8; 32], PatchFrame { mask: 0b101, parts: vec![7u8; 8192] }),
            (9, [2u8; 32], PatchFrame { mask: 0b1, parts: vec![8u8; 4096] }),
        ];
        let mut units: Vec<Unit> = packer.pack(&[], 0, &[], &[], &[], patches).into_iter().map(wait).collect();
        units.extend(packer.finish().into_iter().map(wait));
        let Packed::Patches(frame) = &units[0].packed else { panic!("a patch group") };
        let declared = zstd::zstd_safe::get_frame_content_size(frame).unwrap();
        assert_eq!(declared, Some(2 * 4 + 3 * 4096), "readers size the frame by what it declares");
        let decoded = zstd::bulk::decompress(frame, 1 << 20).unwrap();
        let slot1 = strata_format::patch_group::slot_parts(&decoded, 1, 4096).unwrap();
        assert!(decoded[slot1].iter().all(|&x| x == 8));
    }

    #[test]
    fn no_frame_holds_more_than_the_format_allows() {
        let f = frames(&[(0, (0..1024).map(|i| i % 16 != 0).collect())]);
        assert!(f.iter().all(|frame| frame.len() * BS <= GROUP_MAX_BYTES as usize), "{f:?}");
        let small = Packer::new(4096, 1);
        assert_eq!(small.max_blocks, 255, "a group's length is one byte");
    }
}
