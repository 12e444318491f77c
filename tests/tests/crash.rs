//! The crash harness: `strata backup`, `merge` and `prune` killed at deterministic points (the
//! N-th write, fsync, rename or delete, the N-th block, named publish points) and by SIGKILL at
//! random moments. After every kill: each version that was complete before restores
//! byte-identical (digest verified), the interrupted backup's version is either complete or
//! absent, `list` shows no half version, and the next backup succeeds and cleans up.
//! `STRATA_CRASH_ROUNDS=N` multiplies the random kills for a longer run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_tests::*;

struct Fixture {
    src: PathBuf,
    repo: PathBuf,
    /// Model disk of every version by id.
    models: BTreeMap<u64, PathBuf>,
}

fn change(path: &Path, block: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&text(seed, 4096), (block % 512) * 4096).unwrap();
}

/// full, 2 incrementals, a differential, an incremental of it: 5 versions of a disk of `mib`.
fn base(t: &Path, mib: u64) -> Fixture {
    let (src, repo) = (t.join("disk.img"), t.join("base"));
    write_disk(&src, mib << 20, 7, |b| b % 4 != 1);
    let mut models = BTreeMap::new();
    for i in 1..=5u64 {
        if i > 1 {
            change(&src, i * 37, i);
        }
        let mut args = vec!["backup".to_string(), "-q".into(), "--block-size".into(), "4K".into()];
        if i == 4 {
            args.push("--differential".into());
        }
        args.extend([p(&src), p(&repo)]);
        strata(&args).ok();
        let m = t.join(format!("model{i}"));
        std::fs::copy(&src, &m).unwrap();
        models.insert(i, m);
    }
    Fixture { src, repo, models }
}

fn copy_repo(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    tool("cp", &["-a", &p(from), &p(to)]);
}

/// What must hold after any interruption. `new` is the model of a version the interrupted
/// command may have published (a backup), which is then allowed to be listed.
fn check_after_kill(
    repo: &Path,
    models: &BTreeMap<u64, PathBuf>,
    new: Option<(&Path, u64)>,
    scratch: &Path,
    what: &str,
) {
    let rows = list_json(repo);
    for r in &rows {
        let id = r["id"].as_u64().unwrap();
        assert_eq!(r["restorable"], true, "{what}: version {id} listed but not restorable: {r}");
        let model = match (models.get(&id), new) {
            (Some(m), _) => m.as_path(),
            (None, Some((m, new_id))) if new_id == id => m,
            _ => panic!("{what}: unexpected version {id} listed"),
        };
        assert_restores_to(repo, &id.to_string(), model, scratch);
    }
    let v = strata(["verify", "-q", &p(repo)]);
    assert_eq!(v.code, Some(0), "{what}: verify after the kill:\n{}", v.stdout);
}

/// The next backup works and leaves no temporary file behind.
fn next_backup_cleans_up(src: &Path, repo: &Path, what: &str) {
    strata(["backup", "-q", &p(src), &p(repo)]).ok();
    let temp_left =
        std::fs::read_dir(repo).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
    assert!(!temp_left, "{what}: the next backup left a temporary file");
}

fn points(counted: &[(&str, &[u64])], named: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = named.iter().map(|s| s.to_string()).collect();
    for (kind, ns) in counted {
        out.extend(ns.iter().map(|n| format!("{kind}:{n}")));
    }
    out
}

#[test]
fn kill_points_in_backup_merge_and_prune_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let fx = base(t, 2);
    let work = t.join("work");
    let mut kills = 0;

    // backup: the new version (id 6) must be complete or absent
    change(&fx.src, 100, 66);
    let new_model = t.join("model6");
    std::fs::copy(&fx.src, &new_model).unwrap();
    let backup_points = points(
        &[
            ("write", &[1, 2, 3, 4, 5, 6, 8, 10, 13, 17, 21, 30, 40, 80, 120, 160]),
            ("fsync", &[1, 2, 3, 4, 5]),
            ("rename", &[1, 2]),
            ("image.block", &[1, 2, 5, 10, 20, 50, 100]),
        ],
        &["repo.before_record", "image.before_rename", "image.after_rename", "image.after_dir_sync"],
    );
    for point in &backup_points {
        copy_repo(&fx.repo, &work);
        let r = strata_env(["backup", "-q", "--full", &p(&fx.src), &p(&work)], &[("STRATA_CRASH_AT", point)]);
        if r.code == Some(0) {
            continue;
        }
        kills += 1;
        let what = format!("backup killed at {point}");
        check_after_kill(&work, &fx.models, Some((&new_model, 6)), t, &what);
        next_backup_cleans_up(&fx.src, &work, &what);
    }

    // merge of version 3 (chain 1 <- 2 <- 3): nothing may change
    let merge_points = points(
        &[
            ("write", &[1, 2, 3, 4, 5, 6, 8, 16, 32, 64]),
            ("fsync", &[1, 2, 3]),
            ("rename", &[1]),
            ("image.block", &[1, 50, 200]),
        ],
        &["image.before_rename", "image.after_rename", "image.after_dir_sync"],
    );
    for point in &merge_points {
        copy_repo(&fx.repo, &work);
        let r = strata_env(["merge", "-q", &p(&work), "3"], &[("STRATA_CRASH_AT", point)]);
        if r.code == Some(0) {
            continue;
        }
        kills += 1;
        let what = format!("merge killed at {point}");
        check_after_kill(&work, &fx.models, None, t, &what);
        next_backup_cleans_up(&fx.src, &work, &what);
    }

    // prune keeping the last 2 (merges 4 forward, deletes 1..3): kept versions must survive;
    // deleted ones may be gone or still complete
    let prune_points = points(
        &[("write", &[1, 4, 16]), ("fsync", &[1, 2, 3]), ("rename", &[1]), ("delete", &[1, 2, 3])],
        &["image.before_rename", "image.after_rename", "prune.before_delete"],
    );
    for point in &prune_points {
        copy_repo(&fx.repo, &work);
        let r = strata_env(["prune", "-q", "--keep-last", "2", &p(&work)], &[("STRATA_CRASH_AT", point)]);
        if r.code == Some(0) {
            continue;
        }
        kills += 1;
        let what = format!("prune killed at {point}");
        check_after_kill(&work, &fx.models, None, t, &what);
        let ids: Vec<u64> = list_json(&work).iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert!(ids.contains(&4) && ids.contains(&5), "{what}: a kept version is gone: {ids:?}");
        next_backup_cleans_up(&fx.src, &work, &what);
    }
    eprintln!("deterministic kill points survived: {kills}");
    assert!(kills >= 50, "only {kills} kill points were reached");
}

#[test]
fn random_sigkills_during_backup_merge_and_prune_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let fx = base(t, 24);
    // a slower source: 48 MiB of text at level 9 takes long enough to be killed part way
    let big = t.join("big.img");
    write_disk(&big, 48 << 20, 9, |_| true);
    let rounds: u64 = std::env::var("STRATA_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let work = t.join("work");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    for round in 0..rounds * 4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = 2 + seed % 120;
        copy_repo(&fx.repo, &work);
        let (args, label): (Vec<String>, &str) = match round % 3 {
            0 => (
                vec!["backup".into(), "-q".into(), "--compression-level".into(), "9".into(), p(&fx.src), p(&work)],
                "backup",
            ),
            1 => (vec!["merge".into(), "-q".into(), p(&work), "5".into()], "merge"),
            _ => (vec!["prune".into(), "-q".into(), "--keep-last".into(), "1".into(), p(&work)], "prune"),
        };
        kills += u64::from(strata_killed_after(&args, delay));
        let what = format!("{label} killed after {delay} ms");
        check_after_kill(&work, &fx.models, Some((&fx.src, 6)), t, &what);
        next_backup_cleans_up(&fx.src, &work, &what);
    }
    // and a big backup killed part way
    for delay in [50u64, 200] {
        let repo = t.join(format!("bigrepo{delay}"));
        strata(["backup", "-q", &p(&fx.src), &p(&repo)]).ok();
        kills +=
            u64::from(strata_killed_after(&["backup", "-q", "--compression-level", "9", &p(&big), &p(&repo)], delay));
        let models: BTreeMap<u64, PathBuf> = [(1, fx.src.clone())].into();
        check_after_kill(&repo, &models, Some((&big, 2)), t, &format!("big backup killed after {delay} ms"));
    }
    eprintln!("random kills: {kills}");
}
