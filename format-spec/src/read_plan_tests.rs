//! Unit tests of the read path without FUSE: every read of a window returns the version's bytes
//! (aligned or not; single blocks, groups and deduplicated blocks; whole frames decoded straight
//! into the reply or partial ones through the cache; alone or in parallel, with prefetch racing
//! it, from several threads at once; patched blocks laid over bases in groups, singles,
//! references and zero blocks), a damaged frame fails only the reads that touch it, and a block
//! that does not hash to its entry's hash fails only its own reads, unless hashes go unchecked.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::block::{compress_into, hash_block, is_zero};
use crate::digest::SourceDigest;
use crate::header::{new_id, ImageHeader, ImageRef, Kind, Rule};
use crate::{Encoding, Finish, ImageFile, ImageWriter, IndexEntry, VersionReader};

use crate::frame_cache::FrameCache;
use crate::patch_group::PatchGroupBuilder;
use crate::read_plan::{all_zero, read_window};

const BS: u32 = 4096;

/// A disk of `blocks` blocks and a 1000-byte tail: runs of compressible blocks between zero
/// blocks (stored as groups), incompressible blocks (alone), and copies of block 3 (references).
fn sample_disk(blocks: usize) -> Vec<u8> {
    let bs = BS as usize;
    let mut disk = vec![0u8; blocks * bs + 1000];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (b, chunk) in disk.chunks_mut(bs).enumerate() {
        match b % 11 {
            0 | 7 => {}
            1 | 5 => chunk.iter_mut().enumerate().for_each(|(i, c)| *c = (2u8) ^ ((i / 64) as u8)),
            3 => chunk.iter_mut().for_each(|c| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *c = x as u8;
            }),
            _ => chunk.iter_mut().enumerate().for_each(|(i, c)| *c = (b as u8) ^ ((i / 64) as u8)),
        }
    }
    for b in (9..blocks).step_by(11) {
        disk.copy_within(3 * bs..4 * bs, b * bs);
    }
    disk
}

/// Writes `disk` as a full image in `dir` and opens it as a version: runs of up to 5 adjacent
/// compressible blocks as groups, other blocks alone, a block equal to an earlier single block
/// as a reference to its bytes.
fn write_version(dir: &Path, disk: &[u8]) -> VersionReader {
    write_forged_version(dir, disk, &[])
}

/// The hash a forged entry records: not that of its block, whose bytes and crc32c are sound.
fn forged_hash() -> [u8; 32] {
    hash_block(b"not this block")
}

/// As `write_version`, with the entries of the blocks `forged` recording `forged_hash`.
fn write_forged_version(dir: &Path, disk: &[u8], forged: &[u64]) -> VersionReader {
    let image_id = new_id();
    let header = ImageHeader {
        repo_id: [3; 16],
        image_id,
        version: 1,
        kind: Kind::Full,
        rule: Rule::Scheme,
        parent: None,
        full: ImageRef { version: 1, image_id },
        block_size: BS,
        compression_level: 3,
        source_size: disk.len() as u64,
        created_secs: 1_700_000_000,
        created_nanos: 0,
        label: String::new(),
        source: "test".into(),
        source_id: None,
        selection: Default::default(),
    };
    let final_path = dir.join(crate::repo::image_file_name(1));
    let mut w = ImageWriter::create(&final_path, header).unwrap();
    let mut digest = SourceDigest::new(disk.len() as u64, BS);
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    let (mut out, mut present, mut entries) = (Vec::new(), 0, Vec::new());
    let mut singles: Vec<IndexEntry> = Vec::new();
    let mut run: Vec<(u64, [u8; 32], Vec<u8>)> = Vec::new();
    let mut flush = |w: &mut ImageWriter, run: &mut Vec<(u64, [u8; 32], Vec<u8>)>, singles: &mut Vec<IndexEntry>| {
        let bytes: Vec<u8> = run.iter().flat_map(|(_, _, b)| b.iter().copied()).collect();
        if run.len() >= 2 && compress_into(&mut compressor, &bytes, &mut out) == Encoding::Zstd {
            let ids: Vec<_> = run.iter().map(|(b, h, _)| (*b, *h)).collect();
            w.append_group(&ids, &out, &mut entries).unwrap();
        } else {
            for (b, h, block) in run.iter() {
                let e = match compress_into(&mut compressor, block, &mut out) {
                    Encoding::Zstd => w.append_block(*b, Encoding::Zstd, &out, *h).unwrap(),
                    _ => w.append_block(*b, Encoding::Raw, block, *h).unwrap(),
                };
                singles.push(e);
            }
        }
        run.clear();
    };
    for (b, chunk) in disk.chunks(BS as usize).enumerate() {
        let mut block = chunk.to_vec();
        block.resize(BS as usize, 0);
        let hash = if forged.contains(&(b as u64)) { forged_hash() } else { hash_block(&block) };
        digest.push(&hash);
        if is_zero(&block) {
            flush(&mut w, &mut run, &mut singles);
            continue;
        }
        present += 1;
        if let Some(like) = singles.iter().find(|e| e.hash == hash).copied() {
            flush(&mut w, &mut run, &mut singles);
            w.append_ref(b as u64, hash, &like).unwrap();
            continue;
        }
        let incompressible = b % 11 == 3;
        if incompressible || run.len() == 5 {
            flush(&mut w, &mut run, &mut singles);
        }
        run.push((b as u64, hash, block));
        if incompressible {
            flush(&mut w, &mut run, &mut singles);
        }
    }
    flush(&mut w, &mut run, &mut singles);
    let path = w.finish(Finish { present_blocks: present, source_digest: digest.finish() }).unwrap();
    VersionReader::from_chain(vec![Arc::new(ImageFile::open(&path).unwrap())]).unwrap()
}

/// Deterministic pseudo-random numbers for offsets and lengths.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Checks `count` random reads of the window `[start, start + len)` against `disk`.
fn check_random_reads(reader: &VersionReader, cache: &FrameCache, disk: &[u8], start: u64, seed: u64, count: usize) {
    let len = disk.len() as u64 - start;
    let mut rng = Lcg(seed);
    for i in 0..count {
        let offset = match i % 3 {
            0 => rng.below(len / u64::from(BS)) * u64::from(BS),
            _ => rng.below(len + 100),
        };
        let size = match i % 4 {
            0 => u64::from(BS) * (1 + rng.below(20)),
            1 => 1 + rng.below(200),
            _ => 1 + rng.below(u64::from(BS) * 5),
        } as usize;
        let mut buf = vec![0xAAu8; size];
        let n = read_window(reader, cache, start, len, offset, &mut buf, i % 2 == 0).unwrap();
        let want = (size as u64).min(len.saturating_sub(offset)) as usize;
        assert_eq!(n, want, "length of the read at {offset}+{size}");
        let from = (start + offset.min(len)) as usize;
        assert!(buf[..n] == disk[from..from + n], "bytes of the read at {offset}+{size} (window at {start})");
    }
}

/// The distinct frames a version stores for `blocks`.
fn frames(reader: &VersionReader, blocks: std::ops::Range<u64>) -> usize {
    let mut offsets: Vec<u64> = blocks.filter_map(|b| reader.entry(b).unwrap()).map(|(_, e)| e.data_offset).collect();
    offsets.sort_unstable();
    offsets.dedup();
    offsets.len()
}

#[test]
fn the_sample_version_has_groups_singles_and_references() {
    let dir = tempfile::tempdir().unwrap();
    let reader = write_version(dir.path(), &sample_disk(40));
    let entries: Vec<IndexEntry> =
        (0..reader.block_count()).filter_map(|b| reader.entry(b).unwrap()).map(|(_, e)| e).collect();
    assert!(entries.iter().any(|e| e.encoding == Encoding::ZstdGroup && e.group_len >= 3));
    assert!(entries.iter().any(|e| e.encoding == Encoding::Raw));
    let mut singles: Vec<u64> =
        entries.iter().filter(|e| e.encoding != Encoding::ZstdGroup).map(|e| e.data_offset).collect();
    let count = singles.len();
    singles.sort_unstable();
    singles.dedup();
    assert!(singles.len() < count, "some blocks are references to another block's bytes");
}

#[test]
fn every_read_of_a_window_returns_the_versions_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(200);
    let reader = write_version(dir.path(), &disk);
    let cache = FrameCache::new(64 * u64::from(BS), BS, true);
    check_random_reads(&reader, &cache, &disk, 0, 1, 600);
    // a partition-like window that starts inside a block
    check_random_reads(&reader, &cache, &disk, 3 * u64::from(BS) + 512, 2, 600);
    let mut whole = vec![0u8; disk.len()];
    assert_eq!(read_window(&reader, &cache, 0, disk.len() as u64, 0, &mut whole, true).unwrap(), disk.len());
    assert!(whole == disk);
}

#[test]
fn whole_frame_reads_bypass_the_cache_and_partial_ones_fill_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(32);
    let reader = write_version(dir.path(), &disk);
    let cache = FrameCache::new(64 * u64::from(BS), BS, true);
    // blocks 0..11 hold whole frames only: groups 1-2 and 4-6, singles 3, 8, 10, 9 (= 3)
    let mut buf = vec![0u8; 11 * BS as usize];
    read_window(&reader, &cache, 0, disk.len() as u64, 0, &mut buf, true).unwrap();
    assert!(buf[..] == disk[..buf.len()]);
    assert_eq!(cache.len(), 0, "whole frames are decoded into the reply, not kept");
    let mut part = vec![0u8; 100];
    read_window(&reader, &cache, 0, disk.len() as u64, u64::from(BS) + 10, &mut part, false).unwrap();
    assert_eq!(cache.len(), 1, "a partly read group is kept for the reads of its other parts");
    assert!(part[..] == disk[BS as usize + 10..BS as usize + 110]);
}

#[test]
fn a_group_read_through_in_parts_leaves_the_cache_and_prefetch_leaves_what_the_reader_passed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(32);
    let reader = Arc::new(write_version(dir.path(), &disk));
    let cache = Arc::new(FrameCache::new(64 * u64::from(BS), BS, true));
    let bs = BS as usize;
    // blocks 4-6 are one group (see above): block 4 alone, then 5 and 6
    let mut part = vec![0u8; bs];
    read_window(&reader, &cache, 0, disk.len() as u64, 4 * bs as u64, &mut part, false).unwrap();
    assert_eq!(cache.len(), 1, "a partly read group is kept");
    read_window(&reader, &cache, 0, disk.len() as u64, 4 * bs as u64 + 10, &mut part[..100], false).unwrap();
    let mut rest = vec![0u8; 2 * bs];
    read_window(&reader, &cache, 0, disk.len() as u64, 5 * bs as u64, &mut rest, false).unwrap();
    assert!(rest[..] == disk[5 * bs..7 * bs]);
    assert_eq!(cache.len(), 0, "read through (some bytes twice), the group leaves the cache");
    // A prefetch from block 4 on, queued before the reader got there and run once it has read
    // to block 7, decodes the frames of blocks 8, 9 (block 3's bytes) and 10, not the group
    // again; one that runs with the reader still at block 4 does.
    cache.prefetch(&reader, 4..12, &Arc::new(AtomicU64::new(7)), false);
    wait_for_frames(&cache, 3);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(cache.len(), 3, "only the frames of blocks the reader has not reached are decoded");
    cache.prefetch(&reader, 4..12, &Arc::new(AtomicU64::new(4)), false);
    wait_for_frames(&cache, 4);
    check_random_reads(&reader, &cache, &disk, 0, 7, 200);
}

/// Waits until the cache holds `n` frames (prefetch runs in the background).
fn wait_for_frames(cache: &FrameCache, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cache.len() < n {
        assert!(std::time::Instant::now() < deadline, "prefetch did not finish");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A version of `blocks` sample blocks whose every frame prefetch has put in a cache of
/// `cache_blocks` blocks.
fn prefetched(dir: &Path, blocks: usize, cache_blocks: u64) -> (Vec<u8>, Arc<VersionReader>, Arc<FrameCache>) {
    let disk = sample_disk(blocks);
    let reader = Arc::new(write_version(dir, &disk));
    let cache = Arc::new(FrameCache::new(cache_blocks * u64::from(BS), BS, true));
    cache.prefetch(&reader, 0..reader.block_count() + 10, &Default::default(), false);
    wait_for_frames(&cache, frames(&reader, 0..reader.block_count()));
    (disk, reader, cache)
}

#[test]
fn prefetched_frames_that_a_read_takes_whole_leave_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, reader, cache) = prefetched(dir.path(), 32, 64);
    let present = cache.len();
    // blocks 0..11 hold whole frames only (see above)
    let mut buf = vec![0u8; 11 * BS as usize];
    read_window(&reader, &cache, 0, disk.len() as u64, 0, &mut buf, true).unwrap();
    assert!(buf[..] == disk[..buf.len()]);
    assert_eq!(cache.len(), present - frames(&reader, 0..11), "the kernel keeps what a read took whole");
    check_random_reads(&reader, &cache, &disk, 0, 5, 200);
}

#[test]
fn prefetched_blocks_read_the_same_as_decoded_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, reader, cache) = prefetched(dir.path(), 64, 256);
    check_random_reads(&reader, &cache, &disk, 0, 3, 300);
}

#[test]
fn concurrent_readers_and_prefetch_see_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(sample_disk(300));
    let reader = Arc::new(write_version(dir.path(), &disk));
    // a cache smaller than the disk, so that blocks are evicted while others read them
    let cache = Arc::new(FrameCache::new(24 * u64::from(BS), BS, true));
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (reader, cache, disk) = (reader.clone(), cache.clone(), disk.clone());
            std::thread::spawn(move || {
                for round in 0..20 {
                    cache.prefetch(&reader, (t * 40 + round)..(t * 40 + round + 16), &Default::default(), false);
                    check_random_reads(&reader, &cache, &disk, 0, t * 100 + round, 20);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_damaged_frame_fails_only_the_reads_that_touch_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(16);
    let reader = write_version(dir.path(), &disk);
    // block 6 is the last of the group 4-6; blocks 7 (zero) on still read
    let (image, entry) = reader.entry(6).unwrap().expect("block 6 is stored");
    assert_eq!(entry.encoding, Encoding::ZstdGroup);
    let path = image.path().to_path_buf();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[entry.data_offset as usize + 5] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let reader = VersionReader::from_chain(vec![Arc::new(ImageFile::open(&path).unwrap())]).unwrap();
    let cache = FrameCache::new(64 * u64::from(BS), BS, true);
    let len = disk.len() as u64;
    let bs = u64::from(BS);
    for parallel in [false, true] {
        let mut buf = vec![0u8; 4 * BS as usize];
        assert!(read_window(&reader, &cache, 0, len, 4 * bs, &mut buf, parallel).is_err(), "whole block 6");
        assert!(read_window(&reader, &cache, 0, len, 6 * bs + 7, &mut buf[..10], parallel).is_err(), "part of 6");
        assert!(read_window(&reader, &cache, 0, len, 4 * bs, &mut buf[..10], parallel).is_err(), "same group");
        assert_eq!(
            read_window(&reader, &cache, 0, len, 3 * bs, &mut buf[..BS as usize], parallel).unwrap(),
            BS as usize
        );
        assert_eq!(read_window(&reader, &cache, 0, len, 7 * bs, &mut buf, parallel).unwrap(), buf.len());
        assert!(buf[..] == disk[7 * BS as usize..11 * BS as usize]);
    }
    let mut one = vec![0u8; BS as usize];
    assert!(
        reader.read_block(6, &FrameCache::new(0, BS, false), &mut one).is_err(),
        "the format agrees the block is damaged"
    );
}

#[test]
fn only_reads_within_zero_blocks_count_as_all_zero() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(30);
    let reader = write_version(dir.path(), &disk);
    let bs = u64::from(BS);
    // blocks 0, 7, 11 and 18 are zero; their neighbours are stored
    assert!(all_zero(&reader, 0, BS as usize));
    assert!(all_zero(&reader, 7 * bs + 100, 200));
    assert!(!all_zero(&reader, 0, BS as usize + 1), "one byte into block 1");
    assert!(!all_zero(&reader, 7 * bs - 1, 2), "last byte of block 6");
    assert!(!all_zero(&reader, 10 * bs, 2 * BS as usize));
}

/// How a delta stores its patches.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Patches {
    /// A frame each (encoding 4).
    Alone,
    /// All in one patch group (encoding 5).
    Grouped,
}

/// A delta on top of `parent` (whose disk was `old`) in which the blocks `patched` are patches
/// of `new` naming the parts where they differ, and the blocks `zeroed` are zero entries.
fn write_patch_delta(
    dir: &Path,
    parent: &ImageFile,
    new: &[u8],
    old: &[u8],
    patched: &[u64],
    zeroed: &[u64],
    how: Patches,
) -> std::path::PathBuf {
    write_forged_patch_delta(dir, parent, new, old, patched, zeroed, &[], how)
}

/// As `write_patch_delta`, with the patches of the blocks `forged` recording `forged_hash`.
#[allow(clippy::too_many_arguments)]
fn write_forged_patch_delta(
    dir: &Path,
    parent: &ImageFile,
    new: &[u8],
    old: &[u8],
    patched: &[u64],
    zeroed: &[u64],
    forged: &[u64],
    how: Patches,
) -> std::path::PathBuf {
    let (bs, part) = (BS as usize, BS as usize / 16);
    let version = parent.header.version + 1;
    let image_id = new_id();
    let header = ImageHeader {
        image_id,
        version,
        kind: Kind::Incremental,
        parent: Some(ImageRef { version: parent.header.version, image_id: parent.header.image_id }),
        ..parent.header.clone()
    };
    let final_path = dir.join(crate::repo::image_file_name(version));
    let mut w = ImageWriter::create(&final_path, header).unwrap();
    let mut digest = SourceDigest::new(new.len() as u64, BS);
    let mut present = 0;
    let (mut entries, mut group, mut in_group) = (Vec::new(), PatchGroupBuilder::default(), Vec::new());
    for (b, chunk) in new.chunks(bs).enumerate() {
        let mut block = chunk.to_vec();
        block.resize(bs, 0);
        let hash = hash_block(&block);
        digest.push(&hash);
        present += u64::from(!is_zero(&block));
        let b = b as u64;
        if zeroed.contains(&b) {
            entries.push(ImageWriter::zero_entry(b, hash));
        } else if patched.contains(&b) {
            let mut old_block = old[b as usize * bs..].to_vec();
            old_block.resize(bs, 0);
            let mask = (0..16).filter(|i| old_block[i * part..(i + 1) * part] != block[i * part..(i + 1) * part]);
            let mask = mask.fold(0u16, |m, i| m | 1 << i);
            let parts: Vec<u8> = (0..16)
                .filter(|i| mask & (1 << i) != 0)
                .flat_map(|i| block[i * part..(i + 1) * part].to_vec())
                .collect();
            let hash = if forged.contains(&b) { forged_hash() } else { hash };
            match how {
                Patches::Alone => {
                    entries.push(w.write_patch(b, mask, &zstd::bulk::compress(&parts, 3).unwrap(), hash).unwrap())
                }
                Patches::Grouped => {
                    group.push(&parts);
                    in_group.push((b, mask, hash));
                }
            }
        }
    }
    if !in_group.is_empty() {
        let frame = zstd::bulk::compress(&group.finish(), 3).unwrap();
        entries.extend(w.write_patch_group(&in_group, &frame).unwrap());
        entries.sort_by_key(|e| e.block);
    }
    for entry in entries {
        w.push(entry).unwrap();
    }
    w.finish(Finish { present_blocks: present, source_digest: digest.finish() }).unwrap()
}

#[test]
fn patched_blocks_read_as_their_base_with_the_parts_laid_over() {
    let dir = tempfile::tempdir().unwrap();
    let (bs, part) = (BS as usize, BS as usize / 16);
    let v1 = sample_disk(60);
    let r1 = write_version(dir.path(), &v1);
    let i1 = r1.layers()[0].clone();
    // v2: parts of blocks in groups (1, 2, 5), a single (3), a reference (9), the tail block;
    // block 12 (in a group) zeroed
    let mut v2 = v1.clone();
    let patched2 = [1u64, 2, 3, 5, 9, 60];
    for &b in &patched2 {
        let at = b as usize * bs + (b as usize % 3) * part; // the tail block is 1000 bytes
        let end = (at + part).min(v2.len());
        v2[at..end].iter_mut().for_each(|x| *x = !*x);
    }
    v2[12 * bs..13 * bs].fill(0);
    let delta = write_patch_delta(dir.path(), &i1, &v2, &v1, &patched2, &[12], Patches::Grouped);
    let i2 = Arc::new(ImageFile::open(&delta).unwrap());
    // v3: a patch over a patch (block 2, another part too) and over the zero block 12
    let mut v3 = v2.clone();
    v3[2 * bs + 15 * part..3 * bs].fill(0x5a);
    v3[12 * bs + 4 * part..12 * bs + 5 * part].fill(0x33);
    let mut base3 = v1.clone();
    base3[12 * bs..13 * bs].fill(0); // block 12's base is v2's zero entry
    let delta = write_patch_delta(dir.path(), &i2, &v3, &base3, &[2, 12], &[], Patches::Alone);
    let i3 = Arc::new(ImageFile::open(&delta).unwrap());
    let reader = Arc::new(VersionReader::from_chain(vec![i1, i2, i3]).unwrap());
    assert!(reader.patch_base(12).unwrap().is_none());
    let cache = Arc::new(FrameCache::new(64 * u64::from(BS), BS, true));
    check_random_reads(&reader, &cache, &v3, 0, 7, 600);
    check_random_reads(&reader, &cache, &v3, 3 * u64::from(BS) + 512, 8, 300);
    let mut whole = vec![0u8; v3.len()];
    assert_eq!(read_window(&reader, &cache, 0, v3.len() as u64, 0, &mut whole, true).unwrap(), v3.len());
    assert!(whole == v3);
    let fresh = Arc::new(FrameCache::new(64 * u64::from(BS), BS, true));
    fresh.prefetch(&reader, 0..reader.block_count(), &Default::default(), false);
    check_random_reads(&reader, &fresh, &v3, 0, 9, 300);
}

/// The `FormatError` of a failed read, as text.
fn read_error(reader: &VersionReader, cache: &FrameCache, offset: u64, len: usize, parallel: bool) -> String {
    let mut buf = vec![0u8; len];
    let size = reader.source_size();
    match read_window(reader, cache, 0, size, offset, &mut buf, parallel) {
        Ok(_) => panic!("the read at {offset}+{len} succeeded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_block_of_a_group_that_does_not_match_its_hash_fails_its_reads_only() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk(24);
    // block 5 is the middle one of the group 4-6
    let reader = Arc::new(write_forged_version(dir.path(), &disk, &[5]));
    let (image, entry) = reader.entry(5).unwrap().expect("block 5 is stored");
    assert_eq!((entry.encoding, entry.group_slot), (Encoding::ZstdGroup, 1));
    let (bs, len) = (u64::from(BS), disk.len() as u64);
    let named = format!("{} (version 1) block 5 at offset {}", image.path().display(), entry.data_offset);
    let fresh = || Arc::new(FrameCache::new(64 * bs, BS, true));
    let prefetched = fresh();
    prefetched.prefetch(&reader, 0..reader.block_count(), &Default::default(), false);
    wait_for_frames(&prefetched, frames(&reader, 0..reader.block_count()));
    for (cache, parallel) in [(fresh(), false), (fresh(), true), (prefetched, true)] {
        for (offset, n) in [(4 * bs, 3 * BS as usize), (5 * bs + 100, 10), (0, 12 * BS as usize)] {
            let e = read_error(&reader, &cache, offset, n, parallel);
            assert!(e.contains(&named) && e.contains("content hash mismatch"), "{e}");
        }
        // the other blocks of the group, alone or together, and everything around them
        let mut buf = vec![0u8; BS as usize];
        for block in [4, 6] {
            read_window(&reader, &cache, 0, len, block * bs, &mut buf, parallel).unwrap();
            assert!(buf[..] == disk[(block * bs) as usize..][..BS as usize], "block {block}");
        }
        let mut rest = vec![0u8; (len - 7 * bs) as usize];
        read_window(&reader, &cache, 0, len, 7 * bs, &mut rest, parallel).unwrap();
        assert!(rest[..] == disk[7 * BS as usize..]);
    }
    // without hash checks the block's bytes (sound by their crc32c) are served
    let unchecked = FrameCache::new(64 * bs, BS, false);
    let mut whole = vec![0u8; disk.len()];
    read_window(&reader, &unchecked, 0, len, 0, &mut whole, true).unwrap();
    assert!(whole == disk);
}

#[test]
fn a_patched_block_that_does_not_match_its_hash_fails_its_reads_only() {
    for how in [Patches::Alone, Patches::Grouped] {
        a_patched_block_that_does_not_match_its_hash_fails_its_reads_only_when(how);
    }
}

fn a_patched_block_that_does_not_match_its_hash_fails_its_reads_only_when(how: Patches) {
    let dir = tempfile::tempdir().unwrap();
    let (bs, part) = (BS as usize, BS as usize / 16);
    let v1 = sample_disk(30);
    let r1 = write_version(dir.path(), &v1);
    let i1 = r1.layers()[0].clone();
    // patches over a block of the group 4-6 (5: forged, 6: sound) and over a zero block (7)
    let mut v2 = v1.clone();
    for b in [5usize, 6, 7] {
        v2[b * bs + part..b * bs + 2 * part].fill(0x77);
    }
    let delta = write_forged_patch_delta(dir.path(), &i1, &v2, &v1, &[5, 6, 7], &[], &[5], how);
    let i2 = Arc::new(ImageFile::open(&delta).unwrap());
    let reader = VersionReader::from_chain(vec![i1, i2]).unwrap();
    assert!(reader.patch_base(7).unwrap().is_none());
    let len = v2.len() as u64;
    let (image, entry) = reader.entry(5).unwrap().expect("block 5 is stored");
    let encoding = if how == Patches::Alone { Encoding::Patch } else { Encoding::PatchGroup };
    assert_eq!(entry.encoding, encoding, "{how:?}");
    let named = format!("{} (version 2) block 5 at offset {}", image.path().display(), entry.data_offset);
    for parallel in [false, true] {
        let cache = FrameCache::new(64 * u64::from(BS), BS, true);
        // the whole block joins its base's group; part of it is patched on its own
        for (offset, n) in [(4 * bs as u64, 3 * bs), (5 * bs as u64 + part as u64, 10)] {
            let e = read_error(&reader, &cache, offset, n, parallel);
            assert!(e.contains(&named) && e.contains("content hash mismatch"), "{e}");
        }
        let mut buf = vec![0u8; bs];
        for block in [4, 6, 7] {
            read_window(&reader, &cache, 0, len, block * bs as u64, &mut buf, parallel).unwrap();
            assert!(buf[..] == v2[block as usize * bs..][..bs], "block {block}");
        }
        let mut rest = vec![0u8; v2.len() - 6 * bs];
        read_window(&reader, &cache, 0, len, 6 * bs as u64, &mut rest, parallel).unwrap();
        assert!(rest[..] == v2[6 * bs..]);
    }
    let unchecked = FrameCache::new(64 * u64::from(BS), BS, false);
    let mut whole = vec![0u8; v2.len()];
    read_window(&reader, &unchecked, 0, len, 0, &mut whole, true).unwrap();
    assert!(whole == v2);
}

#[test]
fn a_patch_group_leaves_the_cache_once_the_patches_its_version_reads_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let (bs, part) = (BS as usize, BS as usize / 16);
    let v1 = sample_disk(60);
    let r1 = write_version(dir.path(), &v1);
    let i1 = r1.layers()[0].clone();
    let flip = |disk: &mut Vec<u8>, b: usize, p: usize| {
        disk[b * bs + p * part..b * bs + (p + 1) * part].iter_mut().for_each(|x| *x = !*x)
    };
    // v2: one part of blocks 1, 3, 5 and 9, in one patch group; v3: block 3 patched again, so
    // that v3 reads three of the group's four patches
    let mut v2 = v1.clone();
    [1, 3, 5, 9].into_iter().for_each(|b| flip(&mut v2, b, 2));
    let delta = write_patch_delta(dir.path(), &i1, &v2, &v1, &[1, 3, 5, 9], &[], Patches::Grouped);
    let i2 = Arc::new(ImageFile::open(&delta).unwrap());
    let mut v3 = v2.clone();
    flip(&mut v3, 3, 7);
    let delta = write_patch_delta(dir.path(), &i2, &v3, &v1, &[3], &[], Patches::Alone);
    let i3 = Arc::new(ImageFile::open(&delta).unwrap());
    let r2 = VersionReader::from_chain(vec![i1.clone(), i2.clone()]).unwrap();
    let r3 = VersionReader::from_chain(vec![i1, i2, i3]).unwrap();

    let cache = FrameCache::new(64 * u64::from(BS), BS, true);
    let (image, entry) = r2.entry(1).unwrap().unwrap();
    assert_eq!(entry.encoding, Encoding::PatchGroup);
    let frame = cache.frame(image, &entry).unwrap();
    assert_eq!(r2.patch_group_share(&entry, &frame), Some(frame.len()), "v2 reads all four patches");
    let in_v3 = |b: u64| r3.entry(b).unwrap().unwrap().1;
    assert_eq!(r3.patch_group_share(&in_v3(5), &frame), Some(3 * (4 + part)), "v3 reads three");
    assert_eq!(r3.patch_group_share(&in_v3(3), &frame), None, "block 3 is not in the group in v3");
    drop(frame);

    for (reader, disk) in [(&r3, &v3), (&r2, &v2)] {
        let cache = FrameCache::new(64 * u64::from(BS), BS, true);
        let mut whole = vec![0u8; disk.len()];
        for at in (0..disk.len()).step_by(bs) {
            let end = (at + bs).min(disk.len());
            read_window(reader, &cache, 0, disk.len() as u64, at as u64, &mut whole[at..end], false).unwrap();
        }
        assert!(whole == *disk);
        let (image, entry) = r2.entry(1).unwrap().unwrap();
        assert!(!cache.holds(image, &entry), "read through, the patch group left the cache (version {})", reader.id());
    }
}

#[test]
fn an_entry_naming_a_cached_frame_with_another_shape_is_decoded_on_its_own_and_fails() {
    // A hostile index: block 2 names the stored bytes of the group of blocks 0 and 1, as a
    // group of 4 whose slot 3 it is. The frame decoded for blocks 0 and 1 must never serve it.
    let dir = tempfile::tempdir().unwrap();
    let bs = BS as usize;
    let header = write_version(dir.path(), &sample_disk(3)).layers()[0].header.clone();
    let other = tempfile::tempdir().unwrap();
    let mut w = ImageWriter::create(&other.path().join(crate::repo::image_file_name(1)), header).unwrap();
    let blocks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; bs]).collect();
    let frame = zstd::bulk::compress(&blocks[..2].concat(), 3).unwrap();
    let mut entries = Vec::new();
    w.append_group(&[(0, hash_block(&blocks[0])), (1, hash_block(&blocks[1]))], &frame, &mut entries).unwrap();
    w.push(IndexEntry { block: 2, group_len: 4, group_slot: 3, hash: hash_block(&blocks[2]), ..entries[0] }).unwrap();
    let mut digest = SourceDigest::new(3 * bs as u64, BS);
    blocks.iter().for_each(|b| digest.push(&hash_block(b)));
    let path = w.finish(Finish { present_blocks: 3, source_digest: digest.finish() }).unwrap();
    let reader = VersionReader::from_chain(vec![Arc::new(ImageFile::open(&path).unwrap())]).unwrap();
    for parallel in [false, true] {
        let cache = FrameCache::new(0, BS, true);
        let mut part = vec![0u8; 100];
        read_window(&reader, &cache, 0, reader.source_size(), 10, &mut part, parallel).unwrap();
        assert_eq!(part, vec![1u8; 100], "block 0 reads, and its group is cached");
        let e = read_window(&reader, &cache, 0, reader.source_size(), 2 * bs as u64 + 10, &mut part, parallel);
        assert!(e.is_err(), "block 2's frame does not decode to 4 blocks");
    }
}
