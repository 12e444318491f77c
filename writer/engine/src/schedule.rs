//! Scheduling: a systemd service and timer that run `strata backup REPO` (which applies the
//! scheme and then the retention), enabled where systemd runs; elsewhere, the equivalent crontab
//! line. strata has no scheduler daemon of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where the units go and whether systemctl may be used.
pub struct UnitDir {
    pub dir: PathBuf,
    /// `--user` units (a non-root user's own systemd).
    pub user: bool,
}

impl UnitDir {
    pub fn default_for_user() -> Result<UnitDir> {
        if nix::unistd::geteuid().is_root() {
            return Ok(UnitDir { dir: "/etc/systemd/system".into(), user: false });
        }
        let home = std::env::var_os("HOME").context("HOME is not set")?;
        Ok(UnitDir { dir: Path::new(&home).join(".config/systemd/user"), user: true })
    }
}

/// `strata-backup-<folder name>-<8 hex of the path's hash>`: readable, unique per repository.
pub fn unit_base(repo: &Path) -> String {
    let name: String = repo
        .file_name()
        .map(|n| n.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect())
        .unwrap_or_default();
    let hash = blake3::hash(repo.as_os_str().as_encoded_bytes()).to_hex();
    format!("strata-backup-{name}-{}", &hash[..8])
}

/// The OnCalendar value for `--every`.
pub fn on_calendar(every: &str) -> Result<String> {
    let spec = match every {
        "hourly" | "daily" | "weekly" | "monthly" => every.to_string(),
        other => other.trim().to_string(),
    };
    if spec.is_empty() || spec.contains('\n') {
        bail!("--every {every:?}: give hourly, daily, weekly, monthly or a systemd OnCalendar expression");
    }
    if let Ok(out) = Command::new("systemd-analyze").args(["calendar", &spec]).output() {
        if !out.status.success() {
            bail!(
                "--every {every:?} is not a valid OnCalendar expression: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(spec)
}

/// A crontab line equivalent to the simple schedules.
pub fn cron_line(every: &str, command: &str) -> String {
    let when = match every {
        "hourly" => "0 * * * *",
        "daily" => "0 3 * * *",
        "weekly" => "0 3 * * 1",
        "monthly" => "0 3 1 * *",
        _ => {
            return format!(
                "# no crontab equivalent is derived for OnCalendar={every}; write one by hand for: {command}"
            )
        }
    };
    format!("{when} {command}")
}

/// Quotes a path for an ExecStart line (systemd quoting; `%` escaped as a specifier).
fn exec_arg(p: &Path) -> String {
    let s = p.to_string_lossy().replace('%', "%%").replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{s}\"")
}

pub fn service_text(strata: &Path, repo: &Path) -> String {
    format!(
        "[Unit]\n\
         Description=strata backup of {repo}\n\
         After=local-fs.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart={exe} backup {arg}\n\
         Nice=10\n\
         IOSchedulingClass=idle\n",
        repo = repo.display().to_string().replace('%', "%%"),
        exe = exec_arg(strata),
        arg = exec_arg(repo),
    )
}

pub fn timer_text(repo: &Path, calendar: &str) -> String {
    format!(
        "[Unit]\n\
         Description=Scheduled strata backup of {repo}\n\
         \n\
         [Timer]\n\
         OnCalendar={calendar}\n\
         Persistent=true\n\
         RandomizedDelaySec=60\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n",
        repo = repo.display().to_string().replace('%', "%%"),
    )
}

/// Whether systemd is the running init (so timers can be enabled now).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub fn systemctl(user: bool, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    let out = cmd.args(args).output().context("running systemctl")?;
    if !out.status.success() {
        bail!("systemctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
