//! The one way strata puts a file into a repository folder, and takes one out. A new file is
//! written under a temporary name that nobody can predict or plant in advance (created with
//! `O_EXCL | O_NOFOLLOW`: a symbolic link or file already at that name is never opened), made
//! durable (fsync), renamed into place (an image never replaces a file already there; the
//! identity and configuration files do) and the rename made durable (fsync of the folder).
//! A temporary file that is not published is removed when its guard is dropped. Deletes are
//! counted for the crash tests and made durable by one fsync of the folder after them.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Loc, Result};
use crate::fault;
use crate::layout::TEMP_PREFIX;

/// Whether publishing may replace a file already at the final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// The identity and configuration files: the new one takes the old one's place atomically.
    Yes,
    /// Images: a file already there (a version, or anything a user put there) is never lost.
    Never,
}

/// A temporary file's name in a repository folder, removed on drop unless it was renamed into
/// place.
#[derive(Debug)]
pub struct TempName {
    path: PathBuf,
    final_path: PathBuf,
    renamed: bool,
}

/// Attempts at an unused temporary name before giving up (each name is random).
const NAME_ATTEMPTS: usize = 16;

/// Creates a new, empty temporary file (mode 0600) in `dir` for the file `final_name`:
/// `.tmp-<final_name>.<pid>.<random>`, opened with `O_CREAT | O_EXCL | O_NOFOLLOW`.
pub fn create_temp(dir: &Path, final_name: &str) -> Result<(File, TempName)> {
    let final_path = dir.join(final_name);
    let mut last_error = None;
    for _ in 0..NAME_ATTEMPTS {
        let path = dir.join(format!("{TEMP_PREFIX}{final_name}.{}.{:016x}", std::process::id(), random_u64()));
        let opened = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path);
        match opened {
            Ok(file) => return Ok((file, TempName { path, final_path, renamed: false })),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(FormatError::io(Loc::file(&path), "create", e)),
        }
    }
    let e = last_error.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    Err(FormatError::io(Loc::file(dir), "create a temporary file (every name tried exists)", e))
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        return nanos as u64 ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

impl TempName {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Renames the (already fsynced) file into place; the caller then fsyncs the folder
    /// (`sync_dir`), after which the file is durable under its final name.
    pub fn rename_into_place(&mut self, replace: Replace) -> Result<()> {
        let loc = || Loc::file(&self.final_path);
        match replace {
            Replace::Yes => std::fs::rename(&self.path, &self.final_path)
                .map_err(|e| FormatError::io(Loc::file(&self.path), "rename into place", e))?,
            Replace::Never => rename_no_replace(&self.path, &self.final_path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    FormatError::Invalid(format!(
                        "{}: a file of that name appeared in the repository while this one was written; \
                         nothing was replaced (move that file out and run the command again)",
                        loc()
                    ))
                } else {
                    FormatError::io(Loc::file(&self.path), "rename into place", e)
                }
            })?,
        }
        self.renamed = true;
        fault::step(fault::Step::Rename);
        Ok(())
    }
}

impl Drop for TempName {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("could not remove the unfinished file {}: {e}", self.path.display());
                }
            }
        }
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`. File systems
/// without `RENAME_NOREPLACE` get a hard link and an unlink (also atomic against a file at
/// `to`); those without hard links get a check and a plain rename, under the repository lock.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP)) {
        return Err(err);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) if std::fs::symlink_metadata(to).is_ok() => Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists)),
        Err(_) => std::fs::rename(from, to),
    }
}

/// Writes `bytes` as the file `name` of `dir`, replacing the old one atomically and durably.
pub fn write_file_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let (mut file, mut temp) = create_temp(dir, name)?;
    let loc = Loc::file(temp.path());
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| FormatError::io(loc, "write", e))?;
    fault::step(fault::Step::Fsync);
    temp.rename_into_place(Replace::Yes)?;
    sync_dir(dir)
}

/// fsyncs a folder so that renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| FormatError::io(Loc::file(dir), "open directory", e))?;
    d.sync_all().map_err(|e| FormatError::io(Loc::file(dir), "fsync directory", e))?;
    fault::step(fault::Step::Fsync);
    Ok(())
}

/// Deletes the file at `path` (a symbolic link is removed, never followed). Durable once the
/// folder is fsynced (`sync_dir`, once after a series of deletes).
pub fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| FormatError::io(Loc::file(path), "delete", e))?;
    fault::step(fault::Step::Delete);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_at_a_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // Every name this process could pick for strata.repo, planted as a link: the random
        // suffix makes the planted ones miss; a planted exact name would fail O_EXCL.
        let planted = dir.path().join(format!("{TEMP_PREFIX}strata.repo.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_file_durably(dir.path(), "strata.repo", b"new identity").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(dir.path().join("strata.repo")).unwrap(), b"new identity");
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
    }

    #[test]
    fn an_image_never_replaces_a_file_at_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("v00000001.strata");
        std::fs::write(&target, b"older").unwrap();
        let (_file, mut temp) = create_temp(dir.path(), "v00000001.strata").unwrap();
        let err = temp.rename_into_place(Replace::Never).unwrap_err();
        assert!(err.to_string().contains("nothing was replaced"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"older");
        let temp_path = temp.path().to_path_buf();
        drop(temp);
        assert!(!temp_path.exists(), "the unpublished temporary file is removed");
    }

    #[test]
    fn a_published_file_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        write_file_durably(dir.path(), "strata.toml", b"one").unwrap();
        write_file_durably(dir.path(), "strata.toml", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("strata.toml")).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("strata.toml")]);
    }
}
