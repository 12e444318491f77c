//! Used-blocks backups on real file systems made by their own tools: only the blocks a file
//! system uses are stored, what comes back is fsck-clean with every file intact, everything
//! outside a recognized file system (tables, gaps, unknown partitions) comes back byte-identical,
//! a dirty file system is kept whole, a source mounted read-write is refused, and
//! `--sector-by-sector` (or `sector_by_sector = true`) keeps every byte.

use std::path::Path;

use strata_tests::*;

/// An ext4 image whose free space holds deleted files' data (incompressible noise), with the
/// names of the files still in it.
fn aged_ext4(dir: &Path, image: &Path) -> Vec<String> {
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    for i in 0..20u64 {
        std::fs::write(files.join(format!("f{i:02}.bin")), noise(i, 512 << 10)).unwrap();
    }
    mkfs_ext4(image, "64M", &files);
    let mut cmds = String::new();
    for i in 0..15 {
        cmds += &format!("rm /f{i:02}.bin\n");
    }
    std::fs::write(dir.join("new.txt"), text(99, 300 << 10)).unwrap();
    cmds += &format!("write {} /new.txt\n", dir.join("new.txt").display());
    debugfs_w(image, &cmds);
    let mut kept: Vec<String> = (15..20).map(|i| format!("/f{i:02}.bin")).collect();
    kept.push("/new.txt".into());
    kept
}

fn backup_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["backup", "--json"];
    all.extend_from_slice(args);
    strata(all).ok().json()
}

/// A restored ext4 version is consistent and holds every file as the source did.
fn assert_same_files(restored: &Path, source: &Path, files: &[String]) {
    e2fsck_clean(restored);
    for f in files {
        assert_eq!(debugfs_cat(restored, f), debugfs_cat(source, f), "{f} in {}", restored.display());
    }
}

#[test]
fn an_aged_ext4_is_stored_by_its_used_blocks_and_every_version_restores_fsck_clean() {
    let test = "an_aged_ext4_is_stored_by_its_used_blocks_and_every_version_restores_fsck_clean";
    if !have_e2fsprogs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("disk.img");
    let mut files = aged_ext4(t, &src);
    let (repo, every_repo) = (t.join("repo"), t.join("every"));

    let used = backup_json(&[&p(&src), &p(&repo)]);
    let every = backup_json(&["--sector-by-sector", &p(&src), &p(&every_repo)]);
    assert_eq!(used["blocks"], "used", "{used}");
    assert_eq!(every["blocks"], "every", "{every}");
    assert_eq!(used["regions"][0]["file_system"], "ext4", "{used}");
    let unused = used["unused_bytes"].as_u64().unwrap();
    assert!(unused > 40 << 20, "the deleted files' blocks and the empty space are unused: {used}");
    let (used_stored, every_stored) = (used["stored_bytes"].as_u64().unwrap(), every["stored_bytes"].as_u64().unwrap());
    assert!(
        used_stored + (6 << 20) < every_stored,
        "7.5 MiB of deleted noise is left out: used {used_stored}, every byte {every_stored}"
    );
    assert!(used["bytes_read"].as_u64().unwrap() + unused <= 64 << 20, "unused blocks are not read: {used}");

    let restored = t.join("r1.img");
    strata(["restore", "-q", &p(&repo), "1", &p(&restored)]).ok();
    assert_same_files(&restored, &src, &files);
    let every_restored = t.join("e1.img");
    strata(["restore", "-q", &p(&every_repo), "1", &p(&every_restored)]).ok();
    assert!(same_file(&every_restored, &src), "sector by sector restores every byte");

    // Free two files, add one: the incremental stores the new blocks and zeros the freed ones.
    std::fs::write(t.join("late.txt"), text(7, 200 << 10)).unwrap();
    debugfs_w(&src, &format!("rm /f15.bin\nrm /f16.bin\nwrite {} /late.txt\n", t.join("late.txt").display()));
    files.retain(|f| f != "/f15.bin" && f != "/f16.bin");
    files.push("/late.txt".into());
    let incr = backup_json(&["--incremental", &p(&src), &p(&repo)]);
    assert_eq!(incr["kind"], "incremental", "{incr}");
    assert!(incr["unused_bytes"].as_u64().unwrap() > unused, "freed blocks are unused now: {incr}");
    let diff = backup_json(&["--differential", &p(&src), &p(&repo)]);
    assert_eq!(diff["kind"], "differential", "{diff}");
    for v in ["2", "3"] {
        let r = t.join(format!("r{v}.img"));
        strata(["restore", "-q", &p(&repo), v, &p(&r)]).ok();
        assert_same_files(&r, &src, &files);
    }
    strata(["verify", "-q", &p(&repo)]).ok();

    let rows = list_json(&repo);
    assert_eq!(row(&rows, 2)["blocks"], "used");
    let info = strata(["info", "--json", &p(&repo), "3"]).ok().json();
    assert_eq!(info["regions"][0]["file_system"], "ext4", "{info}");
    assert_eq!(info["regions"][0]["blocks"], "used", "{info}");
    let listed = strata(["list", &p(&repo)]).ok().stdout;
    assert!(listed.contains("UNUSED"), "{listed}");
}

#[test]
fn a_partitioned_disk_keeps_its_tables_gaps_and_unknown_partitions_byte_identical() {
    let test = "a_partitioned_disk_keeps_its_tables_gaps_and_unknown_partitions_byte_identical";
    if !have_e2fsprogs(test) || !capable(test, "sfdisk and mkswap", has_tool("sfdisk") && has_tool("mkswap")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = t.join("disk.img");
    std::fs::write(&disk, noise(5, 128 << 20)).unwrap();
    // 1: ext4 at 1 MiB (64 MiB), 2: unknown data (8 MiB), 3: swap (16 MiB), gaps of noise between.
    let table = "label: dos\nstart=2048, size=131072, type=83\nstart=135168, size=16384, type=da\n\
                 start=155648, size=32768, type=82\n";
    let script = t.join("table");
    std::fs::write(&script, table).unwrap();
    let out = std::process::Command::new(tool_path("sfdisk"))
        .args(["-q", &p(&disk)])
        .stdin(std::fs::File::open(&script).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    let part = t.join("p1.img");
    let files = aged_ext4(t, &part);
    let swap = t.join("p3.img");
    std::fs::write(&swap, noise(9, 16 << 20)).unwrap();
    tool("mkswap", &["-q", &p(&swap)]);
    let put = |file: &Path, at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&std::fs::read(file).unwrap(), at).unwrap();
    };
    put(&part, 1 << 20);
    put(&swap, 76 << 20);

    let repo = t.join("repo");
    let s = backup_json(&[&p(&disk), &p(&repo)]);
    let regions = s["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3, "{s}");
    assert_eq!((&regions[0]["file_system"], &regions[0]["blocks"]), (&"ext4".into(), &"used".into()), "{s}");
    assert_eq!(regions[1]["blocks"], "whole", "{s}");
    assert_eq!((&regions[2]["file_system"], &regions[2]["blocks"]), (&"swap".into(), &"used".into()), "{s}");

    let restored = t.join("restored.img");
    strata(["restore", "-q", &p(&repo), "1", &p(&restored)]).ok();
    let (before, after) = (std::fs::read(&disk).unwrap(), std::fs::read(&restored).unwrap());
    let (p1, p3) = ((1usize << 20)..(65 << 20), (76usize << 20)..(92 << 20));
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if !p1.contains(&i) && !(p3.start + 4096..p3.end).contains(&i) && a != b {
            panic!("byte {i} outside the file systems differs: {a} then {b}");
        }
    }
    assert!(after[p3.start + 4096..p3.end].iter().all(|&b| b == 0), "swap pages after the header are unused");
    let restored_part = t.join("restored-p1.img");
    std::fs::write(&restored_part, &after[p1]).unwrap();
    assert_same_files(&restored_part, &part, &files);
}

#[test]
fn a_file_system_not_cleanly_unmounted_is_kept_whole_and_says_why() {
    let test = "a_file_system_not_cleanly_unmounted_is_kept_whole_and_says_why";
    if !have_e2fsprogs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("disk.img");
    aged_ext4(t, &src);
    debugfs_w(&src, "feature needs_recovery\n");
    let repo = t.join("repo");
    let run = strata(["backup", &p(&src), &p(&repo)]).ok();
    assert!(run.stderr.contains("the source (ext4) kept whole: "), "{}", run.stderr);
    assert!(run.stderr.contains("needs_recovery"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "one line says why: {}", run.stderr);
    assert_restores_to(&repo, "1", &src, t);
}

#[test]
fn a_source_mounted_read_write_is_refused_unless_every_byte_is_asked_for() {
    let test = "a_source_mounted_read_write_is_refused_unless_every_byte_is_asked_for";
    if !have_e2fsprogs(test) || !capable(test, "root (loop mounts)", is_root()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("disk.img");
    aged_ext4(t, &src);
    let repo = t.join("repo");
    {
        let _rw = Mounted::mount(&["-o", "loop", &p(&src)], &t.join("mnt"));
        let refused = strata(["backup", &p(&src), &p(&repo)]).expect_code(1);
        assert!(refused.stderr.contains("is mounted read-write on"), "{}", refused.stderr);
        assert!(refused.stderr.contains("--sector-by-sector"), "{}", refused.stderr);
        assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
        assert!(!repo.exists(), "a refused first backup leaves no repository");
        let every = backup_json(&["--sector-by-sector", &p(&src), &p(&repo)]);
        assert_eq!(every["blocks"], "every", "{every}");
    }
    let lo = LoopDevice::attach(&src);
    {
        let _rw = Mounted::mount(&[&p(&lo.path)], &t.join("mnt"));
        let refused = strata(["backup", &p(&lo.path), &p(&t.join("repo2"))]).expect_code(1);
        assert!(refused.stderr.contains("is mounted read-write on"), "{}", refused.stderr);
    }
    let _ro = Mounted::mount(&["-o", "ro,noload", &p(&lo.path)], &t.join("mnt"));
    let used = backup_json(&[&p(&src), &p(&repo)]);
    assert_eq!(used["blocks"], "used", "a read-only mount is no obstacle: {used}");
}

#[test]
fn sector_by_sector_in_the_task_keeps_every_byte() {
    let test = "sector_by_sector_in_the_task_keeps_every_byte";
    if !have_e2fsprogs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("disk.img");
    aged_ext4(t, &src);
    let repo = t.join("repo");
    strata(["init", "-q", &p(&repo), "--sector-by-sector", "true"]).ok();
    let toml = std::fs::read_to_string(repo.join("strata.toml")).unwrap();
    assert!(toml.contains("sector_by_sector = true"), "{toml}");
    let s = backup_json(&[&p(&src), &p(&repo)]);
    assert_eq!(s["blocks"], "every", "{s}");
    assert_restores_to(&repo, "1", &src, t);
    strata(["config", "-q", &p(&repo), "--sector-by-sector", "false"]).ok();
    let s = backup_json(&[&p(&src), &p(&repo)]);
    assert_eq!(s["blocks"], "used", "{s}");
    let info = strata(["info", &p(&repo), "1"]).ok().stdout;
    assert!(info.contains("every byte (sector by sector)"), "{info}");
}

#[test]
fn an_aged_fat32_is_stored_by_its_used_blocks_and_restores_fsck_clean() {
    let test = "an_aged_fat32_is_stored_by_its_used_blocks_and_restores_fsck_clean";
    let tools = ["mkfs.vfat", "fsck.vfat", "mcopy", "mdel"];
    if !capable(test, "dosfstools and mtools", tools.iter().all(|t| has_tool(t))) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let img = t.join("fat.img");
    tool("mkfs.vfat", &["-F", "32", "-C", &p(&img), "65536"]);
    let mtools = |cmd: &str, args: &[&str]| {
        let mut all = vec!["-i", img.to_str().unwrap()];
        all.extend_from_slice(args);
        tool(cmd, &all);
    };
    for i in 0..16u64 {
        let f = t.join(format!("n{i}.bin"));
        std::fs::write(&f, noise(i, 512 << 10)).unwrap();
        mtools("mcopy", &[&p(&f), &format!("::/n{i}.bin")]);
    }
    for i in 0..12 {
        mtools("mdel", &[&format!("::/n{i}.bin")]);
    }
    std::fs::write(t.join("new.txt"), text(3, 200 << 10)).unwrap();
    mtools("mcopy", &[&p(&t.join("new.txt")), "::/new.txt"]);

    let repo = t.join("repo");
    let s = backup_json(&[&p(&img), &p(&repo)]);
    assert_eq!((&s["regions"][0]["file_system"], &s["blocks"]), (&"vfat".into(), &"used".into()), "{s}");
    assert!(s["stored_bytes"].as_u64().unwrap() < 3 << 20, "6 MiB of deleted noise is left out: {s}");
    let restored = t.join("restored.img");
    strata(["restore", "-q", &p(&repo), "1", &p(&restored)]).ok();
    let fsck = tool_status("fsck.vfat", &["-n", &p(&restored)]);
    assert_eq!(fsck.code, Some(0), "{}{}", fsck.stdout, fsck.stderr);
    for name in ["n12.bin", "n13.bin", "n14.bin", "n15.bin", "new.txt"] {
        let out = t.join(format!("out-{name}"));
        tool("mcopy", &["-i", &p(&restored), &format!("::/{name}"), &p(&out)]);
        let expected = if name == "new.txt" { t.join("new.txt") } else { t.join(name) };
        assert!(same_file(&out, &expected), "{name} differs after restore");
    }
}
