//! Micro-benchmarks of the block pipeline, one stage at a time, on 64 KiB blocks and 1 MiB
//! groups of deterministic file-like data (about 3:1 under zstd -3, like the benchmark's
//! dataset): what a backup pays per block (zero check, BLAKE3, compression of a group, a
//! patch's changed parts), what a read pays (crc32c, decoding a group, laying a patch over its
//! base) and what resolving a block through a chain costs (the block map, an index entry read,
//! a whole patched block read). `tests/bench/run.sh` measures the tools end to end; these
//! say where the time of one block goes.
//!
//! `cargo bench -p strata-format --bench pipeline` runs them (criterion: medians with
//! confidence intervals, `-- --save-baseline NAME` and `-- --baseline NAME` to compare two
//! builds in the same go); `cargo test --workspace --bench pipeline` runs each once.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata_format::block::{compress_into, decode_into, hash_block, is_zero};
use strata_format::digest::{zero_block_hash, SourceDigest};
use strata_format::header::new_id;
use strata_format::{Encoding, Finish, ImageFile, ImageHeader, ImageRef, ImageWriter, Kind, Rule, VersionReader};

const BS: usize = 64 * 1024;
const GROUP: usize = 16 * BS;
const LEVEL: i32 = 3;
/// Blocks of the chain the look-ups resolve through (64 MiB) and blocks its delta patches.
const CHAIN_BLOCKS: u64 = 1024;
const PATCHED_EVERY: u64 = 16;

/// `len` bytes of text-like data: lines of words from a fixed vocabulary, common words far more
/// often than rare ones (about Zipf's law), and numbers. zstd -3 shrinks it 3.2-fold (the
/// benchmark dataset's files: 3.1-fold) but at about half the speed of those files, which hold
/// long repeats; read the compression figures as a floor.
fn file_like(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let vocabulary: Vec<Vec<u8>> = (0..2048)
        .map(|_| {
            let n = 2 + next() % 9;
            (0..n).map(|_| b"etaoinshrdlcumwfgypbvkjxqz_0123456789"[(next() % 37) as usize]).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        match next() % 16 {
            0 => out.extend_from_slice(format!("{:x} ", next() % 1_000_000).as_bytes()),
            1 => out.push(b'\n'),
            _ => {
                let rank = 2048f64.powf((next() % 1_000_000) as f64 / 1e6) as usize - 1;
                out.extend_from_slice(&vocabulary[rank]);
                out.push(b' ');
            }
        }
    }
    out.truncate(len);
    out
}

fn stages(c: &mut Criterion) {
    let group_data = file_like(GROUP, 1);
    let block = &group_data[..BS];
    let mut compressor = zstd::bulk::Compressor::new(LEVEL).unwrap();
    let mut frame = Vec::new();
    assert_eq!(compress_into(&mut compressor, &group_data, &mut frame), Encoding::Zstd);
    let ratio = GROUP as f64 / frame.len() as f64;
    assert!((2.8..3.6).contains(&ratio), "the sample data should compress like files do, not {ratio:.2}-fold");
    let crc = crc32c::crc32c(&frame);

    let mut g = c.benchmark_group("backup");
    g.throughput(Throughput::Bytes(BS as u64));
    g.bench_function("is_zero 64K (zero block: scanned whole)", |b| {
        let zero = vec![0u8; BS];
        b.iter(|| is_zero(black_box(&zero)))
    });
    g.bench_function("blake3 64K", |b| b.iter(|| hash_block(black_box(block))));
    g.throughput(Throughput::Bytes(GROUP as u64));
    g.bench_function("zstd -3 group 1M", |b| {
        let mut out = Vec::new();
        b.iter(|| compress_into(&mut compressor, black_box(&group_data), &mut out))
    });
    let parts = &group_data[..4 * 4096];
    g.throughput(Throughput::Bytes(parts.len() as u64));
    g.bench_function("zstd -3 patch of 4 parts (16K)", |b| {
        let mut out = Vec::new();
        b.iter(|| compress_into(&mut compressor, black_box(parts), &mut out))
    });
    g.finish();

    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Bytes(GROUP as u64));
    g.bench_function("crc32c of a group's frame", |b| b.iter(|| crc32c::crc32c(black_box(&frame))));
    g.bench_function("decode group 1M (crc32c + zstd)", |b| {
        let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
        let mut out = vec![0u8; GROUP];
        b.iter(|| decode_into(&mut decompressor, Encoding::ZstdGroup, black_box(&frame), crc, &mut out).unwrap())
    });
    g.finish();
}

fn header(version: u64, kind: Kind, parent: Option<ImageRef>, full: Option<ImageRef>) -> ImageHeader {
    let image_id = new_id();
    ImageHeader {
        repo_id: [1; 16],
        image_id,
        version,
        kind,
        rule: Rule::Scheme,
        parent,
        full: full.unwrap_or(ImageRef { version, image_id }),
        block_size: BS as u32,
        compression_level: LEVEL,
        source_size: CHAIN_BLOCKS * BS as u64,
        created_secs: 1_700_000_000,
        created_nanos: 0,
        label: String::new(),
        source: "bench".into(),
        source_id: None,
        selection: Default::default(),
    }
}

fn writer(dir: &Path, h: ImageHeader) -> ImageWriter {
    let name = strata_format::repo::image_file_name(h.version);
    ImageWriter::create(&dir.join(name), h).unwrap()
}

/// A full of `CHAIN_BLOCKS` blocks in 1 MiB groups, and an incremental that patches the first
/// of the 4 KiB parts of every `PATCHED_EVERY`th block.
fn chain(dir: &Path) -> VersionReader {
    let disk = file_like(CHAIN_BLOCKS as usize * BS, 2);
    let hashes: Vec<[u8; 32]> = disk.chunks(BS).map(hash_block).collect();
    let mut compressor = zstd::bulk::Compressor::new(LEVEL).unwrap();
    let h1 = header(1, Kind::Full, None, None);
    let r1 = ImageRef { version: 1, image_id: h1.image_id };
    let mut w = writer(dir, h1);
    let (mut frame, mut entries) = (Vec::new(), Vec::new());
    for (g, bytes) in disk.chunks(GROUP).enumerate() {
        compress_into(&mut compressor, bytes, &mut frame);
        let blocks: Vec<(u64, [u8; 32])> =
            (0..bytes.len() / BS).map(|i| ((g * 16 + i) as u64, hashes[g * 16 + i])).collect();
        w.append_group(&blocks, &frame, &mut entries).unwrap();
    }
    let digest = |hashes: &[[u8; 32]]| {
        let mut d = SourceDigest::new(CHAIN_BLOCKS * BS as u64, BS as u32);
        hashes.iter().for_each(|h| d.push(h));
        d.finish()
    };
    let full = w.finish(Finish { present_blocks: CHAIN_BLOCKS, source_digest: digest(&hashes) }).unwrap();

    let mut w = writer(dir, header(2, Kind::Incremental, Some(r1), Some(r1)));
    let mut new_hashes = hashes.clone();
    for b in (0..CHAIN_BLOCKS).step_by(PATCHED_EVERY as usize) {
        let part = file_like(4096, 1000 + b);
        let mut new = disk[b as usize * BS..(b as usize + 1) * BS].to_vec();
        new[..4096].copy_from_slice(&part);
        new_hashes[b as usize] = hash_block(&new);
        compress_into(&mut compressor, &part, &mut frame);
        w.append_patch(b, 1, &frame, new_hashes[b as usize]).unwrap();
    }
    let delta = w.finish(Finish { present_blocks: CHAIN_BLOCKS, source_digest: digest(&new_hashes) }).unwrap();
    let layers = [full, delta].map(|p| Arc::new(ImageFile::open(&p).unwrap()));
    assert_ne!(zero_block_hash(BS as u32), hashes[0]);
    VersionReader::from_chain(layers.to_vec()).unwrap()
}

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let version = chain(dir.path());
    let mut g = c.benchmark_group("resolve");
    g.bench_function(BenchmarkId::new("block map", "per block"), |b| {
        let mut block = 0;
        b.iter(|| {
            block = (block + 7) % CHAIN_BLOCKS;
            version.locate(black_box(block))
        })
    });
    g.bench_function(BenchmarkId::new("index entry read", "per block"), |b| {
        let mut block = 0;
        b.iter(|| {
            block = (block + 7) % CHAIN_BLOCKS;
            version.entry(black_box(block)).unwrap()
        })
    });
    g.throughput(Throughput::Bytes(BS as u64));
    let mut out = vec![0u8; BS];
    let frames = strata_format::frame_cache::FrameCache::new(0, BS as u32, false);
    g.bench_function("whole block of a group", |b| {
        b.iter(|| version.read_block(black_box(1), &frames, &mut out).unwrap())
    });
    g.bench_function("whole patched block (its base's group + the patch)", |b| {
        b.iter(|| version.read_block(black_box(PATCHED_EVERY), &frames, &mut out).unwrap())
    });
    g.finish();
}

criterion_group!(benches, stages, lookups);
criterion_main!(benches);
