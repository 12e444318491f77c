//! Where a repository's files live. `Storage` is everything the format and the engines ask of
//! it: list the names, open one for range reads, write a new one and publish it atomically and
//! durably, replace a small file (the identity, the configuration), delete, take the write lock.
//! It is shaped for an object store as much as for a folder: a new file is invisible until its
//! publish, which is one step (a rename in a folder, the final write of an object in a store),
//! and nothing is ever modified in place.
//!
//! `Folder` (a local folder, through a `Disk`) is the implementation today and the only place
//! that knows the durable-publish protocol; `lossy` is a disk for the crash tests that forgets
//! what was not synced when its power is cut.

pub mod disk;
mod folder;
#[cfg(any(test, feature = "lossy-disk"))]
pub mod lossy;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use folder::Folder;

use crate::error::{FormatError, Loc, Result};

/// Bytes stored under a name, read by range. Shared between threads.
pub trait Blob: Send + Sync + std::fmt::Debug {
    /// Reads at most `buf.len()` bytes at `offset`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether it holds no byte.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `buf` from `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ends before the bytes asked for",
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Advice that `len` bytes at `at` will be read soon (a folder asks the kernel to read
    /// them ahead); changes nothing but speed.
    fn will_need(&self, _at: u64, _len: u64) {}
}

/// What is at a name of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    /// A symbolic link (never followed; removed when it sits at a temporary name).
    Link,
    /// Anything else (a folder, a FIFO, a device), said in words.
    Other(&'static str),
}

/// Whether publishing may replace what is already under the final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// A merged full takes its delta's place in one step, so that the version never goes missing.
    Yes,
    /// New versions: whatever is already there (a version, or anything a user put there) is
    /// never lost.
    Never,
}

/// A file being written: invisible under its name until `publish`; dropped unpublished, it is
/// removed.
pub trait Upload: Send + std::fmt::Debug {
    /// Appends `bytes`.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Where the bytes are being written (a temporary file of a folder), for messages and for
    /// the clean-up a fatal signal does.
    fn temp_path(&self) -> &Path;

    /// Makes everything appended durable, runs `before_publish` (a backup records the version
    /// id there), then puts it under its final name; returns once that is durable too.
    fn publish(
        self: Box<Self>,
        replace: Replace,
        before_publish: Box<dyn FnOnce() -> Result<()> + '_>,
    ) -> Result<PathBuf>;
}

/// Where a repository's files live; see the module documentation.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The repository's location, for messages (a folder's path).
    fn root(&self) -> &Path;

    /// Where the file `name` is, for messages.
    fn locate(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// Every name and what is there, in no particular order.
    fn list(&self) -> Result<Vec<(String, EntryKind)>>;

    /// What is at `name`, if anything.
    fn kind(&self, name: &str) -> Result<Option<EntryKind>>;

    /// Opens the file `name` for reading (only a regular file: see `disk`).
    fn open(&self, name: &str) -> io::Result<Arc<dyn Blob>>;

    /// Starts a new file that will be published as `name`.
    fn create(&self, name: &str) -> Result<Box<dyn Upload>>;

    /// Puts `bytes` under `name` atomically and durably, replacing what was there.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()>;

    /// Deletes `name` (a link is removed, never followed); durable after `sync`.
    fn remove(&self, name: &str) -> Result<()>;

    /// Makes the deletes before it durable.
    fn sync(&self) -> Result<()>;

    /// Takes the repository's write lock, held until the returned value is dropped; fails with
    /// `FormatError::Busy` at once when another holder has it.
    fn lock(&self) -> Result<Box<dyn std::fmt::Debug + Send + Sync>>;

    /// A scratch file, unnamed, for a writer's working data (an image's index).
    fn scratch(&self) -> Result<File>;
}

/// The whole text of the file `name`, at most `limit` bytes (longer is an error).
pub fn read_text(storage: &dyn Storage, name: &str, limit: u64) -> io::Result<String> {
    let blob = storage.open(name)?;
    let len = blob.len()?;
    if len > limit {
        return Err(io::Error::other(format!("longer than {limit} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    blob.read_exact_at(&mut bytes, 0)?;
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// `read_text` with the failure named by file.
pub fn read_text_at(storage: &dyn Storage, name: &str, limit: u64) -> Result<Option<String>> {
    match read_text(storage, name, limit) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FormatError::io(Loc::file(&storage.locate(name)), "read", e)),
    }
}
