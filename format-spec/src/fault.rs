//! Deterministic crash points for tests. When the environment variable `STRATA_CRASH_AT` names
//! a point, the process aborts there without any cleanup, exactly as a power cut or `kill -9`
//! would leave things. Points are named (`image.before_rename`, `image.after_rename`,
//! `image.after_dir_sync`, `repo.before_record`, `prune.before_delete`) or counted: `image.block:N`
//! after the N-th block appended to an image, and `write:N`, `fsync:N`, `rename:N`, `delete:N`
//! after the N-th such operation of the process. Unset, each check is one cached lookup and,
//! for counted steps, one atomic increment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

fn target() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET.get_or_init(|| std::env::var("STRATA_CRASH_AT").ok()).as_deref()
}

fn crash(name: &str) -> ! {
    eprintln!("strata: crash point {name} reached (STRATA_CRASH_AT), aborting");
    std::process::abort();
}

/// Aborts the process if `STRATA_CRASH_AT` names this point.
pub fn point(name: &str) {
    if target() == Some(name) {
        crash(name);
    }
}

/// Aborts the process at the `count`-th occurrence of a counted point (`name:count`).
pub fn counted(name: &str, count: u64) {
    if let Some(t) = target() {
        if let Some((n, c)) = t.split_once(':') {
            if n == name && c.parse::<u64>().ok() == Some(count) {
                crash(t);
            }
        }
    }
}

/// The kinds of durable steps counted for `write:N`, `fsync:N`, `rename:N`, `delete:N`.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Write,
    Fsync,
    Rename,
    Delete,
}

static COUNTS: [AtomicU64; 4] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Counts one completed step of `kind`; aborts when `STRATA_CRASH_AT` names its number.
pub fn step(kind: Step) {
    if target().is_none() {
        return;
    }
    let (slot, name) = match kind {
        Step::Write => (0, "write"),
        Step::Fsync => (1, "fsync"),
        Step::Rename => (2, "rename"),
        Step::Delete => (3, "delete"),
    };
    let n = COUNTS[slot].fetch_add(1, Ordering::Relaxed) + 1;
    counted(name, n);
}
