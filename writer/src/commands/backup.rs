//! `strata backup SOURCE REPO`: make a full, incremental or differential image.

use std::path::PathBuf;

use anyhow::Result;
use strata_format::Kind;

use crate::commands::{Global, Outcome};
use strata_engine::backup::{backup, BackupRequest};
use strata_engine::units::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// SOURCE, then REPO: the block device or raw disk image to back up (left out: the source
    /// recorded in REPO's strata.toml), and the repository folder (created by the first backup).
    #[arg(num_args = 1..=2, required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Make a full image.
    #[arg(long, group = "kind")]
    pub full: bool,
    /// Make an incremental: the blocks changed since the previous version. Without --full,
    /// --incremental or --differential the task's scheme decides (`strata config REPO`).
    #[arg(long, group = "kind")]
    pub incremental: bool,
    /// Make a differential: the blocks changed since the chain's full.
    #[arg(long, group = "kind")]
    pub differential: bool,
    /// Block size of a new repository (power of two, 4K to 4M; fixed per repository).
    #[arg(long, value_name = "SIZE", value_parser = super::block_size_arg)]
    pub block_size: Option<u32>,
    /// Compression of this image, zstd:LEVEL with LEVEL 1-19 (default: the task's, zstd:3).
    #[arg(long, value_name = "zstd:LEVEL", value_parser = super::compression_arg)]
    pub compression: Option<String>,
    /// The same as --compression zstd:N (kept for scripts written for strata 0.3).
    #[arg(long, hide = true, conflicts_with = "compression", value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: Option<i32>,
    /// Store every byte of the source, not only the blocks its file systems use (also:
    /// `sector_by_sector = true` in strata.toml).
    #[arg(long)]
    pub sector_by_sector: bool,
    /// A label stored with the version (none by default).
    #[arg(long)]
    pub label: Option<String>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A disk where the repository goes, or a repository where the source goes, is a mistake in
/// the order of the arguments (or a forgotten one): say so instead of failing further on.
fn check_argument_order(source: Option<&std::path::Path>, repo: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let is_disk =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() || m.file_type().is_block_device());
    let is_repo = |p: &std::path::Path| p.join(strata_format::layout::REPO_FILE).exists();
    match source {
        None if is_disk(repo) => anyhow::bail!(
            "{}: a disk, not a repository; the order is `strata backup SOURCE REPO` (REPO alone backs up the \
             source recorded there)",
            repo.display()
        ),
        Some(source) if is_repo(source) && is_disk(repo) => anyhow::bail!(
            "{} is a repository and {} a disk: the order is `strata backup SOURCE REPO`, here `strata backup {} {}`",
            source.display(),
            repo.display(),
            repo.display(),
            source.display()
        ),
        _ => Ok(()),
    }
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let kind = if args.full {
        Some(Kind::Full)
    } else if args.incremental {
        Some(Kind::Incremental)
    } else if args.differential {
        Some(Kind::Differential)
    } else {
        None
    };
    let block_size = args.block_size;
    let (source, repo) = match args.paths.as_slice() {
        [repo] => (None, repo.clone()),
        [source, repo] => (Some(source.clone()), repo.clone()),
        _ => unreachable!("clap allows one or two paths"),
    };
    check_argument_order(source.as_deref(), &repo)?;
    let level = match &args.compression {
        Some(spec) => Some(strata_engine::config::compression_level(spec)?),
        None => args.compression_level,
    };
    let label = args.label.unwrap_or_default();
    let req = BackupRequest {
        source,
        repo,
        storage: None,
        kind,
        block_size,
        level,
        label,
        sector_by_sector: args.sector_by_sector,
    };
    let progress = crate::progress_display::for_terminal(global.quiet || args.json);
    let s = backup(&req, progress.as_ref())?;
    if args.json {
        super::print_json(&s)?;
    } else if !global.quiet {
        let parent = s.parent.map(|p| format!(" of version {p}")).unwrap_or_default();
        println!(
            "version {} {}{parent} ({}): {}/{} blocks changed, read {}, stored {}, {:.2} s, read at {:.1} MiB/s ({})",
            s.id,
            s.kind,
            s.rule,
            s.changed_blocks,
            s.total_blocks,
            bytes(s.bytes_read),
            bytes(s.stored_bytes),
            s.seconds,
            s.mib_per_s,
            s.file
        );
        let used: Vec<String> = s.regions.iter().filter(|r| r.reason.is_none()).map(|r| r.name()).collect();
        if !used.is_empty() {
            println!(
                "used blocks only: {} unused left out (zeros in the version), from {}",
                bytes(s.unused_bytes),
                used.join(", ")
            );
        }
        if !s.merged.is_empty() || !s.deleted.is_empty() {
            println!("after the backup: merged into fulls {:?}, deleted {:?}", s.merged, s.deleted);
        }
    }
    Ok(Outcome::Success)
}
