//! Deciding what a backup makes: its kind and the version it is a delta against, from what was
//! asked, the health of the repository and the source's size. Pure: no I/O.

use std::sync::Arc;

use strata_format::{ImageFile, Kind, RepoState};

/// What the next backup will be.
#[derive(Debug)]
pub struct Plan {
    pub kind: Kind,
    /// The chain the new image is a delta against (full first); empty for a full.
    pub parent_chain: Vec<Arc<ImageFile>>,
    /// Why the plan differs from what was asked (printed as warnings).
    pub notes: Vec<String>,
}

pub fn plan(requested: Option<Kind>, state: &RepoState, source_size: u64) -> Plan {
    let full = |notes| Plan { kind: Kind::Full, parent_chain: Vec::new(), notes };
    if requested == Some(Kind::Full) {
        return full(Vec::new());
    }
    let wanted = requested.unwrap_or(Kind::Incremental);
    let latest = state.latest_restorable();
    let Some(base_id) = latest else {
        let note = match (requested, state.images.is_empty()) {
            (None, true) => return full(Vec::new()),
            (Some(k), true) => format!("the repository has no full yet: making a full instead of the {k} asked for"),
            (Some(k), false) => format!("no usable full in the repository: making a full instead of the {k} asked for"),
            (None, false) => "no usable full in the repository: making a full".to_string(),
        };
        return full(vec![note]);
    };
    let chain = state.chain(base_id).expect("the latest restorable version has a chain");
    let mut notes = Vec::new();
    if let Some(newest) = state.ids().next_back().filter(|&n| n != base_id) {
        let why = state.status(newest).problem.unwrap_or_default();
        notes.push(format!("version {newest} is not restorable ({why}); the new backup builds on version {base_id}"));
    }
    let chain_size = chain[0].header.source_size;
    if chain_size != source_size {
        notes.push(format!(
            "the source is {source_size} bytes but the chain of version {base_id} is {chain_size} bytes \
             (resized or replaced volume): making a full"
        ));
        return full(notes);
    }
    let parent_chain = match wanted {
        Kind::Differential => vec![chain[0].clone()],
        _ => chain,
    };
    Plan { kind: wanted, parent_chain, notes }
}
