//! Read-only memory maps of ranges of the backup source, so that hashing reads the page cache in
//! place instead of copying every byte into a buffer first, and what happens when a mapped page
//! cannot be read. A read through a map that fails (the source file shrank during the backup, or
//! the device reported an I/O error) raises SIGBUS instead of returning an error; the handler
//! installed here reports the source and the offset on one line, removes the unfinished image
//! (`remove_on_fault`) and exits with status 1, before anything is published.

use std::ffi::c_void;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A read-only shared map of `len` bytes of the source at `offset`; unmapped on drop. At most
/// one map is live at a time (the SIGBUS handler knows only one).
pub struct SourceMap {
    base: *mut c_void,
    len: usize,
}

// SAFETY: the map is read-only and only read through shared slices.
unsafe impl Send for SourceMap {}
unsafe impl Sync for SourceMap {}

/// The answer of `SourceMap::residency`.
pub struct Residency {
    page: usize,
    pages: Vec<u8>,
}

impl Residency {
    /// Whether every page of bytes `[start, end)` of the map is in the page cache.
    pub fn all(&self, start: usize, end: usize) -> bool {
        self.pages[start / self.page..end.div_ceil(self.page)].iter().all(|p| p & 1 == 1)
    }
}

static MAP_BASE: AtomicUsize = AtomicUsize::new(0);
static MAP_LEN: AtomicUsize = AtomicUsize::new(0);
static MAP_OFFSET: AtomicU64 = AtomicU64::new(0);
/// "strata: PATH: cannot read the source at offset ", written by the handler.
static MESSAGE_HEAD: OnceLock<Vec<u8>> = OnceLock::new();
/// What the handler removes (leaked, never freed), or null.
static ON_FAULT: AtomicPtr<Removals> = AtomicPtr::new(std::ptr::null_mut());

/// Files to unlink, then a folder to remove, as C strings made before any fault.
struct Removals {
    files: Vec<CString>,
    folder: Option<CString>,
}
const MESSAGE_TAIL: &[u8] = b" (it shrank during the backup, or the device reported an I/O error); \
no version was written: check the source and run the backup again\n";

impl SourceMap {
    /// Maps `[offset, offset + len)` of `file` (at `path`), which must lie inside the source and
    /// start on a page boundary. `None` when the kernel refuses (the caller reads instead).
    pub fn new(file: &File, path: &Path, offset: u64, len: usize) -> Option<SourceMap> {
        install_handler(path);
        // SAFETY: a fresh read-only shared mapping of our own descriptor; the kernel picks the
        // address. Reads past the file's current end raise SIGBUS, handled above.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), offset as i64)
        };
        if base == libc::MAP_FAILED {
            log::debug!("{}: cannot map {len} bytes at {offset}: {}", path.display(), std::io::Error::last_os_error());
            return None;
        }
        MAP_OFFSET.store(offset, Ordering::SeqCst);
        MAP_LEN.store(len, Ordering::SeqCst);
        MAP_BASE.store(base as usize, Ordering::SeqCst);
        Some(SourceMap { base, len })
    }

    /// Which pages of the map are in the page cache (`mincore`): reading those through the map
    /// costs no disk wait, while a cold range reads faster with `pread`.
    pub fn residency(&self) -> Residency {
        let page = page_size();
        let mut pages = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: the range is our mapping and `pages` holds one byte per page of it.
        if unsafe { libc::mincore(self.base, self.len, pages.as_mut_ptr()) } != 0 {
            pages.fill(0);
        }
        Residency { page, pages }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `base` maps `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, self.len) }
    }
}

impl Drop for SourceMap {
    fn drop(&mut self) {
        MAP_BASE.store(0, Ordering::SeqCst);
        MAP_LEN.store(0, Ordering::SeqCst);
        // SAFETY: unmapping exactly what `new` mapped; no slice of it outlives `self`.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Names what a failed read of a map removes before the process exits: the unfinished image,
/// and the files and folder of a repository that this backup created (the unwinding that
/// removes them otherwise does not happen in a signal handler). Nothing given: nothing removed.
pub fn remove_on_fault(files: &[PathBuf], folder: Option<&Path>) {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
    let removals = Removals { files: files.iter().filter_map(|f| c(f)).collect(), folder: folder.and_then(c) };
    // A few bytes per backup attempt, kept for the process's life: the handler may read them at
    // any moment, so they are never freed.
    ON_FAULT.store(Box::into_raw(Box::new(removals)), Ordering::SeqCst);
}

fn page_size() -> usize {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |n| n as usize)
}

fn install_handler(path: &Path) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = MESSAGE_HEAD.set(format!("strata: {}: cannot read the source at offset ", path.display()).into_bytes());
        // SAFETY: installs a handler that only uses async-signal-safe calls (write, _exit,
        // signal) and reads atomics and a value set before installation.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (base, len) = (MAP_BASE.load(Ordering::SeqCst), MAP_LEN.load(Ordering::SeqCst));
    if base == 0 || addr < base || addr >= base + len {
        // Not a read of the source: let the default action happen when the access repeats.
        // SAFETY: signal() is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    let offset = MAP_OFFSET.load(Ordering::SeqCst) + (addr - base) as u64;
    let mut digits = [0u8; 20];
    let decimal = format_decimal(offset, &mut digits);
    let head = MESSAGE_HEAD.get().map(|m| m.as_slice()).unwrap_or(b"strata: cannot read the source at offset ");
    for part in [head, decimal, MESSAGE_TAIL] {
        // SAFETY: write(2) on stderr is async-signal-safe.
        unsafe { libc::write(2, part.as_ptr() as *const c_void, part.len()) };
    }
    // SAFETY: the pointer is null or a leaked, never-freed `Removals`, only read here.
    if let Some(removals) = unsafe { ON_FAULT.load(Ordering::SeqCst).as_ref() } {
        for file in &removals.files {
            // SAFETY: unlink(2) is async-signal-safe.
            unsafe { libc::unlink(file.as_ptr()) };
        }
        if let Some(folder) = &removals.folder {
            // SAFETY: rmdir(2) is async-signal-safe; it removes only an empty folder.
            unsafe { libc::rmdir(folder.as_ptr()) };
        }
    }
    // SAFETY: _exit is async-signal-safe and skips destructors, as a crash would.
    unsafe { libc::_exit(1) };
}

/// `n` in decimal, without allocating (for the signal handler).
fn format_decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formatting_matches_display() {
        let mut buf = [0u8; 20];
        for n in [0u64, 7, 10, 65536, 4294967296, u64::MAX] {
            assert_eq!(format_decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    /// Runs in a child process (the test re-executes itself): maps a file, truncates it and
    /// reads past the new end, which must end the process with status 1 and the one-line report.
    #[test]
    fn reading_a_map_past_a_shrunk_source_exits_with_a_report_and_removes_the_unfinished_image() {
        if let Ok(path) = std::env::var("STRATA_SIGBUS_CHILD") {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let map = SourceMap::new(&file, Path::new(&path), 0, 1 << 20).expect("map");
            remove_on_fault(&[Path::new(&path).with_file_name("unfinished")], None);
            file.set_len(4096).unwrap();
            let byte = std::hint::black_box(map.bytes()[300_000]);
            panic!("read {byte} past the end without SIGBUS");
        }
        let dir = std::env::temp_dir().join(format!("strata-sigbus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("source.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("unfinished"), b"half an image").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "source_map::tests::reading_a_map_past_a_shrunk_source_exits_with_a_report_and_removes_the_unfinished_image",
                "--nocapture",
            ])
            .env("STRATA_SIGBUS_CHILD", &path)
            .output()
            .unwrap();
        let unfinished_left = dir.join("unfinished").exists();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!unfinished_left, "the handler removes the unfinished image");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        let expected = format!("strata: {}: cannot read the source at offset 300000 (it shrank", path.display());
        assert!(stderr.contains(&expected), "stderr: {stderr}");
    }
}
