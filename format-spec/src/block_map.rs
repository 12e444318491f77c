//! The block map of a version: for each block of its source, which entry of which layer of the
//! chain holds it, or that it is zero; and for each block whose newest entry is a patch, the
//! base the patch is laid over (the newest entry below it that is not a patch; zero when that
//! is a zero entry or there is none). Built from the layers' index entries, oldest layer first,
//! newer entries overriding older ones.
//!
//! Two forms answer the same questions. *Dense*: one word per block, so a look-up is one array
//! read; chosen when the blocks the version stores are a sizeable share of its block count, as
//! on any disk in use. *Sparse*: the stored blocks alone, sorted, found by binary search. The
//! choice is made from counts that the files bound, never from the declared source size alone:
//! the dense form is taken only when `DENSE_SHARE × min(index entries of the chain, present
//! blocks claimed by the top footer) ≥ block count`, so its 8 bytes per block never exceed the
//! chain's index bytes on disk (64 per entry). Building the sparse form holds one record per
//! index entry and sorts them by block (stable, so layer order is kept within a block), which
//! is O(E log L) for E entries in L layers whatever the depth; the map kept is 16 bytes per
//! stored block. Bases are a sorted list in both forms (16 bytes per patched block).
//!
//! Walking a version (`next_stored`, `stored`) costs O(stored blocks) in the sparse form and a
//! scan of words in the dense one; zero runs between stored blocks cost nothing per block.

use std::collections::HashMap;
use std::collections::TryReserveError;

use crate::index::Encoding;

/// Where block b of a version lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLocation {
    /// All zeros: never stored, or zeroed by a later delta.
    Zero,
    /// Entry number `entry` of chain layer `layer` (0 = the full).
    Stored { layer: usize, entry: u64 },
}

/// A stored block met by a walk of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    pub block: u64,
    pub layer: usize,
    pub entry: u64,
}

/// The dense form is used when the stored blocks are at least 1 in `DENSE_SHARE` of the blocks.
pub const DENSE_SHARE: u64 = 8;

const LAYER_SHIFT: u32 = 48;
/// Entry numbers a map word can hold (an index of this many entries is 16 PiB long).
pub const MAX_ENTRIES: u64 = 1 << LAYER_SHIFT;
const ENTRY_MASK: u64 = MAX_ENTRIES - 1;

/// A map word: 0 for a zero block, else `(layer + 1) << 48 | entry` (layers number at most
/// `MAX_CHAIN_LEN`, entries fewer than `MAX_ENTRIES`).
fn pack(layer: usize, entry: u64) -> u64 {
    debug_assert!(entry < MAX_ENTRIES);
    ((layer as u64 + 1) << LAYER_SHIFT) | entry
}

fn unpack(word: u64) -> BlockLocation {
    if word == 0 {
        BlockLocation::Zero
    } else {
        BlockLocation::Stored { layer: ((word >> LAYER_SHIFT) - 1) as usize, entry: word & ENTRY_MASK }
    }
}

fn stored(block: u64, word: u64) -> StoredBlock {
    StoredBlock { block, layer: ((word >> LAYER_SHIFT) - 1) as usize, entry: word & ENTRY_MASK }
}

/// Which form a map takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Dense,
    Sparse,
}

impl Form {
    /// The form for `block_count` blocks resolved from `entries` index entries in all, whose top
    /// footer claims `present` non-zero blocks (a claim checked once the map is built; here it
    /// can only make the map sparser than the entries allow).
    pub fn choose(block_count: u64, entries: u64, present: u64) -> Form {
        if entries.min(present).saturating_mul(DENSE_SHARE) >= block_count {
            Form::Dense
        } else {
            Form::Sparse
        }
    }
}

/// A version's resolved block map (see the module notes).
#[derive(Debug)]
pub struct BlockMap {
    block_count: u64,
    form: Form,
    /// Dense form: one word per block. Empty in the sparse form, so that a look-up that finds
    /// no word here is a sparse one, with no other test on the dense path.
    dense: Vec<u64>,
    /// Sparse form: the stored blocks, increasing, and the word of each (empty when dense).
    blocks: Vec<u64>,
    words: Vec<u64>,
    /// (block, word of its base) of every block whose newest entry is a patch, by block.
    bases: Vec<(u64, u64)>,
    stored_blocks: u64,
}

impl BlockMap {
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    pub fn form(&self) -> Form {
        self.form
    }

    /// Where `block` (< block count) lives.
    #[inline]
    pub fn locate(&self, block: u64) -> BlockLocation {
        match self.dense.get(block as usize) {
            Some(&word) => unpack(word),
            None => locate_sparse(&self.blocks, &self.words, block),
        }
    }

    /// The base of `block` when its newest entry is a patch, else `None`.
    pub fn base(&self, block: u64) -> Option<BlockLocation> {
        let i = self.bases.binary_search_by_key(&block, |&(b, _)| b).ok()?;
        Some(unpack(self.bases[i].1))
    }

    /// The first stored block at or after `from`.
    pub fn next_stored(&self, from: u64) -> Option<u64> {
        self.stored(from).next().map(|s| s.block)
    }

    /// The stored blocks from `from` on, in increasing order.
    pub fn stored(&self, from: u64) -> Stored<'_> {
        let at = match self.form {
            Form::Dense => from.min(self.block_count) as usize,
            Form::Sparse => self.blocks.partition_point(|&b| b < from),
        };
        Stored { map: self, at }
    }

    /// Blocks that are not zero.
    pub fn stored_blocks(&self) -> u64 {
        self.stored_blocks
    }

    /// For each of `layers` layers, how many of its entries the map refers to (newest entries
    /// and bases).
    pub fn live_per_layer(&self, layers: usize) -> Vec<u64> {
        let mut live = vec![0u64; layers];
        let newest = self.stored(0).map(|s| s.layer);
        let bases = self.bases.iter().filter(|&&(_, w)| w != 0).map(|&(b, w)| stored(b, w).layer);
        for layer in newest.chain(bases) {
            live[layer] += 1;
        }
        live
    }

    /// Bytes of memory the map holds.
    pub fn heap_bytes(&self) -> usize {
        (self.dense.capacity() + self.blocks.capacity() + self.words.capacity()) * 8 + self.bases.capacity() * 16
    }
}

/// Kept out of line, so that the dense look-up stays one inlined array read.
#[inline(never)]
fn locate_sparse(blocks: &[u64], words: &[u64], block: u64) -> BlockLocation {
    match blocks.binary_search(&block) {
        Ok(i) => unpack(words[i]),
        Err(_) => BlockLocation::Zero,
    }
}

/// The stored blocks of a map from a position on; see `BlockMap::stored`.
pub struct Stored<'m> {
    map: &'m BlockMap,
    /// The next block (dense) or the next place in the sorted blocks (sparse).
    at: usize,
}

impl Iterator for Stored<'_> {
    type Item = StoredBlock;

    fn next(&mut self) -> Option<StoredBlock> {
        let map = self.map;
        match map.form {
            Form::Dense => {
                let map = &map.dense;
                let skip = map[self.at..].iter().position(|&w| w != 0)?;
                let block = self.at + skip;
                self.at = block + 1;
                Some(stored(block as u64, map[block]))
            }
            Form::Sparse => {
                let (&block, &word) = (map.blocks.get(self.at)?, map.words.get(self.at)?);
                self.at += 1;
                Some(stored(block, word))
            }
        }
    }
}

/// Builds a `BlockMap` from index entries pushed layer by layer, oldest first, each layer's in
/// increasing block order.
pub struct Builder {
    block_count: u64,
    state: Building,
}

enum Building {
    Dense {
        map: Vec<u64>,
        bases: HashMap<u64, u64>,
    },
    /// Every entry as it came; resolved by `finish`.
    Sparse {
        records: Vec<Record>,
    },
}

/// One index entry of the sparse build: its block, its word (0 for a zero entry) and whether
/// it is a patch.
#[derive(Clone, Copy)]
struct Record {
    block: u64,
    word: u64,
    patch: bool,
}

impl Builder {
    /// A builder of `form` for `block_count` blocks and at most `entries` entries in all.
    pub fn new(form: Form, block_count: u64, entries: u64) -> Result<Builder, TryReserveError> {
        let state = match form {
            Form::Dense => {
                let mut map = Vec::new();
                map.try_reserve_exact(usize::try_from(block_count).unwrap_or(usize::MAX))?;
                map.resize(block_count as usize, 0);
                Building::Dense { map, bases: HashMap::new() }
            }
            Form::Sparse => {
                let mut records = Vec::new();
                records.try_reserve_exact(usize::try_from(entries).unwrap_or(usize::MAX))?;
                Building::Sparse { records }
            }
        };
        Ok(Builder { block_count, state })
    }

    /// Adds entry number `entry` of `layer`, which describes `block` (< block count).
    pub fn push(&mut self, layer: usize, entry: u64, block: u64, encoding: Encoding) {
        let word = if encoding == Encoding::Zero { 0 } else { pack(layer, entry) };
        match &mut self.state {
            Building::Dense { map, bases } => {
                let slot = &mut map[block as usize];
                match encoding {
                    // A patch on a patch keeps the older one's base (patches never stack).
                    _ if encoding.is_patch() => {
                        bases.entry(block).or_insert(*slot);
                    }
                    _ if !bases.is_empty() => {
                        bases.remove(&block);
                    }
                    _ => {}
                }
                *slot = word;
            }
            Building::Sparse { records } => {
                records.push(Record { block, word, patch: encoding.is_patch() });
            }
        }
    }

    pub fn finish(self) -> BlockMap {
        let block_count = self.block_count;
        match self.state {
            Building::Dense { map, bases } => {
                let mut bases: Vec<(u64, u64)> = bases.into_iter().collect();
                bases.sort_unstable();
                let stored_blocks = map.iter().filter(|&&w| w != 0).count() as u64;
                let (blocks, words) = (Vec::new(), Vec::new());
                BlockMap { block_count, form: Form::Dense, dense: map, blocks, words, bases, stored_blocks }
            }
            Building::Sparse { mut records } => {
                // Stable: the entries of one block stay oldest first.
                records.sort_by_key(|r| r.block);
                let (mut blocks, mut words, mut bases) = (Vec::new(), Vec::new(), Vec::new());
                for same in records.chunk_by(|a, b| a.block == b.block) {
                    let (mut word, mut base) = (0u64, None);
                    for r in same {
                        if r.patch {
                            base.get_or_insert(word);
                        } else {
                            base = None;
                        }
                        word = r.word;
                    }
                    let block = same[0].block;
                    if word != 0 {
                        blocks.push(block);
                        words.push(word);
                    }
                    if let Some(base) = base {
                        bases.push((block, base));
                    }
                }
                drop(records);
                blocks.shrink_to_fit();
                words.shrink_to_fit();
                bases.shrink_to_fit();
                let stored_blocks = blocks.len() as u64;
                BlockMap { block_count, form: Form::Sparse, dense: Vec::new(), blocks, words, bases, stored_blocks }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The map as the format defines it, one block at a time: the newest entry of each block,
    /// and for a newest entry that is a patch, the newest non-patch entry below (zero if none).
    struct Model {
        /// Per layer: (block, entry number, encoding) in block order.
        layers: Vec<Vec<(u64, u64, Encoding)>>,
    }

    impl Model {
        fn history(&self, block: u64) -> Vec<(usize, u64, Encoding)> {
            let mut h = Vec::new();
            for (layer, entries) in self.layers.iter().enumerate() {
                if let Some(&(_, entry, enc)) = entries.iter().find(|e| e.0 == block) {
                    h.push((layer, entry, enc));
                }
            }
            h
        }

        fn location(at: Option<&(usize, u64, Encoding)>) -> BlockLocation {
            match at {
                None | Some((_, _, Encoding::Zero)) => BlockLocation::Zero,
                Some(&(layer, entry, _)) => BlockLocation::Stored { layer, entry },
            }
        }

        fn locate(&self, block: u64) -> BlockLocation {
            Model::location(self.history(block).last())
        }

        fn base(&self, block: u64) -> Option<BlockLocation> {
            let h = self.history(block);
            if !h.last()?.2.is_patch() {
                return None;
            }
            Some(Model::location(h.iter().rev().find(|e| !e.2.is_patch())))
        }
    }

    fn random_model(rng: &mut Rng, block_count: u64) -> Model {
        let depth = 1 + rng.below(12) as usize;
        let layers = (0..depth)
            .map(|layer| {
                let density = 1 + rng.below(4);
                let mut entries = Vec::new();
                for block in 0..block_count {
                    if rng.below(4) < density {
                        let enc = match (layer, rng.below(5)) {
                            (0, _) => Encoding::Zstd,
                            (_, 0) => Encoding::Zero,
                            (_, 1) => Encoding::Patch,
                            (_, 2) => Encoding::PatchGroup,
                            _ => Encoding::Raw,
                        };
                        entries.push((block, entries.len() as u64, enc));
                    }
                }
                entries
            })
            .collect();
        Model { layers }
    }

    fn build(model: &Model, form: Form, block_count: u64) -> BlockMap {
        let entries = model.layers.iter().map(|l| l.len() as u64).sum();
        let mut b = Builder::new(form, block_count, entries).unwrap();
        for (layer, entries) in model.layers.iter().enumerate() {
            for &(block, entry, enc) in entries {
                b.push(layer, entry, block, enc);
            }
        }
        b.finish()
    }

    #[test]
    fn dense_and_sparse_maps_resolve_like_the_model() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..300 {
            let block_count = 1 + rng.below(60);
            let model = random_model(&mut rng, block_count);
            let maps = [build(&model, Form::Dense, block_count), build(&model, Form::Sparse, block_count)];
            for map in &maps {
                let mut want_stored = Vec::new();
                for b in 0..block_count {
                    assert_eq!(map.locate(b), model.locate(b), "{:?} block {b}", map.form());
                    assert_eq!(map.base(b), model.base(b), "{:?} base of block {b}", map.form());
                    if let BlockLocation::Stored { layer, entry } = model.locate(b) {
                        want_stored.push(StoredBlock { block: b, layer, entry });
                    }
                }
                assert_eq!(map.stored(0).collect::<Vec<_>>(), want_stored, "{:?}", map.form());
                assert_eq!(map.stored_blocks(), want_stored.len() as u64);
                for from in 0..=block_count {
                    let want = want_stored.iter().find(|s| s.block >= from).map(|s| s.block);
                    assert_eq!(map.next_stored(from), want, "{:?} from {from}", map.form());
                }
            }
            assert_eq!(maps[0].live_per_layer(model.layers.len()), maps[1].live_per_layer(model.layers.len()));
        }
    }

    #[test]
    fn the_form_follows_the_entries_not_the_declared_size() {
        let huge = 1 << 40;
        assert_eq!(Form::choose(huge, 3, 3), Form::Sparse);
        assert_eq!(Form::choose(huge, 3, huge), Form::Sparse, "a footer's claim alone does not make it dense");
        assert_eq!(Form::choose(1000, 125, 125), Form::Dense);
        assert_eq!(Form::choose(1000, 124, 124), Form::Sparse);
        assert_eq!(Form::choose(0, 0, 0), Form::Dense);
    }

    #[test]
    fn a_sparse_map_of_a_few_blocks_of_a_huge_source_is_small() {
        let block_count = 1u64 << 40;
        let mut b = Builder::new(Form::Sparse, block_count, 4).unwrap();
        b.push(0, 0, 0, Encoding::Zstd);
        b.push(0, 1, block_count - 1, Encoding::Zstd);
        b.push(1, 0, 7, Encoding::Patch);
        b.push(1, 1, block_count - 1, Encoding::Patch);
        let map = b.finish();
        assert!(map.heap_bytes() < 1024, "{} bytes", map.heap_bytes());
        assert_eq!(map.locate(block_count - 1), BlockLocation::Stored { layer: 1, entry: 1 });
        assert_eq!(map.base(block_count - 1), Some(BlockLocation::Stored { layer: 0, entry: 1 }));
        assert_eq!(map.base(7), Some(BlockLocation::Zero));
        assert_eq!(map.next_stored(8), Some(block_count - 1));
        assert_eq!(map.live_per_layer(2), vec![2, 2]);
    }
}
