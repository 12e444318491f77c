//! Backup tasks: schemes make the expected kinds (driven by STRATA_NOW for the day rules), merge
//! makes a synthetic full without changing any version's bytes, prune keeps what it must and
//! frees what it says, interrupted merges and prunes lose nothing, schedules produce valid
//! systemd units, and a chain of 1000 incrementals works with bounded memory.

use std::path::{Path, PathBuf};

use strata_tests::*;

const DAY: i64 = 86_400;
const T0: i64 = 1_795_000_000; // 2026-11-18

fn change(path: &Path, block: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&text(seed, 4096), (block % 256) * 4096).unwrap();
}

/// `strata backup [args] REPO` at time `t` (STRATA_NOW); returns the JSON summary.
fn backup_at(repo: &Path, t: i64, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["backup".to_string(), "--json".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.push(p(repo));
    let now = t.to_string();
    strata_env(&all, &[("STRATA_NOW", now.as_str())]).ok().json()
}

fn kinds(repo: &Path) -> Vec<String> {
    list_json(repo).iter().map(|r| r["kind"].as_str().unwrap()[..1].to_uppercase()).collect()
}

/// A task over a 1 MiB disk with 4 KiB blocks; returns (source, repo).
fn task(t: &Path, options: &[&str]) -> (PathBuf, PathBuf) {
    let (src, repo) = (t.join("disk.img"), t.join("repo"));
    write_disk(&src, 1 << 20, 1, |b| b % 5 != 0);
    let mut args = vec!["init".to_string(), p(&repo), "--block-size".into(), "4K".into(), "--source".into(), p(&src)];
    args.extend(options.iter().map(|s| s.to_string()));
    strata(&args).ok();
    (src, repo)
}

/// Every listed version restores equal to the model kept for it.
fn assert_models(repo: &Path, models: &Path, scratch: &Path) {
    for r in list_json(repo) {
        let id = r["id"].as_u64().unwrap();
        assert_eq!(r["restorable"], true, "version {id}: {r}");
        assert_restores_to(repo, &id.to_string(), &models.join(format!("m{id}")), scratch);
    }
    strata(["verify", "-q", &p(repo)]).ok();
}

fn snapshot(src: &Path, models: &Path, id: u64) {
    std::fs::create_dir_all(models).unwrap();
    std::fs::copy(src, models.join(format!("m{id}"))).unwrap();
}

#[test]
fn incremental_scheme_makes_a_full_every_n_backups_and_records_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = task(tmp.path(), &["--scheme", "incremental", "--full-every", "3"]);
    for i in 0..7 {
        change(&src, i, i);
        backup_at(&repo, T0 + i as i64 * 3600, &[]);
    }
    assert_eq!(kinds(&repo).concat(), "FIIFIIF");
    let rows = list_json(&repo);
    assert_eq!(rows[0]["rule"], "first backup");
    assert_eq!(rows[1]["rule"], "scheme");
    assert_eq!(rows[3]["rule"], "full every N backups");
    // an explicit kind overrides the scheme
    assert_eq!(backup_at(&repo, T0 + DAY, &["--differential"])["kind"], "differential");
    assert_eq!(list_json(&repo)[7]["rule"], "requested");
    let cfg = strata(["config", "--json", &p(&repo)]).ok().json();
    assert_eq!(cfg["full_every"], 3);
    assert_eq!(cfg["source"], p(&src.canonicalize().unwrap()));
}

#[test]
fn differential_scheme_makes_a_full_when_the_last_is_d_days_old() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = task(tmp.path(), &["--scheme", "differential", "--full-every-days", "7"]);
    for day in 0..10 {
        change(&src, day, day + 50);
        backup_at(&repo, T0 + day as i64 * DAY, &[]);
    }
    assert_eq!(kinds(&repo).concat(), "FDDDDDDFDD");
    assert_eq!(list_json(&repo)[7]["rule"], "full every D days");
    let rows = list_json(&repo);
    assert_eq!(rows[9]["parent"], 8, "differentials of the new full");
}

#[test]
fn incremental_forever_keeps_chains_short_by_merging_and_every_version_stays_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = task(t, &["--scheme", "incremental-forever", "--max-chain", "4"]);
    let models = t.join("models");
    for i in 0..9u64 {
        change(&src, i * 7, i + 100);
        let s = backup_at(&repo, T0 + i as i64 * DAY, &[]);
        assert_ne!(s["kind"], "differential");
        snapshot(&src, &models, s["id"].as_u64().unwrap());
        let info = strata(["info", "--json", &p(&repo), "latest"]).ok().json();
        assert!(info["chain"].as_array().unwrap().len() <= 4, "chain too long: {info}");
    }
    let ids: Vec<u64> = list_json(&repo).iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [6, 7, 8, 9], "the oldest versions were merged away");
    assert_eq!(kinds(&repo).concat(), "FIII");
    assert_eq!(list_json(&repo)[0]["rule"], "synthetic full (merged)");
    assert_models(&repo, &models, t);
}

#[test]
fn backup_of_a_repo_uses_the_recorded_source_and_records_it_on_first_use() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = (t.join("d"), t.join("repo"));
    write_disk(&src, 1 << 20, 1, |_| true);
    let r = strata(["backup", &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("no source recorded"), "{}", r.stderr);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    let cfg = strata(["config", "--json", &p(&repo)]).ok().json();
    assert_eq!(cfg["source"], p(&src.canonicalize().unwrap()));
    change(&src, 3, 3);
    let s = strata(["backup", "--json", &p(&repo)]).ok().json();
    assert_eq!((s["id"].as_u64(), s["kind"].as_str()), (Some(2), Some("incremental")));
    // config changes are validated and kept
    strata(["config", "-q", &p(&repo), "--scheme", "differential", "--keep-last", "5"]).ok();
    let r = strata(["config", &p(&repo), "--compression", "zstd:99"]).expect_code(2);
    assert!(r.stderr.contains("zstd:LEVEL"), "{}", r.stderr);
    let text = std::fs::read_to_string(repo.join("strata.toml")).unwrap();
    assert!(text.contains("scheme = \"differential\"") && text.contains("keep_last = 5"), "{text}");
    strata(["init", &p(&repo)]).expect_code(1);
}

/// full 1, incr 2 3 4, diff 5 (of 1), incr 6 (of 5), incr 7; models of each.
fn seven_versions(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (src, repo) = task(t, &[]);
    let models = t.join("models");
    for i in 1..=7u64 {
        if i > 1 {
            change(&src, i * 13, i + 200);
        }
        let flag: &[&str] = if i == 5 { &["--differential"] } else { &[] };
        let s = backup_at(&repo, T0 + i as i64 * DAY, flag);
        assert_eq!(s["id"], i);
        snapshot(&src, &models, i);
    }
    (src, repo, models)
}

#[test]
fn merge_makes_a_synthetic_full_and_no_version_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = seven_versions(t);
    let before = list_json(&repo);
    strata(["merge", "-q", &p(&repo), "3"]).ok();
    let after = list_json(&repo);
    assert_eq!(after.len(), 7);
    assert_eq!(after[2]["kind"], "full");
    assert_eq!(after[2]["rule"], "synthetic full (merged)");
    assert_eq!(after[2]["created"], before[2]["created"], "the version keeps its time");
    let info = strata(["info", "--json", &p(&repo), "4"]).ok().json();
    assert_eq!(info["chain"], serde_json::json!([3, 4]));
    assert_models(&repo, &models, t);
    let r = strata(["merge", &p(&repo), "3"]).expect_code(1);
    assert!(r.stderr.contains("already a full"), "{}", r.stderr);
    // merging the incremental of a differential
    strata(["merge", "-q", &p(&repo), "6"]).ok();
    assert_models(&repo, &models, t);
}

#[test]
fn interrupted_merges_leave_every_version_restorable() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = seven_versions(t);
    let points =
        ["image.block:1", "image.block:50", "image.before_rename", "image.after_rename", "image.after_dir_sync"];
    for (n, point) in points.iter().enumerate() {
        let version = (2 + n % 3 + if n % 3 == 2 { 2 } else { 0 }).to_string(); // 2, 3, 6, ...
        let r = strata_env(["merge", "-q", &p(&repo), &version], &[("STRATA_CRASH_AT", point)]);
        if r.code == Some(0) {
            continue; // already a full from an earlier round, or the point comes later
        }
        assert_models(&repo, &models, t);
    }
    // random kills of a slow merge (large blocks of the level-19 full take a while to copy)
    for delay in [5u64, 20, 60] {
        strata_killed_after(&["merge", "-q", &p(&repo), "7"], delay);
        assert_models(&repo, &models, t);
    }
}

#[test]
fn prune_keeps_what_kept_versions_need_merges_forward_and_frees_what_it_says() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = seven_versions(t);
    let dry = strata(["prune", "--dry-run", "--keep-last", "2", &p(&repo)]).ok();
    assert!(dry.stdout.contains("would delete version    1"), "{}", dry.stdout);
    assert!(dry.stdout.contains("would merge  version    6"), "{}", dry.stdout);
    assert_eq!(list_json(&repo).len(), 7, "a dry run changes nothing");

    let du = |repo: &Path| -> i64 {
        std::fs::read_dir(repo)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".strata"))
            .map(|e| e.metadata().unwrap().len() as i64)
            .sum()
    };
    let estimate = strata(["prune", "--dry-run", "--json", "--keep-last", "2", &p(&repo)]).ok().json();
    assert!(estimate["merge_bytes"].as_i64().unwrap() > 0, "a merged full is larger than its delta: {estimate}");
    let before = du(&repo);
    let report = strata(["prune", "--json", "--keep-last", "2", &p(&repo)]).ok().json();
    let after = du(&repo);
    assert_eq!(report["freed_bytes"].as_i64().unwrap(), before - after, "prune frees the space it reports");
    eprintln!("dry run: {estimate}\nrun: {report}");
    assert_eq!(estimate["freed_bytes"], report["freed_bytes"], "the dry run counts the merges exactly");
    assert_eq!(estimate["merge_bytes"], report["merge_bytes"]);
    let ids: Vec<u64> = list_json(&repo).iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [6, 7]);
    assert_models(&repo, &models, t);
}

#[test]
fn prune_by_days_never_deletes_an_image_a_kept_version_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = task(t, &["--keep-daily", "3"]);
    let models = t.join("models");
    // three backups a day for five days; retention runs after each backup
    for i in 0..15u64 {
        change(&src, i * 11, i + 300);
        let s = backup_at(&repo, T0 + (i / 3) as i64 * DAY + (i % 3) as i64 * 3600, &[]);
        snapshot(&src, &models, s["id"].as_u64().unwrap());
        for r in list_json(&repo) {
            assert_eq!(r["restorable"], true, "after backup {i}: {r}");
        }
    }
    let ids: Vec<u64> = list_json(&repo).iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [9, 12, 15], "the newest of each of the last three days");
    assert_models(&repo, &models, t);
}

#[test]
fn interrupted_prune_loses_no_kept_version() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = seven_versions(t);
    for point in ["image.block:2", "image.before_rename", "prune.before_delete"] {
        let r = strata_env(["prune", "-q", "--keep-last", "3", &p(&repo)], &[("STRATA_CRASH_AT", point)]);
        assert_ne!(r.code, Some(0), "{point} not reached");
        assert_models(&repo, &models, t);
    }
    strata(["prune", "-q", "--keep-last", "3", &p(&repo)]).ok();
    assert_eq!(list_json(&repo).len(), 3);
    assert_models(&repo, &models, t);
}

#[test]
fn schedule_writes_systemd_units_that_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo) = task(t, &[]);
    let units = t.join("units");
    let run = strata(["schedule", "install", &p(&repo), "--every", "daily", "--unit-dir", &p(&units)]).ok();
    // the binary under test lies in target/: the unit would break when the tree is cleaned
    assert!(run.stderr.contains("lies in a build tree") && run.stderr.contains("cargo install"), "{}", run.stderr);
    assert!(run.stdout.contains(".timer"), "{}", run.stdout);
    let files: Vec<PathBuf> = std::fs::read_dir(&units).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2);
    let timer = files.iter().find(|f| f.extension().is_some_and(|e| e == "timer")).unwrap();
    let service = files.iter().find(|f| f.extension().is_some_and(|e| e == "service")).unwrap();
    let service_text = std::fs::read_to_string(service).unwrap();
    assert!(service_text.contains(&format!("backup \"{}\"", p(&repo.canonicalize().unwrap()))), "{service_text}");
    assert!(std::fs::read_to_string(timer).unwrap().contains("OnCalendar=daily"));
    let show = strata(["schedule", "show", &p(&repo), "--unit-dir", &p(&units)]).ok();
    assert!(show.stdout.contains("OnCalendar=daily"));
    if capable("schedule_writes_systemd_units_that_verify", "systemd-analyze (systemd)", has_tool("systemd-analyze")) {
        let v = tool_status("systemd-analyze", &["verify", &p(service), &p(timer)]);
        assert_eq!(v.code, Some(0), "systemd-analyze verify:\n{}{}", v.stdout, v.stderr);
        tool("systemd-analyze", &["calendar", "daily"]);
        let r = strata(["schedule", "install", &p(&repo), "--every", "every tuesday-ish", "--unit-dir", &p(&units)]);
        assert_eq!(r.code, Some(1), "an invalid OnCalendar is refused: {}", r.stderr);
        strata(["schedule", "install", &p(&repo), "--every", "Mon *-*-* 04:30", "--unit-dir", &p(&units)]).ok();
    }
    strata(["schedule", "remove", &p(&repo), "--unit-dir", &p(&units)]).ok();
    assert_eq!(std::fs::read_dir(&units).unwrap().count(), 0);
}

/// Runs strata and returns its peak RSS in KiB (from wait4).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives the rusage
fn peak_rss_kib(args: &[&str]) -> i64 {
    let child = std::process::Command::new(strata_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 reaps the child this test spawned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "strata {args:?} failed");
    usage.ru_maxrss
}

#[test]
fn a_chain_of_1000_incrementals_works_with_memory_bounded_as_for_a_short_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let depth: u64 = std::env::var("STRATA_LONG_CHAIN").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let (src, repo) = task(t, &[]);
    let (short_src, short_repo) = (t.join("short.img"), t.join("short"));
    std::fs::copy(&src, &short_src).unwrap();
    for i in 0..depth {
        change(&src, i * 7, i + 1000);
        strata(["backup", "-q", &p(&repo)]).ok();
        if i < 10 {
            change(&short_src, i * 7, i + 1000);
            strata(["backup", "-q", "--block-size", "4K", &p(&short_src), &p(&short_repo)]).ok();
        }
    }
    let info = strata(["info", "--json", &p(&repo), "latest"]).ok().json();
    assert_eq!(info["chain"].as_array().unwrap().len() as u64, depth);
    let out = t.join("out.img");
    let mut figures = Vec::new();
    for (name, args_long, args_short) in [
        ("backup", vec!["backup", "-q", &p(&repo)], vec!["backup", "-q", &p(&short_repo)]),
        ("list", vec!["list", &p(&repo)], vec!["list", &p(&short_repo)]),
        ("verify", vec!["verify", "-q", &p(&repo)], vec!["verify", "-q", &p(&short_repo)]),
        (
            "restore",
            vec!["restore", "-q", "--force", &p(&repo), "latest", &p(&out)],
            vec!["restore", "-q", "--force", &p(&short_repo), "latest", &p(&out)],
        ),
    ] {
        let (long, short) = (peak_rss_kib(&args_long), peak_rss_kib(&args_short));
        eprintln!("peak RSS of {name}: {long} KiB at depth {depth}, {short} KiB at depth 10");
        figures.push((name, long, short));
        assert!(long < short + 24 * 1024, "{name}: {long} KiB at depth {depth} vs {short} KiB at depth 10");
    }
    strata(["restore", "-q", "--force", &p(&repo), "latest", &p(&out)]).ok();
    assert!(same_file(&out, &src));
    if have_fuse("a_chain_of_1000_incrementals_works_with_memory_bounded_as_for_a_short_chain") {
        let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
        assert!(same_file(&m.path("latest/disk.img"), &src));
        let pid = m.driver_pid.unwrap();
        let rss: i64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
            .unwrap();
        eprintln!("peak RSS of the mount driver at depth {depth}: {rss} KiB");
        assert!(rss < 200 * 1024);
    }
}

#[test]
fn a_zero_count_means_that_rule_off_in_the_file_in_config_and_in_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = task(tmp.path(), &["--keep-last", "2"]);
    strata(["backup", "-q", &p(&repo)]).ok();
    let cfg = repo.join("strata.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("keep_last = 2", "keep_last = 0");
    std::fs::write(&cfg, text).unwrap();
    for i in 0..3 {
        change(&src, i, i + 1);
        strata(["backup", "-q", &p(&repo)]).ok();
    }
    assert_eq!(list_json(&repo).len(), 4, "keep_last = 0 written by hand is off: nothing deleted, no backup fails");
    let shown = strata(["config", "--json", &p(&repo)]).ok().json();
    assert!(shown["retention"]["keep_last"].is_null(), "{shown}");

    strata(["config", "-q", &p(&repo), "--keep-last", "3"]).ok();
    strata(["config", "-q", &p(&repo), "--keep-last", "0"]).ok();
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("# keep_last = N") && text.contains("(off: left out or 0)"), "{text}");

    let r = strata(["prune", &p(&repo), "--keep-last", "0"]).expect_code(1);
    assert!(r.stderr.contains("a count of 0 turns its rule off"), "{}", r.stderr);
    assert_eq!(list_json(&repo).len(), 4, "nothing deleted");
    let help = strata(["prune", "--help"]).ok().stdout;
    assert!(help.contains("(0: this rule off)"), "{help}");
}

#[test]
fn incremental_forever_leaves_versions_that_retention_keeps() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = task(t, &["--scheme", "incremental-forever", "--max-chain", "3", "--keep-daily", "7"]);
    let models = t.join("models");
    for day in 0..6u64 {
        change(&src, day * 3, day + 700);
        let s = backup_at(&repo, T0 + day as i64 * DAY, &[]);
        snapshot(&src, &models, s["id"].as_u64().unwrap());
    }
    let ids: Vec<u64> = list_json(&repo).iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6], "keep_daily 7 keeps every day");
    let info = strata(["info", "--json", &p(&repo), "latest"]).ok().json();
    assert!(info["chain"].as_array().unwrap().len() <= 3, "{info}");
    assert_models(&repo, &models, t);
}

#[test]
fn full_every_n_counts_backups_from_the_last_full_read_from_the_source_despite_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = task(tmp.path(), &["--full-every", "4", "--keep-last", "2"]);
    let mut kinds = String::new();
    for i in 0..10u64 {
        change(&src, i * 5, i + 900);
        let s = backup_at(&repo, T0 + i as i64 * 3600, &[]);
        kinds += &s["kind"].as_str().unwrap()[..1].to_uppercase();
    }
    assert_eq!(kinds, "FIIIFIIIFI");
}
