//! The backup engine: read the source once in large sequential batches, hash every block on all
//! cores, compare with the parent version's block hashes, store each changed content once per
//! image (`dedup`) with runs of adjacent changed blocks compressed together (`pack`), and write
//! one new image that is published only when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use strata_format::block::{hash_block, is_zero};
use strata_format::digest::{zero_block_hash, SourceDigest};
use strata_format::header::new_id;
use strata_format::layout::{DEFAULT_BLOCK_SIZE, TEMP_PREFIX};
use strata_format::repo::image_file_name;
use strata_format::{
    Finish, HashCursor, ImageHeader, ImageRef, ImageWriter, IndexEntry, Kind, Repository, VersionReader,
};

use crate::config::{Scheme, TaskConfig};
use crate::dedup::Dedup;
use crate::merge::merge_version;
use crate::pack::pack;
use crate::plan::plan;
use crate::progress::Progress;
use crate::prune::prune_locked;
use crate::source::Source;

/// Bytes of source read and processed per batch.
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The source; `None` takes the one recorded in the repository's strata.toml.
    pub source: Option<PathBuf>,
    pub repo: PathBuf,
    pub kind: Option<Kind>,
    pub block_size: Option<u32>,
    /// zstd level; `None` takes the repository's configured compression.
    pub level: Option<i32>,
    pub label: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub id: u64,
    pub kind: &'static str,
    /// Why this kind (the scheme rule, or what was asked).
    pub rule: &'static str,
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
    /// Versions merged into a full after the backup (incremental-forever's max_chain).
    pub merged: Vec<u64>,
    /// Versions deleted after the backup (the merged-away full, retention).
    pub deleted: Vec<u64>,
}

/// Opens the repository at `path`, creating it when the folder is missing or empty.
pub fn open_or_create_repo(path: &Path, block_size: Option<u32>) -> Result<Repository> {
    // Empty, or holding only what an interrupted creation left (`.tmp-*`).
    let only_leftovers = |p: &Path| {
        p.read_dir()
            .map(|d| d.flatten().all(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX)))
            .unwrap_or(false)
    };
    let fresh = !path.exists() || (!path.join(strata_format::layout::REPO_FILE).exists() && only_leftovers(path));
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Same as the parent (or zero in a full): nothing recorded.
    Unchanged,
    /// Zero now, not zero in the parent.
    Zero,
    /// Changed: stored (packed with its neighbours, see `pack`).
    Store,
}

struct BlockResult {
    zero: bool,
    hash: [u8; 32],
    action: Action,
}

pub fn backup(req: &BackupRequest, progress: &dyn Progress) -> Result<BackupSummary> {
    let started = Instant::now();
    // The source is opened before anything is created, so a bad source leaves no repository.
    let existing = Repository::open(&req.repo).ok();
    let mut config = match &existing {
        Some(r) => TaskConfig::load(r.path())?,
        None => TaskConfig::default(),
    };
    let source_path = match (&req.source, &config.source) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => bail!(
            "{}: no source recorded; give one (`strata backup SOURCE REPO`) or set it with `strata config REPO --source DEV`",
            req.repo.display()
        ),
    };
    let source = Source::open(&source_path)?;
    if let (Ok(canon), Ok(repo_canon)) = (source_path.canonicalize(), req.repo.canonicalize()) {
        if canon.starts_with(&repo_canon) {
            bail!("{}: the source lies inside the repository", source_path.display());
        }
    }
    let mut repo = open_or_create_repo(&req.repo, req.block_size)?;
    let level = match req.level {
        Some(l) => l,
        None => crate::config::compression_level(&config.compression)?,
    };
    let lock = repo.lock()?;
    for leftover in repo.remove_leftovers(&lock)? {
        log::warn!("removed {} left by an interrupted backup", leftover.display());
    }
    if existing.is_some() {
        config = TaskConfig::load(repo.path())?; // what `strata config` may have changed meanwhile
    }
    if config.source.is_none() {
        config.source = Some(source_path.canonicalize().unwrap_or_else(|_| source_path.clone()));
        config.save(repo.path())?;
        log::info!("recorded the source {} in {}", source_path.display(), crate::config::CONFIG_FILE);
    }
    let mut state = repo.scan()?;
    state.check_indexes();
    let (now_secs, now_nanos) = crate::config::now()?;
    let plan = plan(req.kind, &state, source.size(), &config, now_secs, repo.last_source_full);
    for note in &plan.notes {
        log::warn!("{note}");
    }
    let parent = if plan.parent_chain.is_empty() {
        None
    } else {
        Some(VersionReader::from_chain(plan.parent_chain.clone()).context("opening the parent version")?)
    };
    let id = repo.next_version_id(&state)?;
    let image_id = new_id();
    let (parent_ref, full_ref) = match &parent {
        None => (None, ImageRef { version: id, image_id }),
        Some(p) => {
            let top = &p.top().header;
            (Some(ImageRef { version: top.version, image_id: top.image_id }), p.layers()[0].header.full)
        }
    };
    let header = ImageHeader {
        repo_id: repo.repo_id,
        image_id,
        version: id,
        kind: plan.kind,
        rule: plan.rule,
        parent: parent_ref,
        full: full_ref,
        block_size: repo.block_size,
        compression_level: level,
        source_size: source.size(),
        created_secs: now_secs,
        created_nanos: now_nanos,
        label: req.label.clone(),
        source: source_path.display().to_string(),
    };
    let total_blocks = header.block_count();
    let mut writer = ImageWriter::create(repo.temp_image_path(id), repo.image_path(id), header)?;
    let outcome = copy_blocks(&source, parent.as_ref(), repo.block_size, level, &mut writer, progress)?;
    let changed_blocks = writer.entry_count();
    let stored_bytes = writer.stored_bytes();
    let finish = Finish { present_blocks: outcome.present_blocks, source_digest: outcome.digest };
    let source_full = (plan.kind == Kind::Full).then_some(now_secs);
    let path = writer.finish_with(finish, || repo.record_published(&lock, id, source_full))?;
    log::info!("published {}", path.display());
    let seconds = started.elapsed().as_secs_f64();
    drop(parent);

    let (mut merged, mut deleted) = (Vec::new(), Vec::new());
    if let (Scheme::IncrementalForever, Some(k)) = (config.scheme, config.max_chain) {
        let (m, d) = keep_chain_short(&repo, &lock, id, k as usize, config.retention.is_empty(), progress)?;
        merged.extend(m);
        deleted.extend(d);
    }
    if !config.retention.is_empty() {
        let report = prune_locked(&repo, &lock, &config.retention, false, progress)?;
        for d in report.decisions {
            match d.action {
                crate::prune::Action::Merge => merged.push(d.id),
                crate::prune::Action::Delete => deleted.push(d.id),
                _ => {}
            }
        }
    }
    drop(lock);
    Ok(BackupSummary {
        id,
        kind: plan.kind.as_str(),
        rule: plan.rule.as_str(),
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
        merged,
        deleted,
    })
}

/// incremental-forever: when the chain of `id` is longer than `max_chain` images, merge the
/// version `max_chain - 1` below it into a full, so the chain is `max_chain` long again. Without
/// retention rules the versions below the merged one are deleted when nothing needs them
/// (they were merged into it); with retention rules prune decides, right after.
fn keep_chain_short(
    repo: &Repository,
    lock: &strata_format::RepoLock,
    id: u64,
    max_chain: usize,
    delete_merged_away: bool,
    progress: &dyn Progress,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let (mut merged, mut deleted) = (Vec::new(), Vec::new());
    let mut state = repo.scan()?;
    state.check_indexes();
    let Ok(chain) = state.chain(id) else { return Ok((merged, deleted)) };
    if chain.len() <= max_chain {
        return Ok((merged, deleted));
    }
    let new_base = chain[chain.len() - max_chain].header.version;
    merge_version(&state, lock, new_base, progress)?;
    merged.push(new_base);
    if delete_merged_away {
        let below: Vec<u64> = chain.iter().map(|i| i.header.version).filter(|&v| v < new_base).collect();
        let state = repo.scan()?;
        for &old in below.iter().rev() {
            let needed = state.ids().any(|v| v != old && !deleted.contains(&v) && state.status(v).chain.contains(&old));
            if needed {
                continue;
            }
            let path = repo.image_path(old);
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot delete", path.display()))?;
            strata_format::fault::step(strata_format::fault::Step::Delete);
            deleted.push(old);
            log::info!("version {old} merged into version {new_base} and deleted (max_chain {max_chain})");
        }
        if !deleted.is_empty() {
            strata_format::image::sync_dir(repo.path())?;
        }
    }
    Ok((merged, deleted))
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
    let mut dedup = Dedup::default();
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
                .map(|(block, parent)| classify(block, *parent, zero_hash))
                .collect();
            let hashes: Vec<[u8; 32]> = results.iter().map(|r| r.hash).collect();
            // A content stored before (in this image, or earlier in this batch) is not stored again.
            let mut first_in_batch: HashMap<[u8; 32], usize> = HashMap::new();
            let store: Vec<bool> = results
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.action == Action::Store
                        && dedup.find(&r.hash).is_none()
                        && *first_in_batch.entry(r.hash).or_insert(i) == i
                })
                .collect();
            let mut units = pack(&buf, bs, &store, level).into_iter().peekable();
            let mut written = Vec::new();
            let mut written_in_batch: HashMap<[u8; 32], IndexEntry> = HashMap::new();
            for (i, r) in results.iter().enumerate() {
                let b = start + i as u64;
                digest.push(&r.hash);
                present_blocks += u64::from(!r.zero);
                match r.action {
                    Action::Unchanged => {}
                    Action::Zero => {
                        writer.append_zero(b, zero_hash)?;
                    }
                    Action::Store if store[i] => {
                        if let Some(unit) = units.next_if(|u| u.first() == i) {
                            written.clear();
                            unit.write(writer, start, &buf, bs, &hashes, &mut written)?;
                            for e in &written {
                                dedup.remember(e);
                                written_in_batch.insert(e.hash, *e);
                            }
                        }
                    }
                    Action::Store => {
                        let like = dedup
                            .find(&r.hash)
                            .or_else(|| written_in_batch.get(&r.hash))
                            .copied()
                            .expect("a duplicate's first copy is written before it");
                        writer.append_ref(b, r.hash, &like)?;
                    }
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
fn classify(block: &[u8], parent: Option<Option<[u8; 32]>>, zero_hash: [u8; 32]) -> BlockResult {
    if is_zero(block) {
        let action = match parent {
            Some(Some(_)) => Action::Zero,
            _ => Action::Unchanged,
        };
        return BlockResult { zero: true, hash: zero_hash, action };
    }
    let hash = hash_block(block);
    let action = if parent == Some(Some(hash)) { Action::Unchanged } else { Action::Store };
    BlockResult { zero: false, hash, action }
}
