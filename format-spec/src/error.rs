//! `FormatError`: every failure of the format layer, each saying where it happened (file,
//! version, byte offset) and, where there is one, what to do about it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where something happened: a file, and when known the version it holds and a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub path: PathBuf,
    pub version: Option<u64>,
    /// The source block concerned, when there is one.
    pub block: Option<u64>,
    pub offset: Option<u64>,
}

impl Loc {
    pub fn file(path: &Path) -> Loc {
        Loc { path: path.to_path_buf(), version: None, block: None, offset: None }
    }

    pub fn version(mut self, version: u64) -> Loc {
        self.version = Some(version);
        self
    }

    pub fn block(mut self, block: u64) -> Loc {
        self.block = Some(block);
        self
    }

    pub fn at(mut self, offset: u64) -> Loc {
        self.offset = Some(offset);
        self
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(v) = self.version {
            write!(f, " (version {v})")?;
        }
        if let Some(b) = self.block {
            write!(f, " block {b}")?;
        }
        if let Some(o) = self.offset {
            write!(f, " at offset {o}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{loc}: {action}: {source}")]
    Io { loc: Loc, action: &'static str, source: io::Error },

    #[error("{loc}: not a strata image (wrong magic); move it out of the repository")]
    NotAnImage { loc: Loc },

    #[error(
        "{loc}: image format version {found}, but this strata reads only versions 1 to {supported}; \
         use a strata release that supports it"
    )]
    UnsupportedFormat { loc: Loc, found: u32, supported: u32 },

    #[error(
        "{loc}: {what} checksum mismatch (expected crc32c {expected:08x}, found {actual:08x}); \
         the image is damaged"
    )]
    Checksum { loc: Loc, what: &'static str, expected: u32, actual: u32 },

    #[error("{loc}: content hash mismatch of block {block}; the image is damaged")]
    HashMismatch { loc: Loc, block: u64 },

    #[error("{loc}: incomplete image ({detail}); it is not a finished version")]
    Incomplete { loc: Loc, detail: String },

    #[error("{loc}: corrupt {what}: {detail}; the image is damaged")]
    Corrupt { loc: Loc, what: &'static str, detail: String },

    #[error("{loc}: {detail}")]
    Foreign { loc: Loc, detail: String },

    #[error("{0}")]
    Invalid(String),

    #[error("{path}: not a strata repository ({detail})")]
    NotARepository { path: PathBuf, detail: String },

    #[error("{path}: the repository's identity cannot be rebuilt: {detail}")]
    DamagedIdentity { path: PathBuf, detail: String },

    #[error("{path}: another strata backup is running in this repository; wait for it to finish")]
    Busy { path: PathBuf },

    #[error("{repo}: no version {id}; `strata list {repo}` shows the versions")]
    NoSuchVersion { repo: PathBuf, id: u64 },

    #[error("{repo}: version {id} is not restorable: {reason}")]
    NotRestorable { repo: PathBuf, id: u64, reason: ChainProblem },

    #[error("{repo}: no restorable version; `strata verify {repo}` says why")]
    NoRestorableVersion { repo: PathBuf },
}

impl FormatError {
    pub fn io(loc: Loc, action: &'static str, source: io::Error) -> FormatError {
        FormatError::Io { loc, action, source }
    }

    /// The version whose image this error shows to be damaged: a checksum, hash or structure
    /// that does not hold, or the storage answering EIO while reading it.
    pub fn damaged_version(&self) -> Option<u64> {
        match self {
            FormatError::Checksum { loc, .. }
            | FormatError::HashMismatch { loc, .. }
            | FormatError::Corrupt { loc, .. }
            | FormatError::Incomplete { loc, .. } => loc.version,
            FormatError::Io { loc, source, .. } if source.raw_os_error() == Some(libc::EIO) => loc.version,
            _ => None,
        }
    }

    /// The operating-system error behind this one, if any (for exit codes and ENOSPC checks).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            FormatError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Why a version cannot be read: what its chain lacks. Its text is the reason users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainProblem {
    /// The version's own image is not in the folder.
    #[error("no image {name}")]
    NoImage { name: String },
    /// The version's own image failed its checks.
    #[error("its image is damaged: {why}")]
    Damaged { why: String },
    #[error("needs version {needed} ({name}), which is missing (from version {from}'s chain)")]
    NeedsMissing { needed: u64, name: String, from: u64 },
    #[error("needs version {needed} ({name}), which is damaged: {why}")]
    NeedsDamaged { needed: u64, name: String, why: String },
    #[error(
        "needs version {needed} ({name}), but that file is not the image it was made from (replaced or copied \
         in from elsewhere)"
    )]
    NeedsReplaced { needed: u64, name: String },
    #[error("needs version {needed} ({name}), whose source size differs")]
    NeedsOtherSize { needed: u64, name: String },
    #[error("chain longer than {max} images")]
    TooLong { max: usize },
    #[error("{image}: a differential whose parent is not a full")]
    DifferentialWithoutFull { image: String },
}
