//! The verify engine: check every image (header, footer, index, and unless quick every stored
//! block: crc32c, decompression and BLAKE3 content hash; a patch's hash over its base once
//! every image is read, see `patch_check`), then every version: is its whole chain
//! present and sound, and does the digest of its resolved blocks match the one recorded at
//! backup time.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use rayon::prelude::*;
use strata_format::block::hash_block;
use strata_format::digest::hex;
use strata_format::{Encoding, FormatError, ImageFile, IndexEntry, ReadScratch, Repository};

use crate::patch_check::PatchChecks;
use crate::progress::Progress;

/// Most bad blocks listed per image (all are counted).
const LISTED_PROBLEMS: usize = 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageReport {
    pub version: u64,
    pub file: String,
    pub sound: bool,
    pub blocks_checked: u64,
    pub bad_blocks: u64,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionReport {
    pub id: u64,
    pub restorable: bool,
    pub digest_verified: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub images: Vec<ImageReport>,
    pub versions: Vec<VersionReport>,
}

pub struct VerifyOptions<'a> {
    pub versions: &'a [String],
    /// Skip reading block data (headers, footers, indexes and digests only).
    pub quick: bool,
}

pub fn verify(repo_path: &Path, opts: &VerifyOptions<'_>, progress: &dyn Progress) -> Result<VerifyReport> {
    verify_repository(&Repository::open(repo_path)?, opts, progress)
}

/// `verify` of an opened repository.
pub fn verify_repository(repo: &Repository, opts: &VerifyOptions<'_>, progress: &dyn Progress) -> Result<VerifyReport> {
    let mut state = repo.scan()?;
    let wanted: Vec<u64> = if opts.versions.is_empty() {
        state.ids().collect()
    } else {
        opts.versions.iter().map(|v| state.resolve_name(v)).collect::<Result<_, _>>()?
    };
    // Every image the wanted versions need, as far as their chains can be followed.
    let mut images: BTreeSet<u64> = BTreeSet::new();
    for &id in &wanted {
        images.extend(state.status(id).chain);
        images.insert(id);
    }
    let total: u64 =
        images.iter().filter_map(|id| state.images.get(id)?.image.as_ref().ok().map(|i| i.footer.stored_bytes)).sum();
    progress.begin("verify", total);
    let mut patches = PatchChecks::default();
    let mut image_reports = Vec::new();
    for &id in &images {
        let Some(slot) = state.images.get(&id) else { continue };
        let file = slot.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut report =
            ImageReport { version: id, file, sound: true, blocks_checked: 0, bad_blocks: 0, problems: Vec::new() };
        match &slot.image {
            Err(why) => report.problems.push(why.clone()),
            Ok(image) => check_image(image, opts.quick, &mut report, &mut patches, progress),
        }
        report.sound = report.problems.is_empty();
        if let Some(first) = report.problems.first() {
            state.mark_damaged(id, first.clone());
        }
        image_reports.push(report);
    }
    // Patches over bases in sound images (a chain through a damaged one is not opened).
    for (id, bad) in patches.run(&state) {
        let Some(report) = image_reports.iter_mut().find(|r| r.version == id) else { continue };
        record_bad(report, bad);
        report.sound = false;
        state.mark_damaged(id, report.problems[0].clone());
    }
    progress.end();
    let mut versions = Vec::new();
    for &id in &wanted {
        let status = state.status(id);
        let mut v = VersionReport {
            id,
            restorable: status.restorable(),
            digest_verified: false,
            problem: status.problem.map(|p| p.to_string()),
        };
        if v.restorable {
            match state.open_version(id).and_then(|r| Ok((r.digest_from_index()?, r.top().footer.source_digest))) {
                Ok((actual, expected)) if actual == expected => v.digest_verified = true,
                Ok((actual, expected)) => {
                    v.restorable = false;
                    v.problem = Some(format!(
                        "its blocks do not add up to the digest recorded at backup (expected {}, found {})",
                        hex(&expected),
                        hex(&actual)
                    ));
                }
                Err(e) => {
                    v.restorable = false;
                    v.problem = Some(e.to_string());
                }
            }
        }
        versions.push(v);
    }
    let ok = image_reports.iter().all(|r| r.sound) && versions.iter().all(|v| v.restorable);
    Ok(VerifyReport { ok, images: image_reports, versions })
}

fn check_image(
    image: &ImageFile,
    quick: bool,
    report: &mut ImageReport,
    patches: &mut PatchChecks,
    progress: &dyn Progress,
) {
    const CHUNK: usize = 256;
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(CHUNK);
    let mut stream = image.stream_entries();
    // Stored bytes are written in order, and entries that share them point back: an entry
    // beyond this offset is the first to name its bytes (progress counts each once).
    let mut stored_frontier = 0u64;
    loop {
        entries.clear();
        for entry in stream.by_ref().take(CHUNK) {
            match entry {
                Ok(e) => entries.push(e),
                Err(e) => {
                    report.problems.push(e.to_string());
                    return;
                }
            }
        }
        if entries.is_empty() {
            return;
        }
        report.blocks_checked += entries.len() as u64;
        if quick {
            continue;
        }
        for e in entries.iter().filter(|e| e.encoding.is_patch()) {
            patches.add(image.header.version, *e);
        }
        let bad: Vec<FormatError> = entries
            .par_iter()
            .map_init(
                || (ReadScratch::new(), vec![0u8; image.header.block_size as usize]),
                |(scratch, out), entry| check_block(image, entry, scratch, out).err(),
            )
            .flatten()
            .collect();
        for e in &entries {
            if e.stored_len > 0 && e.data_offset >= stored_frontier {
                progress.advance(u64::from(e.stored_len));
                stored_frontier = e.data_offset + u64::from(e.stored_len);
            }
        }
        record_bad(report, bad);
    }
}

/// Counts `bad` blocks against `report` and lists the first of them.
fn record_bad(report: &mut ImageReport, bad: Vec<FormatError>) {
    report.bad_blocks += bad.len() as u64;
    for e in bad {
        if report.problems.len() < LISTED_PROBLEMS {
            report.problems.push(e.to_string());
        }
    }
}

/// Checks one stored block against its entry (a patch: only that its parts decode; its content
/// is checked over its base by `patch_check`).
fn check_block(
    image: &ImageFile,
    entry: &IndexEntry,
    scratch: &mut ReadScratch,
    out: &mut [u8],
) -> strata_format::Result<()> {
    match entry.encoding {
        Encoding::Zero => return Ok(()),
        Encoding::Patch | Encoding::PatchGroup => return image.check_patch_frame(entry, scratch),
        _ => image.read_block(entry, scratch, out)?,
    }
    if hash_block(out) != entry.hash {
        return Err(FormatError::HashMismatch {
            loc: image.loc().block(entry.block).at(entry.data_offset),
            block: entry.block,
        });
    }
    Ok(())
}
