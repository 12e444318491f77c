//! Ctrl-C and SIGTERM during a long write (backup, restore, merge): the first one asks the
//! work to stop at its next batch, so that the unfinished image (or restore target) is removed
//! and the command says so and exits 130 (SIGINT) or 143 (SIGTERM); a second one exits at once.
//! The signals are blocked in every thread and taken by one waiting thread, so that no handler
//! runs inside the work.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked to stop, or 0.
static ASKED: AtomicI32 = AtomicI32::new(0);

/// The error a command returns when a signal asked it to stop.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {name}")]
pub struct Interrupted {
    pub signal: i32,
    pub name: &'static str,
}

impl Interrupted {
    /// The exit status of a process ended by this signal, as shells report it.
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal) as u8
    }
}

fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// Starts taking SIGINT, SIGTERM and SIGHUP. Call before any other thread starts (they inherit
/// the blocked signals), and only in commands that start no other program.
pub fn watch() {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    if signals.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || loop {
        let Ok(signal) = signals.wait() else { return };
        let signal = signal as i32;
        if ASKED.swap(signal, Ordering::SeqCst) != 0 {
            eprintln!("strata: {} again: stopping now", name(signal));
            std::process::exit(128 + signal);
        }
        log::debug!("{}: stopping at the next batch", name(signal));
    });
}

/// Fails with `Interrupted` once a signal has asked to stop.
pub fn check() -> Result<(), Interrupted> {
    match ASKED.load(Ordering::Relaxed) {
        0 => Ok(()),
        signal => Err(Interrupted { signal, name: name(signal) }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let i = super::Interrupted { signal: libc::SIGINT, name: super::name(libc::SIGINT) };
        assert_eq!(i.exit_code(), 130);
        assert_eq!(i.to_string(), "interrupted by SIGINT (Ctrl-C)");
    }
}
