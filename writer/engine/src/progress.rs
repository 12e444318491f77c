//! Progress reporting. The engines report through the `Progress` trait and never print; a
//! caller draws it as it likes (the `strata` command: a bar on a terminal, log lines otherwise).

pub trait Progress: Sync {
    /// A new phase of `total` bytes begins.
    fn begin(&self, what: &str, total: u64);
    /// `n` more bytes of the phase are done.
    fn advance(&self, n: u64);
    fn end(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}
