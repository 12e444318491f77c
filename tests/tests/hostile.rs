//! Hostile repository folders: whoever can write the folder can put links, FIFOs, folders and
//! garbage at the names strata uses. These tests prove that root running strata never writes
//! through a planted link, that no FIFO makes a command (or a running mount) hang, that stray
//! names neither stop backups nor get deleted, and that a missing or damaged `strata.repo` is
//! warned about, worked around and rewritten by the next backup.
//!
//! Each test gathers every broken promise before failing (a matrix of plants and commands, where
//! the first failure alone would hide the rest), and names the command and its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::*;

/// Broken promises found so far; `finish` fails the test with all of them.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let what = what();
            eprintln!("FINDING: {what}");
            self.0.push(what);
        }
    }

    fn finish(self, test: &str) {
        assert!(self.0.is_empty(), "{test}: {} broken promise(s):\n{}", self.0.len(), self.0.join("\n---\n"));
    }
}

/// One run of a program with a deadline.
struct Timed {
    run: Run,
    elapsed: Duration,
    killed: bool,
    line: String,
}

impl Timed {
    fn describe(&self) -> String {
        format!(
            "`{}`: exit {:?} after {:.1} s{}\nstdout: {}\nstderr: {}",
            self.line,
            self.run.code,
            self.elapsed.as_secs_f64(),
            if self.killed { " (KILLED at the deadline)" } else { "" },
            self.run.stdout.trim_end(),
            self.run.stderr.trim_end()
        )
    }
}

/// Runs `program ARGS...`, kills it when it outlives `limit`, and says what happened. Output
/// goes to unnamed files, so a child that fills a pipe cannot stall the test.
fn timed<S: AsRef<std::ffi::OsStr>>(program: &Path, args: &[S], limit: Duration) -> Timed {
    use std::io::{Read, Seek};
    let line = std::iter::once(program.as_os_str())
        .chain(args.iter().map(AsRef::as_ref))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let (mut out, mut err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_remove("STRATA_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            killed = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let read = |f: &mut std::fs::File| {
        let mut s = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut s).unwrap();
        String::from_utf8_lossy(&s).into_owned()
    };
    let run = Run { code: status.code(), stdout: read(&mut out), stderr: read(&mut err) };
    Timed { run, elapsed, killed, line }
}

const LIMIT: Duration = Duration::from_secs(10);

fn timed_strata(args: &[String]) -> Timed {
    timed(&strata_bin(), args, LIMIT)
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Lines of stderr that are not warnings.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("strata: warn:")).collect()
}

/// A clause (between ": ") that an error line says twice, if any: the same cause printed again
/// by the error chain.
fn repeated_clause(line: &str) -> Option<&str> {
    let parts: Vec<&str> = line.split(": ").filter(|p| p.len() >= 16).collect();
    parts.iter().enumerate().find(|(i, p)| parts[i + 1..].contains(p)).map(|(_, p)| *p)
}

/// Checks that a run finished in time and either worked or failed with one clear line (exit 1,
/// no panic, one `strata: error:` line saying nothing twice, naming one of `names` when given).
/// Returns whether it worked.
fn works_or_fails_clearly(f: &mut Findings, t: &Timed, names: &[&str]) -> bool {
    f.check(!t.killed, || format!("did not finish within {LIMIT:?}: {}", t.describe()));
    f.check(!t.run.stderr.contains("panicked"), || format!("panicked: {}", t.describe()));
    if t.killed || t.run.code == Some(0) {
        return t.run.code == Some(0);
    }
    f.check(t.run.code == Some(1), || format!("exit code is not 0 or 1: {}", t.describe()));
    let errors = error_lines(&t.run.stderr);
    f.check(errors.len() <= 1, || format!("more than one error line: {}", t.describe()));
    if let Some(line) = errors.first() {
        f.check(line.starts_with("strata: error:"), || format!("not a strata error line: {}", t.describe()));
        if let Some(clause) = repeated_clause(line) {
            f.check(false, || format!("the error says {clause:?} twice: {}", t.describe()));
        }
    }
    let all = format!("{}{}", t.run.stdout, t.run.stderr);
    f.check(names.is_empty() || names.iter().any(|n| all.contains(n)), || {
        format!("the failure names none of {names:?}: {}", t.describe())
    });
    false
}

/// Changes block `block` of the 1 MiB source, so that the next backup has something to store.
fn change(src: &Path, block: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    f.write_all_at(&text(seed, 4096), block * 4096).unwrap();
}

/// `dir/disk.img` (1 MiB) backed up three times into `dir/repo` (4 KiB blocks: a full and two
/// incrementals), with a copy of the source as each version was taken (`dir/model1`..).
fn three_versions(dir: &Path) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    let (src, repo) = (dir.join("disk.img"), dir.join("repo"));
    write_disk(&src, 1 << 20, 21, |b| b % 5 != 4);
    let mut models = Vec::new();
    for i in 1..=3u64 {
        if i > 1 {
            change(&src, i * 7, 100 + i);
        }
        strata(["backup", "-q", "--block-size", "4K", &p(&src), &p(&repo)]).ok();
        let m = dir.join(format!("model{i}"));
        std::fs::copy(&src, &m).unwrap();
        models.push(m);
    }
    (src, repo, models)
}

/// A copy of the folder `from` (files only) at `to`.
fn copy_repo(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(p(path)).unwrap();
    // SAFETY: a valid NUL-terminated path; no memory is shared with the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p(path));
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn is_mounted(dir: &Path) -> bool {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let want = p(&canon);
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A `strata mount` started with a deadline; on drop it is unmounted with `strata umount` (with a
/// deadline too), else detached lazily, and its driver is killed if it is still there.
struct Mount {
    dir: PathBuf,
    driver: Option<i32>,
}

impl Mount {
    /// Mounts `repo` on `dir`; `None` (with a finding) when the mount command fails or hangs.
    fn new(f: &mut Findings, repo: &Path, dir: &Path) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let t = timed_strata(&args(&["mount", &p(repo), &p(dir)]));
        let driver =
            t.run.stdout.split("driver pid ").nth(1).and_then(|s| s.split(')').next()).and_then(|s| s.parse().ok());
        let m = Mount { dir: dir.to_path_buf(), driver };
        f.check(!t.killed && t.run.code == Some(0), || format!("mount failed: {}", t.describe()));
        (!t.killed && t.run.code == Some(0)).then_some(m)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `strata umount`, which must work in time.
    fn umount(mut self, f: &mut Findings) {
        let t = timed_strata(&args(&["umount", &p(&self.dir)]));
        f.check(!t.killed && t.run.code == Some(0), || format!("umount failed: {}", t.describe()));
        if t.run.code == Some(0) {
            self.driver = None;
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let t = timed_strata(&args(&["umount", &p(&self.dir)]));
            if t.run.code != Some(0) || is_mounted(&self.dir) {
                let _ = tool_status("umount", &["-l", &p(&self.dir)]);
            }
        }
        // a mount command killed before it printed its driver's pid leaves the driver (in its
        // own session) behind: it is found by this test's own mount point among its arguments
        let mut drivers = drivers_of(&self.dir);
        drivers.extend(self.driver);
        for pid in drivers.into_iter().filter(|&pid| !process_gone(pid)) {
            // SAFETY: signals a mount driver this test started, by its pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The pids of `strata mount` processes serving the mount point `dir`.
fn drivers_of(dir: &Path) -> Vec<i32> {
    let (bin, dir) = (p(&strata_bin()), p(dir));
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<String> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            argv.first() == Some(&bin) && argv.iter().any(|a| a == "mount") && argv.last() == Some(&dir)
        })
        .collect()
}

/// Reads `file` to the end in a child process (`cmp` against `model`), so that a hanging FUSE
/// read hangs the child, not the test.
fn read_through_mount(f: &mut Findings, file: &Path, model: &Path, limit: Duration) {
    let t = timed(&tool_path("cmp"), &[p(file), p(model)], limit);
    f.check(!t.killed && t.run.code == Some(0), || format!("reading {} through the mount: {}", p(file), t.describe()));
}

// ---------------------------------------------------------------------------------------------
// 1. Links planted by an unprivileged user in a repository root writes to

/// A system user made for one test, removed on drop.
struct TempUser {
    name: String,
}

impl TempUser {
    fn new(tag: &str) -> TempUser {
        let name = format!("strata-hostile-{tag}{}", std::process::id());
        let _ = tool_status("userdel", &[&name]);
        tool("useradd", &["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", &name]);
        TempUser { name }
    }

    /// Runs `argv` as this user and panics if it fails.
    fn run(&self, argv: &[String]) {
        let mut all = vec!["-u", &self.name, "--"];
        all.extend(argv.iter().map(String::as_str));
        tool("runuser", &all);
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = tool_status("userdel", &[&self.name]);
    }
}

/// What must not change about the victim file.
#[derive(PartialEq, Debug)]
struct Fingerprint {
    bytes: Vec<u8>,
    mtime: (i64, i64),
    mode: u32,
    owner: (u32, u32),
}

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    Fingerprint {
        bytes: std::fs::read(path).unwrap(),
        mtime: (m.mtime(), m.mtime_nsec()),
        mode: m.mode(),
        owner: (m.uid(), m.gid()),
    }
}

/// The next pid the kernel hands out, roughly.
fn last_pid() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1)
}

#[test]
fn root_never_follows_links_an_unprivileged_user_plants_in_the_repository() {
    let test = "root_never_follows_links_an_unprivileged_user_plants_in_the_repository";
    if !capable(test, "root", is_root())
        || !capable(
            test,
            "useradd, userdel, runuser and perl",
            ["useradd", "userdel", "runuser", "perl"].iter().all(|t| has_tool(t)),
        )
    {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // the user may walk to the repository but write nowhere else
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (src, repo, _) = three_versions(t);
    let victim = t.join("victim");
    std::fs::write(&victim, b"root's file, which strata must never write\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = fingerprint(&victim);
    let dangling = t.join("created-through-a-link");
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();
    let user = TempUser::new("l");

    let mut f = Findings::default();
    let mut seed = 500;
    let mut phase = |f: &mut Findings, what: &str, plant: &[String], names: &[&str]| {
        user.run(plant);
        seed += 1;
        change(&src, seed % 200, seed);
        let out = t.join(format!("out-{seed}"));
        let commands = [
            args(&["backup", &p(&src), &p(&repo)]),
            args(&["config", &p(&repo), "--keep-last", &(10 + seed % 5).to_string()]),
            args(&["merge", &p(&repo), "latest"]),
            args(&["prune", &p(&repo), "--keep-last", "3"]),
            args(&["list", &p(&repo)]),
            args(&["verify", &p(&repo)]),
            args(&["restore", &p(&repo), "latest", &p(&out)]),
        ];
        for c in &commands {
            let run = timed_strata(c);
            works_or_fails_clearly(f, &run, names);
            eprintln!("[{what}] {} -> {:?}: {}", c[0], run.run.code, run.run.stderr.lines().next().unwrap_or(""));
            let now = fingerprint(&victim);
            f.check(now == before, || format!("[{what}] the victim changed after {}: {now:?}", run.describe()));
            f.check(!dangling.exists(), || format!("[{what}] {} created {}", run.describe(), p(&dangling)));
        }
    };

    // `ln -sf` unlinks root's file (the folder is writable and not sticky) and links the name
    let link = |target: &Path, name: &str| args(&["ln", "-sfn", &p(target), &p(&repo.join(name))]);
    phase(&mut f, "lock -> victim", &link(&victim, "lock"), &["lock"]);
    phase(&mut f, "lock -> dangling", &link(&dangling, "lock"), &["lock"]);
    std::fs::remove_file(repo.join("lock")).unwrap();
    phase(&mut f, "strata.toml -> victim", &link(&victim, "strata.toml"), &["strata.toml"]);
    std::fs::remove_file(repo.join("strata.toml")).unwrap();
    phase(&mut f, "strata.repo -> victim", &link(&victim, "strata.repo"), &["strata.repo"]);
    // the backup of that phase wrote the identity again, as a file in place of the link
    let kind = std::fs::symlink_metadata(repo.join("strata.repo")).map(|m| m.file_type());
    f.check(kind.as_ref().is_ok_and(|k| k.is_file()), || format!("strata.repo after the backups is {kind:?}"));

    // temporary names guessed from the pids the next commands will get, with and without a suffix
    let newest = list_json(&repo).iter().filter_map(|r| r["id"].as_u64()).max().unwrap_or(0);
    let mut finals = vec!["strata.repo".to_string(), "strata.toml".to_string()];
    finals.extend((1..=newest + 3).map(|id| format!("v{id:08}.strata")));
    let pids = last_pid()..last_pid() + 100;
    let mut plant = args(&[
        "perl",
        "-e",
        "my ($v, $r, $a, $b, @f) = @ARGV; for my $f (@f) { for my $p ($a .. $b) { \
         symlink($v, \"$r/.tmp-$f.$p\") && symlink($v, \"$r/.tmp-$f.$p.0000000000000000\") or die \"$f $p: $!\" } }",
        &p(&victim),
        &p(&repo),
        &pids.start.to_string(),
        &pids.end.to_string(),
    ]);
    plant.extend(finals);
    phase(&mut f, ".tmp-* -> victim", &plant, &[]);
    let left: Vec<String> = names_in(&repo).into_iter().filter(|n| n.starts_with(".tmp-")).collect();
    f.check(left.is_empty(), || {
        format!("the backup left {} planted .tmp-* links, e.g. {:?}", left.len(), left.first())
    });
    drop(user);
    f.finish(test);
}

#[test]
fn a_repository_folder_others_can_write_or_own_is_warned_about() {
    let test = "a_repository_folder_others_can_write_or_own_is_warned_about";
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, _) = three_versions(tmp.path());
    let mut f = Findings::default();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();
    for c in [args(&["list", &p(&repo)]), args(&["backup", &p(&src), &p(&repo)])] {
        let t = timed_strata(&c);
        works_or_fails_clearly(&mut f, &t, &[]);
        f.check(t.run.stderr.contains("writable"), || {
            format!("no warning that the repository folder is world-writable (mode 0777): {}", t.describe())
        });
    }
    if is_root() {
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o700)).unwrap();
        tool("chown", &["65534:65534", &p(&repo)]);
        let t = timed_strata(&args(&["list", &p(&repo)]));
        works_or_fails_clearly(&mut f, &t, &[]);
        f.check(t.run.stderr.contains("the repository folder belongs to user 65534"), || {
            format!("no warning that root uses a repository folder owned by uid 65534: {}", t.describe())
        });
    }
    f.finish(test);
}

// ---------------------------------------------------------------------------------------------
// 2. FIFOs

#[test]
fn fifos_in_the_repository_never_hang_a_command() {
    let test = "fifos_in_the_repository_never_hang_a_command";
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, base, models) = three_versions(t);
    let fuse = have_fuse(test);
    let mut f = Findings::default();
    for name in ["v00000009.strata", "strata.repo", "strata.toml", "lock"] {
        let repo = t.join(format!("repo-{name}"));
        copy_repo(&base, &repo);
        mkfifo(&repo.join(name));
        let out = t.join(format!("out-{name}"));
        let r = p(&repo);
        let commands = [
            args(&["list", &r]),
            args(&["info", &r, "1"]),
            args(&["verify", &r]),
            args(&["restore", &r, "1", &p(&out)]),
            args(&["backup", &p(&src), &r]),
            args(&["merge", &r, "2"]),
            args(&["prune", &r, "--keep-last", "2"]),
            args(&["config", &r]),
        ];
        for c in &commands {
            let run = timed_strata(c);
            works_or_fails_clearly(&mut f, &run, &[name]);
            eprintln!("[FIFO {name}] {} -> {:?} in {:?}", c[0], run.run.code, run.elapsed);
        }
        if fuse {
            // a fresh copy, so that the commands above did not replace the FIFO
            let repo = t.join(format!("mrepo-{name}"));
            copy_repo(&base, &repo);
            mkfifo(&repo.join(name));
            if let Some(m) = Mount::new(&mut f, &repo, &t.join(format!("mnt-{name}"))) {
                read_through_mount(&mut f, &m.path("1/disk.img"), &models[0], LIMIT);
                m.umount(&mut f);
                eprintln!("[FIFO {name}] mounted, read version 1 and unmounted");
            }
        }
    }
    f.finish(test);
}

#[test]
fn a_running_mount_keeps_serving_when_fifos_appear() {
    let test = "a_running_mount_keeps_serving_when_fifos_appear";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = three_versions(t);
    let mut f = Findings::default();
    if let Some(m) = Mount::new(&mut f, &repo, &t.join("mnt")) {
        read_through_mount(&mut f, &m.path("3/disk.img"), &models[2], LIMIT);
        for name in ["v00000009.strata", "strata.repo", "strata.toml", "lock"] {
            mkfifo(&repo.join(name));
        }
        let few = Duration::from_secs(5);
        let ls = timed(&tool_path("ls"), &[p(&m.dir)], few);
        f.check(!ls.killed && ls.run.code == Some(0), || format!("listing the mount: {}", ls.describe()));
        for (i, model) in models.iter().enumerate() {
            read_through_mount(&mut f, &m.path(&format!("{}/disk.img", i + 1)), model, few);
        }
        read_through_mount(&mut f, &m.path("latest/disk.img"), &models[2], few);
        m.umount(&mut f);
    }
    f.finish(test);
}

// ---------------------------------------------------------------------------------------------
// 3. Stray names

#[test]
fn stray_names_in_the_repository_do_not_stop_backups_and_are_never_deleted() {
    let test = "stray_names_in_the_repository_do_not_stop_backups_and_are_never_deleted";
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo, _) = three_versions(t);
    std::fs::create_dir(repo.join(".tmp-x")).unwrap();
    std::fs::write(repo.join(".tmp-x/mine"), b"not strata's").unwrap();
    std::fs::create_dir(repo.join("v00000007.strata")).unwrap();
    std::fs::write(repo.join("v00000007.strata/mine"), b"not strata's either").unwrap();
    std::fs::write(repo.join("v99999999999.strata"), b"").unwrap();
    std::fs::write(repo.join("v00000008.strata"), text(77, 6000)).unwrap();
    let strays = [".tmp-x/mine", "v00000007.strata/mine", "v99999999999.strata", "v00000008.strata"];
    let stray_bytes: Vec<Vec<u8>> = strays.iter().map(|s| std::fs::read(repo.join(s)).unwrap()).collect();

    let mut f = Findings::default();
    let mut made = Vec::new();
    for i in 0..6u64 {
        change(&src, 30 + i, 900 + i);
        let run = timed_strata(&args(&["backup", "--json", &p(&src), &p(&repo)]));
        f.check(run.run.code == Some(0), || format!("backup {i} with strays: {}", run.describe()));
        if let Some(id) = serde_json::from_str::<serde_json::Value>(&run.run.stdout).ok().and_then(|v| v["id"].as_u64())
        {
            let model = t.join(format!("model-v{id}"));
            std::fs::copy(&src, &model).unwrap();
            made.push((id, model));
        }
    }
    let ids: Vec<u64> = made.iter().map(|(id, _)| *id).collect();
    f.check(!ids.iter().any(|id| [7, 8, 99_999_999_999].contains(id)), || format!("ids given at stray names: {ids:?}"));
    for (id, model) in &made {
        let out = t.join(format!("restored-{id}"));
        let r = timed_strata(&args(&["restore", "-q", &p(&repo), &id.to_string(), &p(&out)]));
        f.check(r.run.code == Some(0) && same_file(&out, model), || {
            format!("version {id} does not restore to its source: {}", r.describe())
        });
    }
    let list = timed_strata(&args(&["list", "--json", &p(&repo)]));
    f.check(list.run.code == Some(0), || format!("list: {}", list.describe()));
    if let Ok(rows) = serde_json::from_str::<serde_json::Value>(&list.run.stdout) {
        for r in rows.as_array().into_iter().flatten() {
            let id = r["id"].as_u64().unwrap_or(0);
            if [7, 8, 99_999_999_999].contains(&id) {
                f.check(r["restorable"] == false, || format!("stray {id} listed as restorable: {r}"));
            }
        }
    }
    // latest is the newest real version, not a stray
    if let Some((_, model)) = made.last() {
        let out = t.join("restored-latest");
        let r = timed_strata(&args(&["restore", "-q", &p(&repo), "latest", &p(&out)]));
        f.check(r.run.code == Some(0) && same_file(&out, model), || format!("latest: {}", r.describe()));
    }
    for c in [
        args(&["merge", &p(&repo), "latest"]),
        args(&["prune", &p(&repo), "--keep-last", "2"]),
        args(&["verify", &p(&repo)]),
    ] {
        let run = timed_strata(&c);
        works_or_fails_clearly(&mut f, &run, &[]);
    }
    for (s, bytes) in strays.iter().zip(&stray_bytes) {
        let now = std::fs::read(repo.join(s));
        f.check(now.as_ref().ok() == Some(bytes), || format!("stray {s} was deleted or changed: {now:?}"));
    }
    f.finish(test);
}

// ---------------------------------------------------------------------------------------------
// 4. strata.repo missing or damaged

fn field<'a>(ident: &'a str, key: &str) -> Option<&'a str> {
    ident.lines().find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('=').map(|v| v.trim().trim_matches('"')))
}

/// The identity file's text with `repo_id` replaced; with a checksum over the new text when
/// `resum`, else without a checksum line (as files written before 0.4).
fn with_repo_id(ident: &str, repo_id: &str, resum: bool) -> String {
    let old = field(ident, "repo_id").unwrap();
    let body: String = ident.lines().filter(|l| !l.starts_with("checksum")).map(|l| format!("{l}\n")).collect();
    let body = body.replace(old, repo_id);
    if resum {
        format!("{body}checksum = \"crc32c:{:08x}\"\n", crc32c::crc32c(body.as_bytes()))
    } else {
        body
    }
}

/// One hex digit of the id changed.
fn other_id(id: &str) -> String {
    let first = if id.starts_with('0') { '1' } else { '0' };
    format!("{first}{}", &id[1..])
}

/// Checks that no output advises a `strata` subcommand that does not exist.
fn advised_commands_exist(f: &mut Findings, t: &Timed) {
    let all = format!("{}{}", t.run.stdout, t.run.stderr);
    for advice in all.split("`strata ").skip(1) {
        let sub = advice.split([' ', '`']).next().unwrap_or("");
        if sub.is_empty() {
            continue;
        }
        let help = strata([sub, "--help"]);
        f.check(help.code == Some(0), || format!("advises `strata {sub}`, which does not exist: {}", t.describe()));
    }
}

#[test]
fn a_missing_or_damaged_strata_repo_is_warned_about_and_rewritten_by_the_next_backup() {
    let test = "a_missing_or_damaged_strata_repo_is_warned_about_and_rewritten_by_the_next_backup";
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, base, models) = three_versions(t);
    let ident = std::fs::read_to_string(base.join("strata.repo")).unwrap();
    let repo_id = field(&ident, "repo_id").unwrap().to_string();
    let mut f = Findings::default();
    let damaged = ident.replacen(&repo_id, &other_id(&repo_id), 1);
    let legacy_other = with_repo_id(&ident, &other_id(&repo_id), false);
    for (what, content) in [
        ("missing", None),
        ("one repo_id digit changed", Some(damaged.as_str())),
        ("no checksum, another repo_id", Some(legacy_other.as_str())),
    ] {
        let repo = t.join(format!("repo-{}", what.replace(' ', "-")));
        copy_repo(&base, &repo);
        match content {
            None => std::fs::remove_file(repo.join("strata.repo")).unwrap(),
            Some(text) => std::fs::write(repo.join("strata.repo"), text).unwrap(),
        }
        let out = t.join(format!("out-{}", what.replace(' ', "-")));
        for c in
            [args(&["list", &p(&repo)]), args(&["verify", &p(&repo)]), args(&["restore", &p(&repo), "2", &p(&out)])]
        {
            let run = timed_strata(&c);
            eprintln!("[{what}] {}: {}", c[0], run.run.stderr.trim_end());
            f.check(run.run.code == Some(0), || format!("[{what}] does not work: {}", run.describe()));
            f.check(run.run.stderr.contains("strata.repo"), || format!("[{what}] no warning: {}", run.describe()));
            let all = format!("{}{}", run.run.stdout, run.run.stderr);
            f.check(!all.contains("move it out"), || format!("[{what}] advises moving files out: {}", run.describe()));
            advised_commands_exist(&mut f, &run);
        }
        f.check(same_file(&out, &models[1]), || format!("[{what}] version 2 restored wrong"));
        change(&src, 60, 61);
        let b = timed_strata(&args(&["backup", &p(&src), &p(&repo)]));
        f.check(b.run.code == Some(0), || format!("[{what}] the next backup: {}", b.describe()));
        let now = std::fs::read_to_string(repo.join("strata.repo")).unwrap_or_default();
        f.check(now.contains("\nchecksum = \"crc32c:") && field(&now, "repo_id") == Some(repo_id.as_str()), || {
            format!("[{what}] strata.repo after the backup:\n{now}")
        });
        let quiet = timed_strata(&args(&["list", &p(&repo)]));
        f.check(quiet.run.code == Some(0) && !quiet.run.stderr.contains("strata.repo"), || {
            format!("[{what}] still warned after the rewrite: {}", quiet.describe())
        });
    }
    f.finish(test);
}

#[test]
fn a_sound_strata_repo_naming_another_repository_is_rebuilt_from_the_images() {
    let test = "a_sound_strata_repo_naming_another_repository_is_rebuilt_from_the_images";
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo, _) = three_versions(t);
    let ident = std::fs::read_to_string(repo.join("strata.repo")).unwrap();
    let repo_id = field(&ident, "repo_id").unwrap().to_string();
    // another id with a checksum that matches: every image disagrees with strata.repo alone
    std::fs::write(repo.join("strata.repo"), with_repo_id(&ident, &other_id(&repo_id), true)).unwrap();
    let images: Vec<(String, Vec<u8>)> = (1..=3)
        .map(|id| {
            let n = format!("v{id:08}.strata");
            let b = std::fs::read(repo.join(&n)).unwrap();
            (n, b)
        })
        .collect();
    let mut f = Findings::default();
    let list = timed_strata(&args(&["list", &p(&repo)]));
    works_or_fails_clearly(&mut f, &list, &[]);
    f.check(list.run.code == Some(0) && list.run.stderr.contains("strata.repo names repository"), || {
        format!("strata.repo is not named as the one that disagrees: {}", list.describe())
    });
    f.check(!list.run.stdout.contains("another repository") && !list.run.stderr.contains("move"), || {
        format!("sound images are called foreign, or moving them is advised: {}", list.describe())
    });
    for c in [args(&["verify", &p(&repo)]), args(&["restore", &p(&repo), "1", &p(&t.join("out"))])] {
        let run = timed_strata(&c);
        f.check(run.run.code == Some(0), || format!("[{}] does not work on the images: {}", c[0], run.describe()));
    }
    for (n, bytes) in &images {
        let now = std::fs::read(repo.join(n));
        f.check(now.as_ref().ok() == Some(bytes), || format!("{n} was deleted or changed"));
    }
    // the next backup builds on the images and writes their identity back
    let backup = timed_strata(&args(&["backup", "--json", &p(&src), &p(&repo)]));
    f.check(backup.run.code == Some(0) && backup.run.stdout.contains("\"kind\": \"incremental\""), || {
        format!("the next backup does not go on the images' chain: {}", backup.describe())
    });
    let rewritten = std::fs::read_to_string(repo.join("strata.repo")).unwrap_or_default();
    f.check(field(&rewritten, "repo_id") == Some(repo_id.as_str()), || {
        format!("strata.repo was not rewritten with the images' id: {rewritten}")
    });
    f.finish(test);
}
