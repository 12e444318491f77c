//! `strata schedule install|show|remove REPO`: a systemd timer running `strata backup REPO`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::commands::{Global, Outcome};
use strata_engine::schedule::{
    cron_line, on_calendar, service_text, systemctl, systemd_running, timer_text, unit_base, UnitDir,
};

#[derive(clap::Subcommand)]
pub enum Args {
    /// Write (and enable, where systemd runs) a service and timer for the repository.
    Install {
        /// The repository whose task (source, scheme, retention in strata.toml) the timer runs.
        repo: PathBuf,
        /// hourly, daily, weekly, monthly, or a systemd OnCalendar expression.
        #[arg(long)]
        every: String,
        /// Write the units here instead of the system (root) or user unit folder.
        #[arg(long)]
        unit_dir: Option<PathBuf>,
        /// Write the units but do not enable the timer.
        #[arg(long)]
        no_enable: bool,
    },
    /// Show the units of the repository's schedule.
    Show {
        /// The repository the schedule was installed for.
        repo: PathBuf,
        /// The folder the units were written into with `install --unit-dir`.
        #[arg(long)]
        unit_dir: Option<PathBuf>,
    },
    /// Disable and delete the repository's schedule.
    Remove {
        /// The repository the schedule was installed for.
        repo: PathBuf,
        /// The folder the units were written into with `install --unit-dir`.
        #[arg(long)]
        unit_dir: Option<PathBuf>,
    },
}

fn unit_dir(given: Option<PathBuf>) -> Result<UnitDir> {
    match given {
        Some(dir) => Ok(UnitDir { dir, user: false }),
        None => UnitDir::default_for_user(),
    }
}

fn canonical_repo(repo: &std::path::Path) -> Result<PathBuf> {
    strata_format::Repository::open(repo)?;
    repo.canonicalize().with_context(|| format!("{}", repo.display()))
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    match args {
        Args::Install { repo, every, unit_dir: dir, no_enable } => {
            let repo = canonical_repo(&repo)?;
            let calendar = on_calendar(&every)?;
            let custom_dir = dir.is_some();
            let dir = unit_dir(dir)?;
            std::fs::create_dir_all(&dir.dir).with_context(|| format!("{}", dir.dir.display()))?;
            let base = unit_base(&repo);
            let strata = std::env::current_exe().context("finding the strata binary")?;
            if strata.components().any(|c| c.as_os_str() == "target") {
                log::warn!(
                    "the unit runs {}, which lies in a build tree and goes when it is cleaned; install strata \
                     (`cargo install --path writer --locked`, or `install -m 755 {} /usr/local/bin/`) and run \
                     `strata schedule install` again from there",
                    strata.display(),
                    strata.display()
                );
            }
            let service = dir.dir.join(format!("{base}.service"));
            let timer = dir.dir.join(format!("{base}.timer"));
            std::fs::write(&service, service_text(&strata, &repo)).with_context(|| format!("{}", service.display()))?;
            std::fs::write(&timer, timer_text(&repo, &calendar)).with_context(|| format!("{}", timer.display()))?;
            if !global.quiet {
                println!("wrote {} and {}", service.display(), timer.display());
            }
            if no_enable || custom_dir {
                return Ok(Outcome::Success);
            }
            if systemd_running() {
                systemctl(dir.user, &["daemon-reload"])?;
                systemctl(dir.user, &["enable", "--now", &format!("{base}.timer")])?;
                if !global.quiet {
                    println!("enabled {base}.timer (OnCalendar={calendar}); logs: journalctl -u {base}.service");
                }
            } else {
                let cmd = format!("{} backup {}", strata.display(), repo.display());
                println!("systemd is not running here; to schedule with cron instead, add to `crontab -e`:");
                println!("{}", cron_line(&every, &cmd));
            }
            Ok(Outcome::Success)
        }
        Args::Show { repo, unit_dir: dir } => {
            let repo = canonical_repo(&repo)?;
            let dir = unit_dir(dir)?;
            let base = unit_base(&repo);
            let mut found = false;
            for ext in ["service", "timer"] {
                let path = dir.dir.join(format!("{base}.{ext}"));
                if let Ok(text) = std::fs::read_to_string(&path) {
                    found = true;
                    println!("# {}\n{text}", path.display());
                }
            }
            if !found {
                bail!("{}: no schedule installed (looked for {base}.timer in {})", repo.display(), dir.dir.display());
            }
            Ok(Outcome::Success)
        }
        Args::Remove { repo, unit_dir: dir } => {
            let repo = canonical_repo(&repo)?;
            let custom_dir = dir.is_some();
            let dir = unit_dir(dir)?;
            let base = unit_base(&repo);
            if !custom_dir && systemd_running() {
                let _ = systemctl(dir.user, &["disable", "--now", &format!("{base}.timer")]);
            }
            let mut removed = 0;
            for ext in ["service", "timer"] {
                let path = dir.dir.join(format!("{base}.{ext}"));
                if std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            if removed == 0 {
                bail!("{}: no schedule installed (looked for {base}.timer in {})", repo.display(), dir.dir.display());
            }
            if !custom_dir && systemd_running() {
                systemctl(dir.user, &["daemon-reload"])?;
            }
            if !global.quiet {
                println!("removed the schedule {base}");
            }
            Ok(Outcome::Success)
        }
    }
}
