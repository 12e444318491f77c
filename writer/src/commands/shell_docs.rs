//! `strata completions SHELL` and `strata man DIR`: shell completions and man pages generated
//! from the same clap definitions that parse the command line, so they never drift from it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::commands::{Global, Outcome};

#[derive(clap::Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// The folder to write strata.1 and one page per subcommand (strata-backup.1, ...) into,
    /// for example /usr/local/share/man/man1. Created when missing.
    pub dir: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionArgs, mut cli: clap::Command) -> Result<Outcome> {
    let name = cli.get_name().to_string();
    clap_complete::generate(args.shell, &mut cli, name, &mut std::io::stdout());
    Ok(Outcome::Success)
}

/// Writes `strata.1` and `strata-SUBCOMMAND.1` for every subcommand (nested ones too).
pub fn man(args: ManArgs, cli: clap::Command, global: &Global) -> Result<Outcome> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("{}: cannot create the folder", args.dir.display()))?;
    let mut written = Vec::new();
    write_pages(&cli, &args.dir, &mut written)?;
    if !global.quiet {
        println!("wrote {} man pages into {}", written.len(), args.dir.display());
    }
    Ok(Outcome::Success)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let cmd = cmd.clone().disable_help_subcommand(true);
    // The version goes into each page's footer; a subcommand gets no `--version` flag from it
    // (`info` and `merge` have a VERSION argument of their own).
    let cmd = match cmd.get_version() {
        None => cmd.version(env!("CARGO_PKG_VERSION")).disable_version_flag(true),
        Some(_) => cmd,
    };
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let path = dir.join(format!("{}.1", cmd.get_display_name().unwrap_or(cmd.get_name())));
    std::fs::write(&path, page).with_context(|| format!("{}: cannot write", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let parent = cmd.get_display_name().unwrap_or(cmd.get_name());
        let sub = sub.clone().display_name(format!("{parent}-{}", sub.get_name())).bin_name(format!(
            "{} {}",
            cmd.get_bin_name().unwrap_or(cmd.get_name()),
            sub.get_name()
        ));
        write_pages(&sub, dir, written)?;
    }
    Ok(())
}
