//! The block cache: decompressed blocks, keyed by the image that stores them and the block
//! number, so a block shared by many versions is decoded and kept once. Bounded by a byte budget
//! (LRU eviction). A block is decoded by one thread at a time: readers that want a block under
//! way wait for it. Readahead decodes the next blocks of a sequential reader on the other cores.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;
use rayon::prelude::*;
use strata_format::{BlockLocation, ReadScratch, VersionReader};

/// (image id of the image holding the block, block number): an image id names one version's
/// state for good, so a key never changes meaning (SPEC.md §3.1).
type Key = (strata_format::header::Id128, u64);

pub struct BlockCache {
    blocks: Mutex<LruCache<Key, Arc<Vec<u8>>>>,
    in_flight: Mutex<HashSet<Key>>,
    landed: Condvar,
    zero: Arc<Vec<u8>>,
}

/// Whether this thread must decode a block, or it is cached.
enum Claim {
    Cached(Arc<Vec<u8>>),
    Decode,
}

impl BlockCache {
    /// A cache of at most `budget` bytes of `block_size` blocks (at least 16 blocks).
    pub fn new(budget: u64, block_size: u32) -> BlockCache {
        let capacity = (budget / u64::from(block_size)).max(16) as usize;
        BlockCache {
            blocks: Mutex::new(LruCache::new(NonZeroUsize::new(capacity).expect("capacity > 0"))),
            in_flight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            zero: Arc::new(vec![0u8; block_size as usize]),
        }
    }

    fn key(version: &VersionReader, block: u64) -> Option<Key> {
        match version.locate(block) {
            BlockLocation::Zero => None,
            BlockLocation::Stored { layer, .. } => Some((version.layers()[layer].header.image_id, block)),
        }
    }

    fn cached(&self, key: &Key) -> Option<Arc<Vec<u8>>> {
        self.blocks.lock().unwrap().get(key).cloned()
    }

    /// Returns the cached block, or claims it for decoding; waits while another thread decodes
    /// it (`wait`), or gives up at once when it is under way (`!wait`, returns `None`).
    fn claim(&self, key: Key, wait: bool) -> Option<Claim> {
        let mut in_flight = self.in_flight.lock().unwrap();
        loop {
            if let Some(hit) = self.cached(&key) {
                return Some(Claim::Cached(hit));
            }
            if in_flight.insert(key) {
                return Some(Claim::Decode);
            }
            if !wait {
                return None;
            }
            in_flight = self.landed.wait(in_flight).unwrap();
        }
    }

    fn decode(&self, version: &VersionReader, block: u64, key: Key) -> strata_format::Result<Arc<Vec<u8>>> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<ReadScratch> = std::cell::RefCell::new(ReadScratch::new());
        }
        let mut data = vec![0u8; version.block_size() as usize];
        let result = SCRATCH.with(|s| version.read_block(block, &mut s.borrow_mut(), &mut data));
        let data = Arc::new(data);
        if result.is_ok() {
            self.blocks.lock().unwrap().put(key, data.clone());
        }
        self.in_flight.lock().unwrap().remove(&key);
        self.landed.notify_all();
        result.map(|_| data)
    }

    /// Block `block` of `version`, from the cache or decoded now.
    pub fn get(&self, version: &VersionReader, block: u64) -> strata_format::Result<Arc<Vec<u8>>> {
        let Some(key) = Self::key(version, block) else { return Ok(self.zero.clone()) };
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        match self.claim(key, true) {
            Some(Claim::Cached(hit)) => Ok(hit),
            _ => self.decode(version, block, key),
        }
    }

    /// Blocks `blocks` of `version`, decoding the missing ones on all cores.
    pub fn get_many(
        &self,
        version: &VersionReader,
        blocks: std::ops::Range<u64>,
    ) -> strata_format::Result<Vec<Arc<Vec<u8>>>> {
        if blocks.end - blocks.start <= 1 {
            return blocks.map(|b| self.get(version, b)).collect();
        }
        blocks.into_par_iter().map(|b| self.get(version, b)).collect()
    }

    /// Decodes `blocks` of `version` in the background, skipping those cached or under way.
    /// Errors are left for the foreground read to find and report.
    pub fn prefetch(self: &Arc<Self>, version: &Arc<VersionReader>, blocks: std::ops::Range<u64>) {
        for block in blocks {
            if block >= version.block_count() {
                break;
            }
            let Some(key) = Self::key(version, block) else { continue };
            if self.blocks.lock().unwrap().contains(&key) {
                continue;
            }
            let (cache, version) = (self.clone(), version.clone());
            // Claimed only once running: a block is in flight only while a running thread
            // decodes it, so waiting for one can never wait on a queued job.
            rayon::spawn(move || {
                if let Some(Claim::Decode) = cache.claim(key, false) {
                    let _ = cache.decode(&version, block, key);
                }
            });
        }
    }
}
