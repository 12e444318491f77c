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
pub mod task;
pub mod umount;
pub mod verify;

/// The arguments of a command about one version of a repository.
#[derive(clap::Args)]
pub struct VersionArgs {
    /// The repository folder.
    pub repo: std::path::PathBuf,
    /// The version: an id, or `latest`.
    pub version: String,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Prints `value` as one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
