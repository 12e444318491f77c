//! The rules users rely on: which kind a backup makes, which versions a damaged or missing image
//! takes with it, concurrent backups, interrupted backups, and clear errors on bad input.

use std::path::Path;

use strata_tests::*;

fn backup(source: &Path, repo: &Path, flag: Option<&str>) -> serde_json::Value {
    let (s, r) = (p(source), p(repo));
    let mut args = vec!["backup", "--json", "--block-size", "4K"];
    args.extend(flag);
    args.extend([s.as_str(), r.as_str()]);
    strata(&args).ok().json()
}

fn disk(path: &Path, seed: u64) {
    write_disk(path, 1 << 20, seed, |b| b % 4 != 3);
}

fn change(path: &Path, block: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&text(seed, 4096), block * 4096).unwrap();
}

/// full 1, incr 2, incr 3, diff 4, incr 5 (of 4), each after a change.
fn five_versions(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, repo) = (t.join("disk.img"), t.join("repo"));
    disk(&src, 1);
    assert_eq!(backup(&src, &repo, None)["kind"], "full");
    change(&src, 1, 2);
    assert_eq!(backup(&src, &repo, None)["kind"], "incremental");
    change(&src, 2, 3);
    assert_eq!(backup(&src, &repo, None)["kind"], "incremental");
    change(&src, 3, 4);
    assert_eq!(backup(&src, &repo, Some("--differential"))["kind"], "differential");
    change(&src, 5, 5);
    assert_eq!(backup(&src, &repo, None)["kind"], "incremental");
    (src, repo)
}

fn restorable(repo: &Path) -> Vec<(u64, bool)> {
    list_json(repo).iter().map(|r| (r["id"].as_u64().unwrap(), r["restorable"].as_bool().unwrap())).collect()
}

#[test]
fn first_backup_is_a_full_even_when_a_delta_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    let run = strata(["backup", "--differential", &p(&src), &p(&repo)]).ok();
    assert!(run.stdout.contains("version 1 full"), "{}", run.stdout);
    assert!(run.stderr.contains("making a full instead of the differential"), "{}", run.stderr);
}

#[test]
fn incremental_stores_only_changed_blocks_and_differential_all_since_the_full() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    let full = backup(&src, &repo, None);
    assert_eq!(full["changed_blocks"], 192, "every non-zero block of 256, a quarter being zero");
    change(&src, 10, 7);
    assert_eq!(backup(&src, &repo, None)["changed_blocks"], 1);
    change(&src, 20, 8);
    assert_eq!(backup(&src, &repo, None)["changed_blocks"], 1);
    let diff = backup(&src, &repo, Some("--differential"));
    assert_eq!((diff["changed_blocks"].as_u64(), diff["parent"].as_u64()), (Some(2), Some(1)));
    // zeroing a block is a change too, and unchanged source makes an empty incremental
    let zeros = vec![0u8; 4096];
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&src).unwrap(), &zeros, 0)
        .unwrap();
    assert_eq!(backup(&src, &repo, None)["changed_blocks"], 1);
    let same = backup(&src, &repo, None);
    assert_eq!((same["changed_blocks"].as_u64(), same["stored_bytes"].as_u64()), (Some(0), Some(0)));
    assert_restores_to(&repo, "latest", &src, tmp.path());
}

#[test]
fn resized_source_forces_a_full_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    backup(&src, &repo, None);
    std::fs::OpenOptions::new().write(true).open(&src).unwrap().set_len((1 << 20) + 12345).unwrap();
    let run = strata(["backup", "--incremental", &p(&src), &p(&repo)]).ok();
    assert!(run.stdout.contains("version 2 full"), "{}", run.stdout);
    assert!(run.stderr.contains("resized or replaced"), "{}", run.stderr);
    // a source that is not a multiple of the block size restores exactly
    assert_restores_to(&repo, "2", &src, tmp.path());
}

#[test]
fn another_source_in_the_same_repository_makes_a_full_named_source_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Same size, other content, no content id: the name decides.
    let (odd, other, repo) = (t.join("odd.img"), t.join("other.img"), t.join("repo"));
    disk(&odd, 1);
    std::fs::write(&other, noise(77, 1 << 20)).unwrap();
    backup(&odd, &repo, None);
    let run = strata(["backup", "--json", &p(&other), &p(&repo)]).ok();
    let s = run.json();
    assert_eq!((s["kind"].as_str(), s["rule"].as_str()), (Some("full"), Some("source replaced")), "{s}");
    assert!(run.stderr.contains(&format!("the source is {}", p(&other.canonicalize().unwrap()))), "{}", run.stderr);
    assert!(run.stderr.contains("another disk or image: making a full"), "{}", run.stderr);
    let again = backup(&other, &repo, None);
    assert_eq!((again["kind"].as_str(), again["rule"].as_str()), (Some("incremental"), Some("scheme")));
    // asked for explicitly, the kind asked for is made, with the warning
    let run = strata(["backup", "--json", "--differential", &p(&odd), &p(&repo)]).ok();
    assert_eq!(run.json()["kind"], "differential");
    assert!(run.stderr.contains("making the differential asked for"), "{}", run.stderr);
    assert_restores_to(&repo, "latest", &odd, t);

    if !have_e2fsprogs("another_source_in_the_same_repository_makes_a_full_named_source_replaced") {
        return;
    }
    // With a file system UUID the content decides: a moved or copied image is the same source,
    // a new file system is not.
    let (fs, moved, repo) = (t.join("fs.img"), t.join("moved.img"), t.join("fs-repo"));
    let files = t.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("a"), noise(5, 100_000)).unwrap();
    mkfs_ext4(&fs, "16M", &files);
    backup(&fs, &repo, None);
    let info = strata(["info", "--json", &p(&repo), "1"]).ok().json();
    assert!(info["source_id"].as_str().unwrap().starts_with("ext2/3/4 UUID "), "{info}");
    std::fs::rename(&fs, &moved).unwrap();
    let s = backup(&moved, &repo, None);
    assert_eq!((s["kind"].as_str(), s["changed_blocks"].as_u64()), (Some("incremental"), Some(0)), "{s}");
    tool("tune2fs", &["-U", "random", &p(&moved)]);
    let run = strata(["backup", "--json", &p(&moved), &p(&repo)]).ok();
    assert_eq!(run.json()["rule"], "source replaced");
    assert!(run.stderr.contains("another disk or a new file system"), "{}", run.stderr);
    let test = "another_source_in_the_same_repository_makes_a_full_named_source_replaced";
    if capable(test, "root and loop devices", is_root() && has_tool("losetup")) {
        // the same file system through a loop device: another name, the same source
        let dev = LoopDevice::attach(&moved);
        let s = backup(&dev.path, &repo, None);
        assert_eq!((s["kind"].as_str(), s["changed_blocks"].as_u64()), (Some("incremental"), Some(0)), "{s}");
    }
}

#[test]
fn deleted_incremental_makes_exactly_its_successors_unrestorable() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = five_versions(tmp.path());
    std::fs::remove_file(repo.join("v00000002.strata")).unwrap();
    assert_eq!(restorable(&repo), vec![(1, true), (3, false), (4, true), (5, true)]);
    let rows = list_json(&repo);
    assert!(row(&rows, 3)["problem"]
        .as_str()
        .unwrap()
        .contains("needs version 2 (v00000002.strata), which is missing"));
    let v = strata(["verify", &p(&repo)]).expect_code(1);
    assert!(v.stdout.contains("version 3: NOT restorable"), "{}", v.stdout);
    assert!(v.stdout.contains("versions 4-5: restorable"), "{}", v.stdout);
    let out = tmp.path().join("out");
    let r = strata(["restore", &p(&repo), "3", &p(&out)]).expect_code(1);
    assert!(r.stderr.contains("version 3 is not restorable") && r.stderr.lines().count() == 1, "{}", r.stderr);
    assert!(!out.exists(), "nothing written for an unrestorable version");
    strata(["restore", &p(&repo), "5", &p(&out)]).ok();
    // ids are never reused
    let src = tmp.path().join("disk.img");
    assert_eq!(backup(&src, &repo, None)["id"], 6);
}

#[test]
fn a_version_id_whose_image_was_deleted_after_a_crash_is_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    change(&src, 9, 99);
    let r = strata_env(["backup", &p(&src), &p(&repo)], &[("STRATA_CRASH_AT", "image.after_rename")]);
    assert_ne!(r.code, Some(0));
    std::fs::remove_file(repo.join("v00000006.strata")).unwrap();
    assert_eq!(backup(&src, &repo, None)["id"], 7);
}

#[test]
fn hostile_repository_files_get_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    // an id at the top of the range is refused, not wrapped to 0
    std::fs::write(repo.join("v18446744073709551615.strata"), b"").unwrap();
    let ident = std::fs::read_to_string(repo.join("strata.repo")).unwrap();
    // an identity file written before it had a checksum is still read as it says
    let unsummed: String = ident.lines().filter(|l| !l.starts_with("checksum")).map(|l| format!("{l}\n")).collect();
    let high = unsummed.replace("last_version = 5", "last_version = 99999999999");
    std::fs::write(repo.join("strata.repo"), &high).unwrap();
    let r = strata(["backup", &p(&src), &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("every version id"), "{}", r.stderr);
    // non-ASCII in the identity file: damaged, so the identity comes from the images
    let bad = ident.replace("repo_id = \"", "repo_id = \"€€€€€€€€€€ab");
    std::fs::write(repo.join("strata.repo"), bad).unwrap();
    let listed = strata(["list", &p(&repo)]).ok();
    assert!(listed.stderr.contains("strata.repo is damaged"), "{}", listed.stderr);
    let rows = list_json(&repo);
    assert_eq!(rows.len(), 5, "{}", listed.stdout);
    assert!(rows.iter().all(|r| r["restorable"] == true), "{}", listed.stdout);
    std::fs::write(repo.join("strata.repo"), &ident).unwrap();
    strata(["list", &p(&repo)]).ok();
}

#[test]
fn damaged_full_makes_every_version_unrestorable_and_the_next_backup_a_full() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    flip_byte(&repo.join("v00000001.strata"), 100); // inside the header
    assert!(restorable(&repo).iter().all(|(id, ok)| !ok || *id > 5));
    let v = strata(["verify", &p(&repo)]).expect_code(1);
    assert!(
        v.stdout.contains("DAMAGED  v00000001.strata") && v.stdout.contains("header checksum mismatch"),
        "{}",
        v.stdout
    );
    // one damage is printed once, under its image; the versions it takes with it are grouped
    assert_eq!(v.stdout.matches("header checksum mismatch").count(), 1, "{}", v.stdout);
    assert!(v.stdout.contains("version 1: NOT restorable: its image is damaged (above)"), "{}", v.stdout);
    assert!(
        v.stdout.contains("versions 2-5: NOT restorable: needs version 1 (v00000001.strata), which is damaged (above)"),
        "{}",
        v.stdout
    );
    let run = strata(["backup", &p(&src), &p(&repo)]).ok();
    assert!(run.stdout.contains("version 6 full"), "{}", run.stdout);
    assert!(run.stderr.contains("no usable full"), "{}", run.stderr);
}

#[test]
fn damaged_block_data_is_found_by_verify_with_file_version_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = five_versions(tmp.path());
    // version 4 (the differential) stores blocks 1, 2, 3; damage its first stored block
    flip_byte(&repo.join("v00000004.strata"), 512 + 10);
    let v = strata(["verify", "--json", &p(&repo)]).expect_code(1).json();
    let img = v["images"].as_array().unwrap().iter().find(|i| i["version"] == 4).unwrap();
    assert_eq!(img["sound"], false);
    let problem = img["problems"][0].as_str().unwrap();
    assert!(problem.contains("v00000004.strata (version 4) block 1 at offset 512"), "{problem}");
    let verdicts: Vec<(u64, bool)> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["id"].as_u64().unwrap(), x["restorable"].as_bool().unwrap()))
        .collect();
    assert_eq!(verdicts, vec![(1, true), (2, true), (3, true), (4, false), (5, false)]);
    // restore refuses: it fails on the bad block rather than writing wrong data
    let out = tmp.path().join("out");
    let r = strata(["restore", &p(&repo), "5", &p(&out)]).expect_code(1);
    assert!(r.stderr.contains("checksum mismatch") && r.stderr.contains("v00000004.strata"), "{}", r.stderr);
    // verify of a version outside the damage is clean
    strata(["verify", &p(&repo), "3"]).ok();
}

#[test]
fn truncated_or_foreign_or_future_images_are_named_and_never_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    let v5 = repo.join("v00000005.strata");
    let len = std::fs::metadata(&v5).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&v5).unwrap().set_len(len - 50).unwrap();
    let rows = list_json(&repo);
    assert_eq!(row(&rows, 5)["restorable"], false);
    assert!(row(&rows, 5)["problem"].as_str().unwrap().contains("incomplete"), "{rows:?}");

    // an image of another repository copied in under a free name
    let other = tmp.path().join("other");
    backup(&src, &other, None);
    std::fs::copy(other.join("v00000001.strata"), repo.join("v00000009.strata")).unwrap();
    let rows = list_json(&repo);
    assert!(row(&rows, 9)["problem"].as_str().unwrap().contains("belongs to another repository"), "{rows:?}");

    // a future format version
    let v3 = repo.join("v00000003.strata");
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&v3).unwrap(), &[9], 8)
        .unwrap();
    let rows = list_json(&repo);
    assert!(row(&rows, 3)["problem"].as_str().unwrap().contains("image format version 9"), "{rows:?}");
    let r = strata(["restore", &p(&repo), "3", &p(&tmp.path().join("o"))]).expect_code(1);
    assert!(r.stderr.contains("format version 9"), "{}", r.stderr);
}

#[test]
fn concurrent_backup_is_refused() {
    use std::os::unix::io::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    backup(&src, &repo, None);
    let lock = std::fs::File::open(repo.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let r = strata(["backup", &p(&src), &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("another strata backup is running"), "{}", r.stderr);
    drop(lock);
    strata(["backup", &p(&src), &p(&repo)]).ok();
}

#[test]
fn two_real_backups_at_once_publish_one_version_each_or_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    write_disk(&src, 64 << 20, 3, |_| true);
    backup(&src, &repo, None);
    let spawn = || {
        std::process::Command::new(strata_bin())
            .args(["backup", "--full", "--compression-level", "9", &p(&src), &p(&repo)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let refused = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("another strata backup is running"))
        .count();
    let succeeded = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(succeeded + refused, 2);
    assert_eq!(list_json(&repo).len(), 1 + succeeded);
    strata(["verify", "--quick", &p(&repo)]).ok();
}

#[test]
fn interrupted_backup_leaves_no_version_and_the_next_backup_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    for (n, point) in ["image.block:1", "image.before_rename"].iter().enumerate() {
        change(&src, 7, 40 + n as u64);
        let r = strata_env(["backup", &p(&src), &p(&repo)], &[("STRATA_CRASH_AT", point)]);
        assert_ne!(r.code, Some(0), "the crash point {point} was not reached");
        let leftovers: Vec<_> = std::fs::read_dir(&repo)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert_eq!(leftovers.len(), 1, "{point}: the partial image stays as a temporary file");
        assert_eq!(list_json(&repo).len(), 5, "{point}: no half version listed");
        strata(["verify", &p(&repo)]).ok();
    }
    // after the rename the version is complete even though the process died before the end
    let r = strata_env(["backup", &p(&src), &p(&repo)], &[("STRATA_CRASH_AT", "image.after_rename")]);
    assert_ne!(r.code, Some(0));
    // the crash before the rename had already spent id 6 (recorded first, so never reused)
    let ids: Vec<u64> = list_json(&repo).iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 7]);
    let next = backup(&src, &repo, None);
    assert_eq!(next["id"], 8);
    let temp_left = std::fs::read_dir(&repo)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
    assert!(!temp_left, "the next backup removes leftovers");
    strata(["verify", &p(&repo)]).ok();
}

#[test]
fn killed_backup_leaves_earlier_versions_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    write_disk(&src, 64 << 20, 5, |_| true);
    backup(&src, &repo, None);
    for delay_ms in [30u64, 120, 300] {
        strata_killed_after(&["backup", "--full", "--compression-level", "12", &p(&src), &p(&repo)], delay_ms);
        for r in list_json(&repo) {
            assert_eq!(r["restorable"], true, "after kill at {delay_ms} ms: {r}");
        }
    }
    strata(["verify", &p(&repo)]).ok();
    assert_restores_to(&repo, "1", &src, tmp.path());
}

#[test]
fn restore_refuses_to_overwrite_a_non_empty_file_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    backup(&src, &repo, None);
    let out = tmp.path().join("out");
    std::fs::write(&out, b"precious").unwrap();
    let r = strata(["restore", &p(&repo), "1", &p(&out)]).expect_code(1);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    strata(["restore", "--force", &p(&repo), "1", &p(&out)]).ok();
    assert!(same_file(&out, &src));
}

#[test]
fn restored_file_is_sparse_and_holes_in_the_source_are_not_read() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    write_disk(&src, 256 << 20, 9, |b| b < 16);
    let s = backup(&src, &repo, None);
    assert!(s["bytes_read"].as_u64().unwrap() < 1 << 20, "holes are skipped: {s}");
    let out = tmp.path().join("out");
    strata(["restore", &p(&repo), "1", &p(&out)]).ok();
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 256 << 20);
    assert!(m.blocks() * 512 < 4 << 20, "restored file allocates {} bytes", m.blocks() * 512);
    assert!(same_file(&out, &src));
}

#[test]
fn bad_input_gets_a_one_line_error_and_the_right_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = (t.join("d"), t.join("repo"));
    let one_line = |r: Run| {
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.starts_with("strata: error: "), "{}", r.stderr);
        r
    };
    let r = one_line(strata(["backup", &p(&t.join("missing")), &p(&repo)]).expect_code(1));
    assert!(r.stderr.contains("missing") && r.stderr.contains("cannot open the source"), "{}", r.stderr);
    one_line(strata(["list", &p(&t.join("nope"))]).expect_code(1));
    one_line(strata(["verify", &p(t)]).expect_code(1));
    std::fs::write(&src, b"").unwrap();
    one_line(strata(["backup", &p(&src), &p(&repo)]).expect_code(1));
    disk(&src, 1);
    backup(&src, &repo, None);
    one_line(strata(["backup", "--block-size", "64K", &p(&src), &p(&repo)]).expect_code(1));
    one_line(strata(["restore", &p(&repo), "42", &p(&t.join("o"))]).expect_code(1));
    // usage errors exit 2, whether clap or a value check finds them
    for bad in [
        vec!["restore", &p(&repo), "banana", &p(&t.join("o"))],
        vec!["info", &p(&repo), "0"],
        vec!["backup", "--block-size", "3K", &p(&src), &p(&repo)],
        vec!["init", &p(&t.join("new")), "--compression", "zstd:99"],
        vec!["mount", "--cache-size", "lots", &p(&repo), &p(t)],
        vec!["verify", &p(&repo), "latest", "x"],
    ] {
        let r = strata(&bad).expect_code(2);
        assert!(r.stderr.contains("invalid value"), "{bad:?}: {}", r.stderr);
    }
    strata(["backup"]).expect_code(2);
    strata(["frobnicate"]).expect_code(2);
    strata(["backup", "--full", "--differential", &p(&src), &p(&repo)]).expect_code(2);
    let v = strata(["--version"]).ok();
    assert!(v.stdout.starts_with("strata "), "{}", v.stdout);
    // a folder with other files is not taken over as a repository
    let busy = t.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"x").unwrap();
    one_line(strata(["backup", &p(&src), &p(&busy)]).expect_code(1));
}

#[test]
fn quiet_prints_nothing_and_json_is_machine_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    let r = strata(["backup", "-q", "--block-size", "4K", &p(&src), &p(&repo)]).ok();
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    let s = backup(&src, &repo, None);
    assert_eq!((s["id"].as_u64(), s["kind"].as_str()), (Some(2), Some("incremental")));
    let r = strata(["verify", "-q", &p(&repo)]).ok();
    assert_eq!(r.stdout, "");
    let v = strata(["verify", "--json", &p(&repo)]).ok().json();
    assert_eq!(v["ok"], true);
    // with --json a failure is a JSON object on stdout too, besides the line on stderr
    let missing = tmp.path().join("nope");
    for (args, code) in [
        (vec!["list".to_string(), "--json".into(), p(&missing)], 1),
        (vec!["restore".into(), "--json".into(), p(&repo), "9".into(), p(&tmp.path().join("o"))], 1),
        (vec!["backup".into(), "--json".into(), "--block-size".into(), "3K".into(), p(&src), p(&repo)], 2),
    ] {
        let r = strata(&args).expect_code(code);
        let doc = r.json();
        assert_eq!(doc["exit_code"], code, "{args:?}: {doc}");
        let message = doc["error"].as_str().unwrap();
        assert!(!message.is_empty() && r.stderr.contains(message), "{args:?}: {message} vs {}", r.stderr);
    }
}

#[test]
fn man_pages_and_completions_come_from_the_command_line_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let man = tmp.path().join("man1");
    strata(["man", "-q", &p(&man)]).ok();
    for sub in ["", "-backup", "-restore", "-mount", "-schedule-install", "-verify"] {
        let page = std::fs::read_to_string(man.join(format!("strata{sub}.1"))).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "strata{sub}.1: {page}");
    }
    let backup = std::fs::read_to_string(man.join("strata-backup.1")).unwrap();
    assert!(backup.contains("compression") && backup.contains("differential"), "{backup}");
    if has_tool("man") {
        let r = tool("man", &["-l", &p(&man.join("strata-restore.1"))]);
        assert!(r.stdout.contains("strata-restore"), "{}", r.stdout);
    }
    let bash = strata(["completions", "bash"]).ok().stdout;
    assert!(bash.contains("complete -F _strata") && bash.contains("--differential"), "{bash}");
    if has_tool("bash") {
        let script = tmp.path().join("strata.bash");
        std::fs::write(&script, &bash).unwrap();
        tool("bash", &["-n", &p(&script)]);
    }
    for shell in ["zsh", "fish"] {
        assert!(strata(["completions", shell]).ok().stdout.contains("restore"), "{shell}");
    }
    strata(["completions", "tcsh"]).expect_code(2);
}

#[test]
fn images_and_repository_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("d"), tmp.path().join("repo"));
    disk(&src, 1);
    backup(&src, &repo, None);
    assert_eq!(std::fs::metadata(&repo).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["v00000001.strata", "strata.repo"] {
        assert_eq!(std::fs::metadata(repo.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
}

#[test]
fn identical_blocks_are_stored_once_per_image_and_survive_merge() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("disk.img"), tmp.path().join("repo"));
    // 2560 blocks of 4 KiB (10 MiB: more than one 8 MiB backup batch) drawn from 8 distinct
    // incompressible contents, so that every stored copy would cost a whole block
    let contents: Vec<Vec<u8>> = (0..8).map(|i| noise(i, 4096)).collect();
    let f = std::fs::File::create(&src).unwrap();
    for b in 0..2560u64 {
        f.write_all_at(&contents[(b * 5 % 8) as usize], b * 4096).unwrap();
    }
    let full = backup(&src, &repo, None);
    let stored = full["stored_bytes"].as_u64().unwrap();
    assert!(stored <= 8 * 4096 + 1024, "8 distinct blocks stored as {stored} bytes");
    // an incremental that copies one content over others, then a merge of it into a full
    for b in [3u64, 100, 2500] {
        f.write_all_at(&contents[7], b * 4096).unwrap();
    }
    backup(&src, &repo, None);
    assert_restores_to(&repo, "2", &src, tmp.path());
    strata(["merge", "-q", &p(&repo), "2"]).ok();
    assert_restores_to(&repo, "2", &src, tmp.path());
    strata(["verify", "-q", &p(&repo)]).ok();
}

#[test]
fn a_repository_folder_others_can_write_is_named_in_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = five_versions(tmp.path());
    let quiet = strata(["list", &p(&repo)]).ok();
    assert!(!quiet.stderr.contains("writable by"), "a fresh repository is private: {}", quiet.stderr);
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();
    let listed = strata(["list", &p(&repo)]).ok();
    assert!(listed.stderr.contains("writable by every user (mode 0777)"), "{}", listed.stderr);
    let backed = strata(["backup", &p(&src), &p(&repo)]).ok();
    assert!(backed.stderr.contains(&format!("chmod 700 {}", p(&repo))), "{}", backed.stderr);
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert!(strata(["list", &p(&repo)]).ok().stderr.contains("writable by its group"));
}

#[test]
fn repair_rewrites_a_missing_or_damaged_identity_from_the_images_and_touches_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = five_versions(tmp.path());
    let ident = std::fs::read_to_string(repo.join("strata.repo")).unwrap();
    let images = |repo: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(repo)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".strata"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = images(&repo);
    let sound = strata(["repair", "--json", &p(&repo)]).ok().json();
    assert!(sound["identity_rewritten"].is_null(), "{sound}");

    std::fs::remove_file(repo.join("strata.repo")).unwrap();
    std::fs::write(repo.join(".tmp-v00000006.strata.1.0"), b"half").unwrap();
    std::fs::create_dir(repo.join(".tmp-folder")).unwrap();
    let r = strata(["repair", "--json", &p(&repo)]).ok().json();
    assert!(r["identity_rewritten"].as_str().unwrap().contains("strata.repo is missing"), "{r}");
    assert_eq!(r["versions"], 5);
    assert_eq!(r["not_restorable"].as_array().unwrap().len(), 0);
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    assert!(repo.join(".tmp-folder").is_dir(), "a folder is not strata's to remove");
    assert_eq!(
        std::fs::read_to_string(repo.join("strata.repo")).unwrap(),
        ident,
        "the same identity, checksum included"
    );

    // one changed digit of the repository id: damaged, rebuilt, and no advice to move images
    let digit = ident.find("repo_id = \"").unwrap() + 11;
    let mut bad = ident.clone().into_bytes();
    bad[digit] = if bad[digit] == b'0' { b'1' } else { b'0' };
    std::fs::write(repo.join("strata.repo"), &bad).unwrap();
    let listed = strata(["list", &p(&repo)]).ok();
    assert!(listed.stderr.contains("strata.repo is damaged") && !listed.stderr.contains("move"), "{}", listed.stderr);
    let text = strata(["repair", &p(&repo)]).ok();
    assert!(text.stdout.contains("rewrote strata.repo from the image headers"), "{}", text.stdout);
    assert!(text.stdout.contains("5 version(s), 5 restorable"), "{}", text.stdout);
    assert_eq!(std::fs::read_to_string(repo.join("strata.repo")).unwrap(), ident);
    assert!(strata(["list", &p(&repo)]).ok().stderr.is_empty());
    assert_eq!(images(&repo), before, "repair changes no image");

    // images of two repositories in one folder: nothing to choose from, said plainly
    std::fs::create_dir(tmp.path().join("other")).unwrap();
    let (_, other) = five_versions(&tmp.path().join("other"));
    for name in ["v00000004.strata", "v00000005.strata"] {
        std::fs::copy(other.join(name), repo.join(name)).unwrap();
    }
    std::fs::remove_file(repo.join("strata.repo")).unwrap();
    let two = strata(["repair", &p(&repo)]).expect_code(1);
    assert!(two.stderr.contains("belong to 2 repositories"), "{}", two.stderr);
    assert_eq!(two.stderr.lines().count(), 1, "{}", two.stderr);
}

#[test]
fn quick_verify_says_what_it_did_not_read_and_info_shows_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = five_versions(tmp.path());
    let quick = strata(["verify", "--quick", &p(&repo)]).ok();
    assert!(quick.stdout.contains("header, index and footer checked"), "{}", quick.stdout);
    assert!(quick.stdout.contains("digest verified from the index"), "{}", quick.stdout);
    assert!(quick.stdout.contains("quick: no block data was read"), "{}", quick.stdout);
    assert!(!quick.stdout.contains("blocks checked"), "{}", quick.stdout);
    let full = strata(["verify", &p(&repo)]).ok();
    assert!(full.stdout.contains("blocks checked") && !full.stdout.contains("quick"), "{}", full.stdout);
    let info = strata(["info", &p(&repo), "4"]).ok();
    assert!(info.stdout.contains("rule           requested"), "{}", info.stdout);
    assert_eq!(strata(["info", "--json", &p(&repo), "1"]).ok().json()["rule"], "first backup");
}

#[test]
fn rates_count_what_was_read_and_messages_give_sizes_in_binary_units() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("sparse.img"), tmp.path().join("repo"));
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(3, 4 << 20), 1 << 30).unwrap();
    let s = strata(["backup", "--json", &p(&src), &p(&repo)]).ok().json();
    let (read, seconds, rate) =
        (s["bytes_read"].as_u64().unwrap(), s["seconds"].as_f64().unwrap(), s["mib_per_s"].as_f64().unwrap());
    assert!(read < 64 << 20, "holes are not read: {s}");
    let expected = read as f64 / (1 << 20) as f64 / seconds;
    assert!((rate - expected).abs() <= expected * 0.01 + 0.01, "the rate is of the bytes read: {s}");
    let line = strata(["backup", "--full", &p(&src), &p(&repo)]).ok().stdout;
    assert!(line.contains(" MiB/s") && !line.contains("MB/s"), "{line}");

    let out = tmp.path().join("out.img");
    std::fs::write(&out, vec![1u8; 3 << 10]).unwrap();
    let r = strata(["restore", &p(&repo), "1", &p(&out)]).expect_code(1);
    assert!(r.stderr.contains("is not empty (3 KiB)"), "{}", r.stderr);
    let r = strata(["restore", "--json", "--force", &p(&repo), "1", &p(&out)]).ok().json();
    assert_eq!(r["bytes"], 64u64 << 30);
    assert!(r["bytes_written"].as_u64().unwrap() < 64 << 20, "{r}");
    assert_eq!(r["digest_verified"], true);
    let mut data = vec![0u8; 4 << 20];
    std::fs::File::open(&out).unwrap().read_exact_at(&mut data, 1 << 30).unwrap();
    assert!(data == noise(3, 4 << 20), "the data is back where it was");
}
