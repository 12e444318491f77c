//! Unit tests of the format: every structure round-trips, every field is checked, corrupt,
//! truncated, foreign and future input is refused with the named error, a version resolves
//! through its chain, and the constants match SPEC.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::block::hash_block;
use crate::digest::{zero_block_hash, SourceDigest};
use crate::error::{FormatError, Loc};
use crate::footer::ImageFooter;
use crate::frame_cache::FrameCache;
use crate::header::{ImageHeader, ImageRef, Kind};
use crate::image::{Finish, ImageFile, ImageWriter};
use crate::index::{Encoding, EntryLimits, IndexEntry};
use crate::layout::{self, FOOTER_SIZE, HEADER_SIZE, INDEX_ENTRY_SIZE};
use crate::repo::Repository;
use crate::version::VersionReader;
use crate::ReadScratch;

const BS: u32 = 4096;

fn header(version: u64, kind: Kind, parent: Option<ImageRef>, full: Option<ImageRef>, size: u64) -> ImageHeader {
    let image_id = crate::header::new_id();
    ImageHeader {
        repo_id: [7; 16],
        image_id,
        version,
        kind,
        rule: crate::header::Rule::Scheme,
        parent,
        full: full.unwrap_or(ImageRef { version, image_id }),
        block_size: BS,
        compression_level: 3,
        source_size: size,
        created_secs: 1_700_000_000,
        created_nanos: 123,
        label: "läbel".into(),
        source: "/dev/sdz1".into(),
        source_id: Some(crate::SourceId::PATH_ONLY),
        selection: Default::default(),
    }
}

#[test]
fn header_round_trips_every_field() {
    let h = header(
        9,
        Kind::Incremental,
        Some(ImageRef { version: 8, image_id: [1; 16] }),
        Some(ImageRef { version: 2, image_id: [2; 16] }),
        12_345_678,
    );
    let bytes = h.encode();
    assert_eq!(bytes.len(), HEADER_SIZE);
    assert_eq!(ImageHeader::decode(&bytes, &Loc::file(Path::new("x"))).unwrap(), h);
}

#[test]
fn every_flipped_header_byte_is_detected() {
    let h = header(1, Kind::Full, None, None, 1 << 20);
    let good = h.encode();
    for i in 0..HEADER_SIZE {
        let mut bad = good;
        bad[i] ^= 0x40;
        assert!(ImageHeader::decode(&bad, &Loc::file(Path::new("x"))).is_err(), "flip at {i} accepted");
    }
}

#[test]
fn future_format_version_is_refused_by_name() {
    let mut b = header(1, Kind::Full, None, None, 1 << 20).encode();
    b[layout::header::FORMAT_VERSION] = 5;
    let err = ImageHeader::decode(&b, &Loc::file(Path::new("x"))).unwrap_err();
    assert!(matches!(err, FormatError::UnsupportedFormat { found: 5, .. }), "{err}");
    assert!(err.to_string().contains("format version 5"), "{err}");
}

#[test]
fn foreign_file_is_not_an_image() {
    let b = [0x55u8; HEADER_SIZE];
    let err = ImageHeader::decode(&b, &Loc::file(Path::new("x"))).unwrap_err();
    assert!(matches!(err, FormatError::NotAnImage { .. }), "{err}");
}

#[test]
fn differential_whose_parent_is_not_its_full_is_rejected() {
    let full = ImageRef { version: 1, image_id: [1; 16] };
    let h = header(3, Kind::Differential, Some(ImageRef { version: 2, image_id: [2; 16] }), Some(full), 1 << 20);
    assert!(ImageHeader::decode(&h.encode(), &Loc::file(Path::new("x"))).is_err());
}

#[test]
fn footer_and_entry_round_trip_and_self_check() {
    let f = ImageFooter {
        image_id: [3; 16],
        index_offset: 4096,
        entry_count: 2,
        index_crc: 0xdead_beef,
        stored_bytes: 777,
        present_blocks: 5,
        source_digest: [9; 32],
    };
    let loc = Loc::file(Path::new("x"));
    assert_eq!(ImageFooter::decode(&f.encode(), &loc, 0).unwrap(), f);
    let mut bad = f.encode();
    bad[layout::footer::ENTRY_COUNT] ^= 1;
    assert!(matches!(ImageFooter::decode(&bad, &loc, 0), Err(FormatError::Checksum { .. })));

    let e = IndexEntry {
        block: 3,
        data_offset: 600,
        stored_len: 100,
        encoding: Encoding::Zstd,
        data_crc: 5,
        hash: [4; 32],
        group_len: 0,
        group_slot: 0,
        patch_mask: 0,
    };
    let limits = EntryLimits {
        block_count: 10,
        block_size: BS,
        data_start: 512,
        data_end: 4096,
        max_stored: BS,
        zero_entries: true,
        groups: true,
        group_max_bytes: u64::from(layout::GROUP_MAX_BYTES),
        patches: true,
        patch_groups: true,
    };
    assert_eq!(IndexEntry::decode(&e.encode(), &loc, 0, &limits).unwrap(), e);
    for i in 0..INDEX_ENTRY_SIZE {
        let mut bad = e.encode();
        bad[i] ^= 0x10;
        assert!(IndexEntry::decode(&bad, &loc, 0, &limits).is_err(), "flip at {i} accepted");
    }
    // A well-formed entry pointing outside the data region is refused (validate before seeking).
    let outside = IndexEntry { data_offset: 4090, ..e };
    assert!(matches!(IndexEntry::decode(&outside.encode(), &loc, 0, &limits), Err(FormatError::Corrupt { .. })));
    let beyond = IndexEntry { block: 10, ..e };
    assert!(IndexEntry::decode(&beyond.encode(), &loc, 0, &limits).is_err());

    // Groups: slot inside the group, 2..=255 blocks, at most 1 MiB decoded, format 2 only.
    let g = IndexEntry { encoding: Encoding::ZstdGroup, group_len: 4, group_slot: 3, ..e };
    assert_eq!(IndexEntry::decode(&g.encode(), &loc, 0, &limits).unwrap(), g);
    for bad in [
        IndexEntry { group_slot: 4, ..g },
        IndexEntry { group_len: 1, group_slot: 0, ..g },
        IndexEntry { group_len: 0, group_slot: 3, ..e },
    ] {
        assert!(IndexEntry::decode(&bad.encode(), &loc, 0, &limits).is_err(), "{bad:?} accepted");
    }
    // 3 blocks of 2 MiB decode to more than a group may (4 MiB; 1 MiB before format 4).
    let big_blocks = EntryLimits { block_size: 2 << 20, max_stored: 2 << 20, data_end: 1 << 30, ..limits };
    let three = IndexEntry { group_len: 3, group_slot: 0, ..g };
    assert!(IndexEntry::decode(&three.encode(), &loc, 0, &big_blocks).is_err());
    let two = IndexEntry { group_len: 2, group_slot: 0, ..g };
    assert!(IndexEntry::decode(&two.encode(), &loc, 0, &big_blocks).is_ok());
    let format3 = EntryLimits { group_max_bytes: u64::from(layout::GROUP_MAX_BYTES_FORMAT_2), ..big_blocks };
    assert!(IndexEntry::decode(&two.encode(), &loc, 0, &format3).is_err(), "4 MiB groups are format 4's");
    let format1 = EntryLimits { groups: false, ..limits };
    assert!(IndexEntry::decode(&g.encode(), &loc, 0, &format1).is_err());

    // Patches: a non-empty part mask over the group bytes, in deltas of format 3 only.
    let p = IndexEntry { encoding: Encoding::Patch, patch_mask: 0x8001, ..e };
    let raw = p.encode();
    assert_eq!(&raw[layout::entry::PATCH_MASK..layout::entry::PATCH_MASK + 2], &[0x01, 0x80]);
    assert_eq!(IndexEntry::decode(&raw, &loc, 0, &limits).unwrap(), p);
    assert!(IndexEntry::decode(&IndexEntry { patch_mask: 0, ..p }.encode(), &loc, 0, &limits).is_err());
    let format2 = EntryLimits { patches: false, ..limits };
    assert!(IndexEntry::decode(&raw, &loc, 0, &format2).is_err(), "a patch in a format 2 image");
    let full = EntryLimits { zero_entries: false, ..limits };
    assert!(IndexEntry::decode(&raw, &loc, 0, &full).is_err(), "a patch in a full");

    // Patch groups: the mask, and the slot in byte 23; stored up to a group's size (more than
    // a block), in deltas of format 4 only. Entries of one group name one frame.
    let pg = IndexEntry { encoding: Encoding::PatchGroup, patch_mask: 0x0102, group_slot: 7, stored_len: 3000, ..e };
    let raw = pg.encode();
    let (mask_at, slot_at) = (layout::entry::PATCH_MASK, layout::entry::PATCH_SLOT);
    assert_eq!((raw[mask_at], raw[mask_at + 1], raw[slot_at]), (0x02, 0x01, 7));
    let small_blocks = EntryLimits { block_size: 1024, max_stored: 1024, block_count: 40, ..limits };
    assert_eq!(IndexEntry::decode(&raw, &loc, 0, &small_blocks).unwrap(), pg);
    assert!(IndexEntry::decode(&IndexEntry { patch_mask: 0, ..pg }.encode(), &loc, 0, &limits).is_err());
    let format3 = EntryLimits { patch_groups: false, ..limits };
    assert!(IndexEntry::decode(&raw, &loc, 0, &format3).is_err(), "a patch group in a format 3 image");
    assert!(IndexEntry::decode(&raw, &loc, 0, &full).is_err(), "a patch group in a full");
    let other = IndexEntry { block: 4, patch_mask: 0x8000, group_slot: 8, ..pg };
    assert!(pg.same_frame(&other) && !p.same_frame(&IndexEntry { patch_mask: 1, ..p }));
}

/// Writes the patches of `blocks` of `disk` (block and mask, ascending) as one patch group;
/// returns their entries, for `push`.
fn write_patch_group(w: &mut ImageWriter, disk: &[u8], blocks: &[(usize, u16)]) -> Vec<IndexEntry> {
    let (bs, part) = (BS as usize, BS as usize / 16);
    let mut group = crate::patch_group::PatchGroupBuilder::default();
    let mut patches = Vec::new();
    for &(block, mask) in blocks {
        let content = &disk[block * bs..(block + 1) * bs];
        let parts: Vec<u8> =
            (0..16).filter(|i| mask & (1 << i) != 0).flat_map(|i| content[i * part..(i + 1) * part].to_vec()).collect();
        group.push(&parts);
        patches.push((block as u64, mask, hash_block(content)));
    }
    let frame = zstd::bulk::compress(&group.finish(), 3).unwrap();
    w.write_patch_group(&patches, &frame).unwrap()
}

/// A patch of `block` of `disk` naming the parts in `mask` (parts of BS / 16 bytes).
fn append_patch(w: &mut ImageWriter, disk: &[u8], block: usize, mask: u16) -> IndexEntry {
    let entry = write_patch(w, disk, block, mask);
    w.push(entry).unwrap()
}

/// Writes the patch `append_patch` appends; returns its entry, for `push`.
fn write_patch(w: &mut ImageWriter, disk: &[u8], block: usize, mask: u16) -> IndexEntry {
    let (bs, part) = (BS as usize, BS as usize / 16);
    let content = &disk[block * bs..(block + 1) * bs];
    let parts: Vec<u8> =
        (0..16).filter(|i| mask & (1 << i) != 0).flat_map(|i| content[i * part..(i + 1) * part].to_vec()).collect();
    let frame = zstd::bulk::compress(&parts, 3).unwrap();
    w.write_patch(block as u64, mask, &frame, hash_block(content)).unwrap()
}

fn finish_like(w: ImageWriter, disk: &[u8]) -> PathBuf {
    let mut digest = SourceDigest::new(disk.len() as u64, BS);
    let blocks: Vec<&[u8]> = disk.chunks(BS as usize).collect();
    blocks.iter().for_each(|b| digest.push(&hash_block(b)));
    let present = blocks.iter().filter(|b| !crate::block::is_zero(b)).count() as u64;
    w.finish(Finish { present_blocks: present, source_digest: digest.finish() }).unwrap()
}

#[test]
fn a_patch_lays_its_parts_over_the_newest_entry_below_that_is_not_a_patch() {
    let dir = tempfile::tempdir().unwrap();
    let (bs, part) = (BS as usize, BS as usize / 16);
    let size = 4 * bs;
    let v1 = sample_disk(size, 3);
    let h1 = header(1, Kind::Full, None, None, size as u64);
    let r1 = ImageRef { version: 1, image_id: h1.image_id };
    let p1 = write_image(dir.path(), h1, &v1, None);
    // v2: parts 0 and 3 of block 0 rewritten; block 3 zeroed
    let mut v2 = v1.clone();
    v2[0..part].fill(0xa1);
    v2[3 * part..4 * part].fill(0xa2);
    v2[3 * bs..].fill(0);
    let h2 = header(2, Kind::Incremental, Some(r1), Some(r1), size as u64);
    let r2 = ImageRef { version: 2, image_id: h2.image_id };
    let mut w = ImageWriter::create(&dir.path().join("v00000002.strata"), h2).unwrap();
    append_patch(&mut w, &v2, 0, 0b1001);
    w.append_zero(3, zero_block_hash(BS)).unwrap();
    let p2 = finish_like(w, &v2);
    // v3: part 5 of block 0 too (the mask includes v2's), and part 1 of the zeroed block 3
    let mut v3 = v2.clone();
    v3[5 * part..6 * part].fill(0xa3);
    v3[3 * bs + part..3 * bs + 2 * part].fill(0xa4);
    let h3 = header(3, Kind::Incremental, Some(r2), Some(r1), size as u64);
    let mut w = ImageWriter::create(&dir.path().join("v00000003.strata"), h3).unwrap();
    for entry in write_patch_group(&mut w, &v3, &[(0, 0b10_1001), (3, 0b10)]) {
        w.push(entry).unwrap();
    }
    let p3 = finish_like(w, &v3);
    let open = |p: &Path| Arc::new(ImageFile::open(p).unwrap());
    let (i1, i2, i3) = (open(&p1), open(&p2), open(&p3));
    for (chain, want) in [(vec![i1.clone(), i2.clone()], &v2), (vec![i1.clone(), i2.clone(), i3.clone()], &v3)] {
        let r = VersionReader::from_chain(chain).unwrap();
        assert_eq!(&read_all(&r), want);
        assert_eq!(r.digest_from_index().unwrap(), r.top().footer.source_digest);
    }
    let r = VersionReader::from_chain(vec![i1.clone(), i2, i3.clone()]).unwrap();
    let (base_image, base) = r.patch_base(0).unwrap().expect("block 0's base is the full's");
    assert_eq!((base_image.header.version, base.encoding == Encoding::Patch), (1, false));
    assert!(r.patch_base(3).unwrap().is_none(), "block 3's base is the zero entry of v2");
    assert!(r.patch_base(1).is_err(), "block 1 is no patch");
    // A patch read alone, without its version, is refused rather than returned half made.
    let (image, entry) = r.entry(0).unwrap().unwrap();
    assert!(image.read_block(&entry, &mut ReadScratch::new(), &mut vec![0u8; bs]).is_err());
}

/// Writes an image of `disk` as a delta against `parent` (or a full), like the writer does.
fn write_image(dir: &Path, h: ImageHeader, disk: &[u8], parent: Option<&[u8]>) -> PathBuf {
    let final_path = dir.join(crate::repo::image_file_name(h.version));
    let mut w = ImageWriter::create(&final_path, h).unwrap();
    let bs = BS as usize;
    let blocks = disk.len().div_ceil(bs);
    let mut digest = SourceDigest::new(disk.len() as u64, BS);
    let mut present = 0;
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    let mut out = Vec::new();
    for b in 0..blocks {
        let mut block = vec![0u8; bs];
        let end = ((b + 1) * bs).min(disk.len());
        block[..end - b * bs].copy_from_slice(&disk[b * bs..end]);
        let hash = hash_block(&block);
        digest.push(&hash);
        let zero = crate::block::is_zero(&block);
        present += u64::from(!zero);
        let parent_block = parent.map(|p| {
            let mut pb = vec![0u8; bs];
            pb[..end - b * bs].copy_from_slice(&p[b * bs..end]);
            pb
        });
        match (&parent_block, zero) {
            (Some(pb), _) if *pb == block => {}
            (None, true) => {}
            (Some(_), true) => {
                w.append_zero(b as u64, zero_block_hash(BS)).unwrap();
            }
            (_, false) => {
                match crate::block::compress_into(&mut compressor, &block, &mut out) {
                    Encoding::Zstd => w.append_block(b as u64, Encoding::Zstd, &out, hash).unwrap(),
                    _ => w.append_block(b as u64, Encoding::Raw, &block, hash).unwrap(),
                };
            }
        }
    }
    w.finish(Finish { present_blocks: present, source_digest: digest.finish() }).unwrap()
}

/// A full of 8 blocks: a group of blocks 0..4, block 4 a reference to slot 2 of that group,
/// block 5 alone, block 6 a reference to block 5, block 7 zero. Returns the file and the disk.
fn grouped_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let bs = BS as usize;
    let mut disk = sample_disk(8 * bs, 9);
    disk.copy_within(2 * bs..3 * bs, 4 * bs);
    disk.copy_within(5 * bs..6 * bs, 6 * bs);
    disk[7 * bs..].fill(0);
    let h = header(1, Kind::Full, None, None, disk.len() as u64);
    let mut w = ImageWriter::create(&dir.join(crate::repo::image_file_name(1)), h).unwrap();
    let hash = |b: usize| hash_block(&disk[b * bs..(b + 1) * bs]);
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let frame = c.compress(&disk[..4 * bs]).unwrap();
    let mut group = Vec::new();
    w.append_group(&[(0, hash(0)), (1, hash(1)), (2, hash(2)), (3, hash(3))], &frame, &mut group).unwrap();
    w.append_ref(4, hash(4), &group[2]).unwrap();
    let lone = w.append_block(5, Encoding::Zstd, &c.compress(&disk[5 * bs..6 * bs]).unwrap(), hash(5)).unwrap();
    w.append_ref(6, hash(6), &lone).unwrap();
    let mut digest = SourceDigest::new(disk.len() as u64, BS);
    (0..8).for_each(|b| digest.push(&hash(b)));
    let path = w.finish(Finish { present_blocks: 7, source_digest: digest.finish() }).unwrap();
    (path, disk)
}

#[test]
fn grouped_and_shared_blocks_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, disk) = grouped_image(dir.path());
    let image = Arc::new(ImageFile::open(&path).unwrap());
    image.check_index().unwrap();
    let data_region = image.footer.index_offset - HEADER_SIZE as u64;
    assert_eq!(image.footer.stored_bytes, data_region, "every frame counted once");
    let r = VersionReader::from_chain(vec![image.clone()]).unwrap();
    assert_eq!(read_all(&r), disk);
    // out of order and across groups, with one scratch: the kept group must never leak
    let s = FrameCache::new(0, BS, false);
    let mut out = vec![0u8; BS as usize];
    for b in [3u64, 5, 0, 4, 6, 1, 2, 7, 3] {
        r.read_block(b, &s, &mut out).unwrap();
        assert_eq!(out, disk[b as usize * BS as usize..(b as usize + 1) * BS as usize], "block {b}");
    }
    assert_eq!(r.digest_from_index().unwrap(), image.footer.source_digest);
}

#[test]
fn damaged_group_fails_exactly_the_blocks_stored_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = grouped_image(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_SIZE + 5] ^= 0x20; // inside the group's frame, which is stored first
    std::fs::write(&path, &bytes).unwrap();
    let r = VersionReader::from_chain(vec![Arc::new(ImageFile::open(&path).unwrap())]).unwrap();
    let mut out = vec![0u8; BS as usize];
    for b in 0..8u64 {
        let result = r.read_block(b, &FrameCache::new(0, BS, false), &mut out);
        if b <= 4 {
            let err = result.unwrap_err();
            assert!(matches!(err, FormatError::Checksum { .. }), "block {b}: {err}");
            assert!(err.to_string().contains(&format!("block {b}")), "block {b} not named: {err}");
        } else {
            result.unwrap();
        }
    }
}

#[test]
fn broken_group_entries_are_rejected_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = grouped_image(dir.path());
    let image = ImageFile::open(&path).unwrap();
    let at = image.footer.index_offset as usize + layout::entry::GROUP_SLOT; // entry 0
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at] = 4; // slot 4 of a group of 4
    let crc = crc32c::crc32c(&bytes[at - layout::entry::GROUP_SLOT..at - layout::entry::GROUP_SLOT + 60]);
    bytes[at - layout::entry::GROUP_SLOT + 60..at - layout::entry::GROUP_SLOT + 64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = ImageFile::open(&path).unwrap().check_index().unwrap_err();
    assert!(matches!(err, FormatError::Corrupt { .. }), "{err}");
}

fn sample_disk(len: usize, seed: u8) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for (i, x) in d.iter_mut().enumerate() {
        if (i / BS as usize) % 3 != 1 {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8);
        }
    }
    d
}

fn read_all(r: &VersionReader) -> Vec<u8> {
    let mut buf = vec![0u8; r.source_size() as usize];
    let s = FrameCache::new(0, BS, false);
    assert_eq!(r.read_at(0, &mut buf, &s).unwrap(), buf.len());
    buf
}

/// A full of `v1`, an incremental of `v2` over it and one of `v3` over that, opened.
fn three_version_chain(dir: &Path, v1: &[u8], v2: &[u8], v3: &[u8]) -> [Arc<ImageFile>; 3] {
    let size = v1.len() as u64;
    let h1 = header(1, Kind::Full, None, None, size);
    let r1 = ImageRef { version: 1, image_id: h1.image_id };
    let p1 = write_image(dir, h1, v1, None);
    let h2 = header(2, Kind::Incremental, Some(r1), Some(r1), size);
    let r2 = ImageRef { version: 2, image_id: h2.image_id };
    let p2 = write_image(dir, h2, v2, Some(v1));
    let p3 = write_image(dir, header(3, Kind::Incremental, Some(r2), Some(r1), size), v3, Some(v2));
    [p1, p2, p3].map(|p| Arc::new(ImageFile::open(&p).unwrap()))
}

#[test]
fn chain_resolves_to_each_versions_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * BS as usize + 1000;
    let v1 = sample_disk(size, 1);
    let mut v2 = v1.clone();
    v2[5000..9000].fill(0xaa);
    v2[2 * BS as usize..3 * BS as usize].fill(0); // a block becomes zero
    let mut v3 = v1.clone();
    v3[size - 10..].fill(0x11);
    let [i1, i2, i3] = three_version_chain(dir.path(), &v1, &v2, &v3);
    for (chain, want) in [(vec![i1.clone()], &v1), (vec![i1.clone(), i2.clone()], &v2), (vec![i1, i2, i3], &v3)] {
        let r = VersionReader::from_chain(chain).unwrap();
        assert_eq!(&read_all(&r), want);
        assert_eq!(r.digest_from_index().unwrap(), r.top().footer.source_digest);
        // unaligned reads across block boundaries
        let s = FrameCache::new(0, BS, false);
        let mut part = vec![0u8; 3 * BS as usize];
        let n = r.read_at(BS as u64 - 7, &mut part, &s).unwrap();
        assert_eq!(&part[..n], &want[BS as usize - 7..BS as usize - 7 + n]);
    }
}

/// A chain over a full of 40 blocks: version 2 rewrites blocks 0..10, version 3 blocks 0..9
/// (block 9 stays version 2's).
fn rewritten_chain(dir: &Path) -> [Arc<ImageFile>; 3] {
    let v1 = sample_disk(40 * BS as usize, 1);
    let mut v2 = v1.clone();
    v2[..10 * BS as usize].fill(0x22);
    let mut v3 = v2.clone();
    v3[..9 * BS as usize].fill(0x33);
    three_version_chain(dir, &v1, &v2, &v3)
}

#[test]
fn only_deltas_that_an_opened_version_reads_a_good_share_of_are_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let [i1, i2, i3] = rewritten_chain(dir.path());
    VersionReader::from_chain(vec![i1.clone(), i2.clone(), i3.clone()]).unwrap();
    assert!(i3.reads_ahead(), "version 3 reads all of its own image");
    assert!(!i2.reads_ahead(), "version 3 reads 1 of the 10 blocks of version 2's");
    assert!(!i1.reads_ahead(), "a full is left to the kernel's read-ahead");
    VersionReader::from_chain(vec![i1.clone(), i2.clone()]).unwrap();
    assert!(i2.reads_ahead(), "version 2, opened too, reads all of it");
    assert!(!i1.reads_ahead());
}

#[test]
fn priming_asks_once_per_image_for_the_blocks_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let [i1, i2, i3] = rewritten_chain(dir.path());
    let r = VersionReader::from_chain(vec![i1.clone(), i2.clone(), i3.clone()]).unwrap();
    assert!(![&i1, &i2, &i3].iter().any(|i| i.primed()));
    // 16 MiB ahead of block 20: blocks 20..40, all the full's
    r.prime_from(20);
    assert_eq!([&i1, &i2, &i3].map(|i| i.primed()), [true, false, false]);
    r.prime_from(0);
    assert_eq!([&i1, &i2, &i3].map(|i| i.primed()), [true, true, true]);
    // a read counts as priming
    let other = tempfile::tempdir().unwrap();
    let [j1, ..] = rewritten_chain(other.path());
    let only_full = VersionReader::from_chain(vec![j1.clone()]).unwrap();
    only_full.read_block(30, &FrameCache::new(0, BS, false), &mut vec![0u8; BS as usize]).unwrap();
    assert!(j1.primed());
}

#[test]
fn chain_with_a_replaced_parent_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * BS as usize;
    let v1 = sample_disk(size, 1);
    let h1 = header(1, Kind::Full, None, None, size as u64);
    let p1 = write_image(dir.path(), h1, &v1, None);
    // version 2 claims a parent image id that is not the file present
    let fake = ImageRef { version: 1, image_id: [0xee; 16] };
    let h2 = header(2, Kind::Incremental, Some(fake), Some(fake), size as u64);
    let p2 = write_image(dir.path(), h2, &v1, Some(&v1));
    let chain = vec![Arc::new(ImageFile::open(&p1).unwrap()), Arc::new(ImageFile::open(&p2).unwrap())];
    assert!(VersionReader::from_chain(chain).is_err());
}

fn one_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let size = 6 * BS as usize;
    let v1 = sample_disk(size, 5);
    let p = write_image(dir, header(1, Kind::Full, None, None, size as u64), &v1, None);
    (p, v1)
}

#[test]
fn truncated_file_is_rejected_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = one_image(dir.path());
    let whole = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut");
    for len in (0..whole.len()).step_by(97).chain([whole.len() - 1, whole.len() - FOOTER_SIZE]) {
        std::fs::write(&cut, &whole[..len]).unwrap();
        assert!(ImageFile::open(&cut).is_err(), "truncated to {len} accepted");
    }
}

#[test]
fn damaged_block_is_named_with_file_version_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = one_image(dir.path());
    let img = ImageFile::open(&p).unwrap();
    let mut entries = Vec::new();
    img.read_entries(0, 10, &mut entries).unwrap();
    let victim = entries[1];
    drop(img);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[victim.data_offset as usize + 3] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let img = Arc::new(ImageFile::open(&p).unwrap());
    img.check_index().unwrap();
    let r = VersionReader::from_chain(vec![img]).unwrap();
    let mut out = vec![0u8; BS as usize];
    let err = r.read_block(victim.block, &FrameCache::new(0, BS, false), &mut out).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("v00000001.strata")
            && msg.contains("version 1")
            && msg.contains(&format!("offset {}", victim.data_offset)),
        "{msg}"
    );
    // other blocks still read
    r.read_block(entries[0].block, &FrameCache::new(0, BS, false), &mut out).unwrap();
}

#[test]
fn absurd_source_size_opens_with_a_map_of_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let h = header(1, Kind::Full, None, None, 1 << 60);
    let path = dir.path().join("v00000001.strata");
    let w = ImageWriter::create(&path, h).unwrap();
    w.finish(Finish { present_blocks: 0, source_digest: [0; 32] }).unwrap();
    let img = Arc::new(ImageFile::open(&path).unwrap());
    let r = VersionReader::from_chain(vec![img]).unwrap();
    assert_eq!((r.block_count(), r.next_stored(0)), (1 << 48, None));
    assert!(r.map_bytes() < 1024, "{} bytes", r.map_bytes());
}

#[test]
fn a_version_declaring_16_tib_with_a_few_blocks_resolves_with_a_map_of_kilobytes() {
    let dir = tempfile::tempdir().unwrap();
    let (bs, size) = (BS as usize, 16u64 << 40);
    let last = size / u64::from(BS) - 1;
    let block = |seed: u8| sample_disk(bs, seed);
    let h1 = header(1, Kind::Full, None, None, size);
    let r1 = ImageRef { version: 1, image_id: h1.image_id };
    let mut w = ImageWriter::create(&dir.path().join("v00000001.strata"), h1).unwrap();
    for (b, seed) in [(0, 1), (1, 2), (last / 2, 3), (last, 4)] {
        w.append_block(b, Encoding::Raw, &block(seed), hash_block(&block(seed))).unwrap();
    }
    let p1 = w.finish(Finish { present_blocks: 4, source_digest: [0; 32] }).unwrap();
    // version 2: block 1 zeroed, block 5 written, part 0 of the last block patched
    let mut patched = block(4);
    patched[..bs / 16].fill(0x5a);
    let h2 = header(2, Kind::Incremental, Some(r1), Some(r1), size);
    let mut w = ImageWriter::create(&dir.path().join("v00000002.strata"), h2).unwrap();
    w.append_zero(1, zero_block_hash(BS)).unwrap();
    w.append_block(5, Encoding::Raw, &block(6), hash_block(&block(6))).unwrap();
    let frame = zstd::bulk::compress(&patched[..bs / 16], 3).unwrap();
    w.append_patch(last, 1, &frame, hash_block(&patched)).unwrap();
    let p2 = w.finish(Finish { present_blocks: 4, source_digest: [0; 32] }).unwrap();
    let chain = vec![Arc::new(ImageFile::open(&p1).unwrap()), Arc::new(ImageFile::open(&p2).unwrap())];
    let r = VersionReader::from_chain(chain).unwrap();
    assert!(r.map_bytes() < 4096, "a map of {} bytes", r.map_bytes());
    let stored: Vec<u64> = r.stored_blocks(0).map(|s| s.block).collect();
    assert_eq!(stored, [0, 5, last / 2, last]);
    assert_eq!(
        (r.next_stored(6), r.next_stored(last / 2 + 1), r.next_stored(last + 1)),
        (Some(last / 2), Some(last), None)
    );
    assert_eq!(r.locate(1), crate::BlockLocation::Zero);
    let (base_image, base) = r.patch_base(last).unwrap().expect("the full's block");
    assert_eq!((base_image.header.version, base.hash), (1, hash_block(&block(4))));
    let mut out = vec![0u8; bs];
    r.read_block(last, &FrameCache::new(0, BS, false), &mut out).unwrap();
    assert!(out == patched);
}

#[test]
fn damaged_index_is_detected_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = one_image(dir.path());
    let img = ImageFile::open(&p).unwrap();
    let at = img.footer.index_offset as usize + 8; // an entry's data_offset
    drop(img);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[at] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    let img = ImageFile::open(&p).unwrap();
    assert!(img.check_index().is_err());
}

#[test]
fn repository_identity_round_trips_and_ids_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let mut repo = Repository::create(&path, 65536).unwrap();
    let lock = repo.lock().unwrap();
    assert!(matches!(repo.lock(), Err(FormatError::Busy { .. })), "second lock must fail");
    repo.record_published(&lock, 7, Some(1234)).unwrap();
    let again = Repository::open(&path).unwrap();
    assert_eq!((again.repo_id, again.block_size, again.last_version), (repo.repo_id, 65536, 7));
    assert_eq!(again.last_source_full, Some((7, 1234)));
    let state = again.scan().unwrap();
    assert_eq!(again.next_version_id(&state).unwrap(), 8);
    assert!(Repository::create(&path, 65536).is_err());
    assert!(matches!(Repository::open(dir.path()), Err(FormatError::NotARepository { .. })));
}

#[test]
fn scan_opens_a_long_chain_side_by_side_and_keeps_each_image_at_its_version() {
    // enough images for several opening threads; version 7's footer is damaged
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::create(&dir.path().join("repo"), BS).unwrap();
    let size = 6 * BS as usize;
    let mut disks = vec![sample_disk(size, 1)];
    let mut parent: Option<ImageRef> = None;
    let mut full = None;
    for v in 1..=20u64 {
        let mut disk = disks.last().unwrap().clone();
        disk[(v as usize * 977) % size] ^= 0x5a;
        let kind = if v == 1 { Kind::Full } else { Kind::Incremental };
        let mut h = header(v, kind, parent, full, size as u64);
        h.repo_id = repo.repo_id;
        let me = ImageRef { version: v, image_id: h.image_id };
        full = full.or(Some(me));
        let prev = (v > 1).then(|| disks.last().unwrap().clone());
        write_image(repo.path(), h, &disk, prev.as_deref());
        parent = Some(me);
        disks.push(disk);
    }
    let damaged = repo.image_path(7);
    let len = std::fs::metadata(&damaged).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&damaged).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xff\xff\xff\xff", len - 8).unwrap();
    let state = repo.scan().unwrap();
    for v in 1..=20u64 {
        let status = state.status(v);
        assert_eq!(status.restorable(), v < 7, "version {v}: {:?}", status.problem);
        match (v, &status.problem) {
            (7, Some(crate::ChainProblem::Damaged { .. })) => {}
            (8.., Some(crate::ChainProblem::NeedsDamaged { needed: 7, name, .. })) => {
                assert_eq!(name, &crate::repo::image_file_name(7))
            }
            (_, problem) => assert!(v < 7 && problem.is_none(), "version {v}: {problem:?}"),
        }
        match &state.images[&v].image {
            Ok(image) => assert_eq!(image.header.version, v),
            Err(why) => assert_eq!(v, 7, "{why}"),
        }
        if v < 7 {
            assert_eq!(read_all(&state.open_version(v).unwrap()), disks[v as usize]);
        }
    }
}

#[test]
fn image_names_parse_strictly() {
    use crate::repo::{image_file_name, parse_image_file_name};
    assert_eq!(image_file_name(12), "v00000012.strata");
    assert_eq!(parse_image_file_name("v00000012.strata"), Some(12));
    assert_eq!(parse_image_file_name("v123456789.strata"), Some(123_456_789));
    for bad in [
        "v12.strata",
        "v00000000.strata",
        "v18446744073709551615.strata",
        "v100000000000.strata",
        "x00000012.strata",
        "v0000001a.strata",
        ".tmp-v00000012.strata.5",
    ] {
        assert_eq!(parse_image_file_name(bad), None, "{bad}");
    }
}

/// Pulls `| \`NAME\` | value |` rows and `| offset | size | field |` rows out of SPEC.md.
fn spec_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("SPEC.md")).unwrap()
}

fn spec_constant(spec: &str, name: &str) -> String {
    let key = format!("| `{name}` | ");
    let line = spec.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("SPEC.md lacks {name}"));
    line[key.len()..].trim_end_matches('|').trim().trim_matches('`').to_string()
}

/// The (offset, size, field) rows of the SPEC.md table under `heading`.
fn spec_table(spec: &str, heading: &str) -> Vec<(usize, usize, String)> {
    let start = spec.find(heading).unwrap_or_else(|| panic!("SPEC.md lacks {heading}"));
    spec[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| offset"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].parse().unwrap(), cells[2].parse().unwrap(), cells[3].to_string())
        })
        .collect()
}

#[test]
fn constants_match_spec() {
    let spec = spec_text();
    let numbers: [(&str, u64); 37] = [
        ("FORMAT_VERSION", layout::FORMAT_VERSION.into()),
        ("HEADER_SIZE", HEADER_SIZE as u64),
        ("FOOTER_SIZE", FOOTER_SIZE as u64),
        ("INDEX_ENTRY_SIZE", INDEX_ENTRY_SIZE as u64),
        ("MIN_BLOCK_SIZE", layout::MIN_BLOCK_SIZE.into()),
        ("MAX_BLOCK_SIZE", layout::MAX_BLOCK_SIZE.into()),
        ("DEFAULT_BLOCK_SIZE", layout::DEFAULT_BLOCK_SIZE.into()),
        ("LABEL_MAX", layout::LABEL_MAX as u64),
        ("SOURCE_MAX", layout::SOURCE_MAX as u64),
        ("MAX_CHAIN_LEN", layout::MAX_CHAIN_LEN as u64),
        ("KIND_FULL", layout::KIND_FULL.into()),
        ("KIND_INCREMENTAL", layout::KIND_INCREMENTAL.into()),
        ("KIND_DIFFERENTIAL", layout::KIND_DIFFERENTIAL.into()),
        ("ENCODING_ZERO", layout::ENCODING_ZERO.into()),
        ("ENCODING_RAW", layout::ENCODING_RAW.into()),
        ("ENCODING_ZSTD", layout::ENCODING_ZSTD.into()),
        ("ENCODING_ZSTD_GROUP", layout::ENCODING_ZSTD_GROUP.into()),
        ("GROUP_MAX_BLOCKS", layout::GROUP_MAX_BLOCKS.into()),
        ("GROUP_MAX_BYTES", layout::GROUP_MAX_BYTES.into()),
        ("GROUP_MAX_BYTES_FORMAT_2", layout::GROUP_MAX_BYTES_FORMAT_2.into()),
        ("ENCODING_PATCH", layout::ENCODING_PATCH.into()),
        ("PATCH_PARTS", layout::PATCH_PARTS.into()),
        ("ENCODING_PATCH_GROUP", layout::ENCODING_PATCH_GROUP.into()),
        ("PATCH_TABLE_ENTRY", layout::PATCH_TABLE_ENTRY as u64),
        ("RULE_UNSPECIFIED", layout::RULE_UNSPECIFIED.into()),
        ("RULE_FIRST", layout::RULE_FIRST.into()),
        ("RULE_REQUESTED", layout::RULE_REQUESTED.into()),
        ("RULE_SCHEME", layout::RULE_SCHEME.into()),
        ("RULE_FULL_EVERY", layout::RULE_FULL_EVERY.into()),
        ("RULE_FULL_EVERY_DAYS", layout::RULE_FULL_EVERY_DAYS.into()),
        ("RULE_NO_USABLE_FULL", layout::RULE_NO_USABLE_FULL.into()),
        ("RULE_SOURCE_RESIZED", layout::RULE_SOURCE_RESIZED.into()),
        ("RULE_MERGED", layout::RULE_MERGED.into()),
        ("RULE_CHAIN_LIMIT", layout::RULE_CHAIN_LIMIT.into()),
        ("RULE_SOURCE_REPLACED", layout::RULE_SOURCE_REPLACED.into()),
        ("SELECTION_EVERY", layout::SELECTION_EVERY.into()),
        ("SELECTION_USED", layout::SELECTION_USED.into()),
    ];
    for (name, value) in numbers {
        assert_eq!(spec_constant(&spec, name), value.to_string(), "{name}");
    }
    assert_eq!(spec_constant(&spec, "IMAGE_MAGIC").as_bytes(), layout::IMAGE_MAGIC);
    assert_eq!(spec_constant(&spec, "FOOTER_MAGIC").as_bytes(), layout::FOOTER_MAGIC);

    use layout::{entry as e, footer as f, header as h};
    let header_offsets = [
        h::MAGIC,
        h::FORMAT_VERSION,
        h::HEADER_SIZE,
        h::REPO_ID,
        h::IMAGE_ID,
        h::VERSION_ID,
        h::KIND,
        h::RULE,
        h::RESERVED_KIND,
        h::PARENT_ID,
        h::PARENT_IMAGE_ID,
        h::FULL_ID,
        h::FULL_IMAGE_ID,
        h::BLOCK_SIZE,
        h::COMPRESSION_LEVEL,
        h::SOURCE_SIZE,
        h::CREATED_SECS,
        h::CREATED_NANOS,
        h::LABEL_LEN,
        h::SOURCE_LEN,
        h::LABEL,
        h::SOURCE,
        h::SOURCE_ID_KIND,
        h::SOURCE_ID,
        h::BLOCK_SELECTION,
        h::UNUSED_BYTES,
        h::RESERVED,
        h::CRC,
    ];
    let footer_offsets = [
        f::MAGIC,
        f::FORMAT_VERSION,
        f::FOOTER_SIZE,
        f::IMAGE_ID,
        f::INDEX_OFFSET,
        f::ENTRY_COUNT,
        f::INDEX_CRC,
        f::RESERVED0,
        f::STORED_BYTES,
        f::PRESENT_BLOCKS,
        f::SOURCE_DIGEST,
        f::RESERVED1,
        f::CRC,
    ];
    let entry_offsets = [
        e::BLOCK,
        e::DATA_OFFSET,
        e::STORED_LEN,
        e::ENCODING,
        e::GROUP_LEN,
        e::GROUP_SLOT,
        e::PATCH_SLOT,
        e::DATA_CRC,
        e::HASH,
        e::ENTRY_CRC,
    ];
    for (heading, offsets, total) in [
        ("### 3.1 Header", &header_offsets[..], HEADER_SIZE),
        ("### 3.4 Footer", &footer_offsets[..], FOOTER_SIZE),
        ("### 3.3 Index entry", &entry_offsets[..], INDEX_ENTRY_SIZE),
    ] {
        let rows = spec_table(&spec, heading);
        let spec_offsets: Vec<usize> = rows.iter().map(|r| r.0).collect();
        assert_eq!(spec_offsets, offsets, "{heading} offsets");
        // sizes tile the structure exactly
        for pair in rows.windows(2) {
            assert_eq!(
                pair[0].0 + pair[0].1,
                pair[1].0,
                "{heading}: {} does not end where {} starts",
                pair[0].2,
                pair[1].2
            );
        }
        let last = rows.last().unwrap();
        assert_eq!(last.0 + last.1, total, "{heading} size");
    }
}

#[test]
fn format_1_images_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let (path, disk) = one_image(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let footer_at = bytes.len() - FOOTER_SIZE;
    for (start, size, crc_at) in [(0, HEADER_SIZE, layout::header::CRC), (footer_at, FOOTER_SIZE, layout::footer::CRC)]
    {
        let s = &mut bytes[start..start + size];
        s[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&s[..crc_at]);
        s[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&path, &bytes).unwrap();
    let image = Arc::new(ImageFile::open(&path).unwrap());
    image.check_index().unwrap();
    assert_eq!(read_all(&VersionReader::from_chain(vec![image]).unwrap()), disk);
}

/// A chain of random layers over `blocks` blocks (whole blocks, zero entries, patches over
/// patches and over zero bases), with the model of what each block resolves to.
struct RandomChain {
    paths: Vec<PathBuf>,
    /// The version's bytes.
    disk: Vec<u8>,
    /// Per block: the (layer, entry number) of its newest entry, `None` when zero.
    newest: Vec<Option<(usize, u64)>>,
    /// Per block whose newest entry is a patch: its base's (layer, entry number), `None` for a
    /// zero base.
    bases: Vec<Option<Option<(usize, u64)>>>,
}

fn random_chain(dir: &Path, seed: u64, blocks: usize, depth: usize) -> RandomChain {
    let mut x = seed | 1;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (bs, part) = (BS as usize, BS as usize / 16);
    let size = (blocks * bs) as u64;
    let mut disk = vec![0u8; blocks * bs];
    let mut base_bytes = vec![vec![0u8; bs]; blocks];
    let mut masks = vec![0u16; blocks];
    let mut newest: Vec<Option<(usize, u64)>> = vec![None; blocks];
    let mut bases: Vec<Option<Option<(usize, u64)>>> = vec![None; blocks];
    let mut base_loc: Vec<Option<(usize, u64)>> = vec![None; blocks];
    let mut paths = Vec::new();
    let mut parent: Option<ImageRef> = None;
    let mut full: Option<ImageRef> = None;
    for layer in 0..depth {
        let kind = if layer == 0 { Kind::Full } else { Kind::Incremental };
        let h = header(layer as u64 + 1, kind, parent, full, size);
        let this = ImageRef { version: h.version, image_id: h.image_id };
        let name = crate::repo::image_file_name(h.version);
        let mut w = ImageWriter::create(&dir.join(name), h).unwrap();
        let mut entries = 0u64;
        // Every other delta keeps its patches in one patch group, written at the end: its
        // entries wait in `held` (None for a patch) to go in the index in block order.
        let grouped = layer % 2 == 0;
        let (mut held, mut grouped_patches) = (Vec::new(), Vec::new());
        for b in 0..blocks {
            let block = b * bs..(b + 1) * bs;
            let choice = if layer == 0 { [0, 2][next(2) as usize] } else { next(5) };
            match choice {
                1 => {
                    held.push(Some(ImageWriter::zero_entry(b as u64, zero_block_hash(BS))));
                    disk[block].fill(0);
                    base_bytes[b].fill(0);
                    (masks[b], newest[b], bases[b], base_loc[b]) = (0, None, None, None);
                }
                2 => {
                    for x in &mut disk[block.clone()] {
                        *x = next(256) as u8;
                    }
                    let enc = if next(2) == 0 { Encoding::Raw } else { Encoding::Zstd };
                    let bytes = match enc {
                        Encoding::Raw => disk[block.clone()].to_vec(),
                        _ => zstd::bulk::compress(&disk[block.clone()], 1).unwrap(),
                    };
                    let enc = if bytes.len() >= bs { Encoding::Raw } else { enc };
                    let bytes = if enc == Encoding::Raw { disk[block.clone()].to_vec() } else { bytes };
                    held.push(Some(w.write_block(b as u64, enc, &bytes, hash_block(&disk[block.clone()])).unwrap()));
                    base_bytes[b].copy_from_slice(&disk[block]);
                    newest[b] = Some((layer, entries));
                    (masks[b], bases[b], base_loc[b]) = (0, None, newest[b]);
                }
                3 | 4 if layer > 0 => {
                    let changed = 1u16 << next(16);
                    let p = changed.trailing_zeros() as usize;
                    disk[b * bs + p * part..b * bs + (p + 1) * part].fill(1 + next(255) as u8);
                    let differs = (0..16)
                        .filter(|&i| {
                            disk[b * bs + i * part..b * bs + (i + 1) * part] != base_bytes[b][i * part..(i + 1) * part]
                        })
                        .fold(0u16, |m, i| m | 1 << i);
                    let mask = differs | masks[b] | changed;
                    if grouped {
                        grouped_patches.push((b, mask));
                        held.push(None);
                    } else {
                        held.push(Some(write_patch(&mut w, &disk, b, mask)));
                    }
                    bases[b] = Some(base_loc[b]);
                    masks[b] = mask;
                    newest[b] = Some((layer, entries));
                }
                _ => continue,
            }
            entries += 1;
        }
        let mut in_group =
            if grouped_patches.is_empty() { Vec::new() } else { write_patch_group(&mut w, &disk, &grouped_patches) }
                .into_iter();
        for entry in held {
            match entry {
                Some(e) => drop(w.push(e).unwrap()),
                None => drop(w.push(in_group.next().unwrap()).unwrap()),
            }
        }
        let present = newest.iter().filter(|n| n.is_some()).count() as u64;
        let mut digest = SourceDigest::new(size, BS);
        disk.chunks(bs).for_each(|b| digest.push(&hash_block(b)));
        paths.push(w.finish(Finish { present_blocks: present, source_digest: digest.finish() }).unwrap());
        parent = Some(this);
        full = full.or(Some(this));
    }
    RandomChain { paths, disk, newest, bases }
}

#[test]
fn dense_and_sparse_maps_read_random_chains_like_the_model() {
    use crate::block_map::Form;
    use crate::BlockLocation;
    for seed in 1..=24u64 {
        let dir = tempfile::tempdir().unwrap();
        let (blocks, depth) = (1 + (seed as usize * 7) % 23, 1 + (seed as usize * 5) % 9);
        let chain = random_chain(dir.path(), seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), blocks, depth);
        let layers: Vec<Arc<ImageFile>> = chain.paths.iter().map(|p| Arc::new(ImageFile::open(p).unwrap())).collect();
        let entry_of = |at: Option<(usize, u64)>, b: u64| at.map(|(l, e)| layers[l].read_entry(e, b).unwrap());
        for form in [Form::Dense, Form::Sparse] {
            let r = VersionReader::open(layers.clone(), Some(form)).unwrap();
            assert_eq!(r.map_form(), form);
            let what = format!("seed {seed}, {form:?}");
            for b in 0..blocks as u64 {
                let want = match chain.newest[b as usize] {
                    None => BlockLocation::Zero,
                    Some((layer, entry)) => BlockLocation::Stored { layer, entry },
                };
                assert_eq!(r.locate(b), want, "{what}: block {b}");
                let got = r.entry(b).unwrap().map(|(_, e)| e);
                assert_eq!(got, entry_of(chain.newest[b as usize], b), "{what}: entry of block {b}");
                match chain.bases[b as usize] {
                    None => assert!(r.patch_base(b).is_err(), "{what}: block {b} is no patch"),
                    Some(base) => {
                        let got = r.patch_base(b).unwrap().map(|(_, e)| e);
                        assert_eq!(got, entry_of(base, b), "{what}: base of block {b}");
                    }
                }
            }
            assert!(read_all(&r) == chain.disk, "{what}: bytes differ from the model");
            assert_eq!(r.digest_from_index().unwrap(), r.top().footer.source_digest, "{what}");
        }
    }
}
