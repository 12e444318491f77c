//! `strata repair REPO`: rewrite a missing or damaged `strata.repo` from the images and clear
//! leftovers; print what was done.

use std::path::PathBuf;

use anyhow::Result;

use crate::commands::{Global, Outcome};
use strata_engine::repair::repair;

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let r = repair(&args.repo)?;
    if args.json {
        super::print_json(&r)?;
    } else if !global.quiet {
        match &r.identity_rewritten {
            Some(why) => println!("rewrote strata.repo from the image headers: {why}"),
            None => println!("strata.repo is sound (repository {}, block size {})", r.repo_id, r.block_size),
        }
        for removed in &r.removed {
            println!("removed {removed}, left by an interrupted command");
        }
        let restorable = r.versions - r.not_restorable.len();
        println!("{} version(s), {restorable} restorable", r.versions);
        for (id, why) in &r.not_restorable {
            println!("version {id}: NOT restorable: {why}");
        }
        if !r.not_restorable.is_empty() {
            println!("images are never changed by repair; `strata verify {}` checks every block", args.repo.display());
        }
    }
    Ok(Outcome::Success)
}
