//! How the command draws the engines' progress: a bar with rate and ETA on stderr when stderr is
//! a terminal, a log line every few seconds otherwise, nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strata_engine::progress::{NoProgress, Progress};

/// A bar with rate and ETA on stderr.
pub struct BarProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress for BarProgress {
    fn begin(&self, what: &str, total: u64) {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *self.bar.lock().unwrap() = Some(bar);
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap() {
            b.inc(n);
        }
    }
    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}

/// A log line (level info) every few seconds, for stderr that is not a terminal.
pub struct LogProgress {
    state: Mutex<LogState>,
}

struct LogState {
    what: String,
    total: u64,
    done: u64,
    last: Instant,
}

impl Progress for LogProgress {
    fn begin(&self, what: &str, total: u64) {
        *self.state.lock().unwrap() = LogState { what: what.into(), total, done: 0, last: Instant::now() };
    }
    fn advance(&self, n: u64) {
        let mut s = self.state.lock().unwrap();
        s.done += n;
        if s.last.elapsed() >= Duration::from_secs(5) {
            s.last = Instant::now();
            let pct = if s.total == 0 { 100.0 } else { s.done as f64 * 100.0 / s.total as f64 };
            log::info!("{}: {:.0}% ({} of {} bytes)", s.what, pct, s.done, s.total);
        }
    }
    fn end(&self) {}
}

/// The reporter for this run: a bar on a terminal, log lines otherwise, nothing when quiet.
pub fn for_terminal(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(NoProgress)
    } else if std::io::stderr().is_terminal() {
        Box::new(BarProgress { bar: Mutex::new(None) })
    } else {
        Box::new(LogProgress {
            state: Mutex::new(LogState { what: String::new(), total: 0, done: 0, last: Instant::now() }),
        })
    }
}
