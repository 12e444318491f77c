//! The restore engine: write one version into a regular file (sparse: zero blocks become holes)
//! or onto a block device, decoding on all cores, checking every block's crc32c while reading and
//! the version's whole-source digest at the end. Refuses targets that would lose data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::sync::mpsc::sync_channel;
use strata_format::block::hash_block;
use strata_format::digest::{hex, zero_block_hash, SourceDigest};
use strata_format::frame_cache::FrameCache;
use strata_format::read_plan::read_window;
use strata_format::{BlockLocation, Repository, VersionReader};

use crate::direct_io::{AlignedBuf, TargetWriter};
use crate::progress::Progress;
use crate::source::block_device_size;

const BATCH_BYTES: usize = 8 << 20;
/// Bytes of the disk one parallel task reads in order: a backup's window of all-stored blocks,
/// whose group the task decodes straight into its buffer. A frame that reaches beyond the task
/// (a group of blocks spread over more of the disk) is decoded once into the shared frame cache,
/// and the tasks that need the rest of it take it from there.
const TASK_BYTES: usize = crate::pack::WINDOW_BYTES;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub id: u64,
    pub target: PathBuf,
    pub bytes: u64,
    /// Bytes written onto the target: all of them on a device; on a file, the runs that are not
    /// zero (the rest are left as holes).
    pub bytes_written: u64,
    pub seconds: f64,
    /// `bytes_written` per second, in MiB.
    pub mib_per_s: f64,
    pub digest: String,
    pub digest_verified: bool,
    /// The restored bytes were written past the page cache (`O_DIRECT`); false for targets
    /// that refuse it, which are written through the cache.
    pub direct_io: bool,
}

enum TargetKind {
    /// A regular file: created or truncated, zero blocks left as holes.
    File,
    /// A block device or other special file: every byte is written.
    Device,
}

/// Opens `target` for writing `size` bytes, refusing what would lose data: a mounted or too
/// small device, and an existing non-empty file or device without `force`.
fn open_target(target: &Path, size: u64, force: bool) -> Result<(File, TargetKind)> {
    let meta = std::fs::metadata(target);
    match meta {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(target)
                .with_context(|| format!("{}: cannot create the restore target", target.display()))?;
            crate::claim::claim_target(&f, target)?;
            Ok((f, TargetKind::File))
        }
        Err(e) => Err(e).with_context(|| format!("{}: cannot stat the restore target", target.display())),
        Ok(m) if m.file_type().is_file() => {
            if m.len() > 0 && !force {
                bail!(
                    "{}: the target exists and is not empty ({}); add --force to overwrite it",
                    target.display(),
                    crate::units::size(m.len())
                );
            }
            let f = OpenOptions::new()
                .write(true)
                .open(target)
                .with_context(|| format!("{}: cannot open the restore target", target.display()))?;
            crate::claim::claim_target(&f, target)?;
            f.set_len(0).with_context(|| format!("{}: cannot empty the restore target", target.display()))?;
            Ok((f, TargetKind::File))
        }
        Ok(m) if m.file_type().is_block_device() => {
            if let Some(mnt) = mounted_at(target) {
                bail!("{}: the device is mounted on {mnt}; unmount it before restoring onto it", target.display());
            }
            let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(target).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    anyhow::anyhow!(
                        "{}: the device is in use (mounted or held); refusing to restore onto it",
                        target.display()
                    )
                } else {
                    anyhow::Error::new(e).context(format!("{}: cannot open the device", target.display()))
                }
            })?;
            crate::claim::claim_target(&f, target)?;
            let dev_size = block_device_size(&f, target)?;
            if dev_size < size {
                bail!(
                    "{}: the device holds {}, less than the version's {}; choose a larger device",
                    target.display(),
                    crate::units::size(dev_size),
                    crate::units::size(size)
                );
            }
            if !force && !starts_empty(&f)? {
                bail!("{}: the device holds data; add --force to overwrite it", target.display());
            }
            Ok((f, TargetKind::Device))
        }
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_fifo() => {
            let f = OpenOptions::new()
                .write(true)
                .open(target)
                .with_context(|| format!("{}: cannot open the restore target", target.display()))?;
            Ok((f, TargetKind::Device))
        }
        Ok(_) => bail!("{}: the restore target must be a regular file or a block device", target.display()),
    }
}

/// Whether the first MiB of a device is all zeros.
fn starts_empty(f: &File) -> Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let n = f.read_at(&mut buf, 0).context("reading the start of the target device")?;
    Ok(strata_format::block::is_zero(&buf[..n]))
}

/// Where the block device `dev` is mounted (by device number).
fn mounted_at(dev: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).ok()?.rdev();
    let devno = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    strata_format::mounts::mount_point_of(&devno)
}

pub fn restore(
    repo_path: &Path,
    version: &str,
    target: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let repo = Repository::open(repo_path)?;
    let state = repo.scan()?;
    let id = state.resolve_name(version)?;
    let reader = state.open_version(id)?;
    refuse_a_target_in_a_repository(target)?;
    let before = target.metadata().ok();
    let (file, kind) = open_target(target, reader.source_size(), force)?;
    let written = write_and_check(&reader, &file, &kind, target, progress, repo_path, id);
    let (digest, direct_io, bytes_written) = match written {
        Ok(done) => done,
        Err(e) => return Err(undo_partial_target(e, target, before.as_ref(), &kind, id)),
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(RestoreSummary {
        id,
        target: target.to_path_buf(),
        bytes: reader.source_size(),
        bytes_written,
        seconds,
        mib_per_s: crate::units::mib_per_s(bytes_written, seconds),
        digest: hex(&digest),
        digest_verified: true,
        direct_io,
    })
}

/// Refuses a target inside a repository folder (an image, or a new file there): restoring over
/// an image destroys that version and every version that needs it.
fn refuse_a_target_in_a_repository(target: &Path) -> Result<()> {
    let folder = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(folder) = folder.canonicalize() else { return Ok(()) };
    if let Some(repo) = folder.ancestors().find(|a| a.join(strata_format::layout::REPO_FILE).exists()) {
        bail!(
            "{}: the target lies inside the repository {}; restore to a file or device outside it",
            target.display(),
            repo.display()
        );
    }
    Ok(())
}

/// After a failed restore: removes a target file that restore created, empties one that was
/// empty, and otherwise says plainly that the target now holds part of the version.
fn undo_partial_target(
    e: anyhow::Error,
    target: &Path,
    before: Option<&std::fs::Metadata>,
    kind: &TargetKind,
    id: u64,
) -> anyhow::Error {
    let regular = matches!(kind, TargetKind::File);
    match before {
        None if regular => match std::fs::remove_file(target) {
            Ok(()) => e.context(format!("restore of version {id} failed; {} was removed", target.display())),
            Err(why) => {
                e.context(format!("restore of version {id} failed; {} is incomplete ({why})", target.display()))
            }
        },
        Some(m) if regular && m.len() == 0 => {
            let emptied = OpenOptions::new().write(true).open(target).and_then(|f| f.set_len(0));
            e.context(match emptied {
                Ok(()) => format!("restore of version {id} failed; {} is empty again", target.display()),
                Err(why) => format!("restore of version {id} failed; {} is incomplete ({why})", target.display()),
            })
        }
        _ if matches!(kind, TargetKind::Device) && before.is_some_and(|m| m.file_type().is_fifo()) => {
            e.context(format!("restore of version {id} failed; the stream to {} is incomplete", target.display()))
        }
        _ => e.context(format!(
            "restore of version {id} failed; {} is now INCOMPLETE: it holds part of the version over what it \
             held before; restore again before using it",
            target.display()
        )),
    }
}

/// Writes the version, syncs the target and checks the whole-source digest.
fn write_and_check(
    reader: &VersionReader,
    file: &File,
    kind: &TargetKind,
    target: &Path,
    progress: &dyn Progress,
    repo_path: &Path,
    id: u64,
) -> Result<([u8; 32], bool, u64)> {
    let (digest, direct_io, bytes_written) = write_version(reader, file, kind, target, progress)?;
    match file.sync_all() {
        // Character devices and pipes (e.g. /dev/null) have nothing to sync.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => other.with_context(|| format!("{}: fsync", target.display()))?,
    }
    let expected = reader.top().footer.source_digest;
    if digest != expected {
        bail!(
            "{}: the restored data of version {id} does not match its digest (expected {}, got {}); \
             the target is NOT a faithful copy; run `strata verify {}`",
            target.display(),
            hex(&expected),
            hex(&digest),
            repo_path.display()
        );
    }
    Ok((digest, direct_io, bytes_written))
}

/// Writes every block of `reader` into `file`; returns the digest of what was written, whether
/// the writes bypassed the page cache (`direct_io`) and how many bytes were written. Blocks are read and decoded on all
/// cores a batch at a time while a writer thread writes the batch before (two batch buffers in
/// flight).
fn write_version(
    reader: &VersionReader,
    file: &File,
    kind: &TargetKind,
    target: &Path,
    progress: &dyn Progress,
) -> Result<([u8; 32], bool, u64)> {
    let bs = reader.block_size() as usize;
    let size = reader.source_size();
    if let TargetKind::File = kind {
        file.set_len(size)
            .with_context(|| format!("{}: cannot size the target to {}", target.display(), crate::units::size(size)))?;
    }
    let device = matches!(kind, TargetKind::Device);
    let zero_hash = zero_block_hash(reader.block_size());
    let mut digest = SourceDigest::new(size, reader.block_size());
    let batch_blocks = (BATCH_BYTES / bs).max(1) as u64;
    // Frames a task needs in part (a group cut by a task boundary, a patch base shared by
    // neighbours, a patch group), kept for the tasks that need the rest. A sequential pass holds
    // one such frame per layer whose frames span the position it has reached (in a deep chain
    // of scattered changes, every layer's patch group), so the budget is the mount's: frames
    // leave once read through, and what is held never exceeds it.
    let cache = FrameCache::new(strata_format::frame_cache::DEFAULT_BUDGET, reader.block_size(), false);
    progress.begin("restore", size);
    let (full_tx, full_rx) = sync_channel::<Batch>(1);
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(2);
    let result = std::thread::scope(|scope| -> Result<(bool, u64)> {
        let full_tx = full_tx; // dropped on every way out, which ends the writer's loop
        let writer = scope.spawn(move || -> Result<(bool, u64)> {
            let mut out = TargetWriter::new(file);
            let mut zeros = AlignedBuf::default();
            let mut bytes_written = 0u64;
            for batch in full_rx {
                let blocks = if batch.zeros > 0 { batch.zeros } else { (batch.buf.len() / bs) as u64 };
                let end = ((batch.start + blocks) * bs as u64).min(size);
                bytes_written += end - batch.start * bs as u64;
                let written = match batch.zeros {
                    0 => write_batch(&mut out, &batch, bs, size, device),
                    n => write_zeros(
                        &mut out,
                        &mut zeros,
                        batch.start * bs as u64,
                        ((batch.start + n) * bs as u64).min(size),
                    ),
                };
                written.with_context(|| {
                    format!("{}: write error at offset {}", target.display(), batch.start * bs as u64)
                })?;
                if batch.zeros == 0 {
                    let _ = free_tx.try_send(batch.buf);
                }
            }
            Ok((out.bypassed_cache(), bytes_written))
        });
        let mut start = 0u64;
        while start < reader.block_count() {
            // A run of zero blocks: holes in a file (sized above), zeros written on a device.
            let stored = reader.next_stored(start).unwrap_or(reader.block_count());
            if stored > start {
                let n = stored - start;
                digest.push_repeated(&zero_hash, n);
                progress.advance((n * bs as u64).min(size - start * bs as u64));
                if device
                    && full_tx.send(Batch { start, buf: AlignedBuf::default(), hashes: Vec::new(), zeros: n }).is_err()
                {
                    break;
                }
                start = stored;
                continue;
            }
            crate::interrupt::check()?;
            let n = batch_blocks.min(reader.block_count() - start);
            reader.prime_from(start);
            let mut buf = free_rx.try_recv().unwrap_or_default();
            buf.resize(n as usize * bs);
            let hashes = read_batch(reader, &cache, start, &mut buf, bs)?;
            for (i, h) in hashes.iter().enumerate() {
                digest.push(h.as_ref().unwrap_or(&zero_hash));
                if h.is_none() && device {
                    buf[i * bs..(i + 1) * bs].fill(0);
                }
            }
            progress.advance((n * bs as u64).min(size - start * bs as u64));
            if full_tx.send(Batch { start, buf, hashes, zeros: 0 }).is_err() {
                break; // the writer failed; its error is reported below
            }
            start += n;
        }
        drop(full_tx);
        writer.join().expect("restore writer thread")
    });
    progress.end();
    let (direct_io, bytes_written) = result?;
    Ok((digest.finish(), direct_io, bytes_written))
}

/// Blocks `start..` of a version, decoded, with the hash of each non-zero one; or, when
/// `zeros` is not 0, that many zero blocks from `start` on (nothing decoded).
struct Batch {
    start: u64,
    buf: AlignedBuf,
    hashes: Vec<Option<[u8; 32]>>,
    zeros: u64,
}

/// Reads and decodes the blocks of `buf` on all cores, through the read path the mount serves
/// (`read_plan`): each task reads the runs of stored blocks of its stretch, a frame it covers
/// whole decoded straight into `buf`, one it needs in part through the shared `cache`.
fn read_batch(
    reader: &VersionReader,
    cache: &FrameCache,
    start: u64,
    buf: &mut [u8],
    bs: usize,
) -> strata_format::Result<Vec<Option<[u8; 32]>>> {
    let task_blocks = (TASK_BYTES / bs).max(1);
    Ok(buf
        .par_chunks_mut(bs * task_blocks)
        .enumerate()
        .map(|(t, task)| -> strata_format::Result<Vec<Option<[u8; 32]>>> {
            let first = start + (t * task_blocks) as u64;
            let blocks = task.len() / bs;
            let mut hashes = vec![None; blocks];
            let mut i = 0;
            while i < blocks {
                let b = first + i as u64;
                if reader.locate(b) == BlockLocation::Zero {
                    i += 1;
                    continue;
                }
                let run_end = (i + 1..blocks).find(|&j| reader.locate(first + j as u64) == BlockLocation::Zero);
                let run_end = run_end.unwrap_or(blocks);
                let out = &mut task[i * bs..run_end * bs];
                let n = read_window(reader, cache, 0, reader.source_size(), b * bs as u64, out, false)?;
                out[n..].fill(0);
                for (j, block) in out.chunks(bs).enumerate() {
                    hashes[i + j] = Some(hash_block(block));
                }
                i = run_end;
            }
            Ok(hashes)
        })
        .collect::<strata_format::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// Writes runs of consecutive blocks that must be written: all of them on a device (zero
/// blocks zero-filled by then), the non-zero ones in a file, whose zero blocks stay holes.
fn write_batch(out: &mut TargetWriter, batch: &Batch, bs: usize, size: u64, device: bool) -> std::io::Result<()> {
    let mut i = 0usize;
    while i < batch.hashes.len() {
        if batch.hashes[i].is_none() && !device {
            i += 1;
            continue;
        }
        let run_start = i;
        while i < batch.hashes.len() && (device || batch.hashes[i].is_some()) {
            i += 1;
        }
        let offset = (batch.start + run_start as u64) * bs as u64;
        let end = ((batch.start + i as u64) * bs as u64).min(size);
        out.write_all_at(&batch.buf[run_start * bs..run_start * bs + (end - offset) as usize], offset)?;
    }
    Ok(())
}

/// Writes zeros over `from..to` of a device from one zeroed buffer.
fn write_zeros(out: &mut TargetWriter, zeros: &mut AlignedBuf, from: u64, to: u64) -> std::io::Result<()> {
    if zeros.is_empty() {
        zeros.resize(BATCH_BYTES);
        zeros.fill(0);
    }
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
