//! The strata engines as a library: back up a source into a repository, restore, verify,
//! merge, prune and repair its versions, and the task configuration they follow. They report
//! progress through `progress::Progress` and return typed results; they never print. The
//! on-disk format and the read path are `strata_format`'s; the `strata` command (the crate in
//! `writer/`) parses arguments and draws what these return.

pub mod backup;
pub mod claim;
pub mod config;
mod dedup;
mod direct_io;
pub mod interrupt;
mod live_source;
pub mod merge;
mod pack;
mod patch;
mod patch_check;
mod plan;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod schedule;
pub mod source;
pub mod source_identity;
mod source_map;
pub mod units;
pub mod verify;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod power_cut_tests;
