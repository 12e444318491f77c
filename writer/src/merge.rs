//! Merge: rewrite a version as a full built from its chain (a synthetic full), without reading
//! the source. Stored blocks are copied as they are (crc32c checked), so it costs one read and
//! one write of the version's data and memory as for reading it. The new image keeps the
//! version's id, image id, time and digest, and replaces the old one by an atomic rename, so
//! every version depending on it stays restorable and byte-identical whatever the moment of a
//! crash (SPEC.md §4.1).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use strata_format::{Encoding, Finish, ImageHeader, ImageRef, ImageWriter, Kind, RepoLock, RepoState, Rule};

use crate::progress::Progress;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub id: u64,
    /// Versions the old chain of `id` went through, full first (now no longer needed by it).
    pub old_chain: Vec<u64>,
    pub blocks: u64,
    pub old_bytes: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

/// Rewrites version `id` as a full. Needs the repository lock.
pub fn merge_version(state: &RepoState, _lock: &RepoLock, id: u64, progress: &dyn Progress) -> Result<MergeSummary> {
    let started = Instant::now();
    let repo = &state.repo;
    let chain = state
        .chain(id)
        .map_err(|why| anyhow::anyhow!("{}: version {id} cannot be merged: {why}", repo.path().display()))?;
    let top = chain[chain.len() - 1].clone();
    if top.header.kind == Kind::Full {
        bail!("{}: version {id} is already a full", repo.path().display());
    }
    let old_chain: Vec<u64> = chain.iter().map(|i| i.header.version).collect();
    let old_bytes = std::fs::metadata(top.path()).map(|m| m.len()).unwrap_or(0);
    let reader = strata_format::VersionReader::from_chain(chain)?;
    let digest = reader.digest_from_index()?;
    if digest != top.footer.source_digest {
        bail!("{}: version {id}'s chain does not add up to its digest; run `strata verify`", top.path().display());
    }
    let header = ImageHeader {
        kind: Kind::Full,
        rule: Rule::Merged,
        parent: None,
        full: ImageRef { version: id, image_id: top.header.image_id },
        ..top.header.clone()
    };
    let mut writer = ImageWriter::create(repo.temp_image_path(id), repo.image_path(id), header)?;
    let mut stored = Vec::new();
    progress.begin("merge", reader.source_size());
    for block in 0..reader.block_count() {
        if let Some((image, entry)) = reader.entry(block)? {
            debug_assert!(entry.encoding != Encoding::Zero);
            image.read_stored(&entry, &mut stored)?;
            writer.append_block(block, entry.encoding, &stored, entry.hash)?;
        }
        progress.advance(u64::from(reader.block_size()));
    }
    progress.end();
    let blocks = writer.entry_count();
    let path = writer
        .finish(Finish { present_blocks: top.footer.present_blocks, source_digest: top.footer.source_digest })
        .with_context(|| format!("publishing the merged version {id}"))?;
    let new_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    log::info!("merged version {id} into a full ({blocks} blocks)");
    Ok(MergeSummary { id, old_chain, blocks, old_bytes, new_bytes, seconds: started.elapsed().as_secs_f64() })
}
