//! A version: its chain of images (full first) and the block map that answers, in one array
//! look-up whatever the chain's depth, which image holds block b. Built once at open by streaming
//! each layer's index oldest first, so that newer layers overwrite older ones; then reads cost one
//! entry read and one block read from exactly one image, or, for a block whose newest entry is a
//! patch, two: the patch's and its base's (patches never stack, so never more). Memory: 8 bytes
//! per source block, plus a word per patched block naming its base.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::digest::{zero_block_hash, SourceDigest};
use crate::error::{FormatError, Loc, Result};
use crate::header::Kind;
use crate::image::{ImageFile, ReadScratch};
use crate::index::{Encoding, IndexEntry};
use crate::layout::MAX_CHAIN_LEN;

/// Where block b of a version lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLocation {
    /// All zeros: never stored, or zeroed by a later delta.
    Zero,
    /// Entry number `entry` of chain layer `layer` (0 = the full).
    Stored { layer: usize, entry: u64 },
}

const LAYER_SHIFT: u32 = 48;
const ENTRY_MASK: u64 = (1 << LAYER_SHIFT) - 1;

fn pack(layer: usize, entry: u64) -> u64 {
    ((layer as u64 + 1) << LAYER_SHIFT) | entry
}

fn unpack(v: u64) -> BlockLocation {
    if v == 0 {
        BlockLocation::Zero
    } else {
        BlockLocation::Stored { layer: ((v >> LAYER_SHIFT) - 1) as usize, entry: v & ENTRY_MASK }
    }
}

/// One version opened for reading. Shareable between threads; each thread brings its own
/// `ReadScratch`.
pub struct VersionReader {
    layers: Vec<Arc<ImageFile>>,
    map: Vec<u64>,
    /// For each block whose newest entry is a patch: its base, the newest entry of the block
    /// below the patch that is not a patch (packed like `map`; 0 for a zero base).
    bases: HashMap<u64, u64>,
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

/// Bytes of physical memory (or u64::MAX when unknown).
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || page <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page as u64)
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
        check_chain(&layers)?;
        let top = &layers[layers.len() - 1].header;
        let (block_size, source_size) = (top.block_size, top.source_size);
        let block_count = usize::try_from(top.block_count())
            .map_err(|_| FormatError::Invalid(format!("source of {source_size} bytes is too large")))?;
        // The map is 8 bytes per block of the size the header claims: check it against the
        // machine before allocating, so a hostile header cannot make us ask for terabytes.
        let map_bytes = (block_count as u64).saturating_mul(8);
        let mut map = Vec::new();
        if map_bytes > physical_memory() / 2 || map.try_reserve_exact(block_count).is_err() {
            return Err(FormatError::Corrupt {
                loc: layers[layers.len() - 1].loc(),
                what: "header",
                detail: format!(
                    "a source of {source_size} bytes needs a block map of {map_bytes} bytes, more than half of \
                     this machine's memory"
                ),
            });
        }
        map.resize(block_count, 0u64);
        let mut bases = HashMap::new();
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
                let (b, word) = (entry.block, pack(layer, entry_index as u64));
                match entry.encoding {
                    // A patch on a patch keeps the older one's base (patches never stack).
                    Encoding::Patch => {
                        bases.entry(b).or_insert(map[b as usize]);
                    }
                    _ if !bases.is_empty() => {
                        bases.remove(&b);
                    }
                    _ => {}
                }
                map[b as usize] = if entry.encoding == Encoding::Zero { 0 } else { word };
            }
        }
        let mut live = vec![0u64; layers.len()];
        for &word in map.iter().chain(bases.values()) {
            if let BlockLocation::Stored { layer, .. } = unpack(word) {
                live[layer] += 1;
            }
        }
        for (image, live) in layers.iter().zip(live) {
            image.note_live_entries(live);
        }
        let reader = VersionReader { layers, map, bases, block_size, source_size, primed_window: Mutex::new(0..0) };
        let present = reader.map.iter().filter(|&&v| v != 0).count() as u64;
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
        self.map.len() as u64
    }

    pub fn locate(&self, block: u64) -> BlockLocation {
        unpack(self.map[block as usize])
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
        for block in from..end {
            if let BlockLocation::Stored { layer, entry } = self.locate(block) {
                let image = &self.layers[layer];
                if !image.primed() {
                    if let Ok(entry) = image.read_entry(entry, block) {
                        image.prime(&entry);
                    }
                }
            }
        }
    }

    /// The base of `block`, whose newest entry is a patch: the entry the patch's parts are laid
    /// over, or `None` when the base is a zero block.
    pub fn patch_base(&self, block: u64) -> Result<Option<(&ImageFile, IndexEntry)>> {
        let word = *self.bases.get(&block).ok_or_else(|| {
            FormatError::Invalid(format!("{}: block {block} is not a patch", self.top().path().display()))
        })?;
        match unpack(word) {
            BlockLocation::Zero => Ok(None),
            BlockLocation::Stored { layer, entry } => {
                let image = &self.layers[layer];
                Ok(Some((image, image.read_entry(entry, block)?)))
            }
        }
    }

    /// Reads block `block` (always a whole block, zero-padded past the source's end) into `out`.
    pub fn read_block(&self, block: u64, scratch: &mut ReadScratch, out: &mut [u8]) -> Result<()> {
        assert_eq!(out.len(), self.block_size as usize);
        match self.entry(block)? {
            None => {
                out.fill(0);
                Ok(())
            }
            Some((image, entry)) if entry.encoding == Encoding::Patch => {
                match self.patch_base(block)? {
                    Some((base_image, base)) => base_image.read_block(&base, scratch, out)?,
                    None => out.fill(0),
                }
                image.read_patch(&entry, scratch, out)
            }
            Some((image, entry)) => image.read_block(&entry, scratch, out),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset` of the version's source; returns the bytes read
    /// (fewer only at the end of the source).
    pub fn read_at(&self, offset: u64, buf: &mut [u8], scratch: &mut ReadScratch) -> Result<usize> {
        if offset >= self.source_size {
            return Ok(0);
        }
        let bs = u64::from(self.block_size);
        let len = (buf.len() as u64).min(self.source_size - offset) as usize;
        let mut done = 0usize;
        let mut block_buf = std::mem::take(&mut scratch.block);
        block_buf.resize(self.block_size as usize, 0);
        let result = (|| {
            while done < len {
                let pos = offset + done as u64;
                let block = pos / bs;
                let within = (pos % bs) as usize;
                let n = (self.block_size as usize - within).min(len - done);
                if within == 0 && n == self.block_size as usize {
                    self.read_block(block, scratch, &mut buf[done..done + n])?;
                } else {
                    self.read_block(block, scratch, &mut block_buf)?;
                    buf[done..done + n].copy_from_slice(&block_buf[within..within + n]);
                }
                done += n;
            }
            Ok(len)
        })();
        scratch.block = block_buf;
        result
    }

    /// Recomputes this version's whole-source digest from the block hashes of its resolved index
    /// (no block data is read). Matches the footer's digest when the index is sound.
    pub fn digest_from_index(&self) -> Result<[u8; 32]> {
        let zero = zero_block_hash(self.block_size);
        let mut digest = SourceDigest::new(self.source_size, self.block_size);
        let mut hashes = HashCursor::new(self);
        for block in 0..self.block_count() {
            digest.push(&hashes.hash(block)?.unwrap_or(zero));
        }
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

impl<'a> HashCursor<'a> {
    pub fn new(version: &'a VersionReader) -> HashCursor<'a> {
        HashCursor { version, windows: (0..version.layers.len()).map(|_| None).collect() }
    }

    /// The content hash of `block`, or `None` when it is zero in this version.
    pub fn hash(&mut self, block: u64) -> Result<Option<[u8; 32]>> {
        let BlockLocation::Stored { layer, entry } = self.version.locate(block) else {
            return Ok(None);
        };
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
        Ok(Some(found.hash))
    }
}
