//! `strata mount REPO MOUNTPOINT`: every restorable version as a read-only folder. Without
//! `--foreground`, starts the driver as a detached process and returns once the mount is ready
//! to read; the driver then logs to syslog.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use strata_mountfs::{serve, MountOptions};

use crate::commands::{Global, Outcome};
use strata_engine::units::parse_size;

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
    /// Memory for decompressed blocks (default: `frame_cache::DEFAULT_BUDGET`).
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
    serve(&args.repo, &args.mountpoint, &opts, || ready_fd.is_none_or(report_ready))?;
    Ok(Outcome::Success)
}

/// How long a detached driver waits for its caller to take the mount over before it serves
/// anyway (the caller is alive but stuck writing its message).
const HANDOVER_TIMEOUT_MS: u16 = 10_000;

/// In the detached driver, once the mount is live: outlive the caller from now on, let go of its
/// stderr, log to syslog, say "ready" on `fd` and wait for the caller's "ok". Returns false when
/// the caller is gone without taking the mount over (killed while waiting, a `timeout` that gave
/// up): then nobody was told of the mount and it must not stay.
fn report_ready(fd: i32) -> bool {
    let _ = nix::sys::prctl::set_pdeathsig(None);
    crate::logging::switch_to_syslog();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
    }
    // SAFETY: the caller passed this socket to us and nothing else owns it.
    let mut caller = unsafe { UnixStream::from_raw_fd(fd) };
    if caller.write_all(b"ready\n").is_err() {
        log::warn!("the caller of `strata mount` exited before the mount was ready");
        return false;
    }
    let answered = {
        use std::os::fd::AsFd;
        let mut poll = [nix::poll::PollFd::new(caller.as_fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut poll, HANDOVER_TIMEOUT_MS)
    };
    if answered.is_ok_and(|ready| ready == 0) {
        log::warn!("the caller of `strata mount` did not answer in time; serving the mount anyway");
        return true;
    }
    let mut answer = [0u8; 3];
    let taken = caller.read_exact(&mut answer).is_ok() && &answer == b"ok\n";
    if !taken {
        log::warn!("the caller of `strata mount` exited before the mount was ready");
    }
    taken
}

/// Starts `strata mount --foreground` detached (own session, no terminal) and waits until it
/// reports the mount ready, or exits with its error.
fn detach(args: &Args, global: &Global) -> Result<Outcome> {
    strata_mountfs::check_mountpoint(&args.mountpoint)?;
    let (mut driver, driver_end) = UnixStream::pair().context("creating a socket pair")?;
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
    let driver_fd = driver_end.as_raw_fd();
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
            if libc::dup2(driver_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount driver")?;
    drop(driver_end);
    let mut status = [0u8; 6];
    let ready = driver.read_exact(&mut status).is_ok() && &status == b"ready\n";
    let mut errors = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut errors).ok();
    }
    if ready {
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
        // Told the user; from here the mount is theirs and outlives us.
        driver.write_all(b"ok\n").context("handing the mount over to its driver")?;
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
