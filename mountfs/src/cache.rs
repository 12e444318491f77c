//! The block cache: decompressed blocks, keyed by the image that stores them and the block
//! number, so a block shared by many versions is decoded and kept once. Bounded by a byte budget
//! (LRU eviction). Readahead decodes the next blocks of a sequential reader on the other cores
//! while the current read is answered.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use strata_format::{BlockLocation, ReadScratch, VersionReader};

/// (version id of the image holding the block, block number)
type Key = (u64, u64);

pub struct BlockCache {
    blocks: Mutex<LruCache<Key, Arc<[u8]>>>,
    in_flight: Mutex<HashSet<Key>>,
    zero: Arc<[u8]>,
}

impl BlockCache {
    /// A cache of at most `budget` bytes of `block_size` blocks (at least 16 blocks).
    pub fn new(budget: u64, block_size: u32) -> BlockCache {
        let capacity = (budget / u64::from(block_size)).max(16) as usize;
        BlockCache {
            blocks: Mutex::new(LruCache::new(NonZeroUsize::new(capacity).expect("capacity > 0"))),
            in_flight: Mutex::new(HashSet::new()),
            zero: vec![0u8; block_size as usize].into(),
        }
    }

    fn key(version: &VersionReader, block: u64) -> Option<Key> {
        match version.locate(block) {
            BlockLocation::Zero => None,
            BlockLocation::Stored { layer, .. } => Some((version.layers()[layer].header.version, block)),
        }
    }

    /// Block `block` of `version`, from the cache or decoded now.
    pub fn get(&self, version: &VersionReader, block: u64) -> strata_format::Result<Arc<[u8]>> {
        let Some(key) = Self::key(version, block) else { return Ok(self.zero.clone()) };
        if let Some(hit) = self.blocks.lock().unwrap().get(&key) {
            return Ok(hit.clone());
        }
        self.load(version, block, key)
    }

    fn load(&self, version: &VersionReader, block: u64, key: Key) -> strata_format::Result<Arc<[u8]>> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<ReadScratch> = std::cell::RefCell::new(ReadScratch::new());
        }
        let mut data = vec![0u8; version.block_size() as usize];
        SCRATCH.with(|s| version.read_block(block, &mut s.borrow_mut(), &mut data))?;
        let data: Arc<[u8]> = data.into();
        self.blocks.lock().unwrap().put(key, data.clone());
        Ok(data)
    }

    /// Decodes `blocks` of `version` in the background, skipping those cached or under way.
    /// Errors are left for the foreground read to find and report.
    pub fn prefetch(self: &Arc<Self>, version: &Arc<VersionReader>, blocks: std::ops::Range<u64>) {
        for block in blocks {
            if block >= version.block_count() {
                break;
            }
            let Some(key) = Self::key(version, block) else { continue };
            if self.blocks.lock().unwrap().contains(&key) || !self.in_flight.lock().unwrap().insert(key) {
                continue;
            }
            let (cache, version) = (self.clone(), version.clone());
            rayon::spawn(move || {
                let _ = cache.load(&version, block, key);
                cache.in_flight.lock().unwrap().remove(&key);
            });
        }
    }
}
