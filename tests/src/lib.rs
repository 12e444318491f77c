//! Helpers for the end-to-end tests: run the real `strata` binary, make real ext4 images, attach
//! loop devices, and check for root and tools. Everything a test attaches or mounts is released
//! by a guard's `Drop`, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod faulty;

/// The `strata` binary under test: `$STRATA_BIN`, or the one cargo built next to this test.
pub fn strata_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("strata");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (which builds it) or set STRATA_BIN",
        bin.display()
    );
    bin
}

/// The result of one run of a command.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the exit code is `code`; also checks no panic.
    pub fn expect_code(self, code: i32) -> Run {
        assert!(!self.stderr.contains("panicked"), "strata panicked:\n{}", self.stderr);
        assert_eq!(self.code, Some(code), "unexpected exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    pub fn ok(self) -> Run {
        self.expect_code(0)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `strata ARGS...`.
pub fn strata<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    strata_env(args, &[])
}

/// Runs `strata ARGS...` with extra environment variables.
pub fn strata_env<I, S>(args: I, env: &[(&str, &str)]) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(strata_bin());
    cmd.args(args).env_remove("STRATA_CRASH_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from_output(cmd.output().expect("run strata"))
}

/// Runs a system tool (looked up in the sbin folders too) and panics on failure.
pub fn tool(name: &str, args: &[&str]) -> Run {
    let run = tool_status(name, args);
    assert_eq!(run.code, Some(0), "{name} {args:?} failed:\n{}{}", run.stdout, run.stderr);
    run
}

pub fn tool_status(name: &str, args: &[&str]) -> Run {
    Run::from_output(
        Command::new(tool_path(name)).args(args).output().unwrap_or_else(|e| panic!("cannot run {name}: {e}")),
    )
}

pub fn tool_path(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

pub fn has_tool(name: &str) -> bool {
    tool_path(name).is_absolute()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether a test that needs `what` can run. Under `CI=true` a missing capability fails the
/// test; elsewhere the test is skipped with the reason printed.
pub fn capable(test: &str, what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("{test}: needs {what}, which is missing on this CI machine");
    }
    eprintln!("SKIP {test}: needs {what}");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Needs e2fsprogs (mkfs.ext4, debugfs, e2fsck).
pub fn have_e2fsprogs(test: &str) -> bool {
    capable(
        test,
        "e2fsprogs (mkfs.ext4, debugfs, e2fsck)",
        ["mkfs.ext4", "debugfs", "e2fsck"].iter().all(|t| has_tool(t)),
    )
}

/// Deterministic text content (so files compress like real ones).
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = ["alpha", "block", "chain", "delta", "extent", "inode", "journal", "sector"];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 8) as usize].as_bytes());
        out.push(if x.is_multiple_of(13) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// `len` pseudo-random bytes that zstd cannot shrink (so that stored sizes are what they encode).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes a real ext4 image of `size` (e.g. "32M") holding the files of `dir`.
pub fn mkfs_ext4(image: &Path, size: &str, dir: &Path) {
    tool("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", &dir.to_string_lossy(), &image.to_string_lossy(), size]);
}

/// Runs debugfs commands read-write on an image.
pub fn debugfs_w(image: &Path, commands: &str) {
    let script = image.with_extension("debugfs");
    std::fs::write(&script, commands).unwrap();
    tool("debugfs", &["-w", "-f", &script.to_string_lossy(), &image.to_string_lossy()]);
}

/// The content of `file` inside an ext4 image, read with debugfs.
pub fn debugfs_cat(image: &Path, file: &str) -> Vec<u8> {
    let out = Command::new(tool_path("debugfs"))
        .args(["-R", &format!("cat {file}"), &image.to_string_lossy()])
        .output()
        .expect("debugfs");
    out.stdout
}

/// `e2fsck -fn`: the file system is consistent.
pub fn e2fsck_clean(image: &Path) {
    let run = tool_status("e2fsck", &["-fn", &image.to_string_lossy()]);
    assert_eq!(run.code, Some(0), "e2fsck -fn {} found problems:\n{}{}", image.display(), run.stdout, run.stderr);
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    tool_status("cmp", &[&a.to_string_lossy(), &b.to_string_lossy()]).code == Some(0)
}

/// A loop device attached to a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let run = tool("losetup", &["--find", "--show", &file.to_string_lossy()]);
        LoopDevice { path: PathBuf::from(run.stdout.trim()) }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = tool_status("losetup", &["-d", &self.path.to_string_lossy()]);
    }
}

/// A mount point with something mounted on it, unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
}

impl Mounted {
    pub fn mount(args: &[&str], dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut all: Vec<&str> = args.to_vec();
        let d = dir.to_string_lossy().into_owned();
        all.push(&d);
        tool("mount", &all);
        Mounted { dir: dir.to_path_buf() }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = tool_status("umount", &[&self.dir.to_string_lossy()]);
    }
}

/// Flips the byte at `offset` of `path`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

/// A file of `len` bytes: pseudo-random data in the blocks where `filled(block_no)` holds, zero
/// (holes) elsewhere, in 4 KiB blocks.
pub fn write_disk(path: &Path, len: u64, seed: u64, filled: impl Fn(u64) -> bool) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    let blocks = len.div_ceil(4096);
    for b in 0..blocks {
        if filled(b) {
            let n = (4096).min(len - b * 4096) as usize;
            f.write_all_at(&text(seed ^ (b * 0x9e37), n), b * 4096).unwrap();
        }
    }
}

/// One row of `strata list --json` by id.
pub fn list_json(repo: &Path) -> Vec<serde_json::Value> {
    let run = strata(["list", "--json", &repo.to_string_lossy()]).ok();
    run.json().as_array().expect("array").clone()
}

pub fn row(rows: &[serde_json::Value], id: u64) -> &serde_json::Value {
    rows.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no version {id} in {rows:?}"))
}

pub fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Whether FUSE mounts can be made here (/dev/fuse, and root or fusermount3).
pub fn have_fuse(test: &str) -> bool {
    let ok = Path::new("/dev/fuse").exists() && (is_root() || has_tool("fusermount3"));
    capable(test, "FUSE (/dev/fuse and root or fusermount3)", ok)
}

/// A `strata mount` of a repository, unmounted with `strata umount` on drop (lazily by
/// fusermount3/umount if that fails), so that no mount or driver outlives a test.
pub struct StrataMount {
    pub dir: PathBuf,
    pub driver_pid: Option<i32>,
}

impl StrataMount {
    pub fn new(repo: &Path, dir: &Path, extra: &[&str]) -> StrataMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<String> = vec!["mount".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(p(repo));
        args.push(p(dir));
        let run = strata(&args).ok();
        let driver_pid =
            run.stdout.split("driver pid ").nth(1).and_then(|s| s.split(')').next()).and_then(|s| s.parse().ok());
        StrataMount { dir: dir.to_path_buf(), driver_pid }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for StrataMount {
    fn drop(&mut self) {
        let run = strata(["umount", &p(&self.dir)]);
        if run.code != Some(0) {
            eprintln!("strata umount failed ({}); detaching lazily", run.stderr.trim());
            let _ = tool_status("umount", &["-l", &p(&self.dir)]);
            if let Some(pid) = self.driver_pid {
                // SAFETY: signals the driver this test started, by its pid.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Restores `version` of `repo` into a new file in `dir` and asserts it equals `expected`.
pub fn assert_restores_to(repo: &Path, version: &str, expected: &Path, dir: &Path) {
    let out = dir.join(format!("restored-{version}-{}", std::process::id()));
    let _ = std::fs::remove_file(&out);
    strata(["restore", "-q", &p(repo), version, &p(&out)]).ok();
    assert!(same_file(&out, expected), "version {version} of {} does not restore to {}", p(repo), p(expected));
    std::fs::remove_file(&out).unwrap();
}

/// A 1 MiB pseudo-random disk `dir/d` backed up once into `dir/repo` with `backup_args`.
pub fn one_version_repo(dir: &Path, backup_args: &[&str]) -> (PathBuf, PathBuf) {
    let (src, repo) = (dir.join("d"), dir.join("repo"));
    write_disk(&src, 1 << 20, 3, |_| true);
    let mut args = vec!["backup".to_string(), "-q".into()];
    args.extend(backup_args.iter().map(|s| s.to_string()));
    args.extend([p(&src), p(&repo)]);
    strata(&args).ok();
    (src, repo)
}

/// Starts `strata ARGS...`, sends it SIGKILL after `delay_ms` and reaps it; returns whether the
/// kill interrupted it (false when it had already finished successfully).
pub fn strata_killed_after<S: AsRef<std::ffi::OsStr>>(args: &[S], delay_ms: u64) -> bool {
    let mut child = Command::new(strata_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run strata");
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    // SAFETY: signals the child this test started, by its pid, before reaping it.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    !child.wait().expect("reap strata").success()
}
