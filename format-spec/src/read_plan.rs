//! The one read path of a version: how the bytes of one read are made from its blocks, for the
//! mount's replies, restore, merge and every `VersionReader::read_at`. The read is cut into
//! units: a run of zero blocks (filled, never copied), or the blocks it needs of one stored frame
//! (a block, or a group of at most 4 MiB). A frame the read covers whole, in order, is decoded
//! straight into the caller's buffer (for the mount, the reply, whose pages the kernel keeps with
//! `FOPEN_KEEP_CACHE`: a copy in the cache would cost a memcpy and cache room for nothing). It
//! comes from the frame cache only when already there or being decoded there (by prefetch), and
//! then leaves it. A frame the read needs in part goes through the cache, so that the next
//! request, which wants the rest of the group, or small reads of the same block, do not decode it
//! again. With `parallel`, units are decoded on all cores (the mount asks for it when no other
//! read is being served; when the kernel sends many requests at once, the requests share the
//! cores instead). A whole block whose newest entry is a patch joins the unit of its base's frame
//! (usually a group its neighbours read too), and the patch's parts, decoded into a per-thread
//! buffer (a patch group's through the cache, which keeps it for the group's next patches), are
//! laid over it afterwards; part of a patched block, or one over a zero base, is a unit of its
//! own. With a cache that checks hashes, every stored block served is checked
//! against its entry's BLAKE3 hash: a block of a frame against the hashes taken when the frame
//! was decoded, a patched block once its parts are laid over its base. Each block is checked
//! against the entry that names it for this version, so a block that points into another block's
//! frame (deduplication) is checked too.

use crate::block::hash_block;
use crate::{BlockLocation, Encoding, ImageFile, IndexEntry, VersionReader};
use rayon::prelude::*;

use crate::frame_cache::FrameCache;

/// A part of a read served by one source.
enum Unit<'v> {
    Zero {
        len: usize,
    },
    /// Blocks of one stored frame; `patches` are laid over some of them afterwards (whole
    /// patched blocks whose base is a block of this frame).
    Frame {
        image: &'v ImageFile,
        entry: IndexEntry,
        parts: Vec<Part>,
        patches: Vec<Overlay<'v>>,
    },
    /// Part of a patched block that cannot join its base's frame unit (a zero base, or less
    /// than the whole block).
    Patch {
        image: &'v ImageFile,
        entry: IndexEntry,
        base: Option<(&'v ImageFile, IndexEntry)>,
        part: Part,
    },
}

/// Bytes `within..within + len` of the block at `slot` of a frame; `entry` is the one whose
/// hash that block must have (`None` for a patch's base: the block is checked once patched).
struct Part {
    slot: usize,
    within: usize,
    len: usize,
    entry: Option<IndexEntry>,
}

/// A patch laid over the whole block at byte `at` of a frame unit's output.
struct Overlay<'v> {
    at: usize,
    image: &'v ImageFile,
    entry: IndexEntry,
}

impl Unit<'_> {
    fn len(&self) -> usize {
        match self {
            Unit::Zero { len } => *len,
            Unit::Frame { parts, .. } => parts.iter().map(|p| p.len).sum(),
            Unit::Patch { part, .. } => part.len,
        }
    }
}

impl VersionReader {
    /// Reads up to `buf.len()` bytes at `offset` of the version's source through `cache`;
    /// returns the bytes read (fewer only at the end of the source).
    pub fn read_at(&self, offset: u64, buf: &mut [u8], cache: &FrameCache) -> crate::Result<usize> {
        read_window(self, cache, 0, self.source_size(), offset, buf, false)
    }

    /// Reads block `block` (always a whole block, zero-padded past the source's end) into `out`
    /// through `cache`.
    pub fn read_block(&self, block: u64, cache: &FrameCache, out: &mut [u8]) -> crate::Result<()> {
        assert_eq!(out.len(), self.block_size() as usize);
        let n = self.read_at(block.saturating_mul(u64::from(self.block_size())), out, cache)?;
        out[n..].fill(0);
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `offset` of the window `[start, start + len)` of a version's disk
/// (fewer only at the window's end); with `parallel`, the frames are decoded on all cores.
pub fn read_window(
    reader: &VersionReader,
    cache: &FrameCache,
    start: u64,
    len: u64,
    offset: u64,
    buf: &mut [u8],
    parallel: bool,
) -> crate::Result<usize> {
    if offset >= len {
        return Ok(0);
    }
    let n = (buf.len() as u64).min(len - offset) as usize;
    let units = plan(reader, start + offset, n)?;
    let mut jobs = Vec::with_capacity(units.len());
    let mut rest = &mut buf[..n];
    for unit in units {
        let (out, tail) = rest.split_at_mut(unit.len());
        jobs.push((unit, out));
        rest = tail;
    }
    if jobs.len() == 1 || !parallel {
        jobs.into_iter().try_for_each(|(unit, out)| fill(cache, reader, unit, out))?;
    } else {
        jobs.into_par_iter().try_for_each(|(unit, out)| fill(cache, reader, unit, out))?;
    }
    Ok(n)
}

/// Whether the `n` (> 0) bytes at disk position `pos` lie in zero blocks only: such a read is
/// answered from a shared zero buffer, with nothing to fill.
pub fn all_zero(reader: &VersionReader, pos: u64, n: usize) -> bool {
    let bs = u64::from(reader.block_size());
    reader.next_stored(pos / bs).is_none_or(|b| b > (pos + n as u64 - 1) / bs)
}

/// Cuts `n` bytes at disk position `pos` into units, in order.
fn plan(reader: &VersionReader, mut pos: u64, n: usize) -> crate::Result<Vec<Unit<'_>>> {
    let bs = u64::from(reader.block_size());
    let mut units: Vec<Unit<'_>> = Vec::new();
    let mut left = n;
    while left > 0 {
        let (block, within) = (pos / bs, (pos % bs) as usize);
        let location = reader.locate(block);
        let len = match location {
            // A zero block: the run of them up to the next stored block, or the read's end.
            BlockLocation::Zero => {
                let end = reader.next_stored(block).map_or(u64::MAX, |b| b.saturating_mul(bs));
                (end - pos).min(left as u64) as usize
            }
            BlockLocation::Stored { .. } => (bs as usize - within).min(left),
        };
        match (location, units.last_mut()) {
            (BlockLocation::Zero, Some(Unit::Zero { len: run })) => *run += len,
            (BlockLocation::Zero, _) => units.push(Unit::Zero { len }),
            (BlockLocation::Stored { .. }, _) => {
                let (image, entry) = reader.entry(block)?.expect("a stored block has an entry");
                if !entry.encoding.is_patch() {
                    join_frame(
                        &mut units,
                        image,
                        entry,
                        Part { slot: usize::from(entry.group_slot), within, len, entry: Some(entry) },
                        None,
                    );
                } else {
                    match reader.patch_base(block)? {
                        Some((base_image, base)) if len == bs as usize => {
                            let part = Part { slot: usize::from(base.group_slot), within, len, entry: None };
                            join_frame(&mut units, base_image, base, part, Some((image, entry)));
                        }
                        base => {
                            let part = Part { slot: 0, within, len, entry: None };
                            units.push(Unit::Patch { image, entry, base, part })
                        }
                    }
                }
            }
        }
        pos += len as u64;
        left -= len;
    }
    Ok(units)
}

/// Adds `part` of the frame of `entry` to the last unit when that is the same frame, else
/// starts a unit; `patch` is laid over the part (then a whole block) once the frame is read.
fn join_frame<'v>(
    units: &mut Vec<Unit<'v>>,
    image: &'v ImageFile,
    entry: IndexEntry,
    part: Part,
    patch: Option<(&'v ImageFile, IndexEntry)>,
) {
    let same = |i: &ImageFile, e: &IndexEntry| i.serial() == image.serial() && e.same_frame(&entry);
    let unit = match units.last_mut() {
        Some(Unit::Frame { image: i, entry: e, parts, patches }) if same(i, e) => (parts, patches),
        _ => {
            units.push(Unit::Frame { image, entry, parts: Vec::new(), patches: Vec::new() });
            let Some(Unit::Frame { parts, patches, .. }) = units.last_mut() else { unreachable!() };
            (parts, patches)
        }
    };
    let (parts, patches) = unit;
    if let Some((image, entry)) = patch {
        patches.push(Overlay { at: parts.iter().map(|p| p.len).sum(), image, entry });
    }
    parts.push(part);
}

fn fill(cache: &FrameCache, reader: &VersionReader, unit: Unit<'_>, out: &mut [u8]) -> crate::Result<()> {
    let bs = reader.block_size() as usize;
    let (image, entry, parts, patches) = match unit {
        Unit::Zero { .. } => {
            out.fill(0);
            return Ok(());
        }
        Unit::Patch { image, entry, base, part } => return fill_patch(cache, reader, image, &entry, base, &part, out),
        Unit::Frame { image, entry, parts, patches } => (image, entry, parts, patches),
    };
    let whole = out.len() == image.frame_len(&entry)
        && parts.iter().enumerate().all(|(i, p)| p.slot == i && p.within == 0 && p.len == bs);
    if whole {
        let hashes = cache.frame_into(image, &entry, out)?;
        parts.iter().try_for_each(|p| check_part(image, p, &hashes))?;
    } else {
        let frame = cache.frame(image, &entry)?;
        let mut at = 0;
        for p in parts {
            check_part(image, &p, &frame.hashes)?;
            let from = p.slot * bs + p.within;
            out[at..at + p.len].copy_from_slice(&frame[from..from + p.len]);
            at += p.len;
        }
        cache.took(image, &entry, frame, at);
    }
    for patch in patches {
        lay_patch(cache, reader, patch.image, &patch.entry, &mut out[patch.at..patch.at + bs], true)?;
    }
    Ok(())
}

/// Checks the block of `part` against its entry, given the hashes of its frame's blocks (none
/// when the cache does not check hashes).
fn check_part(image: &ImageFile, part: &Part, hashes: &[[u8; 32]]) -> crate::Result<()> {
    match (&part.entry, hashes.get(part.slot)) {
        (Some(entry), Some(actual)) => image.check_hash(entry, actual),
        _ => Ok(()),
    }
}

/// Lays the parts of the patch `entry` over `block`, which holds its base, and checks the
/// patched block's hash when the cache checks hashes. The parts of a patch of its own are not
/// kept in the cache (a sequential reader needs them once) unless prefetch put them there; a
/// patch group is, for the group's next patches, and leaves once reads have taken what this
/// version reads of it (`took`: the whole block is read this time; `patch_group_share`: a
/// later version may have rewritten some of the group's blocks).
fn lay_patch(
    cache: &FrameCache,
    reader: &VersionReader,
    image: &ImageFile,
    entry: &IndexEntry,
    block: &mut [u8],
    took: bool,
) -> crate::Result<()> {
    thread_local! {
        static PARTS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if entry.encoding == Encoding::PatchGroup {
        let frame = cache.frame_shared(image, entry, |bytes| reader.patch_group_share(entry, bytes))?;
        let laid = image.lay_patch(entry, &frame, block)?;
        if took {
            cache.took(image, entry, frame, laid + crate::layout::PATCH_TABLE_ENTRY);
        }
    } else {
        PARTS.with(|cell| -> crate::Result<()> {
            let mut parts = cell.borrow_mut();
            parts.resize(image.frame_len(entry), 0);
            cache.frame_into(image, entry, &mut parts)?;
            image.lay_patch(entry, &parts, block).map(|_| ())
        })?;
    }
    if cache.checks_hashes() {
        image.check_hash(entry, &hash_block(block))?;
    }
    Ok(())
}

/// Fills `out` with `part` of a patched block: the base's block, the patch's parts laid over
/// (in `out` itself when the part is the whole block).
fn fill_patch(
    cache: &FrameCache,
    reader: &VersionReader,
    image: &ImageFile,
    entry: &IndexEntry,
    base: Option<(&ImageFile, IndexEntry)>,
    part: &Part,
    out: &mut [u8],
) -> crate::Result<()> {
    let bs = reader.block_size() as usize;
    let whole = part.within == 0 && part.len == bs;
    let mut spare = Vec::new();
    let block: &mut [u8] = if whole {
        out
    } else {
        spare.resize(bs, 0);
        &mut spare
    };
    match base {
        Some((base_image, base)) => {
            let frame = cache.frame(base_image, &base)?;
            let at = usize::from(base.group_slot) * bs;
            block.copy_from_slice(&frame[at..at + bs]);
        }
        None => block.fill(0),
    }
    lay_patch(cache, reader, image, entry, block, whole)?;
    if !whole {
        out.copy_from_slice(&spare[part.within..part.within + part.len]);
    }
    Ok(())
}
