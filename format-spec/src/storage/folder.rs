//! A repository in a local folder, and the one place that knows how a file is put there
//! durably. A new file is written under a temporary name that nobody can predict or plant in
//! advance (created exclusively, never through a link), made durable (fsync), renamed into place
//! (an image never replaces a file already there unless told to; the identity and configuration
//! files do) and the rename made durable (fsync of the folder). A temporary file that is not
//! published is removed when its upload is dropped. Deletes are made durable by one fsync of the
//! folder after them. Every step is counted for the crash tests (`fault`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::{Disk, DiskFile, OsDisk};
use super::{Blob, EntryKind, Replace, Storage, Upload};
use crate::error::{FormatError, Loc, Result};
use crate::fault;
use crate::layout::{LOCK_FILE, TEMP_PREFIX};

/// A repository folder on a `Disk`.
#[derive(Debug, Clone)]
pub struct Folder {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
}

impl Folder {
    /// The folder at `dir` on the operating system's file systems.
    pub fn new(dir: &Path) -> Folder {
        Folder::on(Arc::new(OsDisk), dir)
    }

    /// The folder at `dir` on `disk`.
    pub fn on(disk: Arc<dyn Disk>, dir: &Path) -> Folder {
        Folder { dir: dir.to_path_buf(), disk }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a new, empty temporary file for the file `final_name`:
    /// `.tmp-<final_name>.<pid>.<random>`, created exclusively (a link or file already at
    /// that name is never opened).
    fn create_temp(&self, final_name: &str) -> Result<FolderUpload> {
        let mut last_error = None;
        for _ in 0..NAME_ATTEMPTS {
            let path = self.path(&format!("{TEMP_PREFIX}{final_name}.{}.{:016x}", std::process::id(), random_u64()));
            match self.disk.create_new(&path) {
                Ok(file) => {
                    let temp = TempName { path, disk: self.disk.clone(), renamed: false };
                    return Ok(FolderUpload {
                        folder: self.clone(),
                        final_name: final_name.to_string(),
                        file,
                        temp,
                        offset: 0,
                        written_back: 0,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => return Err(FormatError::io(Loc::file(&path), "create", e)),
            }
        }
        let e = last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists));
        Err(FormatError::io(Loc::file(&self.dir), "create a temporary file (every name tried exists)", e))
    }

    fn sync_dir(&self) -> Result<()> {
        self.disk.sync_dir(&self.dir).map_err(|e| FormatError::io(Loc::file(&self.dir), "fsync directory", e))?;
        fault::step(fault::Step::Fsync);
        Ok(())
    }
}

/// Attempts at an unused temporary name before giving up (each name is random).
const NAME_ATTEMPTS: usize = 16;

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        return nanos as u64 ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

/// A temporary file's name, removed on drop unless it was renamed into place.
#[derive(Debug)]
struct TempName {
    path: PathBuf,
    disk: Arc<dyn Disk>,
    renamed: bool,
}

impl Drop for TempName {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(e) = self.disk.remove(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("could not remove the unfinished file {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// Appended bytes after which the kernel is asked to start writing them to the disk, so that
/// the fsync that publishes the file waits for the last of them only.
const WRITE_BACK_EVERY: u64 = 16 << 20;

#[derive(Debug)]
struct FolderUpload {
    folder: Folder,
    final_name: String,
    file: Box<dyn DiskFile>,
    temp: TempName,
    offset: u64,
    written_back: u64,
}

impl FolderUpload {
    fn sync(&self) -> Result<()> {
        self.file.sync().map_err(|e| FormatError::io(Loc::file(&self.temp.path), "fsync", e))?;
        fault::step(fault::Step::Fsync);
        Ok(())
    }

    fn rename_into_place(&mut self, replace: Replace) -> Result<PathBuf> {
        let final_path = self.folder.path(&self.final_name);
        self.folder.disk.rename(&self.temp.path, &final_path, replace == Replace::Yes).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists && replace == Replace::Never {
                FormatError::Invalid(format!(
                    "{}: a file of that name appeared in the repository while this one was written; nothing was \
                     replaced (move that file out and run the command again)",
                    final_path.display()
                ))
            } else {
                FormatError::io(Loc::file(&self.temp.path), "rename into place", e)
            }
        })?;
        self.temp.renamed = true;
        fault::step(fault::Step::Rename);
        Ok(final_path)
    }
}

impl Upload for FolderUpload {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        if self.offset - self.written_back >= WRITE_BACK_EVERY {
            self.file.start_write_back(self.written_back, self.offset);
            self.written_back = self.offset;
        }
        Ok(())
    }

    fn temp_path(&self) -> &Path {
        &self.temp.path
    }

    fn publish(
        mut self: Box<Self>,
        replace: Replace,
        before_publish: Box<dyn FnOnce() -> Result<()> + '_>,
    ) -> Result<PathBuf> {
        self.sync()?;
        before_publish()?;
        fault::point("image.before_rename");
        let final_path = self.rename_into_place(replace)?;
        fault::point("image.after_rename");
        self.folder.sync_dir()?;
        fault::point("image.after_dir_sync");
        Ok(final_path)
    }
}

impl Storage for Folder {
    fn root(&self) -> &Path {
        &self.dir
    }

    fn list(&self) -> Result<Vec<(String, EntryKind)>> {
        self.disk.list(&self.dir).map_err(|e| FormatError::io(Loc::file(&self.dir), "list", e))
    }

    fn kind(&self, name: &str) -> Result<Option<EntryKind>> {
        match self.disk.kind(&self.path(name)) {
            Ok(kind) => Ok(Some(kind)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FormatError::io(Loc::file(&self.path(name)), "look at", e)),
        }
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Blob>> {
        let file = self.disk.open_read(&self.path(name))?;
        Ok(Arc::new(BlobFile(file)))
    }

    fn create(&self, name: &str) -> Result<Box<dyn Upload>> {
        Ok(Box::new(self.create_temp(name)?))
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut upload = self.create_temp(name)?;
        upload.append(bytes).map_err(|e| FormatError::io(Loc::file(upload.temp_path()), "write", e))?;
        upload.sync()?;
        upload.rename_into_place(Replace::Yes)?;
        self.sync_dir()
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        self.disk.remove(&path).map_err(|e| FormatError::io(Loc::file(&path), "delete", e))?;
        fault::step(fault::Step::Delete);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.sync_dir()
    }

    fn lock(&self) -> Result<Box<dyn std::fmt::Debug + Send + Sync>> {
        let path = self.path(LOCK_FILE);
        match self.disk.lock(&path) {
            Ok(Some(held)) => Ok(held),
            Ok(None) => Err(FormatError::Busy { path: self.dir.clone() }),
            Err(e) => Err(FormatError::io(Loc::file(&path), "lock", e)),
        }
    }

    fn scratch(&self) -> Result<File> {
        self.disk.scratch(&self.dir).map_err(|e| FormatError::io(Loc::file(&self.dir), "create a scratch file", e))
    }
}

/// A file of the folder opened for reading.
#[derive(Debug)]
struct BlobFile(Box<dyn DiskFile>);

impl Blob for BlobFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn will_need(&self, at: u64, len: u64) {
        self.0.will_need(at, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_planted_link_at_a_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // Every name this process could pick for strata.repo, planted as a link: the random
        // suffix makes the planted ones miss; a planted exact name would fail to be created.
        let planted = dir.path().join(format!("{TEMP_PREFIX}strata.repo.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        Folder::new(dir.path()).put("strata.repo", b"new identity").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(dir.path().join("strata.repo")).unwrap(), b"new identity");
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
    }

    #[test]
    fn an_image_never_replaces_a_file_at_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("v00000001.strata");
        std::fs::write(&target, b"older").unwrap();
        let folder = Folder::new(dir.path());
        let mut upload = folder.create("v00000001.strata").unwrap();
        upload.append(b"newer").unwrap();
        let temp_path = upload.temp_path().to_path_buf();
        let err = upload.publish(Replace::Never, Box::new(|| Ok(()))).unwrap_err();
        assert!(err.to_string().contains("nothing was replaced"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"older");
        assert!(!temp_path.exists(), "the unpublished temporary file is removed");
    }

    #[test]
    fn a_published_file_replaces_the_old_one_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::new(dir.path());
        folder.put("strata.toml", b"one").unwrap();
        folder.put("strata.toml", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("strata.toml")).unwrap(), b"two");
        let mut upload = folder.create("v00000002.strata").unwrap();
        upload.append(b"ab").unwrap();
        upload.append(b"cd").unwrap();
        let published = upload.publish(Replace::Never, Box::new(|| Ok(()))).unwrap();
        assert_eq!(std::fs::read(published).unwrap(), b"abcd");
        assert_eq!(names(dir.path()), ["strata.toml", "v00000002.strata"]);
    }

    #[test]
    fn a_dropped_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::new(dir.path());
        let mut upload = folder.create("v00000001.strata").unwrap();
        upload.append(b"partial").unwrap();
        drop(upload);
        assert!(names(dir.path()).is_empty());
    }
}
