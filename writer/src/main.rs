//! The `strata` command: parse the command line, set up logging, run one subcommand (the work
//! is `strata_engine`'s), print its error chain on one line and map the outcome to an exit code
//! (0 success, 1 failure, 2 usage).

mod commands;
mod logging;
mod progress_display;

use std::process::ExitCode;
use strata_engine::interrupt;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "strata", version, about = "Block-level disk backups: full, incremental and differential images")]
struct Cli {
    /// No progress and no summary chatter (errors are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More log detail (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a backup task: a repository with its source, scheme and retention.
    Init(commands::task::InitArgs),
    /// Show or change a repository's task configuration.
    Config(commands::task::ConfigArgs),
    /// Back up a block device or raw disk image into a repository.
    #[command(override_usage = "strata backup [OPTIONS] [SOURCE] REPO")]
    Backup(commands::backup::Args),
    /// List the versions of a repository.
    List(commands::list::Args),
    /// Show one version in detail, with its chain.
    Info(commands::info::Args),
    /// Check every image and version; exit 1 if anything is damaged.
    Verify(commands::verify::Args),
    /// Write a version back onto a device or into a file.
    Restore(commands::restore::Args),
    /// Turn a version into a full built from its chain (a synthetic full).
    Merge(commands::merge::Args),
    /// Delete versions no retention rule keeps, merging forward what kept versions need.
    Prune(commands::prune::Args),
    /// Rewrite a missing or damaged strata.repo from the image headers; clear leftovers.
    Repair(commands::repair::Args),
    /// Run `strata backup REPO` on a timer (systemd), or print the crontab line.
    #[command(subcommand)]
    Schedule(commands::schedule::Args),
    /// Mount every restorable version read-only with FUSE.
    Mount(commands::mount::Args),
    /// Unmount a strata mount and wait for its driver to exit.
    Umount(commands::umount::Args),
    /// Run the whole job on a built-in sample: a small ext4 disk, full/incremental/differential
    /// backups, verify and restore.
    Demo(commands::demo::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(commands::shell_docs::CompletionArgs),
    /// Write the man pages (strata.1, strata-backup.1, ...) into a folder.
    Man(commands::shell_docs::ManArgs),
}

use commands::{Global, Outcome};

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let global = Global { quiet: cli.quiet };
    match cli.command {
        Command::Init(a) => commands::task::init(a, &global),
        Command::Config(a) => commands::task::config(a, &global),
        Command::Backup(a) => {
            interrupt::watch();
            commands::backup::run(a, &global)
        }
        Command::Merge(a) => {
            interrupt::watch();
            commands::merge::run(a, &global)
        }
        Command::Prune(a) => commands::prune::run(a, &global),
        Command::Repair(a) => commands::repair::run(a, &global),
        Command::Schedule(a) => commands::schedule::run(a, &global),
        Command::List(a) => commands::list::run(a, &global),
        Command::Info(a) => commands::info::run(a, &global),
        Command::Verify(a) => commands::verify::run(a, &global),
        Command::Restore(a) => {
            interrupt::watch();
            commands::restore::run(a, &global)
        }
        Command::Mount(a) => commands::mount::run(a, &global),
        Command::Umount(a) => commands::umount::run(a, &global),
        Command::Demo(a) => commands::demo::run(a, &global),
        Command::Completions(a) => commands::shell_docs::completions(a, <Cli as clap::CommandFactory>::command()),
        Command::Man(a) => commands::shell_docs::man(a, <Cli as clap::CommandFactory>::command(), &global),
    }
}

/// Lets a chain of file descriptors (a block-heavy chain needs one per image) stay open.
fn raise_open_file_limit() {
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Whether the error comes from a full file system.
fn is_no_space(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) == Some(libc::ENOSPC)
            || e.downcast_ref::<strata_format::FormatError>().and_then(|f| f.raw_os_error()) == Some(libc::ENOSPC)
    })
}

/// The error and its causes on one line, leaving out a cause whose text an outer message
/// already holds (a format error quotes the OS error it wraps, which is also its cause).
fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text += ": ";
        }
        text += &part;
    }
    text
}

fn interrupted(err: &anyhow::Error) -> Option<&interrupt::Interrupted> {
    err.chain().find_map(|e| e.downcast_ref::<interrupt::Interrupted>())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

impl Command {
    /// Whether the command was asked for JSON on stdout.
    fn json(&self) -> bool {
        match self {
            Command::Backup(a) => a.json,
            Command::List(a) => a.json,
            Command::Info(a) | Command::Merge(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Prune(a) => a.json,
            Command::Repair(a) => a.json,
            Command::Config(a) => a.json,
            _ => false,
        }
    }
}

/// With `--json`, a failure is also one JSON object on stdout, so that a script reading stdout
/// always gets a document: `{"error": "...", "exit_code": N}`.
fn print_json_error(message: &str, exit_code: u8) {
    let doc = serde_json::json!({ "error": message, "exit_code": exit_code });
    println!("{doc}");
}

/// The line printed on stderr for a failed run, and its exit code.
fn failure(e: &anyhow::Error) -> (String, u8) {
    if let Some(signal) = interrupted(e) {
        let line = match e.chain().next().filter(|outer| outer.to_string() != signal.to_string()) {
            Some(outer) => format!("{signal}; {outer}"),
            None => signal.to_string(),
        };
        return (line, signal.exit_code());
    }
    if is_no_space(e) {
        let line = format!(
            "error: no space left: {}; nothing was published and earlier versions are intact; free space \
             (`strata prune` deletes old versions) and run the command again",
            one_line(e)
        );
        return (line, 1);
    }
    (format!("error: {}", one_line(e)), 1)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS;
            }
            if std::env::args_os().any(|a| a == "--json") {
                let text = e.render().to_string();
                let message = text.split("\n\nUsage:").next().unwrap_or_default();
                let message = message.split("\n\nFor more information").next().unwrap_or_default();
                let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
                print_json_error(message.trim_start_matches("error: "), 2);
            }
            return ExitCode::from(2);
        }
    };
    logging::init(cli.verbose);
    raise_open_file_limit();
    let json = cli.command.json();
    match run(cli) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failure) => ExitCode::from(1),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let (line, code) = failure(&e);
            eprintln!("strata: {line}");
            if json {
                print_json_error(line.trim_start_matches("error: "), code);
            }
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use strata_format::{FormatError, Loc};

    #[test]
    fn a_cause_quoted_by_its_error_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = anyhow::Error::new(FormatError::io(Loc::file(Path::new("/r/v1.strata")), "write", io))
            .context("publishing version 1");
        let text = super::one_line(&err);
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
        assert!(text.starts_with("publishing version 1: /r/v1.strata: write: No space left"), "{text}");
    }
}
