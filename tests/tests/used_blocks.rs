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

/// What a test puts in a partition.
#[derive(Clone, Copy, PartialEq)]
enum Content {
    Ext4,
    Fat32,
    Swap,
    /// Data no parser knows (a boot loader, an unknown file system): kept whole.
    Unknown,
    /// The extended partition that holds the logical ones.
    Extended,
}

/// A partition: its number, first sector, length in sectors, type for sfdisk and content.
type Part = (u32, u64, u64, &'static str, Content);

/// Builds a disk of `mib` MiB of noise (the gaps hold data, as boot loaders leave), with the
/// partition table of `label` and the content of each partition; backs it up and restores it;
/// then checks that every byte outside the file systems comes back identical, each file
/// system fsck-clean with its files, and a swap area's pages after its header as zeros.
fn partitioned_disk_round_trip(test: &str, label: &str, mib: u64, parts: &[Part]) {
    let tools = ["sfdisk", "mkswap", "mkfs.vfat", "fsck.vfat", "mcopy", "mdel"];
    if !have_e2fsprogs(test)
        || !capable(test, "fdisk, util-linux, dosfstools, mtools", tools.iter().all(|t| has_tool(t)))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = t.join("disk.img");
    std::fs::write(&disk, noise(5, (mib << 20) as usize)).unwrap();
    let mut table = format!("label: {label}\n");
    for (_, start, sectors, kind, _) in parts {
        table += &format!("start={start}, size={sectors}, type={kind}\n");
    }
    let script = t.join("table");
    std::fs::write(&script, table).unwrap();
    let out = std::process::Command::new(tool_path("sfdisk"))
        .args(["-q", &p(&disk)])
        .stdin(std::fs::File::open(&script).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    let mut ext4_files = Vec::new();
    let mut fat_files = Vec::new();
    for &(n, start, sectors, _, content) in parts {
        let img = t.join(format!("p{n}.img"));
        match content {
            Content::Ext4 => ext4_files = aged_ext4(&t.join(format!("p{n}")), &img),
            Content::Fat32 => fat_files = aged_fat32(&t.join(format!("p{n}")), &img),
            Content::Swap => {
                std::fs::write(&img, noise(9, (sectors * 512) as usize)).unwrap();
                tool("mkswap", &["-q", &p(&img)]);
            }
            Content::Unknown | Content::Extended => continue,
        }
        assert_eq!(std::fs::metadata(&img).unwrap().len(), sectors * 512, "partition {n} fits its content");
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&std::fs::read(&img).unwrap(), start * 512).unwrap();
    }

    let repo = t.join("repo");
    let s = backup_json(&[&p(&disk), &p(&repo)]);
    let regions = s["regions"].as_array().unwrap();
    let expected: Vec<_> = parts.iter().filter(|p| p.4 != Content::Extended).collect();
    assert_eq!(regions.len(), expected.len(), "{s}");
    for &&(n, _, _, _, content) in &expected {
        let region = regions.iter().find(|r| r["partition"] == n).unwrap_or_else(|| panic!("partition {n}: {s}"));
        let (fs, blocks) = match content {
            Content::Ext4 => ("ext4", "used"),
            Content::Fat32 => ("vfat", "used"),
            Content::Swap => ("swap", "used"),
            _ => ("", "whole"),
        };
        if !fs.is_empty() {
            assert_eq!(region["file_system"], fs, "partition {n}: {s}");
        }
        assert_eq!(region["blocks"], blocks, "partition {n}: {s}");
    }

    let restored = t.join("restored.img");
    strata(["restore", "-q", &p(&repo), "1", &p(&restored)]).ok();
    let (before, after) = (std::fs::read(&disk).unwrap(), std::fs::read(&restored).unwrap());
    assert_eq!(before.len(), after.len());
    let byte_range = |start: u64, sectors: u64| (start * 512) as usize..((start + sectors) * 512) as usize;
    let file_systems: Vec<_> = parts
        .iter()
        .filter(|p| matches!(p.4, Content::Ext4 | Content::Fat32 | Content::Swap))
        .map(|&(n, start, sectors, _, content)| {
            let r = byte_range(start, sectors);
            // A swap area keeps its header page; its other pages are unused.
            let free = if content == Content::Swap { r.start + 4096..r.end } else { r.clone() };
            (n, r, free, content)
        })
        .collect();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b && !file_systems.iter().any(|(_, _, free, _)| free.contains(&i)) {
            panic!("byte {i} outside the file systems differs: {a} then {b}");
        }
    }
    for (n, range, free, content) in file_systems {
        let img = t.join(format!("restored-p{n}.img"));
        std::fs::write(&img, &after[range]).unwrap();
        match content {
            Content::Ext4 => assert_same_files(&img, &t.join(format!("p{n}.img")), &ext4_files),
            Content::Fat32 => assert_same_fat_files(&img, &fat_files),
            _ => assert!(after[free].iter().all(|&b| b == 0), "partition {n}: swap pages after the header are unused"),
        }
    }
}

const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";

#[test]
fn a_partitioned_disk_keeps_its_tables_gaps_and_unknown_partitions_byte_identical() {
    partitioned_disk_round_trip(
        "a_partitioned_disk_keeps_its_tables_gaps_and_unknown_partitions_byte_identical",
        "dos",
        128,
        &[
            (1, 2048, 131072, "83", Content::Ext4),
            (2, 135168, 16384, "da", Content::Unknown),
            (3, 155648, 32768, "82", Content::Swap),
        ],
    );
}

#[test]
fn an_mbr_disk_with_logical_partitions_keeps_its_boot_records_and_gaps() {
    partitioned_disk_round_trip(
        "an_mbr_disk_with_logical_partitions_keeps_its_boot_records_and_gaps",
        "dos",
        180,
        &[
            (1, 2048, 131072, "83", Content::Ext4),
            (2, 133120, 200704, "5", Content::Extended),
            (3, 335872, 16384, "da", Content::Unknown),
            (5, 135168, 131072, "c", Content::Fat32),
            (6, 268288, 32768, "82", Content::Swap),
        ],
    );
}

#[test]
fn a_gpt_disk_keeps_its_bios_boot_partition_tables_and_gaps() {
    partitioned_disk_round_trip(
        "a_gpt_disk_keeps_its_bios_boot_partition_tables_and_gaps",
        "gpt",
        144,
        &[
            (1, 2048, 2048, BIOS_BOOT, Content::Unknown),
            (2, 4096, 131072, LINUX, Content::Ext4),
            (3, 135168, 131072, BASIC_DATA, Content::Fat32),
            (4, 270336, 16384, LINUX, Content::Unknown),
        ],
    );
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

/// A 64 MiB FAT32 image filled through mtools whose free space holds deleted files' data, with
/// the files still in it and where their content is.
fn aged_fat32(dir: &Path, img: &Path) -> Vec<(String, std::path::PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    tool("mkfs.vfat", &["-F", "32", "-C", &p(img), "65536"]);
    let mtools = |cmd: &str, args: &[&str]| {
        let mut all = vec!["-i", img.to_str().unwrap()];
        all.extend_from_slice(args);
        tool(cmd, &all);
    };
    for i in 0..16u64 {
        let f = dir.join(format!("n{i}.bin"));
        std::fs::write(&f, noise(i, 512 << 10)).unwrap();
        mtools("mcopy", &[&p(&f), &format!("::/n{i}.bin")]);
    }
    for i in 0..12 {
        mtools("mdel", &[&format!("::/n{i}.bin")]);
    }
    std::fs::write(dir.join("new.txt"), text(3, 200 << 10)).unwrap();
    mtools("mcopy", &[&p(&dir.join("new.txt")), "::/new.txt"]);
    ["n12.bin", "n13.bin", "n14.bin", "n15.bin", "new.txt"].iter().map(|n| (n.to_string(), dir.join(n))).collect()
}

/// A restored FAT image is consistent (fsck.vfat) and holds every file as the source did.
fn assert_same_fat_files(restored: &Path, files: &[(String, std::path::PathBuf)]) {
    let fsck = tool_status("fsck.vfat", &["-n", &p(restored)]);
    assert_eq!(fsck.code, Some(0), "{}{}", fsck.stdout, fsck.stderr);
    for (name, expected) in files {
        let out = restored.with_extension(format!("out-{name}"));
        tool("mcopy", &["-i", &p(restored), &format!("::/{name}"), &p(&out)]);
        assert!(same_file(&out, expected), "{name} differs after restore");
    }
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
    let files = aged_fat32(&t.join("files"), &img);
    let repo = t.join("repo");
    let s = backup_json(&[&p(&img), &p(&repo)]);
    assert_eq!((&s["regions"][0]["file_system"], &s["blocks"]), (&"vfat".into(), &"used".into()), "{s}");
    assert!(s["stored_bytes"].as_u64().unwrap() < 3 << 20, "6 MiB of deleted noise is left out: {s}");
    let restored = t.join("restored.img");
    strata(["restore", "-q", &p(&repo), "1", &p(&restored)]).ok();
    assert_same_fat_files(&restored, &files);
}
