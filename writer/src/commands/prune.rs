//! `strata prune REPO [--keep-*] [--dry-run]`: apply retention, printing each decision and why.

use std::path::PathBuf;

use anyhow::Result;

use super::task::KeepOptions;
use crate::commands::{Global, Outcome};
use strata_engine::config::TaskConfig;
use strata_engine::prune::{prune, Action};
use strata_engine::units::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    #[command(flatten)]
    pub keep: KeepOptions,
    /// Print what would be kept, merged and deleted, and change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn signed(n: i64) -> String {
    match n < 0 {
        true => format!("-{}", bytes(n.unsigned_abs())),
        false => bytes(n as u64),
    }
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let mut policy = TaskConfig::load(&strata_format::Repository::open(&args.repo)?)?.retention;
    if args.keep.any() {
        policy = Default::default();
        args.keep.apply(&mut policy);
        if policy.is_empty() {
            anyhow::bail!(
                "no retention rule left: a count of 0 turns its rule off, the same as in `strata config` and \
                 strata.toml; give a count of 1 or more (prune never deletes every version)"
            );
        }
    }
    let progress = crate::progress_display::for_terminal(global.quiet || args.json);
    let report = prune(&args.repo, &policy, args.dry_run, progress.as_ref())?;
    if args.json {
        super::print_json(&report)?;
        return Ok(Outcome::Success);
    }
    if !global.quiet {
        let would = if report.dry_run { "would " } else { "" };
        for d in &report.decisions {
            let verb = match d.action {
                Action::Keep => "keep  ",
                Action::Merge => "merge ",
                Action::Delete => "delete",
                Action::Leave => "leave ",
            };
            println!("{would}{verb} version {:>4} ({:>10}): {}", d.id, bytes(d.bytes), d.why);
        }
        let merges = match report.merge_bytes {
            0 => String::new(),
            n => format!(" (the merges {} {})", if report.dry_run { "would add" } else { "added" }, signed(n)),
        };
        match (report.dry_run, report.freed_bytes >= 0) {
            (true, true) => println!("would free {}{merges}; nothing changed", bytes(report.freed_bytes as u64)),
            (true, false) => {
                println!(
                    "the repository would grow by {}{merges}; nothing changed",
                    bytes(report.freed_bytes.unsigned_abs())
                )
            }
            (false, true) => println!("freed {}{merges}", bytes(report.freed_bytes as u64)),
            (false, false) => println!("the repository grew by {}{merges}", bytes(report.freed_bytes.unsigned_abs())),
        }
    }
    Ok(Outcome::Success)
}
