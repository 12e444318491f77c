//! The backup engine: read the source once, batch by batch, hash every block on all cores
//! (cached data in place through a memory map), compare with the parent version's block hashes,
//! store each changed content once per image (`dedup`), a block changed in a few pages as a
//! patch (`patch`), the stored blocks gathered into frames of a few MiB (`pack`), and write one
//! new image that is published only when complete.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use strata_format::block::{hash_block, is_zero};
use strata_format::digest::{zero_block_hash, SourceDigest};
use strata_format::header::{new_id, BlockSelection};
use strata_format::layout::{DEFAULT_BLOCK_SIZE, LOCK_FILE, REPO_FILE, TEMP_PREFIX};
use strata_format::repo::{image_file_name, parse_image_file_name};
use strata_format::storage::{Folder, Storage};
use strata_format::{
    Finish, HashCursor, ImageHeader, ImageRef, ImageWriter, IndexEntry, Kind, Repository, VersionReader,
};

use crate::config::{Scheme, TaskConfig};
use crate::dedup::{Decision, Dedup, Stored};
use crate::merge::merge_version;
use crate::pack::{Packer, Pending, Unit};
use crate::patch::{PatchFrame, Patcher};
use crate::plan::plan;
use crate::progress::Progress;
use crate::prune::prune_locked;
use crate::source::{Fill, Source};
use crate::source_map::SourceMap;

#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The source; `None` takes the one recorded in the repository's strata.toml.
    pub source: Option<PathBuf>,
    pub repo: PathBuf,
    /// Where the repository lives when it is not the folder `repo`, which then only names it in
    /// messages (the crash tests put it on a disk that loses unsynced writes).
    pub storage: Option<Arc<dyn Storage>>,
    pub kind: Option<Kind>,
    pub block_size: Option<u32>,
    /// zstd level; `None` takes the repository's configured compression.
    pub level: Option<i32>,
    pub label: String,
    /// Store every byte, not only the blocks the file systems use (or the task's
    /// `sector_by_sector` says so).
    pub sector_by_sector: bool,
}

/// One region of the source as the backup found it (see `strata_format::volume`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionSummary {
    /// The partition number; `None` for a source without a partition table.
    pub partition: Option<u32>,
    pub start: u64,
    pub bytes: u64,
    pub file_system: Option<&'static str>,
    /// `used` (only the blocks the file system uses were read) or `whole`.
    pub blocks: &'static str,
    pub unused_bytes: u64,
    /// Why the region was kept whole.
    pub reason: Option<String>,
}

impl RegionSummary {
    pub fn from_region(r: &strata_format::volume::Region) -> RegionSummary {
        RegionSummary {
            partition: r.partition,
            start: r.start,
            bytes: r.len,
            file_system: r.file_system,
            blocks: if r.kept_whole.is_some() { "whole" } else { "used" },
            unused_bytes: r.unused_bytes,
            reason: r.kept_whole.clone(),
        }
    }

    /// "partition 2 (ext4)", "the whole source (unknown)".
    pub fn name(&self) -> String {
        let place = match self.partition {
            Some(n) => format!("partition {n}"),
            None => "the source".to_string(),
        };
        format!("{place} ({})", self.file_system.unwrap_or("no known file system"))
    }
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
    /// Bytes read from the source (holes are not read) per second, in MiB.
    pub mib_per_s: f64,
    pub notes: Vec<String>,
    /// `used` (only the blocks the file systems use) or `every` (sector by sector).
    pub blocks: &'static str,
    /// Bytes the file systems do not use, left out (they read back as zeros).
    pub unused_bytes: u64,
    /// The regions of the source and how each was read (empty for a sector-by-sector backup).
    pub regions: Vec<RegionSummary>,
    /// Versions merged into a full after the backup (incremental-forever's max_chain).
    pub merged: Vec<u64>,
    /// Versions deleted after the backup (the merged-away full, retention).
    pub deleted: Vec<u64>,
}

/// Opens the repository `req` names.
fn open_repo(req: &BackupRequest) -> strata_format::Result<Repository> {
    match &req.storage {
        Some(storage) => Repository::open_in(storage.clone()),
        None => Repository::open(&req.repo),
    }
}

/// Opens the repository `req` names (unless `opened` is it already), creating it when its
/// folder is missing or empty. Says whether it created it.
fn open_or_create_repo(req: &BackupRequest, opened: Option<Repository>) -> Result<(Repository, bool)> {
    let (path, block_size) = (&req.repo, req.block_size);
    // Empty, or holding only what an interrupted creation left (`.tmp-*`).
    let only_leftovers = |storage: &dyn Storage| {
        storage.list().map(|names| names.iter().all(|(name, _)| name.starts_with(TEMP_PREFIX))).unwrap_or(false)
    };
    let fresh = opened.is_none()
        && match &req.storage {
            Some(storage) => only_leftovers(&**storage),
            None => !path.exists() || (!path.join(REPO_FILE).exists() && only_leftovers(&Folder::new(path))),
        };
    if fresh {
        let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        let repo = match &req.storage {
            Some(storage) => Repository::create_in(storage.clone(), block_size)?,
            None => Repository::create(path, block_size)?,
        };
        log::info!("created repository {} (block size {})", path.display(), repo.block_size);
        return Ok((repo, true));
    }
    let repo = match opened {
        Some(repo) => repo,
        None => open_repo(req)?,
    };
    if let Some(bs) = block_size {
        if bs != repo.block_size {
            bail!(
                "{}: the repository's block size is {}; it is fixed per repository (use a new repository for {})",
                path.display(),
                crate::units::size(repo.block_size.into()),
                crate::units::size(bs.into())
            );
        }
    }
    Ok((repo, false))
}

/// The version of the parent chain whose damage `error` reports, if it reports one.
fn damaged_parent(error: &anyhow::Error, plan: &crate::plan::Plan) -> Option<u64> {
    let version = error.chain().find_map(|c| c.downcast_ref::<strata_format::FormatError>())?.damaged_version()?;
    plan.parent_chain.iter().any(|image| image.header.version == version).then_some(version)
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
    let folder_existed = req.repo.exists();
    let mut created = false;
    let result = backup_into(req, progress, folder_existed, &mut created);
    if result.is_err() && created && req.storage.is_none() {
        forget_new_repository(&req.repo, !folder_existed);
    }
    result
}

/// After a failed first backup: removes the repository that backup created (its identity,
/// task and lock files, and the folder when the backup made it), so that a failed start leaves
/// nothing behind. Anything else in the folder (an image, a file of the user's) keeps it.
fn forget_new_repository(path: &Path, remove_folder: bool) {
    let holds_images = path
        .read_dir()
        .map(|d| d.flatten().any(|e| parse_image_file_name(&e.file_name().to_string_lossy()).is_some()))
        .unwrap_or(true);
    if holds_images {
        return;
    }
    let folder = Folder::new(path);
    for name in NEW_REPOSITORY_FILES {
        if matches!(folder.kind(name), Ok(Some(_))) {
            if let Err(e) = folder.remove(name) {
                log::warn!("{e}");
            }
        }
    }
    if remove_folder {
        match std::fs::remove_dir(path) {
            Ok(()) => log::info!("removed {}, which this failed first backup had created", path.display()),
            Err(e) => log::warn!("{}: could not remove the folder this failed backup created: {e}", path.display()),
        }
    } else {
        log::info!("removed the repository files this failed first backup had created in {}", path.display());
    }
}

/// The files a new repository holds before its first version.
const NEW_REPOSITORY_FILES: [&str; 3] = [crate::config::CONFIG_FILE, LOCK_FILE, REPO_FILE];

/// `NEW_REPOSITORY_FILES` in the folder `path`.
fn new_repository_files(path: &Path) -> [PathBuf; 3] {
    NEW_REPOSITORY_FILES.map(|name| path.join(name))
}

/// Reads which blocks of the source its file systems use and leaves the rest out of the
/// backup, unless every byte is asked for. A source in use read-write is refused: its
/// allocation maps would be stale by the time its blocks are read.
fn select_blocks(source: &mut Source, path: &Path, every_byte: bool) -> Result<(BlockSelection, Vec<RegionSummary>)> {
    if every_byte {
        return Ok((BlockSelection::Every, Vec::new()));
    }
    if let Some(why) = source.in_use_read_write() {
        bail!(
            "{}: {why}; a backup of only the blocks a live file system uses could miss what is written meanwhile. \
             Unmount it (or mount it read-only), back up a snapshot, or back up every byte with --sector-by-sector",
            path.display()
        );
    }
    let analysis = strata_format::volume::analyse(&*source, source.size());
    let regions: Vec<RegionSummary> = analysis.regions.iter().map(RegionSummary::from_region).collect();
    for region in &regions {
        match (&region.reason, region.file_system) {
            (Some(why), Some(_)) => log::warn!("{}: {} kept whole: {why}", path.display(), region.name()),
            (Some(why), None) => log::info!("{}: {} kept whole: {why}", path.display(), region.name()),
            (None, _) => log::info!(
                "{}: {}: {} unused, left out",
                path.display(),
                region.name(),
                crate::units::size(region.unused_bytes)
            ),
        }
    }
    let unused_bytes = analysis.unused_bytes();
    source.leave_out(analysis.into_unused());
    Ok((BlockSelection::Used { unused_bytes }, regions))
}

fn backup_into(
    req: &BackupRequest,
    progress: &dyn Progress,
    folder_existed: bool,
    created: &mut bool,
) -> Result<BackupSummary> {
    let started = Instant::now();
    // The source is opened before anything is created, so a bad source leaves no repository.
    let existing = open_repo(req).ok();
    let mut config = match &existing {
        Some(r) => TaskConfig::load(r)?,
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
    let mut source = Source::open(&source_path)?;
    let identity = source.identity(&source_path)?;
    let (selection, regions) =
        select_blocks(&mut source, &source_path, req.sector_by_sector || config.sector_by_sector)?;
    if let (Ok(canon), Ok(repo_canon)) = (source_path.canonicalize(), req.repo.canonicalize()) {
        if canon.starts_with(&repo_canon) {
            bail!("{}: the source lies inside the repository", source_path.display());
        }
    }
    let had_repo = existing.is_some();
    let (mut repo, fresh) = open_or_create_repo(req, existing)?;
    *created = fresh;
    let level = match req.level {
        Some(l) => l,
        None => crate::config::compression_level(&config.compression)?,
    };
    let lock = repo.lock()?;
    match repo.remove_leftovers(&lock)?.as_slice() {
        [] => {}
        [one] => log::warn!("removed {}, left by an interrupted command", one.display()),
        [first, rest @ ..] => log::warn!(
            "removed {} temporary files or links left in the repository (by interrupted commands, or planted), {} and \
             {} more",
            rest.len() + 1,
            first.display(),
            rest.len()
        ),
    }
    if had_repo {
        config = TaskConfig::load(&repo)?; // what `strata config` may have changed meanwhile
    }
    if config.source.is_none() {
        config.source = Some(identity.name.clone());
        config.save(&repo)?;
        log::info!("recorded the source {} in {}", source_path.display(), crate::config::CONFIG_FILE);
    }
    let mut state = repo.scan()?;
    state.check_indexes();
    let (now_secs, now_nanos) = crate::config::now()?;
    let mut damage_notes = Vec::new();
    // A parent block that turns out damaged while this backup reads it marks its image damaged
    // and the backup starts again on what is still sound, so that one rotted block never stops
    // every later backup.
    let (mut plan, parent, id, parent_ref, total_blocks, writer, outcome) = loop {
        let plan = plan(req.kind, &state, source.size(), &identity, &config, now_secs, repo.last_source_full);
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
            source: identity.name.display().to_string(),
            source_id: Some(identity.id),
            selection,
        };
        let total_blocks = header.block_count();
        let mut writer = repo.create_image(id, header)?;
        if req.storage.is_none() {
            // What a fault reading a mapped source (SIGBUS) removes before the process dies.
            let mut on_fault = vec![writer.temp_path().to_path_buf()];
            if *created {
                on_fault.extend(new_repository_files(repo.path()));
            }
            crate::source_map::remove_on_fault(&on_fault, (*created && !folder_existed).then_some(repo.path()));
        }
        match copy_blocks(&source, parent.as_ref(), repo.block_size, level, &mut writer, progress) {
            Ok(outcome) => {
                crate::source_map::remove_on_fault(&[], None);
                break (plan, parent, id, parent_ref, total_blocks, writer, outcome);
            }
            Err(e) => {
                if e.downcast_ref::<crate::interrupt::Interrupted>().is_some() {
                    return Err(e.context("backup stopped: no version was written, the unfinished image was removed"));
                }
                let Some(damaged) = damaged_parent(&e, &plan) else { return Err(e) };
                drop(writer);
                let note = format!(
                    "version {damaged} is damaged ({e:#}); this backup does not build on it, and neither do \
                     the versions that need it (`strata verify {}` shows which)",
                    repo.path().display()
                );
                log::warn!("{note}");
                state.mark_damaged(damaged, format!("{e:#}"));
                damage_notes.push(note);
            }
        }
    };
    for note in &plan.notes {
        log::warn!("{note}");
    }
    plan.notes.extend(damage_notes);
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
        mib_per_s: crate::units::mib_per_s(source.bytes_read(), seconds),
        notes: plan.notes,
        blocks: selection.name(),
        unused_bytes: selection.unused_bytes(),
        regions,
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
            repo.remove_image(lock, old)?;
            deleted.push(old);
            log::info!("version {old} merged into version {new_base} and deleted (max_chain {max_chain})");
        }
        if !deleted.is_empty() {
            repo.sync()?;
        }
    }
    Ok((merged, deleted))
}

struct Outcome {
    present_blocks: u64,
    digest: [u8; 32],
}

/// The pipeline, in three stages that overlap: a scanner thread reads each batch on all cores
/// (hashing data in place through a memory map where it is cached, see `scan_batch`), a packer
/// thread decides what to store and compresses it on all cores (gathered frames in the
/// background while it packs the next batch, see `Packer::compress`), and this thread appends
/// to the image in block order, waiting for each frame's compression, and feeds the digest.
fn copy_blocks(
    source: &Source,
    parent: Option<&VersionReader>,
    block_size: u32,
    level: i32,
    writer: &mut ImageWriter,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let bs = block_size as usize;
    let zero_hash = zero_block_hash(block_size);
    let mut digest = SourceDigest::new(source.size(), block_size);
    let mut present_blocks = 0u64;
    let mut stored = Stored::default();
    progress.begin("backup", source.size());

    let (scanned_tx, scanned_rx) = sync_channel::<Result<Scanned>>(1);
    let (packed_tx, packed_rx) = sync_channel::<Result<Packed>>(1);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(SCAN_BUFFERS);
    let result = std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || scan(source, parent, block_size, zero_hash, free_rx, scanned_tx));
        scope.spawn(move || pack_batches(parent, bs, level, scanned_rx, packed_tx));
        let mut order = EntryOrder::default();
        for packed in packed_rx {
            let Packed { batch, units } = packed?;
            crate::interrupt::check()?;
            let batch_buf = batch.as_ref().map_or(&[][..], |(scanned, _)| scanned.buf.as_slice());
            for unit in units {
                let unit = unit.wait().context("compressing a frame failed (a strata bug: please report it)")?;
                order.write_unit(writer, &unit, batch_buf, &mut stored)?;
            }
            let Some((Scanned { start, buf, results }, decisions)) = batch else { continue };
            for (i, (r, decision)) in results.iter().zip(&decisions).enumerate() {
                let b = start + i as u64;
                digest.push(&r.hash);
                present_blocks += u64::from(!r.zero);
                let held = match (r.action, decision) {
                    (Action::Unchanged, _) => continue,
                    (Action::Zero, _) => Held::Entry(ImageWriter::zero_entry(b, zero_hash)),
                    (Action::Store, Some(Decision::Store { .. } | Decision::Patch)) => Held::Stored(b),
                    (Action::Store, _) => Held::Copy(b, r.hash),
                };
                order.hold(held);
            }
            order.push_ready(writer, &stored)?;
            progress.advance((buf.len() as u64).min(source.size() - start * bs as u64));
            let _ = free_tx.try_send(buf);
        }
        order.push_ready(writer, &stored)?;
        assert!(order.held.is_empty(), "every held entry is pushed once its frame is written");
        Ok(())
    });
    progress.end();
    result?;
    source.check_size()?;
    Ok(Outcome { present_blocks, digest: digest.finish() })
}

/// One batch decided, and the frames that closed with it (they may hold blocks of earlier
/// batches); the last message has frames only (what was still open at the source's end).
struct Packed {
    /// The batch, and per block the decision (`None` unless the block changed to a non-zero
    /// content).
    batch: Option<(Scanned, Vec<Option<Decision>>)>,
    /// The frames that closed, in block order (compressed, or being compressed).
    units: Vec<Pending>,
}

/// An index entry, or what it waits for.
enum Held {
    Entry(IndexEntry),
    /// A stored block or a patch, whose frame may still be open.
    Stored(u64),
    /// A copy of a content stored earlier in this image (block, hash).
    Copy(u64, [u8; 32]),
}

/// Puts the entries in the index in block order although a frame holds blocks that are not
/// adjacent: the frames' bytes are written as they close, their blocks' entries wait in
/// `written` until the appender reaches them, and everything after a block whose frame is
/// still open waits in `held` (at most a frame's span of the disk, `pack::GROUP_MAX_SPAN`).
#[derive(Default)]
struct EntryOrder {
    written: std::collections::BTreeMap<u64, IndexEntry>,
    held: std::collections::VecDeque<Held>,
}

impl EntryOrder {
    /// Writes the frame of `unit` and keeps its entries for their turn.
    fn write_unit(&mut self, writer: &mut ImageWriter, unit: &Unit, batch: &[u8], stored: &mut Stored) -> Result<()> {
        for (i, entry) in unit.write(writer, batch)?.into_iter().enumerate() {
            if unit.remember(i) {
                stored.remember(&entry);
            }
            self.written.insert(entry.block, entry);
        }
        Ok(())
    }

    fn hold(&mut self, held: Held) {
        self.held.push_back(held);
    }

    /// Pushes the held entries, in order, up to the first whose frame is still open.
    fn push_ready(&mut self, writer: &mut ImageWriter, stored: &Stored) -> Result<()> {
        while let Some(next) = self.held.front() {
            let entry = match next {
                Held::Entry(entry) => *entry,
                Held::Stored(b) => match self.written.remove(b) {
                    Some(entry) => entry,
                    None => return Ok(()),
                },
                Held::Copy(b, hash) => {
                    let like = stored.find(hash).expect("a copy's content is written before it");
                    ImageWriter::ref_entry(*b, *hash, like)
                }
            };
            writer.push(entry)?;
            self.held.pop_front();
        }
        Ok(())
    }
}

/// Changed blocks one patch task handles in order (adjacent blocks often share the parent's
/// group, which the thread's patch scratch then decodes once).
const PATCH_TASK_BLOCKS: usize = 16;

/// The packer stage: makes the patches of changed blocks against the parent, decides in block
/// order which changed blocks are stored, which are patches and which are copies of a content
/// stored earlier in this image, and compresses the stored ones.
fn pack_batches(
    parent: Option<&VersionReader>,
    bs: usize,
    level: i32,
    scanned_rx: Receiver<Result<Scanned>>,
    packed_tx: SyncSender<Result<Packed>>,
) {
    let mut dedup = Dedup::default();
    let mut packer = Packer::new(bs as u32, level);
    for scanned in scanned_rx {
        let packed = scanned.and_then(|scanned| {
            let patches = match parent {
                Some(parent) => patch_batch(parent, &scanned, bs)?,
                None => (0..scanned.results.len()).map(|_| None).collect(),
            };
            let decisions: Vec<Option<Decision>> = scanned
                .results
                .iter()
                .zip(&patches)
                .map(|(r, p)| (r.action == Action::Store).then(|| dedup.decide(&r.hash, p.is_some())))
                .collect();
            let store: Vec<bool> = decisions.iter().map(|d| matches!(d, Some(Decision::Store { .. }))).collect();
            let remember: Vec<bool> =
                decisions.iter().map(|d| *d == Some(Decision::Store { remember: true })).collect();
            let hashes: Vec<[u8; 32]> = scanned.results.iter().map(|r| r.hash).collect();
            let patched = patches.into_iter().enumerate().filter(|(i, _)| decisions[*i] == Some(Decision::Patch));
            let patched =
                patched.map(|(i, p)| (scanned.start + i as u64, hashes[i], p.expect("a patch decision has its patch")));
            let units = packer.pack(&scanned.buf, scanned.start, &hashes, &store, &remember, patched.collect());
            Ok(Packed { batch: Some((scanned, decisions)), units })
        });
        let failed = packed.is_err();
        if packed_tx.send(packed).is_err() || failed {
            return;
        }
    }
    let _ = packed_tx.send(Ok(Packed { batch: None, units: packer.finish() }));
}

/// The patches of the changed blocks of one batch against the parent, on all cores.
fn patch_batch(parent: &VersionReader, scanned: &Scanned, bs: usize) -> Result<Vec<Option<PatchFrame>>> {
    let changed: Vec<usize> =
        (0..scanned.results.len()).filter(|&i| scanned.results[i].action == Action::Store).collect();
    let patcher = Patcher::new(parent);
    let made = changed
        .par_chunks(PATCH_TASK_BLOCKS)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&i| patcher.patch(scanned.start + i as u64, &scanned.buf[i * bs..(i + 1) * bs]))
                .collect::<strata_format::Result<Vec<_>>>()
        })
        .collect::<strata_format::Result<Vec<Vec<_>>>>()
        .context("reading the parent version's blocks to patch them")?;
    let mut patches: Vec<Option<PatchFrame>> = (0..scanned.results.len()).map(|_| None).collect();
    for (i, patch) in changed.into_iter().zip(made.into_iter().flatten()) {
        patches[i] = patch;
    }
    Ok(patches)
}

/// Bytes of source read and classified per batch.
const BATCH_BYTES: usize = 8 << 20;
/// Bytes one scan task classifies: small enough that what it reads stays in the CPU cache
/// until it is hashed.
const SCAN_TASK_BYTES: usize = 256 << 10;
/// Batch buffers in flight: one being scanned, one waiting, one being packed, one waiting, one
/// being appended.
const SCAN_BUFFERS: usize = 5;

/// One batch of source blocks, read and classified.
struct Scanned {
    /// Index of the batch's first block.
    start: u64,
    /// The batch's bytes (zero past the source's end).
    buf: Vec<u8>,
    results: Vec<BlockResult>,
}

/// The scanner stage: reads the source batch by batch, each batch on all cores, and classifies
/// every block against the parent's hash of it. Stops at the first error (sent on) or when the
/// storing stage hangs up.
fn scan(
    source: &Source,
    parent: Option<&VersionReader>,
    block_size: u32,
    zero_hash: [u8; 32],
    free_rx: Receiver<Vec<u8>>,
    scanned_tx: SyncSender<Result<Scanned>>,
) {
    let bs = block_size as usize;
    let total_blocks = source.size().div_ceil(block_size as u64);
    let batch_blocks = (BATCH_BYTES / bs).max(1) as u64;
    let mut parent_hashes = parent.map(HashCursor::new);
    let mut start = 0u64;
    while start < total_blocks {
        let n = batch_blocks.min(total_blocks - start);
        let scanned = (|| -> Result<Scanned> {
            source.will_need((start + n) * bs as u64, BATCH_BYTES)?;
            let parents = match parent_hashes.as_mut() {
                Some(cursor) => (start..start + n).map(|b| cursor.hash(b).map(Some)).collect::<Result<Vec<_>, _>>()?,
                None => vec![None; n as usize],
            };
            let mut buf = free_rx.try_recv().unwrap_or_default();
            buf.resize(n as usize * bs, 0);
            let results = scan_batch(source, start, bs, &parents, &mut buf, zero_hash)?;
            Ok(Scanned { start, buf, results })
        })();
        let failed = scanned.is_err();
        if scanned_tx.send(scanned).is_err() || failed {
            return;
        }
        start += n;
    }
}

/// Classifies the blocks of one batch (`buf.len() / bs` blocks from block `start`) on all cores.
/// Every changed block's bytes end up in `buf`; an unchanged block's may not. Whole-data blocks
/// of a batch already in the page cache are read through a memory map (hashed in place, copied
/// only when changed); holes are zero without being read; the rest (cold batches, blocks partly
/// holes, the source's end) is read with `pread`.
fn scan_batch(
    source: &Source,
    start: u64,
    bs: usize,
    parents: &[Option<Option<[u8; 32]>>],
    buf: &mut [u8],
    zero_hash: [u8; 32],
) -> Result<Vec<BlockResult>> {
    let n = buf.len() / bs;
    let fills = source.fills(start, n, bs)?;
    let offset = start * bs as u64;
    let data_blocks = fills.iter().rposition(|f| *f == Fill::Data).map_or(0, |i| i + 1);
    let map = if data_blocks > 0 { source.map(offset, data_blocks * bs) } else { None };
    let cached = |map: &SourceMap| {
        let resident = map.residency();
        let mut data = fills.iter().enumerate().filter(|(_, f)| **f == Fill::Data);
        data.all(|(i, _)| resident.all(i * bs, (i + 1) * bs))
    };
    let map = map.filter(cached);
    if map.is_some() {
        source.count_mapped((fills.iter().filter(|f| **f == Fill::Data).count() * bs) as u64);
    }
    let task_blocks = (SCAN_TASK_BYTES / bs).max(1);
    let results = buf
        .par_chunks_mut(task_blocks * bs)
        .zip(parents.par_chunks(task_blocks))
        .zip(fills.par_chunks(task_blocks))
        .enumerate()
        .map(|(t, ((bytes, parents), fills))| {
            let first = t * task_blocks;
            let task_offset = offset + (first * bs) as u64;
            if map.is_none() && fills.iter().any(|f| *f != Fill::Hole) {
                source.read_into(task_offset, bytes)?;
            }
            let mut results = Vec::with_capacity(fills.len());
            for (i, ((block, parent), fill)) in bytes.chunks_mut(bs).zip(parents).zip(fills).enumerate() {
                let result = match (fill, &map) {
                    (Fill::Hole, _) => classify_zero(*parent, zero_hash),
                    (Fill::Data, Some(map)) => {
                        let mapped = &map.bytes()[(first + i) * bs..(first + i + 1) * bs];
                        let result = classify(mapped, *parent, zero_hash);
                        if result.action == Action::Store {
                            block.copy_from_slice(mapped);
                        }
                        result
                    }
                    (Fill::Mixed, Some(_)) => {
                        source.read_into(task_offset + (i * bs) as u64, block)?;
                        classify(block, *parent, zero_hash)
                    }
                    (_, None) => classify(block, *parent, zero_hash),
                };
                results.push(result);
            }
            Ok(results)
        })
        .collect::<Result<Vec<Vec<BlockResult>>>>()?;
    Ok(results.into_iter().flatten().collect())
}

/// Decides what to record for one block given the parent's view of it (`None`: no parent, a
/// full; `Some(None)`: zero in the parent; `Some(Some(h))`: content hash `h` in the parent).
fn classify(block: &[u8], parent: Option<Option<[u8; 32]>>, zero_hash: [u8; 32]) -> BlockResult {
    if is_zero(block) {
        return classify_zero(parent, zero_hash);
    }
    let hash = hash_block(block);
    let action = if parent == Some(Some(hash)) { Action::Unchanged } else { Action::Store };
    BlockResult { zero: false, hash, action }
}

/// `classify` for a block known to be zero.
fn classify_zero(parent: Option<Option<[u8; 32]>>, zero_hash: [u8; 32]) -> BlockResult {
    let action = match parent {
        Some(Some(_)) => Action::Zero,
        _ => Action::Unchanged,
    };
    BlockResult { zero: true, hash: zero_hash, action }
}
