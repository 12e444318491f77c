//! Deterministic crash points for tests. When the environment variable `STRATA_CRASH_AT` names
//! a point (`image.before_rename`, `image.after_rename`, `repo.before_record`, ...), or
//! `image.block:N` for the N-th block appended, the process aborts there without any cleanup,
//! exactly as a power cut or `kill -9` would leave things. Unset, each check is one cached
//! lookup.

use std::sync::OnceLock;

fn target() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET.get_or_init(|| std::env::var("STRATA_CRASH_AT").ok()).as_deref()
}

/// Aborts the process if `STRATA_CRASH_AT` names this point.
pub fn point(name: &str) {
    if target() == Some(name) {
        eprintln!("strata: crash point {name} reached (STRATA_CRASH_AT), aborting");
        std::process::abort();
    }
}

/// Aborts the process at the `count`-th occurrence of a counted point (`name:count`).
pub fn counted(name: &str, count: u64) {
    if let Some(t) = target() {
        if let Some((n, c)) = t.split_once(':') {
            if n == name && c.parse::<u64>().ok() == Some(count) {
                eprintln!("strata: crash point {t} reached (STRATA_CRASH_AT), aborting");
                std::process::abort();
            }
        }
    }
}
