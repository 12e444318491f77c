//! Full disks, failing source devices, corrupted images of every kind and concurrent use: each
//! is detected, named, and loses nothing already backed up.

use std::path::{Path, PathBuf};

use strata_tests::faulty::FaultySource;
use strata_tests::*;

/// Pseudo-random bytes that do not compress.
fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn backup_into_a_full_file_system_fails_clearly_and_publishes_nothing() {
    let test = "backup_into_a_full_file_system_fails_clearly_and_publishes_nothing";
    if !capable(test, "root (tmpfs mounts)", is_root()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let small = t.join("small");
    let _fs = Mounted::mount(&["-t", "tmpfs", "-o", "size=3m", "tmpfs"], &small);
    let repo = small.join("repo");
    let first = t.join("first.img");
    write_disk(&first, 1 << 20, 5, |_| true);
    strata(["backup", "-q", &p(&first), &p(&repo)]).ok();
    let big = t.join("big.img");
    random_file(&big, 8 << 20, 9);
    let r = strata(["backup", "--full", &p(&big), &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("no space left") && r.stderr.contains("nothing was published"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    let names: Vec<String> =
        std::fs::read_dir(&repo).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with(".tmp-")), "the partial file is removed: {names:?}");
    assert_eq!(list_json(&repo).len(), 1);
    assert_restores_to(&repo, "1", &first, t);
    // after freeing space the next backup works
    strata(["backup", "-q", &p(&first), &p(&repo)]).ok();
}

#[test]
fn source_read_errors_fail_the_backup_naming_the_offset() {
    let test = "source_read_errors_fail_the_backup_naming_the_offset";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let bad_at = 5 * (1 << 20) + 12_288;
    let source = FaultySource::mount(&t.join("src"), 8 << 20, bad_at..bad_at + 4096, 3);
    let repo = t.join("repo");
    let good = t.join("good.img");
    write_disk(&good, 8 << 20, 1, |_| true);
    strata(["backup", "-q", &p(&good), &p(&repo)]).ok();
    let r = strata(["backup", &p(&source.path()), &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("read error at offset"), "{}", r.stderr);
    let offset: u64 = r.stderr.split("at offset ").nth(1).unwrap().split(':').next().unwrap().trim().parse().unwrap();
    assert!(offset <= bad_at && bad_at < offset + (8 << 20), "offset {offset} does not point at the bad range");
    assert_eq!(list_json(&repo).len(), 1, "nothing published");
    let temp_left =
        std::fs::read_dir(&repo).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
    assert!(!temp_left);
    assert_restores_to(&repo, "1", &good, t);
}

/// A repository with a full (1), an incremental (2), a differential (3) and an incremental of
/// it (4), each with a model; 4 KiB blocks, 1 MiB disk.
fn four_kinds(t: &Path) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    let (src, repo) = (t.join("disk.img"), t.join("repo"));
    write_disk(&src, 1 << 20, 11, |b| b % 3 != 0);
    let mut models = Vec::new();
    for (i, flag) in ["", "", "--differential", ""].iter().enumerate() {
        if i > 0 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            f.write_all_at(&text(40 + i as u64, 8192), (i as u64 * 20 + 1) * 4096).unwrap();
        }
        let mut args = vec!["backup", "-q", "--block-size", "4K"];
        if !flag.is_empty() {
            args.push(flag);
        }
        let (s, r) = (p(&src), p(&repo));
        args.extend([s.as_str(), r.as_str()]);
        strata(&args).ok();
        let m = t.join(format!("model{}", i + 1));
        std::fs::copy(&src, &m).unwrap();
        models.push(m);
    }
    (src, repo, models)
}

/// Which versions depend on image `id` in `four_kinds`.
fn dependents(id: u64) -> Vec<u64> {
    match id {
        1 => vec![1, 2, 3, 4],
        2 => vec![2],
        3 => vec![3, 4],
        _ => vec![4],
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    FlipHeader,
    FlipBlockData,
    FlipIndex,
    FlipFooter,
    Truncate,
    ZeroRange,
    Delete,
}

fn damage(path: &Path, how: Damage) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let len = std::fs::metadata(path).unwrap().len();
    let footer = len - 128;
    let index_offset = {
        let f = std::fs::File::open(path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, footer + 32).unwrap();
        u64::from_le_bytes(b)
    };
    match how {
        Damage::FlipHeader => {
            flip_byte(path, 130);
            Some(130)
        }
        Damage::FlipBlockData => {
            flip_byte(path, 512 + 7);
            Some(512)
        }
        Damage::FlipIndex => {
            flip_byte(path, index_offset + 3);
            Some(index_offset)
        }
        Damage::FlipFooter => {
            flip_byte(path, footer + 60);
            Some(footer)
        }
        Damage::Truncate => {
            std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
            None
        }
        Damage::ZeroRange => {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&vec![0u8; 300], 512).unwrap();
            Some(512)
        }
        Damage::Delete => {
            std::fs::remove_file(path).unwrap();
            None
        }
    }
}

#[test]
fn every_kind_of_damage_to_every_kind_of_image_is_detected_and_contained() {
    let kinds = [
        Damage::FlipHeader,
        Damage::FlipBlockData,
        Damage::FlipIndex,
        Damage::FlipFooter,
        Damage::Truncate,
        Damage::ZeroRange,
        Damage::Delete,
    ];
    let mut detected = 0;
    for id in 1..=4u64 {
        for how in kinds {
            let tmp = tempfile::tempdir().unwrap();
            let t = tmp.path();
            let (src, repo, models) = four_kinds(t);
            let file = repo.join(format!("v{id:08}.strata"));
            let offset = damage(&file, how);
            let what = format!("{how:?} of version {id}");
            if matches!(how, Damage::Delete) && dependents(id) == [id] {
                // Nothing else needs it: its file gone, it is simply no longer a version (strata
                // keeps no list of versions besides the images; RELIABILITY.md, known limits).
                strata(["verify", "-q", &p(&repo)]).ok();
                assert!(list_json(&repo).iter().all(|r| r["id"] != id));
                continue;
            }
            let v = strata(["verify", "--json", &p(&repo)]).expect_code(1).json();
            // the damaged image is named, with the offset where there is one
            if !matches!(how, Damage::Delete) {
                let img = v["images"].as_array().unwrap().iter().find(|i| i["version"] == id).unwrap();
                assert_eq!(img["sound"], false, "{what}: {v}");
                let problem = img["problems"][0].as_str().unwrap();
                assert!(problem.contains(&format!("v{id:08}.strata")), "{what}: {problem}");
                if let Some(o) = offset.filter(|_| matches!(how, Damage::FlipBlockData | Damage::ZeroRange)) {
                    assert!(problem.contains(&format!("offset {o}")), "{what}: {problem}");
                }
            }
            // exactly the dependents are unrestorable
            for ver in v["versions"].as_array().unwrap() {
                let vid = ver["id"].as_u64().unwrap();
                let expect_ok = !dependents(id).contains(&vid);
                assert_eq!(ver["restorable"].as_bool(), Some(expect_ok), "{what}: version {vid}: {ver}");
                let out = t.join(format!("out{vid}"));
                let r = strata(["restore", "-q", &p(&repo), &vid.to_string(), &p(&out)]);
                if expect_ok {
                    assert_eq!(r.code, Some(0), "{what}: restore {vid}: {}", r.stderr);
                    assert!(same_file(&out, &models[vid as usize - 1]), "{what}: version {vid} differs");
                } else {
                    assert_eq!(r.code, Some(1), "{what}: restore of damaged version {vid} did not fail");
                    assert!(!r.stderr.contains("panicked"));
                }
            }
            // the next backup still works (a full when the full is lost)
            let s = strata(["backup", "--json", &p(&src), &p(&repo)]).ok().json();
            if id == 1 && !matches!(how, Damage::FlipBlockData | Damage::ZeroRange) {
                assert_eq!(s["kind"], "full", "{what}");
            }
            detected += 1;
        }
    }
    eprintln!("damage cases detected: {detected}");
}

#[test]
fn the_mount_answers_eio_only_for_damaged_ranges() {
    let test = "the_mount_answers_eio_only_for_damaged_ranges";
    if !have_fuse(test) {
        return;
    }
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo, models) = four_kinds(t);
    // damage the first stored frame of the incremental 2: blocks 21 and 22, changed together at
    // step 2 and so stored as one group (SPEC.md §3.2)
    flip_byte(&repo.join("v00000002.strata"), 512 + 3);
    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
    let f = std::fs::File::open(m.path("2/disk.img")).unwrap();
    let model = std::fs::read(&models[1]).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut eio = Vec::new();
    for block in 0..256u64 {
        match f.read_exact_at(&mut buf, block * 4096) {
            Ok(()) => assert_eq!(&buf[..], &model[block as usize * 4096..][..4096], "block {block}"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO));
                eio.push(block);
            }
        }
    }
    assert_eq!(eio, [21, 22], "exactly the blocks of the damaged group fail");
    // other versions read in full
    assert!(same_file(&m.path("4/disk.img"), &models[3]));
}

#[test]
fn prune_while_mounted_keeps_open_files_readable_and_two_mounts_coexist() {
    let test = "prune_while_mounted_keeps_open_files_readable_and_two_mounts_coexist";
    if !have_fuse(test) {
        return;
    }
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo, models) = four_kinds(t);
    let a = StrataMount::new(&repo, &t.join("a"), &[]);
    let b = StrataMount::new(&repo, &t.join("b"), &["--only", "2"]);
    let mut open = std::fs::File::open(a.path("2/disk.img")).unwrap();
    let mut first = vec![0u8; 1000];
    open.read_exact(&mut first).unwrap();
    // a backup while the mounts read, then a prune that deletes version 2
    let reader = {
        let path = a.path("1/disk.img");
        std::thread::spawn(move || std::fs::read(path).unwrap())
    };
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    strata(["prune", "-q", "--keep-last", "1", &p(&repo)]).ok();
    assert!(!repo.join("v00000002.strata").exists());
    assert_eq!(reader.join().unwrap(), std::fs::read(&models[0]).unwrap());
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    assert_eq!(first, std::fs::read(&models[1]).unwrap(), "an open file keeps reading its version after prune");
    assert!(same_file(&b.path("2/disk.img"), &models[1]), "the second mount still serves version 2");
}

/// Starts a backup, stops it (SIGSTOP) as soon as its unfinished image appears, truncates the
/// source to 1 MiB, lets it go on and returns what it printed and its exit status.
fn backup_with_source_truncated_midway(src: &Path, repo: &Path) -> Run {
    let child = std::process::Command::new(strata_bin())
        .args(["backup", &p(src), &p(repo)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strata");
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let unfinished = || {
        std::fs::read_dir(repo)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-v")))
            .unwrap_or(false)
    };
    while !unfinished() {
        assert!(std::time::Instant::now() < deadline, "the backup never started its image");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // SAFETY: signals the child this test started, by its pid, before reaping it.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::fs::OpenOptions::new().write(true).open(src).unwrap().set_len(1 << 20).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    Run::from_output(child.wait_with_output().expect("reap strata"))
}

#[test]
fn a_source_truncated_during_a_backup_fails_it_and_publishes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk.img"), t.path().join("repo"));
    random_file(&src, 64 << 20, 7);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    random_file(&src, 256 << 20, 8);
    let run = backup_with_source_truncated_midway(&src, &repo).expect_code(1);
    assert!(
        run.stderr.contains("changed size during the backup") || run.stderr.contains("it shrank during the backup"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("no version was written"), "{}", run.stderr);
    let ids: Vec<u64> = list_json(&repo).iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1], "only the version written before");
    let names: Vec<String> =
        std::fs::read_dir(&repo).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with(".tmp-")), "unfinished image left behind: {names:?}");

    // a first backup that fails this way leaves no repository behind
    let fresh = t.path().join("fresh");
    random_file(&src, 256 << 20, 9);
    backup_with_source_truncated_midway(&src, &fresh).expect_code(1);
    let left: Vec<String> = std::fs::read_dir(&fresh)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!fresh.exists() || left.is_empty(), "a failed first backup left {left:?}");
}

/// Fills the file system holding `dir` to the last byte with a file there.
fn fill_up(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..4096]).is_ok() {}
    while f.write_all(&[1]).is_ok() {}
}

#[test]
fn prune_relieves_a_full_disk_deleting_what_nothing_needs_before_merging() {
    let test = "prune_relieves_a_full_disk_deleting_what_nothing_needs_before_merging";
    if !capable(test, "root (tmpfs mounts)", is_root()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let small = t.join("small");
    let _fs = Mounted::mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs"], &small);
    let (src, repo) = (t.join("disk.img"), small.join("repo"));
    random_file(&src, 4 << 20, 3);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    for (round, full) in [(1u64, false), (2, false), (3, true), (4, false)] {
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![round as u8; 256 << 10], round << 20).unwrap();
        let kind = if full { "--full" } else { "--incremental" };
        strata(["backup", "-q", kind, &p(&src), &p(&repo)]).ok();
    }
    // versions: 1 full, 2 and 3 incrementals, 4 full, 5 incremental of 4; no byte free
    fill_up(&small);
    let pruned = strata(["prune", "--keep-last", "1", &p(&repo)]).ok();
    let rows = list_json(&repo);
    assert_eq!(rows.len(), 1, "{}", pruned.stdout);
    assert_eq!((rows[0]["id"].as_u64(), rows[0]["kind"].as_str()), (Some(5), Some("full")), "{}", pruned.stdout);
    assert_restores_to(&repo, "5", &src, t);

    // a merge that cannot have its space says so, and loses nothing
    strata(["backup", "-q", "--incremental", &p(&src), &p(&repo)]).ok();
    std::fs::remove_file(small.join("filler")).unwrap();
    fill_up(&small);
    let r = strata(["prune", "--keep-last", "1", &p(&repo)]).expect_code(1);
    assert!(r.stderr.contains("no space left") && r.stderr.contains("merging version 6 into a full"), "{}", r.stderr);
    assert_eq!(r.stderr.matches("os error 28").count(), 1, "{}", r.stderr);
    assert_eq!(list_json(&repo).len(), 2);
    assert_restores_to(&repo, "6", &src, t);
}
