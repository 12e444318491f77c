//! `strata restore REPO VERSION TARGET`: write a version back, checked end to end.

use std::path::PathBuf;

use anyhow::Result;

use crate::restore::restore;
use crate::units::bytes;
use crate::{Global, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// The version id, or `latest`.
    pub version: String,
    /// A block device or a file (created sparse).
    pub target: PathBuf,
    /// Overwrite a non-empty file or device.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let progress = crate::progress::for_terminal(global.quiet || args.json);
    let s = restore(&args.repo, &args.version, &args.target, args.force, progress.as_ref())?;
    if args.json {
        super::print_json(&s)?;
    } else if !global.quiet {
        println!(
            "restored version {} to {}: {}, {:.2} s, {:.1} MB/s; every block's crc32c and the whole-source digest verified",
            s.id,
            s.target.display(),
            bytes(s.bytes),
            s.seconds,
            s.mb_per_s
        );
    }
    Ok(Outcome::Success)
}
