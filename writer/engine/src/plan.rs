//! Deciding what a backup makes: its kind, the rule that chose it, and the version it is a delta
//! against, from what was asked, the task's scheme, the health of the repository, the source's
//! size and the time. Pure: no I/O.

use std::sync::Arc;

use strata_format::{ImageFile, Kind, RepoState, Rule};

use crate::config::{Scheme, TaskConfig};
use crate::source_identity::{replaced, SourceIdentity};

/// What the next backup will be.
#[derive(Debug)]
pub struct Plan {
    pub kind: Kind,
    pub rule: Rule,
    /// The chain the new image is a delta against (full first); empty for a full.
    pub parent_chain: Vec<Arc<ImageFile>>,
    /// Why the plan differs from what was asked (printed as warnings).
    pub notes: Vec<String>,
}

/// `last_source_full` is the repository's record of its newest full read from the source (id,
/// time), which merges and prunes do not move.
pub fn plan(
    requested: Option<Kind>,
    state: &RepoState,
    source_size: u64,
    identity: &SourceIdentity,
    config: &TaskConfig,
    now_secs: i64,
    last_source_full: Option<(u64, i64)>,
) -> Plan {
    let full = |rule, notes| Plan { kind: Kind::Full, rule, parent_chain: Vec::new(), notes };
    if requested == Some(Kind::Full) {
        return full(if state.images.is_empty() { Rule::First } else { Rule::Requested }, Vec::new());
    }
    let Some(base_id) = state.latest_restorable() else {
        let note = match (requested, state.images.is_empty()) {
            (None, true) => return full(Rule::First, Vec::new()),
            (Some(k), true) => format!("the repository has no full yet: making a full instead of the {k} asked for"),
            (Some(k), false) => format!("no usable full in the repository: making a full instead of the {k} asked for"),
            (None, false) => "no usable full in the repository: making a full".to_string(),
        };
        let rule = if state.images.is_empty() { Rule::First } else { Rule::NoUsableFull };
        return full(rule, vec![note]);
    };
    let chain = state.chain(base_id).expect("the latest restorable version has a chain");
    let mut notes = Vec::new();
    if let Some(newest) = state.ids().next_back().filter(|&n| n != base_id) {
        let why = state.status(newest).problem.map(|p| p.to_string()).unwrap_or_default();
        notes.push(format!("version {newest} is not restorable ({why}); the new backup builds on version {base_id}"));
    }
    let chain_full = &chain[0].header;
    if chain_full.source_size != source_size {
        notes.push(format!(
            "the source is {} but the chain of version {base_id} is {} (resized or replaced volume): making a full",
            crate::units::size(source_size),
            crate::units::size(chain_full.source_size)
        ));
        return full(Rule::SourceResized, notes);
    }
    let base_header = &chain.last().expect("a chain holds its version").header;
    if let Some(why) = replaced(base_header, identity) {
        match requested {
            Some(k) => notes.push(format!("{why}; making the {k} asked for")),
            None => {
                notes.push(format!("{why}: making a full"));
                return full(Rule::SourceReplaced, notes);
            }
        }
    }
    let (kind, rule) = match requested {
        Some(k) => (k, Rule::Requested),
        None => {
            let scheme_kind = match config.scheme {
                Scheme::Differential => Kind::Differential,
                Scheme::Incremental | Scheme::IncrementalForever => Kind::Incremental,
            };
            if config.scheme != Scheme::IncrementalForever {
                // Backups made since the last full read from the source, that full included
                // (ids grow by one per backup; merges and prunes do not reset the count).
                let (full_id, full_secs) = last_source_full.unwrap_or((chain_full.version, chain_full.created_secs));
                let next_id = state.repo.next_version_id(state).unwrap_or(u64::MAX);
                let cycle = next_id.saturating_sub(full_id);
                let age_days = now_secs.saturating_sub(full_secs).max(0) / 86_400;
                if config.full_every.is_some_and(|n| cycle >= u64::from(n)) {
                    return full(Rule::FullEvery, notes);
                }
                if config.full_every_days.is_some_and(|d| age_days >= i64::from(d)) {
                    return full(Rule::FullEveryDays, notes);
                }
            }
            (scheme_kind, Rule::Scheme)
        }
    };
    if kind == Kind::Incremental && chain.len() >= strata_format::layout::MAX_CHAIN_LEN {
        notes.push(format!(
            "the chain of version {base_id} has {} images, the most a chain may have: making a full",
            chain.len()
        ));
        return full(Rule::ChainLimit, notes);
    }
    let parent_chain = match kind {
        Kind::Differential => vec![chain[0].clone()],
        _ => chain,
    };
    Plan { kind, rule, parent_chain, notes }
}
