//! The mistakes a careless user makes and what strata does about them: a restore aimed into a
//! repository is refused, a restore that fails leaves no partial file it created (and says when
//! it overwrote something), and Ctrl-C or SIGTERM during a backup or restore stops cleanly,
//! removing what was half written and saying so, with the shell's exit status for the signal;
//! backup arguments in the wrong order are named as such.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs `strata ARGS`, sends `signal` once `started()` holds, and returns what it printed.
fn signalled(args: &[String], signal: i32, started: impl Fn() -> bool) -> Run {
    let child = Command::new(strata_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strata");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started() {
        assert!(Instant::now() < deadline, "the command never started writing");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: signals the child this test started, by its pid, before reaping it.
    unsafe { libc::kill(child.id() as i32, signal) };
    Run::from_output(child.wait_with_output().expect("reap strata"))
}

#[test]
fn a_restore_into_a_repository_is_refused_and_destroys_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk"), t.path().join("repo"));
    write_disk(&src, 1 << 20, 4, |_| true);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    write_disk(&src, 1 << 20, 5, |b| b % 3 == 0);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    let v2 = std::fs::read(repo.join("v00000002.strata")).unwrap();
    for target in [repo.join("v00000002.strata"), repo.join("restored.img")] {
        let r = strata(["restore", &p(&repo), "1", &p(&target), "--force"]).expect_code(1);
        assert!(r.stderr.contains("lies inside the repository"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    assert_eq!(std::fs::read(repo.join("v00000002.strata")).unwrap(), v2);
    assert!(!repo.join("restored.img").exists());
    assert_restores_to(&repo, "2", &src, t.path());
}

#[test]
fn a_failed_restore_removes_what_it_created_and_says_what_it_overwrote() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk"), t.path().join("repo"));
    write_disk(&src, 4 << 20, 6, |_| true);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    // damage a block late in the full, so that restore has written most of the target
    let image = repo.join("v00000001.strata");
    let len = std::fs::metadata(&image).unwrap().len();
    flip_byte(&image, len * 3 / 4);

    let fresh = t.path().join("fresh.img");
    let r = strata(["restore", &p(&repo), "1", &p(&fresh)]).expect_code(1);
    assert!(r.stderr.contains(&format!("{} was removed", p(&fresh))), "{}", r.stderr);
    assert!(!fresh.exists(), "a partial target restore created is left behind");

    let empty = t.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let r = strata(["restore", &p(&repo), "1", &p(&empty)]).expect_code(1);
    assert!(r.stderr.contains("is empty again"), "{}", r.stderr);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    let old = t.path().join("old.img");
    std::fs::write(&old, b"what was there").unwrap();
    let r = strata(["restore", &p(&repo), "1", &p(&old), "--force"]).expect_code(1);
    assert!(r.stderr.contains("is now INCOMPLETE"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn ctrl_c_or_sigterm_during_a_backup_removes_the_unfinished_image_and_says_so() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk"), t.path().join("repo"));
    std::fs::write(&src, noise(11, 64 << 20)).unwrap();
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    std::fs::write(&src, noise(12, 256 << 20)).unwrap();
    let unfinished = |repo: &Path| names(repo).iter().any(|n| n.starts_with(".tmp-v"));
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let r = signalled(&["backup".into(), p(&src), p(&repo)], signal, || unfinished(&repo)).expect_code(code);
        assert!(r.stderr.contains("interrupted by SIG"), "{}", r.stderr);
        assert!(r.stderr.contains("no version was written, the unfinished image was removed"), "{}", r.stderr);
        assert!(!unfinished(&repo), "left {:?}", names(&repo));
        assert_eq!(list_json(&repo).len(), 1);
    }
    // a first backup stopped so leaves no repository
    let fresh = t.path().join("fresh");
    signalled(&["backup".into(), p(&src), p(&fresh)], libc::SIGINT, || unfinished(&fresh)).expect_code(130);
    assert!(!fresh.exists(), "left {:?}", names(&fresh));
    // and the next backup works
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    assert_restores_to(&repo, "latest", &src, t.path());
}

#[test]
fn ctrl_c_during_a_restore_removes_the_target_it_created() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk"), t.path().join("repo"));
    std::fs::write(&src, noise(13, 256 << 20)).unwrap();
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    let target = t.path().join("out.img");
    let r = signalled(&["restore".into(), p(&repo), "1".into(), p(&target)], libc::SIGINT, || target.exists())
        .expect_code(130);
    assert!(r.stderr.contains("interrupted by SIGINT") && r.stderr.contains("was removed"), "{}", r.stderr);
    assert!(!target.exists());
}

#[test]
fn backup_arguments_in_the_wrong_order_are_named() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk.img"), t.path().join("repo"));
    write_disk(&src, 1 << 20, 7, |_| true);
    let forgot = strata(["backup", &p(&src)]).expect_code(1);
    assert!(
        forgot.stderr.contains("a disk, not a repository; the order is `strata backup SOURCE REPO`"),
        "{}",
        forgot.stderr
    );
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    let before = std::fs::read(&src).unwrap();
    let swapped = strata(["backup", &p(&repo), &p(&src)]).expect_code(1);
    assert!(swapped.stderr.contains(&format!("here `strata backup {} {}`", p(&src), p(&repo))), "{}", swapped.stderr);
    assert_eq!(swapped.stderr.lines().count(), 1, "{}", swapped.stderr);
    assert_eq!(std::fs::read(&src).unwrap(), before);
    assert_eq!(list_json(&repo).len(), 1);
}

/// Starts `strata backup SOURCE REPO`, stops it (SIGSTOP) once its unfinished image appears, runs
/// `during`, lets the backup go on and returns its result.
fn during_a_paused_backup(source: &Path, repo: &Path, during: impl FnOnce()) -> Run {
    let child = Command::new(strata_bin())
        .args(["backup", "-q", &p(source), &p(repo)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strata");
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names(repo).iter().any(|n| n.starts_with(".tmp-v")) {
        assert!(Instant::now() < deadline, "the backup never started its image");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: signals the child this test started, by its pid, before reaping it.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let run = Run::from_output(child.wait_with_output().expect("reap strata"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    run
}

#[test]
fn a_restore_onto_the_source_of_a_running_backup_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (small, other) = (t.path().join("small.img"), t.path().join("other"));
    std::fs::write(&small, noise(21, 1 << 20)).unwrap();
    strata(["backup", "-q", &p(&small), &p(&other)]).ok();
    let (src, repo) = (t.path().join("disk.img"), t.path().join("repo"));
    std::fs::write(&src, noise(22, 256 << 20)).unwrap();
    let model = t.path().join("model.img");
    std::fs::copy(&src, &model).unwrap();

    let backup = during_a_paused_backup(&src, &repo, || {
        let r = strata(["restore", "--force", &p(&other), "1", &p(&src)]).expect_code(1);
        assert!(r.stderr.contains("the source of a running `strata backup`"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    });
    backup.ok();
    assert!(same_file(&src, &model), "the source was not touched");
    assert_restores_to(&repo, "latest", &model, t.path());
    // once the backup is over the same restore goes through
    strata(["restore", "-q", "--force", &p(&other), "1", &p(&src)]).ok();
    assert!(same_file(&src, &small));

    let test = "a_restore_onto_the_source_of_a_running_backup_is_refused";
    if !capable(test, "root and loop devices", is_root() && has_tool("losetup")) {
        return;
    }
    std::fs::copy(&model, &src).unwrap();
    let dev = LoopDevice::attach(&src);
    let dev_repo = t.path().join("dev-repo");
    let backup = during_a_paused_backup(&dev.path, &dev_repo, || {
        let r = strata(["restore", "--force", &p(&other), "1", &p(&dev.path)]).expect_code(1);
        assert!(r.stderr.contains("the source of a running `strata backup`"), "{}", r.stderr);
    });
    backup.ok();
    drop(dev);
    assert!(same_file(&src, &model), "the device was not touched");
}
