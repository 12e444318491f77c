//! `strata merge REPO VERSION`: rewrite a version as a synthetic full.

use anyhow::Result;
use strata_format::Repository;

use crate::commands::{Global, Outcome};
use strata_engine::merge::merge_version;
use strata_engine::units::bytes;

pub use super::VersionArgs as Args;

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let mut repo = Repository::open(&args.repo)?;
    let lock = repo.lock()?;
    repo.remove_leftovers(&lock)?;
    let mut state = repo.scan()?;
    state.check_indexes();
    let id = state.resolve_name(&args.version)?;
    let progress = crate::progress_display::for_terminal(global.quiet || args.json);
    let s = merge_version(&state, &lock, id, progress.as_ref())?;
    if args.json {
        super::print_json(&s)?;
    } else if !global.quiet {
        let chain: Vec<String> = s.old_chain.iter().map(u64::to_string).collect();
        println!(
            "version {} is now a full: {} blocks copied from chain {} ({} -> {}), {:.2} s; versions below it are unchanged",
            s.id,
            s.blocks,
            chain.join(" <- "),
            bytes(s.old_bytes),
            bytes(s.new_bytes),
            s.seconds
        );
    }
    Ok(Outcome::Success)
}
