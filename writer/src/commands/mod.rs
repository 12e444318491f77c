//! One module per subcommand: its arguments, and how its result is shown (a table or line for
//! people, JSON on stdout with `--json`).

pub mod backup;
pub mod demo;
pub mod info;
pub mod list;
pub mod merge;
pub mod mount;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod schedule;
pub mod shell_docs;
pub mod task;
pub mod umount;
pub mod verify;

/// What a command's run ended with, short of an error.
pub enum Outcome {
    Success,
    /// The command ran but found a problem it reported (e.g. verify found damage).
    Failure,
}

pub struct Global {
    pub quiet: bool,
}

/// The arguments of a command about one version of a repository.
#[derive(clap::Args)]
pub struct VersionArgs {
    /// The repository folder.
    pub repo: std::path::PathBuf,
    /// The version: an id, or `latest`.
    #[arg(value_parser = version_arg)]
    pub version: String,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--block-size`: a size (4096, 64K, 1M) that is a power of two from 4K to 4M. Parsed by clap,
/// so that a bad value is a usage error (exit 2) like every other.
pub fn block_size_arg(s: &str) -> Result<u32, String> {
    let n = strata_engine::units::parse_size(s).map_err(|e| e.to_string())?;
    let n = u32::try_from(n).map_err(|_| format!("{s} is larger than 4M"))?;
    strata_format::header::check_block_size(n).map_err(|_| format!("{s} is not a power of two from 4K to 4M"))?;
    Ok(n)
}

/// A size such as 128M.
pub fn size_arg(s: &str) -> Result<String, String> {
    strata_engine::units::parse_size(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// A version: an id (a number such as 3) or `latest`.
pub fn version_arg(s: &str) -> Result<String, String> {
    match s == "latest" || s.parse::<u64>().is_ok_and(|id| id > 0) {
        true => Ok(s.to_string()),
        false => Err("a version is an id (a number such as 3) or `latest`".into()),
    }
}

/// `--compression zstd:LEVEL`.
pub fn compression_arg(s: &str) -> Result<String, String> {
    strata_engine::config::compression_level(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// Prints `value` as one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
