//! `strata verify REPO [VERSION...]`: check images and versions; exit 1 on any damage.

use std::path::PathBuf;

use anyhow::Result;

use crate::verify::{verify, VerifyOptions};
use crate::{Global, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// Versions to check (ids or `latest`), with the images they need; all when none given.
    #[arg(value_parser = super::version_arg)]
    pub versions: Vec<String>,
    /// Check headers, indexes and digests only, without reading block data.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let progress = crate::progress::for_terminal(global.quiet || args.json);
    let opts = VerifyOptions { versions: &args.versions, quick: args.quick };
    let report = verify(&args.repo, &opts, progress.as_ref())?;
    if args.json {
        super::print_json(&report)?;
    } else {
        for img in &report.images {
            if img.sound {
                if global.quiet {
                } else if args.quick {
                    println!("ok       {} (version {}): header, index and footer checked", img.file, img.version);
                } else {
                    println!("ok       {} (version {}): {} blocks checked", img.file, img.version, img.blocks_checked);
                }
            } else {
                println!("DAMAGED  {} (version {}): {} bad blocks", img.file, img.version, img.bad_blocks);
                for p in &img.problems {
                    println!("         {p}");
                }
            }
        }
        for v in &report.versions {
            match &v.problem {
                None if global.quiet => {}
                None if args.quick => println!("version {}: restorable, digest verified from the index", v.id),
                None => println!("version {}: restorable, digest verified", v.id),
                Some(p) => println!("version {}: NOT restorable: {p}", v.id),
            }
        }
        if !global.quiet {
            println!("{}", if report.ok { "verify: everything checked is sound" } else { "verify: damage found" });
            if args.quick {
                println!(
                    "verify: quick: no block data was read (crc32c, decompression and hashes of the data unchecked)"
                );
            }
        }
    }
    Ok(if report.ok { Outcome::Success } else { Outcome::Failure })
}
