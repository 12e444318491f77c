//! Opening the files of a repository folder: regular files only, symbolic links never followed,
//! and never a wait. Anyone who can write the folder can put a FIFO, a device or a link at a
//! name strata reads; opened plainly, a FIFO blocks every command (and a running mount) and a
//! link sends root's reads and writes anywhere. Here such a name is refused at once, with a
//! message that says what is there.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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

fn not_regular(what: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "it is {what}, not a regular file; strata opens only regular files in a repository (move it out)"
    ))
}

/// Opens `options` at `path` without following a link or blocking, and checks that what was
/// opened is a regular file.
fn open_checked(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
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
    use std::os::fd::AsRawFd;
    if let Ok(bits) = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(bits) - OFlag::O_NONBLOCK;
        let _ = fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags));
    }
}

/// Opens the regular file at `path` for reading.
pub fn open_read(path: &Path) -> std::io::Result<File> {
    open_checked(path, OpenOptions::new().read(true))
}

/// Opens the regular file at `path` for writing, creating it (mode 0600) when missing; a
/// dangling link at `path` is refused rather than followed to create a file elsewhere.
pub fn open_or_create(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    open_checked(path, OpenOptions::new().write(true).create(true).truncate(false).mode(0o600))
}

/// The whole text of the regular file at `path`, at most `limit` bytes (longer is an error).
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    let file = open_read(path)?;
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::other(format!("longer than {limit} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("v00000001.strata");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_read(&fifo).unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = open_or_create(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn a_dangling_link_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        let lock = dir.path().join("lock");
        std::os::unix::fs::symlink(&elsewhere, &lock).unwrap();
        let err = open_or_create(&lock).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!elsewhere.exists());
    }

    #[test]
    fn a_link_to_a_readable_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        let link = dir.path().join("strata.repo");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(read_text(&link, 100).is_err());
        std::fs::write(dir.path().join("plain"), b"text").unwrap();
        assert_eq!(read_text(&dir.path().join("plain"), 100).unwrap(), "text");
        assert!(read_text(&dir.path().join("plain"), 2).is_err());
    }
}
