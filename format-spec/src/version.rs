//! A version: its chain of images (full first) and the block map (`block_map`) that answers,
//! whatever the chain's depth, which image holds block b. Built once at open by streaming each
//! layer's index oldest first, newer layers overriding older ones; then reads cost one entry
//! read and one block read from exactly one image, or, for a block whose newest entry is a
//! patch, two: the patch's and its base's (patches never stack, so never more). Memory is
//! bounded by the index entries the chain's files hold, not by the source size their headers
//! declare; so is the work of walking the version's blocks (`stored_blocks`), apart from the
//! whole-source digest's 32 bytes of hashing per block.

use std::ops::Range;
use std::sync::{Arc, Mutex};

pub use crate::block_map::{BlockLocation, StoredBlock};
use crate::block_map::{BlockMap, Builder, Form, MAX_ENTRIES};
use crate::digest::{zero_block_hash, SourceDigest};
use crate::error::{FormatError, Loc, Result};
use crate::header::Kind;
use crate::image::{ImageFile, ReadScratch};
use crate::index::{Encoding, IndexEntry};
use crate::layout::{MAX_CHAIN_LEN, PATCH_TABLE_ENTRY};

/// One version opened for reading. Shareable between threads; each thread brings its own
/// `ReadScratch`.
pub struct VersionReader {
    layers: Vec<Arc<ImageFile>>,
    map: BlockMap,
    block_size: u32,
    source_size: u64,
    /// The blocks `prime_from` looked at last: a reader going forward looks only at the blocks
    /// that came into its window since.
    primed_window: Mutex<Range<u64>>,
}

impl std::fmt::Debug for VersionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionReader").field("version", &self.id()).field("layers", &self.layers.len()).finish()
    }
}

/// Checks that `layers` form one chain, full first, each image a delta of the one before (for a
/// differential: of the full).
pub fn check_chain(layers: &[Arc<ImageFile>]) -> Result<()> {
    let first = layers.first().ok_or_else(|| FormatError::Invalid("empty chain".into()))?;
    if layers.len() > MAX_CHAIN_LEN {
        return Err(FormatError::Invalid(format!("chain of {} images is longer than {MAX_CHAIN_LEN}", layers.len())));
    }
    if first.header.kind != Kind::Full {
        return Err(FormatError::Corrupt {
            loc: first.loc(),
            what: "chain",
            detail: "does not start with a full".into(),
        });
    }
    for pair in layers.windows(2) {
        let (parent, child) = (&pair[0].header, &pair[1].header);
        let ok = child.parent.is_some_and(|p| p.version == parent.version && p.image_id == parent.image_id)
            && (child.kind != Kind::Differential || parent.kind == Kind::Full)
            && child.repo_id == parent.repo_id
            && child.block_size == parent.block_size
            && child.source_size == parent.source_size;
        if !ok {
            return Err(FormatError::Corrupt {
                loc: pair[1].loc(),
                what: "chain",
                detail: format!("not a delta of version {} ({})", parent.version, pair[0].path().display()),
            });
        }
    }
    Ok(())
}

impl VersionReader {
    /// Opens the version at the top of `layers` (full first). Reads every layer's index once.
    pub fn from_chain(layers: Vec<Arc<ImageFile>>) -> Result<VersionReader> {
        VersionReader::open(layers, None)
    }

    /// `from_chain` with the block map's form chosen by the caller (tests of both forms).
    pub(crate) fn open(layers: Vec<Arc<ImageFile>>, form: Option<Form>) -> Result<VersionReader> {
        check_chain(&layers)?;
        let top = &layers[layers.len() - 1];
        let (block_size, source_size, block_count) =
            (top.header.block_size, top.header.source_size, top.header.block_count());
        // Entry counts are bounded by the files' lengths (checked when each was opened), and
        // they bound what the map holds: the declared size alone decides no allocation.
        if let Some(image) = layers.iter().find(|i| i.entry_count() >= MAX_ENTRIES) {
            return Err(FormatError::Corrupt {
                loc: image.loc(),
                what: "footer",
                detail: format!("{} index entries, more than a block map can name", image.entry_count()),
            });
        }
        let entries: u64 = layers.iter().map(|i| i.entry_count()).sum();
        let form = form.unwrap_or_else(|| Form::choose(block_count, entries, top.footer.present_blocks));
        let mut map = Builder::new(form, block_count, entries).map_err(|e| {
            FormatError::Invalid(format!(
                "{}: no memory for the block map of {entries} index entries over {block_count} blocks ({e})",
                top.path().display()
            ))
        })?;
        // The indexes of the next few layers are read from the disk while one is streamed.
        const INDEXES_AHEAD: usize = 16;
        for image in layers.iter().take(INDEXES_AHEAD) {
            image.read_index_ahead();
        }
        for (layer, image) in layers.iter().enumerate() {
            if let Some(ahead) = layers.get(layer + INDEXES_AHEAD) {
                ahead.read_index_ahead();
            }
            for (entry_index, entry) in image.stream_entries().enumerate() {
                let entry = entry?;
                map.push(layer, entry_index as u64, entry.block, entry.encoding);
            }
        }
        let map = map.finish();
        for (image, live) in layers.iter().zip(map.live_per_layer(layers.len())) {
            image.note_live_entries(live);
        }
        let reader = VersionReader { layers, map, block_size, source_size, primed_window: Mutex::new(0..0) };
        let present = reader.map.stored_blocks();
        let top = reader.top();
        if present != top.footer.present_blocks {
            return Err(FormatError::Corrupt {
                loc: top.loc(),
                what: "chain",
                detail: format!(
                    "resolves to {present} present blocks, the footer records {}",
                    top.footer.present_blocks
                ),
            });
        }
        Ok(reader)
    }

    pub fn id(&self) -> u64 {
        self.top().header.version
    }

    /// The image of this version itself (the newest layer).
    pub fn top(&self) -> &ImageFile {
        &self.layers[self.layers.len() - 1]
    }

    pub fn layers(&self) -> &[Arc<ImageFile>] {
        &self.layers
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn source_size(&self) -> u64 {
        self.source_size
    }

    pub fn block_count(&self) -> u64 {
        self.map.block_count()
    }

    #[inline]
    pub fn locate(&self, block: u64) -> BlockLocation {
        self.map.locate(block)
    }

    /// The first block at or after `from` that is not zero.
    pub fn next_stored(&self, from: u64) -> Option<u64> {
        self.map.next_stored(from)
    }

    /// The first byte at or after `pos` that may not be zero (the start of the next stored
    /// block, or `pos` inside one); `None` when only zeros follow (SEEK_DATA).
    pub fn data_from(&self, pos: u64) -> Option<u64> {
        let bs = u64::from(self.block_size);
        if pos >= self.source_size {
            return None;
        }
        let block = self.next_stored(pos / bs)?;
        Some((block * bs).max(pos)).filter(|&d| d < self.source_size)
    }

    /// The first byte at or after `pos` of a zero block, or the source's end (SEEK_HOLE).
    pub fn hole_from(&self, pos: u64) -> u64 {
        let bs = u64::from(self.block_size);
        let mut block = pos / bs;
        while block < self.block_count() && matches!(self.locate(block), BlockLocation::Stored { .. }) {
            block += 1;
        }
        block.saturating_mul(bs).max(pos).min(self.source_size)
    }

    /// The blocks that are not zero, from `from` on, in order (zero runs cost nothing).
    pub fn stored_blocks(&self, from: u64) -> impl Iterator<Item = StoredBlock> + '_ {
        self.map.stored(from)
    }

    /// Bytes of memory the block map holds.
    pub fn map_bytes(&self) -> usize {
        self.map.heap_bytes()
    }

    #[cfg(test)]
    pub(crate) fn map_form(&self) -> Form {
        self.map.form()
    }

    /// The index entry of `block`, or `None` when the block is zero.
    pub fn entry(&self, block: u64) -> Result<Option<(&ImageFile, IndexEntry)>> {
        match self.locate(block) {
            BlockLocation::Zero => Ok(None),
            BlockLocation::Stored { layer, entry } => {
                let image = &self.layers[layer];
                Ok(Some((image, image.read_entry(entry, block)?)))
            }
        }
    }

    /// Asks the kernel for the first frame that the next stretch of the disk from `block` (the
    /// read-ahead distance, 16 MiB) needs from each image not read yet, so that a reader about
    /// to go through it does not wait on the disk once per image of the chain when it reaches
    /// the image's first block. Looks only at the blocks that came into the window since the
    /// last call when the window moved forward (a look-up in the block map each, an entry read
    /// and an fadvise per image not read yet). Advice only: an entry that cannot be read is
    /// left for the read.
    pub fn prime_from(&self, block: u64) {
        let blocks = crate::read_ahead::DISK_AHEAD.div_ceil(u64::from(self.block_size));
        let end = block.saturating_add(blocks).min(self.block_count());
        let from = {
            let mut last = self.primed_window.lock().unwrap();
            let from = if last.contains(&block) { last.end.min(end) } else { block };
            *last = block..end;
            from
        };
        for StoredBlock { block, layer, entry } in self.stored_blocks(from).take_while(|s| s.block < end) {
            let image = &self.layers[layer];
            if !image.primed() {
                if let Ok(entry) = image.read_entry(entry, block) {
                    image.prime(&entry);
                }
            }
        }
    }

    /// The bytes of the decoded patch group `frame` of the newest entry `me` of its block (a
    /// patch in that group) that a reader of this version takes: a table entry and the parts of each
    /// patch of the group this version resolves to. A later version may have rewritten some of
    /// the group's blocks, and those parts are never read here. Found by reading the layer's
    /// index around the block's entry until every slot of the group is met, at most
    /// `PATCH_SHARE_SCAN` entries each way; `None` when that does not find them all (then a
    /// reader keeps the group until its cache evicts it).
    pub fn patch_group_share(&self, me: &IndexEntry, frame: &[u8]) -> Option<usize> {
        const CHUNK: u64 = 256;
        let BlockLocation::Stored { layer, entry: at } = self.locate(me.block) else { return None };
        let image = &self.layers[layer];
        if me.encoding != Encoding::PatchGroup || frame.len() < PATCH_TABLE_ENTRY {
            return None;
        }
        let slots = crate::le::get_u32(frame, 0) as usize / PATCH_TABLE_ENTRY;
        let (mut found, mut share) = (0usize, 0usize);
        let mut tally = |first: u64, entries: &[IndexEntry]| {
            for (i, e) in entries.iter().enumerate() {
                if e.encoding == Encoding::PatchGroup && e.data_offset == me.data_offset {
                    found += 1;
                    if self.locate(e.block) == (BlockLocation::Stored { layer, entry: first + i as u64 }) {
                        share += PATCH_TABLE_ENTRY + image.patch_len(e);
                    }
                }
            }
            found
        };
        let mut met = tally(at, std::slice::from_ref(me));
        let (count, mut below, mut above) = (image.entry_count(), at, at + 1);
        let mut entries = Vec::new();
        while met < slots {
            let up = above < count && above - at <= PATCH_SHARE_SCAN;
            let down = below > 0 && at - below < PATCH_SHARE_SCAN;
            if !up && !down {
                break;
            }
            if up {
                let n = CHUNK.min(count - above);
                image.read_entries(above, n as usize, &mut entries).ok()?;
                met = tally(above, &entries);
                above += n;
            }
            if down {
                let n = CHUNK.min(below);
                below -= n;
                image.read_entries(below, n as usize, &mut entries).ok()?;
                met = tally(below, &entries);
            }
        }
        (met == slots).then_some(share)
    }

    /// The base of `block`, whose newest entry is a patch: the entry the patch's parts are laid
    /// over, or `None` when the base is a zero block.
    pub fn patch_base(&self, block: u64) -> Result<Option<(&ImageFile, IndexEntry)>> {
        let base = self.map.base(block).ok_or_else(|| {
            FormatError::Invalid(format!("{}: block {block} is not a patch", self.top().path().display()))
        })?;
        match base {
            BlockLocation::Zero => Ok(None),
            BlockLocation::Stored { layer, entry } => {
                let image = &self.layers[layer];
                Ok(Some((image, image.read_entry(entry, block)?)))
            }
        }
    }

    /// What a new patch of `block` (in a child of this version) is laid over: reads the block's
    /// base into `out` (its stored block; for a block that is a patch here, the base under that
    /// patch; zeros when that base is a zero block) and returns the mask of this version's patch
    /// of it, which the new patch must include (SPEC §3.2; 0 when it is not a patch). `None`
    /// when the block is zero in this version: there is nothing to lay parts over.
    pub fn read_patch_base(&self, block: u64, scratch: &mut ReadScratch, out: &mut [u8]) -> Result<Option<u16>> {
        let Some((image, entry)) = self.entry(block)? else { return Ok(None) };
        let (inherited, base) = match entry.encoding {
            Encoding::Patch | Encoding::PatchGroup => (entry.patch_mask, self.patch_base(block)?),
            _ => (0, Some((image, entry))),
        };
        match base {
            Some((image, base)) => image.read_block(&base, scratch, out)?,
            None => out.fill(0),
        }
        Ok(Some(inherited))
    }

    /// Recomputes this version's whole-source digest from the block hashes of its resolved index
    /// (no block data is read). Matches the footer's digest when the index is sound.
    pub fn digest_from_index(&self) -> Result<[u8; 32]> {
        let zero = zero_block_hash(self.block_size);
        let mut digest = SourceDigest::new(self.source_size, self.block_size);
        let mut hashes = HashCursor::new(self);
        let mut next = 0;
        for stored in self.stored_blocks(0) {
            digest.push_repeated(&zero, stored.block - next);
            digest.push(&hashes.stored_hash(stored)?);
            next = stored.block + 1;
        }
        digest.push_repeated(&zero, self.block_count() - next);
        Ok(digest.finish())
    }

    pub fn loc(&self) -> Loc {
        self.top().loc()
    }
}

/// Looks up the content hashes of a version's blocks in increasing block order, reading each
/// layer's index sequentially in windows (so a pass over all blocks reads every index at most
/// once). Used to compare a new backup with its parent and to recompute digests.
pub struct HashCursor<'a> {
    version: &'a VersionReader,
    windows: Vec<Option<Window>>,
}

struct Window {
    first: u64,
    entries: Vec<IndexEntry>,
}

const CURSOR_WINDOW: usize = 256;
/// How many index entries each way `patch_group_share` reads at most to find a patch group's
/// slots (strata lists them in block order, within 32 MiB of the disk).
const PATCH_SHARE_SCAN: u64 = 8192;

impl<'a> HashCursor<'a> {
    pub fn new(version: &'a VersionReader) -> HashCursor<'a> {
        HashCursor { version, windows: (0..version.layers.len()).map(|_| None).collect() }
    }

    /// The content hash of `block`, or `None` when it is zero in this version.
    pub fn hash(&mut self, block: u64) -> Result<Option<[u8; 32]>> {
        let BlockLocation::Stored { layer, entry } = self.version.locate(block) else {
            return Ok(None);
        };
        self.stored_hash(StoredBlock { block, layer, entry }).map(Some)
    }

    /// The content hash of a stored block met by a walk of the version.
    fn stored_hash(&mut self, StoredBlock { block, layer, entry }: StoredBlock) -> Result<[u8; 32]> {
        let window = self.windows[layer].get_or_insert_with(|| Window { first: 0, entries: Vec::new() });
        let inside = entry >= window.first && entry < window.first + window.entries.len() as u64;
        if !inside {
            window.first = entry;
            self.version.layers[layer].read_entries(entry, CURSOR_WINDOW, &mut window.entries)?;
        }
        let found = window.entries[(entry - window.first) as usize];
        if found.block != block {
            return Err(FormatError::Corrupt {
                loc: self.version.layers[layer].loc(),
                what: "index entry",
                detail: format!("entry {entry} describes block {}, expected block {block}", found.block),
            });
        }
        Ok(found.hash)
    }
}
