//! strata's FUSE driver: every restorable version of a repository as a read-only folder holding
//! `disk.img` (the source as it was at that backup) and `partN.img` (each partition of it), plus a
//! `latest` symlink. All format knowledge, and the read path with its frame cache
//! (`strata_format::read_plan`, `frame_cache`), lives in strata-format; this crate maps it to FUSE.

mod fs;
mod tree;

use std::path::{Path, PathBuf};

use fuser::{Config, MountOption, SessionACL};
use strata_format::mounts::mount_info;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Format(#[from] strata_format::FormatError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: mount failed: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Show only this version.
    pub version: Option<u64>,
    /// Bytes of decompressed blocks kept in memory.
    pub cache_bytes: u64,
    /// Let other users read the mount (needs `user_allow_other` in /etc/fuse.conf for non-root).
    pub allow_other: bool,
    /// FUSE request threads.
    pub threads: usize,
    /// Check every block served against its index entry's BLAKE3 hash (crc32c is always checked).
    pub check_hashes: bool,
}

/// The `fsname` a mount of process `pid` carries, which `strata umount` reads back.
pub fn fs_name(pid: u32) -> String {
    format!("strata@{pid}")
}

/// The FUSE subtype of strata mounts (`fuse.strata` in /proc/mounts).
pub const SUBTYPE: &str = "strata";

/// Checks that `mountpoint` is an empty folder with nothing mounted on it.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, MountError> {
    let invalid = |why: &str| MountError::Invalid(format!("{}: {why}", mountpoint.display()));
    let meta = std::fs::metadata(mountpoint).map_err(|_| invalid("no such folder to mount on"))?;
    if !meta.is_dir() {
        return Err(invalid("not a folder"));
    }
    let canon = mountpoint.canonicalize().map_err(|e| invalid(&e.to_string()))?;
    if mount_info(&canon).is_some() {
        return Err(invalid("busy: something is already mounted there"));
    }
    if std::fs::read_dir(&canon).map_err(|e| invalid(&e.to_string()))?.next().is_some() {
        return Err(invalid("busy: the folder is not empty; mount on an empty folder"));
    }
    Ok(canon)
}

/// Readahead of the mount's backing device, in KiB: eight 1 MiB requests ahead of a sequential
/// reader, so that every FUSE thread has a request to serve while the others copy theirs (with
/// 1 MiB, at most two were in flight and the driver sat idle a quarter of the time).
const READAHEAD_KB: u32 = 8192;

/// The kernel caps FUSE readahead at the bdi default (128 KiB) whatever the driver asks for;
/// root may raise it through sysfs, so sequential reads arrive as 1 MiB requests, several at once.
/// The device number is taken from mountinfo: a stat of the mount itself would wait for this
/// driver, which does not serve requests yet.
fn raise_readahead(mountpoint: &Path) {
    let Some(devno) = mount_info(mountpoint).map(|m| m.devno) else { return };
    let path = format!("/sys/class/bdi/{devno}/read_ahead_kb");
    match std::fs::write(&path, READAHEAD_KB.to_string()) {
        Ok(()) => log::debug!("{path} = {READAHEAD_KB}"),
        Err(e) => log::debug!("cannot raise readahead ({path}): {e}"),
    }
}

/// Mounts the repository at `mountpoint` and serves it until it is unmounted (by `strata
/// umount`, `fusermount3 -u`, or SIGINT/SIGTERM/SIGHUP to this process, which unmount cleanly).
/// `ready` runs once the mount is live and readable and says whether to serve it; when it says no
/// (whoever asked for the mount is gone), the mount is taken down again.
pub fn serve(
    repo: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce() -> bool,
) -> Result<(), MountError> {
    let mountpoint = check_mountpoint(mountpoint)?;
    bound_allocator_memory();
    let catalogue = tree::Catalogue::load(repo, opts.version)?;
    if catalogue.versions().is_empty() {
        log::warn!("{}: no restorable version to show", repo.display());
    }
    let filesystem = fs::StrataFs::new(catalogue, opts.cache_bytes, opts.check_hashes);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName(fs_name(std::process::id())),
        MountOption::Subtype(SUBTYPE.into()),
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1;

    // Signals are taken by one thread (blocked everywhere else, before FUSE threads start).
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM, nix::sys::signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| MountError::Invalid(format!("blocking signals: {e}")))?;

    let mut session = fuser::Session::new(filesystem, &mountpoint, &config)
        .map_err(|source| MountError::Mount { path: mountpoint.clone(), source })?;
    let mut unmounter = session.unmount_callable();
    let where_ = mountpoint.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            log::info!("{sig:?}: unmounting {}", where_.display());
            if let Err(e) = unmounter.unmount() {
                log::warn!("unmounting {}: {e}", where_.display());
            }
        }
    });
    log::info!("mounted {} on {}", repo.display(), mountpoint.display());
    raise_readahead(&mountpoint);
    if !ready() {
        log::info!("unmounting {}: nobody is waiting for it", mountpoint.display());
        return session.unmount_callable().unmount().map_err(|source| MountError::Mount { path: mountpoint, source });
    }
    session.run().map_err(|source| MountError::Mount { path: mountpoint, source })
}

/// Keeps the driver's memory at its cache budget plus a few MiB. Decoded frames (up to 4 MiB)
/// are allocated and freed by different threads; glibc would otherwise serve them from growing
/// per-thread arenas (its mmap threshold adapts upwards) and keep the freed space: 128 MiB of
/// cache measured ~207 MiB resident. Large buffers are mapped and unmapped instead, and two
/// arenas serve the small allocations. (The cache reuses evicted frames' buffers itself.)
fn bound_allocator_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the serving threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
