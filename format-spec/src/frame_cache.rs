//! The frame cache: decoded stored frames (one block, a whole group: at most 4 MiB, a patch's
//! parts, or a patch group), keyed by the opened image and the frame's offset in it, so that a frame
//! shared by several versions or several blocks (deduplication), or read by two requests that
//! each cover part of a group, is decoded and kept once. Bounded by a byte budget (LRU
//! eviction). A frame is decoded by one thread at a time: readers that want a frame under way
//! wait for it. Prefetch decodes the frames of the next blocks of a reader on the other cores.
//! A frame that reads have taken all of (a sequential reader went through it) leaves the cache,
//! its buffer kept for the next decode.
//! A cache that checks hashes hashes each block of a frame once, when the frame is decoded
//! (by prefetch, on another core, when it gets there first); reads compare those hashes with
//! the entries of the blocks they serve.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::block::hash_block;
use crate::{Encoding, ImageFile, IndexEntry, ReadScratch, VersionReader};
use lru::LruCache;

/// (serial of the opened image holding the frame, the frame's data offset in it).
/// What names a decoded frame: the image (its serial) and the frame in it
/// (`IndexEntry::frame_name`: never a frame decoded for an entry of another shape).
type Key = (u64, (u64, u64, u32));

/// Evicted frame buffers kept for reuse: at most this many, holding at most a quarter of the
/// budget.
const SPARE_BUFFERS: usize = 8;

/// The budget of a reader's frame cache unless told otherwise: the mount's `--cache-size`
/// default, and what a restore keeps for the tasks that need frames in part.
pub const DEFAULT_BUDGET: u64 = 128 << 20;

pub struct FrameCache {
    frames: Mutex<Frames>,
    /// Buffers of evicted frames, reused for the next decodes: frames are freed and allocated
    /// by different threads, and the allocator's per-thread arenas would otherwise keep tens of
    /// MiB beyond the budget.
    spare: Mutex<Vec<Vec<u8>>>,
    in_flight: Mutex<HashSet<Key>>,
    landed: Condvar,
    budget: usize,
    /// Whether decoded frames carry the BLAKE3 hash of each of their blocks.
    hashes: bool,
    block_size: u32,
}

struct Frames {
    lru: LruCache<Key, Arc<Decoded>>,
    bytes: usize,
}

/// A decoded frame, and the BLAKE3 hash of each of its blocks in slot order when the cache
/// checks hashes (none for a patch's parts, which are not blocks).
pub struct Decoded {
    bytes: Vec<u8>,
    pub hashes: Vec<[u8; 32]>,
    /// Bytes of it that reads have taken, counted by `FrameCache::took`.
    taken: AtomicUsize,
    /// Bytes of it that its reader takes at most, when that is less than all of it (a patch
    /// group some of whose patches the version does not read); 0: all of it.
    share: AtomicUsize,
}

impl Decoded {
    fn new(bytes: Vec<u8>, hashes: Vec<[u8; 32]>) -> Decoded {
        Decoded { bytes, hashes, taken: Default::default(), share: Default::default() }
    }

    fn set_share(&self, share: Option<usize>) {
        if let Some(share) = share.filter(|&s| s > 0) {
            self.share.store(share, Ordering::Relaxed);
        }
    }

    /// The bytes its buffer holds, which the budget counts: a reused buffer may be larger than
    /// the frame.
    fn held(&self) -> usize {
        self.bytes.capacity()
    }
}

impl std::ops::Deref for Decoded {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Whether this thread must decode a frame, or it is cached.
enum Claim<'c> {
    Cached(Arc<Decoded>),
    Decode(Claimed<'c>),
}

/// A frame this thread decodes: released when dropped, also when the decode panics, so that
/// readers waiting for the frame wake and decode it themselves instead of waiting forever.
struct Claimed<'c> {
    cache: &'c FrameCache,
    key: Key,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        lock(&self.cache.in_flight).remove(&self.key);
        self.cache.landed.notify_all();
    }
}

/// Locks `m` even when a thread panicked holding it: the cache's state stays usable (at worst a
/// byte count is off until the frames it counts are evicted), and one failed request must not
/// fail every later one.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

thread_local! {
    static SCRATCH: std::cell::RefCell<ReadScratch> = std::cell::RefCell::new(ReadScratch::new());
}

/// Decodes the frame of `entry` into `out` with this thread's scratch buffers.
fn decode_frame(image: &ImageFile, entry: &IndexEntry, out: &mut [u8]) -> crate::Result<()> {
    SCRATCH.with(|s| image.decode_frame(entry, &mut s.borrow_mut(), out))
}

fn key(image: &ImageFile, entry: &IndexEntry) -> Key {
    (image.serial(), entry.frame_name())
}

impl FrameCache {
    /// A cache of at most `budget` bytes of frames of `block_size` blocks (at least four of the
    /// largest frames, so that the frames of one request fit); with `hashes`, frames carry their
    /// blocks' hashes.
    pub fn new(budget: u64, block_size: u32, hashes: bool) -> FrameCache {
        use crate::layout::{GROUP_MAX_BLOCKS, GROUP_MAX_BYTES};
        let bs = u64::from(block_size);
        let floor = 4 * (u64::from(GROUP_MAX_BLOCKS) * bs).min(u64::from(GROUP_MAX_BYTES)).max(bs);
        FrameCache {
            frames: Mutex::new(Frames { lru: LruCache::unbounded(), bytes: 0 }),
            spare: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            budget: usize::try_from(budget.max(floor)).unwrap_or(usize::MAX),
            hashes,
            block_size,
        }
    }

    /// The block size of the frames this cache holds.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether reads through this cache check blocks against their entries' hashes.
    pub fn checks_hashes(&self) -> bool {
        self.hashes
    }

    /// The hashes of the blocks of the decoded frame `bytes` of `entry`.
    fn hash_blocks(&self, image: &ImageFile, entry: &IndexEntry, bytes: &[u8]) -> Vec<[u8; 32]> {
        if !self.hashes || entry.encoding.is_patch() {
            return Vec::new();
        }
        bytes.chunks_exact(image.header.block_size as usize).map(hash_block).collect()
    }

    /// Frames held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.frames).lru.len()
    }

    fn cached(&self, key: &Key) -> Option<Arc<Decoded>> {
        lock(&self.frames).lru.get(key).cloned()
    }

    fn insert(&self, key: Key, data: Arc<Decoded>) {
        let mut f = lock(&self.frames);
        f.bytes += data.held();
        if let Some(old) = f.lru.put(key, data) {
            f.bytes -= old.held();
        }
        while f.bytes > self.budget && f.lru.len() > 1 {
            match f.lru.pop_lru() {
                Some((_, old)) => {
                    f.bytes -= old.held();
                    self.recycle(old);
                }
                None => break,
            }
        }
    }

    /// Keeps the buffer of an evicted frame for reuse, unless a reader still holds it.
    fn recycle(&self, frame: Arc<Decoded>) {
        if let Ok(Decoded { bytes: buf, .. }) = Arc::try_unwrap(frame) {
            let mut spare = lock(&self.spare);
            let held: usize = spare.iter().map(|b| b.capacity()).sum();
            if spare.len() < SPARE_BUFFERS && held + buf.capacity() <= self.budget / 4 {
                spare.push(buf);
            }
        }
    }

    /// A buffer of `len` bytes (contents undefined until decoded into): the smallest spare one
    /// that holds `len` and is not more than twice that (frames differ in length: groups are
    /// cut by the data they hold), else a new one.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut spare = lock(&self.spare);
        let fits = spare.iter().enumerate().filter(|(_, b)| (len..=len.saturating_mul(2)).contains(&b.capacity()));
        match fits.min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i) {
            Some(i) => {
                let mut buf = spare.swap_remove(i);
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// Returns the cached frame, or claims it for decoding; waits while another thread decodes
    /// it (`wait`), or gives up at once when it is under way (`!wait`, returns `None`).
    fn claim(&self, key: Key, wait: bool) -> Option<Claim<'_>> {
        let mut in_flight = lock(&self.in_flight);
        loop {
            if let Some(hit) = self.cached(&key) {
                return Some(Claim::Cached(hit));
            }
            if in_flight.insert(key) {
                return Some(Claim::Decode(Claimed { cache: self, key }));
            }
            if !wait {
                return None;
            }
            in_flight = self.landed.wait(in_flight).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Decodes a claimed frame into the cache; the claim is released when this returns or
    /// unwinds.
    fn decode(&self, image: &ImageFile, entry: &IndexEntry, claim: Claimed<'_>) -> crate::Result<Arc<Decoded>> {
        let result = SCRATCH.with(|s| image.decode_frame_with(entry, &mut s.borrow_mut(), |len| self.buffer(len)));
        let data = result.map(|bytes| {
            let hashes = self.hash_blocks(image, entry, &bytes);
            let data = Arc::new(Decoded::new(bytes, hashes));
            self.insert(claim.key, data.clone());
            data
        });
        drop(claim);
        data
    }

    /// Whether the decoded frame of `entry` is in the cache.
    #[cfg(test)]
    pub(crate) fn holds(&self, image: &ImageFile, entry: &IndexEntry) -> bool {
        self.cached(&key(image, entry)).is_some()
    }

    /// The decoded frame of `entry`, from the cache or decoded now.
    pub fn frame(&self, image: &ImageFile, entry: &IndexEntry) -> crate::Result<Arc<Decoded>> {
        self.frame_shared(image, entry, |_| None)
    }

    /// `frame`; when it decodes the frame now, `share` (given the decoded bytes) may tell how
    /// many of them its reader takes, so that the frame leaves once those are taken (`took`).
    pub fn frame_shared(
        &self,
        image: &ImageFile,
        entry: &IndexEntry,
        share: impl FnOnce(&[u8]) -> Option<usize>,
    ) -> crate::Result<Arc<Decoded>> {
        let key = key(image, entry);
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        match self.claim(key, true) {
            Some(Claim::Cached(hit)) => Ok(hit),
            Some(Claim::Decode(claim)) => {
                let data = self.decode(image, entry, claim)?;
                data.set_share(share(&data));
                Ok(data)
            }
            None => unreachable!("a waiting claim returns a frame or a claim"),
        }
    }

    /// The decoded frame of `entry` (not a patch group) into `out` (`frame_len` bytes): taken from the cache when it
    /// is there or being decoded there (and then dropped from it), else decoded straight into
    /// `out` and not kept. Returns the hashes of its blocks (see `Decoded`).
    pub fn frame_into(&self, image: &ImageFile, entry: &IndexEntry, out: &mut [u8]) -> crate::Result<Vec<[u8; 32]>> {
        let key = key(image, entry);
        let under_way = lock(&self.in_flight).contains(&key);
        let hit = if under_way { self.claim(key, true) } else { self.cached(&key).map(Claim::Cached) };
        let data = match hit {
            Some(Claim::Cached(data)) => data,
            Some(Claim::Decode(claim)) => self.decode(image, entry, claim)?,
            None => {
                decode_frame(image, entry, out)?;
                return Ok(self.hash_blocks(image, entry, out));
            }
        };
        out.copy_from_slice(&data);
        let hashes = data.hashes.clone();
        drop(data);
        self.forget(&key);
        Ok(hashes)
    }

    /// Notes that a read took `bytes` of `frame` (the frame of `entry`, which the read has
    /// dropped its hold on): once reads have taken as many bytes as it holds (or its share,
    /// see `frame_shared`), which a
    /// sequential reader does once it has read through it, it is dropped as `frame_into` drops
    /// the frames it takes whole, and for the same reason. A frame read at random, or again and
    /// again in one place, stays until evicted.
    pub fn took(&self, image: &ImageFile, entry: &IndexEntry, frame: Arc<Decoded>, bytes: usize) {
        let goal = match frame.share.load(Ordering::Relaxed) {
            0 => frame.len(),
            share => share.min(frame.len()),
        };
        let before = frame.taken.fetch_add(bytes, Ordering::Relaxed);
        let through = before < goal && before + bytes >= goal;
        drop(frame);
        if through {
            self.forget(&key(image, entry));
        }
    }

    /// Drops a frame that a reader has just taken whole. Its bytes are in the kernel's page
    /// cache now (`FOPEN_KEEP_CACHE`), and its buffer serves the next decode: a sequential
    /// reader, whose frames prefetch decodes into the cache, so cycles through a few buffers
    /// instead of filling the budget with fresh pages (faulting them in and clearing them took
    /// 4-16% of the CPU of a cached read).
    fn forget(&self, key: &Key) {
        let old = {
            let mut f = lock(&self.frames);
            let old = f.lru.pop(key);
            if let Some(old) = &old {
                f.bytes -= old.held();
            }
            old
        };
        if let Some(old) = old {
            self.recycle(old);
        }
    }

    /// Decodes the frames of `blocks` of `version` in the background (for a patched block, its
    /// base's and the patch's), skipping those cached or under way, and those of blocks before
    /// `reached` (the first block the reader has not read yet) when the job gets to them: a
    /// prefetch queued behind a fast reader would otherwise decode again frames the reader
    /// decoded itself, or went through and dropped. Errors are left for the foreground read to
    /// find and report. With `groups_only` (the cores are busy with other reads), only groups
    /// are decoded: the requests in flight often fall in one, and would wait for one core to
    /// decode it, while smaller frames (single blocks, patches) decode as fast as they are read.
    pub fn prefetch(
        self: &Arc<Self>,
        version: &Arc<VersionReader>,
        blocks: std::ops::Range<u64>,
        reached: &Arc<AtomicU64>,
        groups_only: bool,
    ) {
        let (cache, version, reached) = (self.clone(), version.clone(), reached.clone());
        rayon::spawn(move || {
            let mut last = None;
            let end = blocks.end.min(version.block_count());
            let passed = move |block: u64| block < reached.load(Ordering::Relaxed);
            for block in version.stored_blocks(blocks.start).map(|s| s.block).take_while(|&b| b < end) {
                if passed(block) {
                    continue;
                }
                let Ok(Some((image, entry))) = version.entry(block) else { continue };
                if groups_only && !matches!(entry.encoding, Encoding::ZstdGroup | Encoding::PatchGroup) {
                    continue;
                }
                let patch = entry.encoding.is_patch();
                let base = if patch { version.patch_base(block).ok().flatten() } else { None };
                for (frame, found) in [(Frame::Newest, Some((image, entry))), (Frame::Base, base)] {
                    let Some((image, entry)) = found else { continue };
                    let key = key(image, &entry);
                    if last == Some(key) || cache.cached(&key).is_some() {
                        last = Some(key);
                        continue;
                    }
                    last = Some(key);
                    let (cache, version, passed) = (cache.clone(), version.clone(), passed.clone());
                    // Claimed only once running: a frame is in flight only while a running thread
                    // decodes it, so waiting for one can never wait on a queued job.
                    rayon::spawn(move || {
                        let found = match frame {
                            Frame::Newest => version.entry(block),
                            Frame::Base => version.patch_base(block),
                        };
                        let Ok(Some((image, entry))) = found else { return };
                        if passed(block) {
                            return;
                        }
                        if let Some(Claim::Decode(claim)) = cache.claim(key, false) {
                            // A panic in a rayon job would abort the driver; here it only loses the
                            // prefetch (the foreground read decodes the frame and reports).
                            let decode = std::panic::AssertUnwindSafe(|| {
                                let data = cache.decode(image, &entry, claim)?;
                                if entry.encoding == Encoding::PatchGroup {
                                    data.set_share(version.patch_group_share(&entry, &data));
                                }
                                Ok::<_, crate::FormatError>(data)
                            });
                            if std::panic::catch_unwind(decode).is_err() {
                                log::error!("prefetch of block {block} panicked; the read will retry it");
                            }
                        }
                    });
                }
            }
        });
    }
}

/// Records in `reached` (see [`FrameCache::prefetch`]) a read of blocks `first..end`: forward
/// reads, and requests the kernel sends a little out of order, only move it on; a read that
/// starts more than `slack` blocks behind it is a seek back, from which the reader goes on, so
/// `reached` follows it there (else a second pass over a file would find no prefetch).
pub fn note_read(reached: &AtomicU64, first: u64, end: u64, slack: u64) {
    let _ = reached.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        Some(if first.saturating_add(slack) < now { end } else { now.max(end) })
    });
}

/// Which frame of a block a prefetch job decodes.
#[derive(Clone, Copy)]
enum Frame {
    /// The block's newest entry's.
    Newest,
    /// The base of a patched block.
    Base,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_move_reached_on_and_a_seek_back_brings_it_back() {
        let reached = AtomicU64::new(0);
        note_read(&reached, 0, 100, 8);
        note_read(&reached, 100, 200, 8);
        assert_eq!(reached.load(Ordering::Relaxed), 200);
        note_read(&reached, 195, 199, 8);
        assert_eq!(reached.load(Ordering::Relaxed), 200, "a request a little out of order does not move it back");
        note_read(&reached, 10, 20, 8);
        assert_eq!(reached.load(Ordering::Relaxed), 20, "a seek back: the reader goes on from there");
        note_read(&reached, 20, 30, 8);
        assert_eq!(reached.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn evicted_buffers_are_reused_for_frames_of_at_least_half_their_size() {
        let cache = FrameCache::new(0, 1 << 16, false); // budget floor: four of the largest frames
        let mib = crate::layout::GROUP_MAX_BYTES as usize;
        let frame = |len| Arc::new(Decoded::new(vec![0u8; len], Vec::new()));
        for i in 0..6u64 {
            cache.insert((1, (i, 0, 0)), frame(mib));
        }
        assert_eq!(cache.len(), 4, "two frames evicted");
        assert_eq!(lock(&cache.spare).len(), 1, "one buffer kept: spares hold at most a quarter of the budget");
        let small = cache.buffer(64 << 10);
        assert_eq!(small.capacity(), 64 << 10, "a spare of the largest size is not handed out for 64 KiB");
        let reused = cache.buffer(mib / 2 + 4096);
        assert_eq!((reused.len(), reused.capacity(), lock(&cache.spare).len()), (mib / 2 + 4096, mib, 0));
        cache.insert((2, (0, 0, 0)), Arc::new(Decoded::new(reused, Vec::new())));
        assert_eq!(lock(&cache.frames).bytes, 4 * mib, "the budget counts what the buffers hold");
        cache.forget(&(2, (0, 0, 0)));
        assert_eq!(lock(&cache.spare).len(), 1, "forgotten, its buffer is a spare again");
        let reused = cache.buffer(mib);
        assert_eq!((reused.len(), lock(&cache.spare).len()), (mib, 0));
        // a frame still held by a reader is not recycled
        let held = frame(mib);
        cache.recycle(held.clone());
        assert_eq!(lock(&cache.spare).len(), 0);
        drop(held);
        cache.recycle(frame(mib));
        assert_eq!(lock(&cache.spare).len(), 1);
    }

    #[test]
    fn a_decode_that_panics_releases_its_claim_and_waiters_go_on() {
        let cache = Arc::new(FrameCache::new(0, 1 << 16, false));
        let key = (1, (0, 0, 0));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let Some(Claim::Decode(_claim)) = cache.claim(key, false) else { panic!("not claimed") };
            let _held = lock(&cache.frames);
            panic!("a decoder bug");
        }));
        assert!(panicked.is_err());
        assert!(cache.frames.is_poisoned(), "the panic poisoned the frames lock");
        let waiter = {
            let cache = cache.clone();
            std::thread::spawn(move || matches!(cache.claim(key, true), Some(Claim::Decode(_))))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !waiter.is_finished() {
            assert!(std::time::Instant::now() < deadline, "a waiter hangs on the claim of a decode that panicked");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(waiter.join().unwrap(), "the next reader claims the frame and decodes it itself");
        cache.insert((1, (1, 0, 0)), Arc::new(Decoded::new(vec![0; 4096], Vec::new())));
        assert_eq!(cache.len(), 1, "the cache still works after the panic");
    }
}
