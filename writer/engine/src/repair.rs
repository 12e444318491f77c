//! `strata repair`: put a repository's own files right without touching a version. It rewrites
//! `strata.repo` from the image headers when it is missing or damaged (every image carries the
//! repository id and block size), removes what interrupted commands left, and says how many
//! versions are restorable. It never moves, rewrites or deletes an image.

use std::path::Path;

use anyhow::Result;
use strata_format::header::hex_id;
use strata_format::Repository;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RepairReport {
    /// Why `strata.repo` was rewritten; `None` when it was sound and left as it was.
    pub identity_rewritten: Option<String>,
    pub repo_id: String,
    pub block_size: u32,
    /// The leftovers of interrupted commands that were removed.
    pub removed: Vec<String>,
    pub versions: usize,
    /// The versions that cannot be restored, each with why (`strata verify` checks the data).
    pub not_restorable: Vec<(u64, String)>,
}

pub fn repair(path: &Path) -> Result<RepairReport> {
    let mut repo = Repository::open(path)?;
    let identity_rewritten = repo.rebuilt.clone();
    let lock = repo.lock()?; // writes the rebuilt identity
    let removed = repo.remove_leftovers(&lock)?.iter().map(|p| p.display().to_string()).collect();
    let mut state = repo.scan()?;
    state.check_indexes();
    let statuses = state.statuses();
    let not_restorable =
        statuses.iter().filter_map(|s| s.problem.as_ref().map(|problem| (s.id, problem.to_string()))).collect();
    Ok(RepairReport {
        identity_rewritten,
        repo_id: hex_id(&repo.repo_id),
        block_size: repo.block_size,
        removed,
        versions: statuses.len(),
        not_restorable,
    })
}
