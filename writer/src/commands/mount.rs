//! `strata mount REPO MOUNTPOINT`: every restorable version as a read-only folder. Without
//! `--foreground`, starts the driver as a detached process and returns once the mount is ready
//! to read; the driver then logs to syslog.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use strata_mountfs::{serve, MountOptions};

use crate::units::parse_size;
use crate::{Global, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// An empty folder to mount on.
    pub mountpoint: PathBuf,
    /// Show only this version (an id or `latest`); the layout stays MOUNTPOINT/<id>/...
    #[arg(long, value_name = "VERSION", value_parser = super::version_arg)]
    pub only: Option<String>,
    /// Stay attached and log to stderr; SIGINT/SIGTERM unmount.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Memory for decompressed blocks.
    #[arg(long, default_value = "128M", value_name = "SIZE", value_parser = super::size_arg)]
    pub cache_size: String,
    /// Let other users read the mount (non-root needs user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE request threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve blocks checked by their crc32c only, not also by their BLAKE3 content hash.
    #[arg(long)]
    pub no_verify_hashes: bool,
    /// Internal: the descriptor on which a detached driver reports readiness.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let cache_bytes = parse_size(&args.cache_size)?;
    let version = match &args.only {
        None => None,
        Some(v) => {
            let repo = strata_format::Repository::open(&args.repo)?;
            let mut state = repo.scan()?;
            state.check_indexes();
            Some(state.resolve_name(v)?)
        }
    };
    if args.allow_other && args.ready_fd.is_none() {
        log::warn!(
            "--allow-other: every local user can read the whole disk of every version under {} \
             (every file on it, whatever its permissions on the source said); mount without it \
             unless that is what you want",
            args.mountpoint.display()
        );
    }
    if !args.foreground {
        return detach(&args, global);
    }
    strata_mountfs::check_mountpoint(&args.mountpoint)?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let opts = MountOptions {
        version,
        cache_bytes,
        allow_other: args.allow_other,
        threads,
        check_hashes: !args.no_verify_hashes,
    };
    let ready_fd = args.ready_fd;
    serve(&args.repo, &args.mountpoint, &opts, || {
        if let Some(fd) = ready_fd {
            report_ready(fd);
        }
    })?;
    Ok(Outcome::Success)
}

/// In the detached driver: outlive the caller from now on, let go of its stderr, log to
/// syslog, say "ready".
fn report_ready(fd: i32) {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number, 0 for none.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    crate::logging::switch_to_syslog();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto our own stderr descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
    // SAFETY: the parent passed this descriptor to us and nothing else owns it.
    let mut ready = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = std::io::Write::write_all(&mut ready, b"ready\n");
}

/// Starts `strata mount --foreground` detached (own session, no terminal) and waits until it
/// reports the mount ready, or exits with its error.
fn detach(args: &Args, global: &Global) -> Result<Outcome> {
    strata_mountfs::check_mountpoint(&args.mountpoint)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("--foreground").arg("--ready-fd").arg("3");
    cmd.arg("--cache-size").arg(&args.cache_size);
    if let Some(v) = &args.only {
        cmd.arg("--only").arg(v);
    }
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(t) = args.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if args.no_verify_hashes {
        cmd.arg("--no-verify-hashes");
    }
    cmd.arg(&args.repo).arg(&args.mountpoint);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let write_fd = ready_w.as_raw_fd();
    let caller = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Until it reports ready, the driver dies with the caller (a `timeout strata mount`
            // that gives up must not leave a driver behind); `report_ready` lifts this.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() as u32 != caller {
                return Err(std::io::Error::other("the caller exited"));
            }
            libc::setsid();
            if libc::dup2(write_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount driver")?;
    drop(ready_w);
    let mut status = String::new();
    std::fs::File::from(ready_r).read_to_string(&mut status).ok();
    let mut errors = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut errors).ok();
    }
    if status.trim() == "ready" {
        eprint!("{errors}");
        if !global.quiet {
            println!(
                "mounted {} on {} (driver pid {}); unmount with: strata umount {}",
                args.repo.display(),
                args.mountpoint.display(),
                child.id(),
                args.mountpoint.display()
            );
        }
        return Ok(Outcome::Success);
    }
    let _ = child.wait();
    let errors = errors.trim();
    if let Some(last) = errors.lines().last() {
        for line in errors.lines() {
            if line != last {
                eprintln!("{line}");
            }
        }
        bail!("{}", last.trim_start_matches("strata: error: "));
    }
    bail!("the mount driver exited before the mount was ready");
}
