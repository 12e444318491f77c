//! The backup engine: read the source once in large sequential batches, hash every block and
//! compress the changed ones on all cores, compare with the parent version's block hashes, and
//! write one new image that is published only when complete.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use strata_format::block::{compress_into, hash_block, is_zero};
use strata_format::digest::{zero_block_hash, SourceDigest};
use strata_format::header::new_id;
use strata_format::layout::DEFAULT_BLOCK_SIZE;
use strata_format::repo::image_file_name;
use strata_format::{
    Encoding, Finish, HashCursor, ImageHeader, ImageRef, ImageWriter, Kind, Repository, VersionReader,
};

use crate::plan::plan;
use crate::progress::Progress;
use crate::source::Source;

/// Bytes of source read and processed per batch.
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub source: PathBuf,
    pub repo: PathBuf,
    pub kind: Option<Kind>,
    pub block_size: Option<u32>,
    pub level: i32,
    pub label: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub id: u64,
    pub kind: &'static str,
    pub parent: Option<u64>,
    pub file: String,
    pub changed_blocks: u64,
    pub total_blocks: u64,
    pub bytes_read: u64,
    pub stored_bytes: u64,
    pub source_size: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub notes: Vec<String>,
}

/// Opens the repository at `path`, creating it when the folder is missing or empty.
pub fn open_or_create_repo(path: &Path, block_size: Option<u32>) -> Result<Repository> {
    let fresh = !path.exists() || path.read_dir().map(|mut d| d.next().is_none()).unwrap_or(false);
    if fresh {
        let repo = Repository::create(path, block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?;
        log::info!("created repository {} (block size {})", path.display(), repo.block_size);
        return Ok(repo);
    }
    let repo = Repository::open(path)?;
    if let Some(bs) = block_size {
        if bs != repo.block_size {
            bail!(
                "{}: the repository's block size is {}; it is fixed per repository (use a new repository for {bs})",
                path.display(),
                repo.block_size
            );
        }
    }
    Ok(repo)
}

enum Action {
    /// Same as the parent (or zero in a full): nothing recorded.
    Unchanged,
    /// Zero now, not zero in the parent.
    Zero,
    Store(Encoding, Vec<u8>),
}

struct BlockResult {
    zero: bool,
    hash: [u8; 32],
    action: Action,
}

pub fn backup(req: &BackupRequest, progress: &dyn Progress) -> Result<BackupSummary> {
    let started = Instant::now();
    let source = Source::open(&req.source)?;
    if let Ok(canon) = req.source.canonicalize() {
        if let Ok(repo_canon) = req.repo.canonicalize() {
            if canon.starts_with(&repo_canon) {
                bail!("{}: the source lies inside the repository", req.source.display());
            }
        }
    }
    let mut repo = open_or_create_repo(&req.repo, req.block_size)?;
    let lock = repo.lock()?;
    for leftover in repo.remove_leftovers(&lock)? {
        log::warn!("removed {} left by an interrupted backup", leftover.display());
    }
    let mut state = repo.scan()?;
    state.check_indexes();
    let plan = plan(req.kind, &state, source.size());
    for note in &plan.notes {
        log::warn!("{note}");
    }
    let parent = if plan.parent_chain.is_empty() {
        None
    } else {
        Some(VersionReader::from_chain(plan.parent_chain.clone()).context("opening the parent version")?)
    };
    let id = repo.next_version_id(&state);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let image_id = new_id();
    let (parent_ref, full_ref) = match &parent {
        None => (None, ImageRef { version: id, image_id }),
        Some(p) => {
            let top = &p.top().header;
            (Some(ImageRef { version: top.version, image_id: top.image_id }), top.full)
        }
    };
    let header = ImageHeader {
        repo_id: repo.repo_id,
        image_id,
        version: id,
        kind: plan.kind,
        parent: parent_ref,
        full: full_ref,
        block_size: repo.block_size,
        compression_level: req.level,
        source_size: source.size(),
        created_secs: now.as_secs() as i64,
        created_nanos: now.subsec_nanos(),
        label: req.label.clone(),
        source: req.source.display().to_string(),
    };
    let total_blocks = header.block_count();
    let mut writer = ImageWriter::create(repo.temp_image_path(id), repo.image_path(id), header)?;
    let outcome = copy_blocks(&source, parent.as_ref(), repo.block_size, req.level, &mut writer, progress)?;
    let changed_blocks = writer.entry_count();
    let stored_bytes = writer.stored_bytes();
    let path = writer.finish(Finish { present_blocks: outcome.present_blocks, source_digest: outcome.digest })?;
    repo.record_published(&lock, id)?;
    drop(lock);
    let seconds = started.elapsed().as_secs_f64();
    log::info!("published {}", path.display());
    Ok(BackupSummary {
        id,
        kind: plan.kind.as_str(),
        parent: parent_ref.map(|p| p.version),
        file: image_file_name(id),
        changed_blocks,
        total_blocks,
        bytes_read: source.bytes_read(),
        stored_bytes,
        source_size: source.size(),
        seconds,
        mb_per_s: crate::units::mb_per_s(source.size(), seconds),
        notes: plan.notes,
    })
}

struct Outcome {
    present_blocks: u64,
    digest: [u8; 32],
}

/// The pipeline: a reader thread fills batches, all cores hash and compress a batch, this thread
/// compares, appends to the image and feeds the digest in block order.
fn copy_blocks(
    source: &Source,
    parent: Option<&VersionReader>,
    block_size: u32,
    level: i32,
    writer: &mut ImageWriter,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let bs = block_size as usize;
    let total_blocks = source.size().div_ceil(block_size as u64);
    let batch_blocks = (BATCH_BYTES / bs).max(1) as u64;
    let zero_hash = zero_block_hash(block_size);
    let mut digest = SourceDigest::new(source.size(), block_size);
    let mut present_blocks = 0u64;
    let mut parent_hashes = parent.map(HashCursor::new);
    progress.begin("backup", source.size());

    let (full_tx, full_rx) = sync_channel::<Result<(u64, Vec<u8>)>>(2);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);
    let result = std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || {
            let mut start = 0u64;
            while start < total_blocks {
                let n = batch_blocks.min(total_blocks - start);
                let mut buf = free_rx.try_recv().unwrap_or_default();
                buf.resize(n as usize * bs, 0);
                let read = source.read_into(start * bs as u64, &mut buf).map(|_| (start, buf));
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
                start += n;
            }
        });
        for batch in full_rx {
            let (start, buf) = batch?;
            let n = (buf.len() / bs) as u64;
            let mut parents = Vec::with_capacity(n as usize);
            for b in start..start + n {
                parents.push(match parent_hashes.as_mut() {
                    Some(cursor) => Some(cursor.hash(b)?),
                    None => None,
                });
            }
            let results: Vec<BlockResult> = buf
                .par_chunks(bs)
                .zip(parents.par_iter())
                .map_init(
                    || (zstd::bulk::Compressor::new(level).expect("zstd compressor"), Vec::new()),
                    |(compressor, scratch), (block, parent)| classify(block, *parent, zero_hash, compressor, scratch),
                )
                .collect();
            for (i, r) in results.into_iter().enumerate() {
                let b = start + i as u64;
                digest.push(&r.hash);
                present_blocks += u64::from(!r.zero);
                match r.action {
                    Action::Unchanged => {}
                    Action::Zero => writer.append_zero(b, zero_hash)?,
                    Action::Store(encoding, bytes) => writer.append_block(b, encoding, &bytes, r.hash)?,
                }
            }
            progress.advance((buf.len() as u64).min(source.size() - start * bs as u64));
            let _ = free_tx.try_send(buf);
        }
        Ok(())
    });
    progress.end();
    result?;
    Ok(Outcome { present_blocks, digest: digest.finish() })
}

/// Decides what to record for one block given the parent's view of it (`None`: no parent, a
/// full; `Some(None)`: zero in the parent; `Some(Some(h))`: content hash `h` in the parent).
fn classify(
    block: &[u8],
    parent: Option<Option<[u8; 32]>>,
    zero_hash: [u8; 32],
    compressor: &mut zstd::bulk::Compressor<'_>,
    scratch: &mut Vec<u8>,
) -> BlockResult {
    if is_zero(block) {
        let action = match parent {
            Some(Some(_)) => Action::Zero,
            _ => Action::Unchanged,
        };
        return BlockResult { zero: true, hash: zero_hash, action };
    }
    let hash = hash_block(block);
    if parent == Some(Some(hash)) {
        return BlockResult { zero: false, hash, action: Action::Unchanged };
    }
    let action = match compress_into(compressor, block, scratch) {
        Encoding::Zstd => Action::Store(Encoding::Zstd, scratch.clone()),
        _ => Action::Store(Encoding::Raw, block.to_vec()),
    };
    BlockResult { zero: false, hash, action }
}
