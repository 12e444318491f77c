//! Logging for the binary: env_logger's filtering and format on stderr, switched to syslog (the
//! journal, where one runs) when a background mount driver lets go of the terminal.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

struct Logger {
    inner: env_logger::Logger,
    to_syslog: AtomicBool,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        if !self.to_syslog.load(Ordering::Relaxed) {
            return self.inner.log(record);
        }
        let priority = match record.level() {
            log::Level::Error => libc::LOG_ERR,
            log::Level::Warn => libc::LOG_WARNING,
            log::Level::Info => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        if let Ok(msg) = CString::new(record.args().to_string()) {
            // SAFETY: a constant "%s" format with one valid C string argument.
            unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

pub fn init(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let inner = env_logger::Builder::new()
        .filter_level(level)
        // fuser reports its own unmount-on-exit attempt after we unmounted as a warning
        .filter_module("fuser", if verbose >= 2 { level } else { log::LevelFilter::Error })
        .parse_env("STRATA_LOG")
        .format(|buf, record| {
            use std::io::Write;
            let level = record.level().to_string().to_lowercase();
            writeln!(buf, "strata: {level}: {}", record.args())
        })
        .build();
    let max = inner.filter();
    let logger = LOGGER.get_or_init(|| Logger { inner, to_syslog: AtomicBool::new(false) });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

/// From now on, log to syslog as `strata-mount` instead of stderr.
pub fn switch_to_syslog() {
    // SAFETY: openlog keeps the identity pointer; it is a static C string literal.
    unsafe { libc::openlog(c"strata-mount".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    if let Some(l) = LOGGER.get() {
        l.to_syslog.store(true, Ordering::Relaxed);
    }
}
