//! The file-system calls a repository folder is made of, as a trait (`Disk`) so that the crash
//! tests can put a disk that loses unsynced writes (`storage::lossy`) under the real folder
//! code. `OsDisk` is the real one. It opens regular files only, never follows a symbolic link
//! and never waits: anyone who can write the folder can put a FIFO, a device or a link at a
//! name strata reads; opened plainly, a FIFO blocks every command (and a running mount) and a
//! link sends root's reads and writes anywhere. Such a name is refused at once, with a message
//! that says what is there.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{Blob, EntryKind};

/// A file opened on a `Disk`.
pub trait DiskFile: Blob {
    /// Writes all of `bytes` at `offset`.
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Makes what was written durable (fsync).
    fn sync(&self) -> io::Result<()>;
    /// Asks for bytes `from..to` to be written back soon, without waiting (advice).
    fn start_write_back(&self, _from: u64, _to: u64) {}
}

/// The calls the folder storage makes. Paths are absolute or relative to the working folder;
/// the folder code only ever names files directly inside the repository folder.
pub trait Disk: Send + Sync + std::fmt::Debug {
    /// Creates a new file (mode 0600): fails if anything, even a dangling link, is at `path`.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens the regular file at `path` for reading.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Takes an exclusive lock on the regular file at `path` (created, mode 0600, when
    /// missing), held until the returned value is dropped; `None` when another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn std::fmt::Debug + Send + Sync>>>;
    /// Renames `from` to `to`; with `replace` false, fails with `AlreadyExists` rather than
    /// replace a file at `to`.
    fn rename(&self, from: &Path, to: &Path, replace: bool) -> io::Result<()>;
    /// Removes the file or link at `path` (a link is removed, never followed).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the renames, creations and removals in the folder `dir` durable (fsync).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The names in the folder `dir` and what each is.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>>;
    /// What is at `path` (a link is not followed); `NotFound` when nothing is.
    fn kind(&self, path: &Path) -> io::Result<EntryKind>;
    /// An unnamed scratch file for `dir`'s writers (an image's index before it is appended).
    fn scratch(&self, dir: &Path) -> io::Result<File>;
}

/// The operating system's file systems.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

#[derive(Debug)]
struct OsFile(File);

impl Blob for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn will_need(&self, at: u64, len: u64) {
        let (Ok(at), Ok(len)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else { return };
        // Advice: a failure changes nothing but speed.
        let _ =
            nix::fcntl::posix_fadvise(self.0.as_raw_fd(), at, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED);
    }
}

impl DiskFile for OsFile {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, bytes, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn start_write_back(&self, from: u64, to: u64) {
        let (Ok(from), Ok(len)) = (libc::off64_t::try_from(from), libc::off64_t::try_from(to - from)) else { return };
        // SAFETY: sync_file_range only reads its arguments; the descriptor is open for the
        // file's life. Advice: durability still comes from `sync`, which reports any error.
        unsafe { libc::sync_file_range(self.0.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
}

/// What is at a name instead of a regular file, for messages.
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn not_regular(what: &str) -> io::Error {
    io::Error::other(format!(
        "it is {what}, not a regular file; strata opens only regular files in a repository (move it out)"
    ))
}

/// Opens `options` at `path` without following a link or blocking, and checks that what was
/// opened is a regular file.
fn open_checked(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(|e| {
        match e.raw_os_error() {
            // O_NOFOLLOW on a link; a FIFO without a reader opened for writing.
            Some(libc::ELOOP) => not_regular("a symbolic link"),
            Some(libc::ENXIO) => not_regular("a FIFO or device"),
            _ => e,
        }
    })?;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() {
        return Err(not_regular(describe(ft)));
    }
    clear_nonblocking(&file);
    Ok(file)
}

/// Regular files ignore O_NONBLOCK; cleared anyway so that nothing later depends on it.
fn clear_nonblocking(file: &File) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(bits) = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(bits) - OFlag::O_NONBLOCK;
        let _ = fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags));
    }
}

fn kind_of(ft: std::fs::FileType) -> EntryKind {
    if ft.is_file() {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Link
    } else {
        EntryKind::Other(describe(ft))
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`. File systems
/// without `RENAME_NOREPLACE` get a hard link and an unlink (also atomic against a file at
/// `to`); those without hard links get a check and a plain rename, under the repository lock.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP)) {
        return Err(err);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(_) if std::fs::symlink_metadata(to).is_ok() => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(_) => std::fs::rename(from, to),
    }
}

impl Disk for OsDisk {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(OsFile(open_checked(path, OpenOptions::new().read(true))?)))
    }

    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn std::fmt::Debug + Send + Sync>>> {
        use nix::fcntl::{Flock, FlockArg};
        let file = open_checked(path, OpenOptions::new().write(true).create(true).truncate(false).mode(0o600))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Some(Box::new(held))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(errno.into()),
        }
    }

    fn rename(&self, from: &Path, to: &Path, replace: bool) -> io::Result<()> {
        if replace {
            std::fs::rename(from, to)
        } else {
            rename_no_replace(from, to)
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type().map_or(EntryKind::Other("unreadable"), kind_of);
            names.push((entry.file_name().to_string_lossy().into_owned(), kind));
        }
        Ok(names)
    }

    fn kind(&self, path: &Path) -> io::Result<EntryKind> {
        Ok(kind_of(std::fs::symlink_metadata(path)?.file_type()))
    }

    fn scratch(&self, dir: &Path) -> io::Result<File> {
        tempfile::tempfile_in(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(file: &dyn DiskFile) -> Vec<u8> {
        let mut buf = vec![0u8; file.len().unwrap() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("v00000001.strata");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = OsDisk.open_read(&fifo).unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = OsDisk.lock(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn a_dangling_link_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        let lock = dir.path().join("lock");
        std::os::unix::fs::symlink(&elsewhere, &lock).unwrap();
        let err = OsDisk.lock(&lock).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(OsDisk.create_new(&lock).is_err());
        assert!(!elsewhere.exists());
    }

    #[test]
    fn a_link_to_a_readable_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        let link = dir.path().join("strata.repo");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(OsDisk.open_read(&link).is_err());
        assert!(matches!(OsDisk.kind(&link).unwrap(), EntryKind::Link));
        std::fs::write(dir.path().join("plain"), b"text").unwrap();
        assert_eq!(read_all(&*OsDisk.open_read(&dir.path().join("plain")).unwrap()), b"text");
    }

    #[test]
    fn a_lock_is_held_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = OsDisk.lock(&path).unwrap().expect("free");
        assert!(OsDisk.lock(&path).unwrap().is_none(), "a second holder is refused");
        drop(held);
        assert!(OsDisk.lock(&path).unwrap().is_some());
    }

    #[test]
    fn a_rename_without_replace_keeps_the_file_there() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        let err = OsDisk.rename(&a, &b, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        OsDisk.rename(&a, &b, true).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
    }
}
