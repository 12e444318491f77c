//! Used-blocks backups of aged ext4, XFS, NTFS, exFAT and btrfs file systems, made by their own tools
//! and filled through their own drivers (the kernel's, ntfs-3g, exfat-fuse): a full, an
//! incremental and a differential, each version fsck-clean through the mount and after restore,
//! with every file's content and metadata equal to what the driver showed at backup time.
//! (FAT, which has no driver here, is filled through mtools in used_blocks.rs.)

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use strata_tests::*;

/// One kind of file system: how to make, mount and check it, and what strata should make of it.
struct Kind {
    /// The name strata reports for it.
    name: &'static str,
    /// The tools the test needs.
    tools: &'static [&'static str],
    size: u64,
    mkfs: fn(&Path),
    /// `mount` arguments before the device, for a read-write and a read-only mount.
    mount_rw: &'static [&'static str],
    mount_ro: &'static [&'static str],
    /// The read-only check and its arguments before the image.
    fsck: &'static [&'static str],
    /// Whether it has symlinks, hard links and stable inode numbers.
    links: bool,
    /// Whether strata stores only its used blocks (or keeps it whole).
    used_blocks: bool,
}

const EXT4: Kind = Kind {
    name: "ext4",
    tools: &["mkfs.ext4", "e2fsck"],
    size: 96 << 20,
    mkfs: |img| drop(tool("mkfs.ext4", &["-q", "-F", &p(img)])),
    mount_rw: &["-t", "ext4"],
    mount_ro: &["-t", "ext4", "-o", "ro"],
    fsck: &["e2fsck", "-fn"],
    links: true,
    used_blocks: true,
};

const XFS: Kind = Kind {
    name: "xfs",
    tools: &["mkfs.xfs", "xfs_repair"],
    size: 320 << 20,
    mkfs: |img| drop(tool("mkfs.xfs", &["-q", &p(img)])),
    mount_rw: &["-t", "xfs"],
    mount_ro: &["-t", "xfs", "-o", "ro"],
    fsck: &["xfs_repair", "-n", "-f"],
    links: true,
    used_blocks: true,
};

const NTFS: Kind = Kind {
    name: "ntfs",
    tools: &["mkntfs", "ntfs-3g", "ntfsfix"],
    size: 96 << 20,
    mkfs: |img| drop(tool("mkntfs", &["-q", "-F", "-f", &p(img)])),
    mount_rw: &["-t", "ntfs-3g"],
    mount_ro: &["-t", "ntfs-3g", "-o", "ro"],
    fsck: &["ntfsfix", "-n"],
    links: true,
    used_blocks: true,
};

const EXFAT: Kind = Kind {
    name: "exfat",
    tools: &["mkfs.exfat", "fsck.exfat", "mount.exfat-fuse"],
    size: 96 << 20,
    mkfs: |img| drop(tool("mkfs.exfat", &[&p(img)])),
    mount_rw: &["-t", "exfat-fuse"],
    mount_ro: &["-t", "exfat-fuse", "-o", "ro"],
    fsck: &["fsck.exfat", "-n"],
    links: false,
    used_blocks: true,
};

const BTRFS: Kind = Kind {
    name: "btrfs",
    tools: &["mkfs.btrfs", "btrfs"],
    size: 160 << 20,
    mkfs: |img| drop(tool("mkfs.btrfs", &["-q", &p(img)])),
    mount_rw: &["-t", "btrfs"],
    mount_ro: &["-t", "btrfs", "-o", "ro"],
    fsck: &["btrfs", "check", "--readonly"],
    links: true,
    used_blocks: false,
};

/// Runs `change` on the file system in `img`, mounted by its driver through a loop device,
/// and unmounts it cleanly.
fn with_mounted(kind: &Kind, img: &Path, read_only: bool, change: impl FnOnce(&Path)) {
    let lo = LoopDevice::attach(img);
    let dir = img.with_extension("mnt");
    let mut args = if read_only { kind.mount_ro } else { kind.mount_rw }.to_vec();
    let dev = p(&lo.path);
    args.push(&dev);
    let mounted = Mounted::mount(&args, &dir);
    change(&mounted.dir);
    if !read_only {
        tool("sync", &["-f", &p(&mounted.dir)]);
    }
}

/// Every entry under `root` with what a file system must give back: kind, mode, owner, size,
/// link count, modification time, link target or a digest of the content, and the inode number
/// where the driver keeps them stable.
fn tree(kind: &Kind, root: &Path) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                pending.push(path.clone());
                "dir".to_string()
            } else {
                format!("file {:016x}", fnv1a(&std::fs::read(&path).unwrap()))
            };
            let ino = if kind.links { m.ino().to_string() } else { String::new() };
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = format!(
                "{what} mode {:o} uid {} gid {} size {} nlink {} mtime {}.{:09} ino {ino}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.nlink(),
                m.mtime(),
                m.mtime_nsec()
            );
            entries.insert(rel, meta);
        }
    }
    entries
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Ages the file system: 24 files of incompressible data written, 20 of them deleted, then new
/// text, a sparse file (written out where the file system has no holes), a folder, and links where the file system has them.
fn age(kind: &Kind, dir: &Path) {
    std::fs::create_dir(dir.join("old")).unwrap();
    for i in 0..24u64 {
        std::fs::write(dir.join(format!("old/n{i:02}.bin")), noise(i, 512 << 10)).unwrap();
    }
    tool("sync", &["-f", &p(dir)]);
    for i in (0..24).filter(|i| i % 6 != 0) {
        std::fs::remove_file(dir.join(format!("old/n{i:02}.bin"))).unwrap();
    }
    std::fs::create_dir_all(dir.join("docs/deep")).unwrap();
    std::fs::write(dir.join("docs/new.txt"), text(1, 300 << 10)).unwrap();
    for i in 0..40u64 {
        std::fs::write(dir.join(format!("docs/deep/s{i}.txt")), text(100 + i, 1 + (i as usize * 97) % 5000)).unwrap();
    }
    use std::os::unix::fs::FileExt;
    let sparse = std::fs::File::create(dir.join("sparse.bin")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    sparse.write_all_at(&text(5, 8192), 512 << 10).unwrap();
    if kind.links {
        std::os::unix::fs::symlink("docs/new.txt", dir.join("to-new")).unwrap();
        std::fs::hard_link(dir.join("docs/new.txt"), dir.join("docs/same.txt")).unwrap();
    }
}

/// The change before the incremental: two files freed, one added, one rewritten in place.
fn change_for_incremental(dir: &Path) {
    std::fs::remove_file(dir.join("old/n00.bin")).unwrap();
    std::fs::remove_file(dir.join("old/n06.bin")).unwrap();
    std::fs::write(dir.join("late.bin"), noise(77, 256 << 10)).unwrap();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("docs/new.txt")).unwrap();
    f.write_all_at(&text(2, 4096), 64 << 10).unwrap();
}

/// The change before the differential: one more file freed, one added in a new folder.
fn change_for_differential(dir: &Path) {
    std::fs::remove_file(dir.join("old/n12.bin")).unwrap();
    std::fs::create_dir(dir.join("later")).unwrap();
    std::fs::write(dir.join("later/x.txt"), text(3, 100 << 10)).unwrap();
}

fn backup(args: &[&str]) -> Run {
    let mut all = vec!["backup", "--json"];
    all.extend_from_slice(args);
    strata(all).ok()
}

fn assert_fsck_clean(kind: &Kind, img: &Path) {
    let (cmd, args) = kind.fsck.split_first().unwrap();
    let mut all = args.to_vec();
    let path = p(img);
    all.push(&path);
    let run = tool_status(cmd, &all);
    assert_eq!(run.code, Some(0), "{} of {path}: {}{}", kind.fsck.join(" "), run.stdout, run.stderr);
}

/// A backup's flag and the change made to the source before it.
type Step = (&'static str, fn(&Path));

fn aged_file_system_round_trip(test: &str, kind: &Kind) {
    let needs = format!("root, FUSE and {}", kind.tools.join(", "));
    let ok = is_root() && Path::new("/dev/fuse").exists() && kind.tools.iter().all(|t| has_tool(t));
    if !capable(test, &needs, ok) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("source.img");
    std::fs::File::create(&src).unwrap().set_len(kind.size).unwrap();
    (kind.mkfs)(&src);
    with_mounted(kind, &src, false, |d| age(kind, d));

    let repo = t.join("repo");
    let mut trees = Vec::new();
    let changes: [Step; 3] =
        [("", |_| {}), ("--incremental", change_for_incremental), ("--differential", change_for_differential)];
    for (i, (flag, change)) in changes.into_iter().enumerate() {
        if i > 0 {
            with_mounted(kind, &src, false, change);
        }
        let mut seen = BTreeMap::new();
        with_mounted(kind, &src, true, |d| seen = tree(kind, d));
        assert!(seen.len() > 40, "{seen:?}");
        trees.push(seen);
        let mut args = vec![flag];
        args.retain(|a| !a.is_empty());
        let (s, r) = (p(&src), p(&repo));
        args.extend([s.as_str(), r.as_str()]);
        let run = backup(&args);
        let summary = run.json();
        assert_eq!(summary["regions"][0]["file_system"], kind.name, "{summary}");
        if kind.used_blocks {
            assert_eq!(summary["blocks"], "used", "{summary}");
            assert!(run.stderr.is_empty(), "nothing to warn about: {}", run.stderr);
        } else {
            assert_eq!(summary["regions"][0]["blocks"], "whole", "{summary}");
            assert!(run.stderr.contains(&format!("the source ({}) kept whole: ", kind.name)), "{}", run.stderr);
            assert_eq!(run.stderr.lines().count(), 1, "one line says why: {}", run.stderr);
        }
        if i == 0 {
            assert_first_backup_leaves_out_the_deleted(kind, &src, t, &summary);
        }
    }
    strata(["verify", "-q", &p(&repo)]).ok();

    let mount = StrataMount::new(&repo, &t.join("versions"), &[]);
    for (i, expected) in trees.iter().enumerate() {
        let version = (i + 1).to_string();
        let served = mount.path(&format!("{version}/disk.img"));
        assert_fsck_clean(kind, &served);
        let restored = t.join(format!("restored-{version}.img"));
        strata(["restore", "-q", &p(&repo), &version, &p(&restored)]).ok();
        assert!(same_file(&restored, &served), "version {version}: the restore and the mount differ");
        assert_fsck_clean(kind, &restored);
        let mut got = BTreeMap::new();
        with_mounted(kind, &restored, true, |d| got = tree(kind, d));
        for (name, meta) in expected {
            assert_eq!(got.get(name), Some(meta), "version {version}: {name}");
        }
        assert_eq!(got.len(), expected.len(), "version {version}: {got:?}");
        std::fs::remove_file(&restored).unwrap();
    }
}

/// The full of an aged file system stores far less than every byte: most of the 10 MiB of
/// deleted incompressible files are left out (for a file system kept whole, exactly every byte).
fn assert_first_backup_leaves_out_the_deleted(kind: &Kind, src: &Path, t: &Path, used: &serde_json::Value) {
    let every = backup(&["--sector-by-sector", &p(src), &p(&t.join("every"))]).json();
    let (used_stored, every_stored) = (used["stored_bytes"].as_u64().unwrap(), every["stored_bytes"].as_u64().unwrap());
    if kind.used_blocks {
        assert!(used_stored + (6 << 20) < every_stored, "used {used_stored}, every byte {every_stored}");
        assert!(used["unused_bytes"].as_u64().unwrap() > 10 << 20, "{used}");
    } else {
        assert_eq!(used["unused_bytes"], 0, "{used}");
        assert!(used_stored.abs_diff(every_stored) < 64 << 10, "used {used_stored}, every byte {every_stored}");
    }
}

#[test]
fn an_aged_ext4_keeps_its_files_through_full_incremental_and_differential() {
    aged_file_system_round_trip("an_aged_ext4_keeps_its_files_through_full_incremental_and_differential", &EXT4);
}

#[test]
fn an_aged_xfs_keeps_its_files_through_full_incremental_and_differential() {
    aged_file_system_round_trip("an_aged_xfs_keeps_its_files_through_full_incremental_and_differential", &XFS);
}

#[test]
fn an_aged_ntfs_keeps_its_files_through_full_incremental_and_differential() {
    aged_file_system_round_trip("an_aged_ntfs_keeps_its_files_through_full_incremental_and_differential", &NTFS);
}

#[test]
fn an_aged_exfat_keeps_its_files_through_full_incremental_and_differential() {
    aged_file_system_round_trip("an_aged_exfat_keeps_its_files_through_full_incremental_and_differential", &EXFAT);
}

#[test]
fn an_aged_btrfs_is_kept_whole_and_keeps_its_files_through_every_version() {
    aged_file_system_round_trip("an_aged_btrfs_is_kept_whole_and_keeps_its_files_through_every_version", &BTRFS);
}
