//! `strata restore REPO VERSION TARGET`: write a version back, checked end to end.

use std::path::PathBuf;

use anyhow::Result;

use crate::commands::{Global, Outcome};
use strata_engine::restore::restore;
use strata_engine::units::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// The version id, or `latest`.
    #[arg(value_parser = super::version_arg)]
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

/// Whether `target` is this process's standard output (`/dev/stdout`, or the file it names).
fn is_stdout(target: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(target) else { return false };
    let Ok(stdout) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stdout())) else { return false };
    target.dev() == stdout.st_dev && target.ino() == stdout.st_ino
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let progress = crate::progress_display::for_terminal(global.quiet || args.json);
    // Restored onto standard output, the disk is the output: the summary goes to stderr.
    let onto_stdout = is_stdout(&args.target);
    let s = restore(&args.repo, &args.version, &args.target, args.force, progress.as_ref())?;
    if args.json && onto_stdout {
        eprintln!("{}", serde_json::to_string_pretty(&s)?);
    } else if args.json {
        super::print_json(&s)?;
    } else if !global.quiet {
        let holes = match s.bytes_written < s.bytes {
            true => format!(" ({} written, the rest left as holes)", bytes(s.bytes_written)),
            false => String::new(),
        };
        let line = format!(
            "restored version {} to {}: {}{holes}, {:.2} s, {:.1} MiB/s; every block's crc32c and the whole-source \
             digest verified",
            s.id,
            s.target.display(),
            bytes(s.bytes),
            s.seconds,
            s.mib_per_s
        );
        if onto_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    Ok(Outcome::Success)
}
