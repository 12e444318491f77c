//! The strata on-disk format. This crate owns every byte strata writes: the image header, the
//! block index, the footer, how stored blocks are encoded and checked, how a repository is laid
//! out and where its files live (`storage`), and how a read of version N resolves through its
//! chain, and the keys and seals of encrypted repositories (`crypto`). It knows nothing of the
//! command line or of FUSE; `mounts` reads the mount table that the engines and the mount both
//! consult. `SPEC.md` next to this crate is the normative description.

pub mod block;
pub mod block_map;
pub mod crypto;
pub mod digest;
pub mod error;
pub mod fault;
pub mod footer;
pub mod frame_cache;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod image;
pub mod index;
pub mod layout;
mod le;
pub mod mounts;
pub mod patch_group;
mod read_ahead;
pub mod read_plan;
pub mod repo;
pub mod source_id;
pub mod storage;
pub mod version;
pub mod volume;

pub use error::{ChainProblem, FormatError, Loc, Result};
pub use header::{ImageHeader, ImageRef, Kind, Rule};
pub use image::{Finish, ImageFile, ImageWriter, ReadScratch};
pub use index::{Encoding, IndexEntry};
pub use repo::{RepoLock, RepoState, Repository, VersionStatus};
pub use source_id::{SourceId, SourceIdKind};
pub use version::{BlockLocation, HashCursor, StoredBlock, VersionReader};

#[cfg(test)]
mod read_plan_tests;
#[cfg(test)]
mod tests;
