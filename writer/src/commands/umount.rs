//! `strata umount MOUNTPOINT`: unmount a strata mount and wait for its driver to exit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::commands::{Global, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// Where the repository is mounted.
    pub mountpoint: PathBuf,
}

fn driver_pid(source: &str) -> Option<i32> {
    source.strip_prefix("strata@")?.parse().ok()
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn unmount(path: &Path) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        return nix::mount::umount(path).map_err(|e| {
            if e == nix::errno::Errno::EBUSY {
                anyhow::anyhow!(
                    "{}: busy: a file in it is open or a loop device is attached; close it first",
                    path.display()
                )
            } else {
                anyhow::anyhow!("{}: unmount failed: {e}", path.display())
            }
        });
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(path)
        .output()
        .context("running fusermount3 (Debian package fuse3)")?;
    if !out.status.success() {
        bail!("{}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let path = args.mountpoint.canonicalize().with_context(|| format!("{}", args.mountpoint.display()))?;
    let Some(strata_format::mounts::MountInfo { source, fstype, .. }) = strata_format::mounts::mount_info(&path) else {
        bail!("{}: nothing is mounted there", path.display());
    };
    let is_fuse = fstype == "fuse" || fstype == format!("fuse.{}", strata_mountfs::SUBTYPE);
    if !is_fuse || driver_pid(&source).is_none() {
        bail!("{}: not a strata mount ({fstype} from {source})", path.display());
    }
    unmount(&path)?;
    if let Some(pid) = driver_pid(&source) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            if Instant::now() > deadline {
                bail!("{}: unmounted, but the driver (pid {pid}) is still running after 10 s", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !global.quiet {
        println!("unmounted {}", path.display());
    }
    Ok(Outcome::Success)
}
