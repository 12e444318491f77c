//! The FUSE mount of a repository: every version's disk.img is byte-for-byte the disk at its
//! backup, partitions appear as partN.img, files can be browsed through a loop mount or fuse2fs,
//! dd from the mount equals `strata restore`, writes are refused, damage gives EIO only where it
//! is, concurrent readers are served, a VM can run a version with its writes in a throwaway
//! overlay, XFS versions mount side by side, and unmounting leaves nothing behind.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use strata_tests::*;

fn needs(test: &str) -> bool {
    have_fuse(test) && have_e2fsprogs(test)
}

/// An ext4 disk backed up as full, incr, incr, diff, incr; returns (repo, per-version states).
fn ext4_history(t: &Path) -> (PathBuf, Vec<PathBuf>) {
    let files = t.join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    for i in 0..20u64 {
        std::fs::write(files.join(format!("f{i}.txt")), text(i, 5000 + (i as usize * 15_731) % 150_000)).unwrap();
    }
    std::fs::write(files.join("sub/passwd"), std::fs::read("/etc/passwd").unwrap_or_default()).unwrap();
    let disk = t.join("disk.img");
    mkfs_ext4(&disk, "40M", &files);
    let repo = t.join("repo");
    let data = t.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let steps = [
        ("", ""),
        ("", "write {D}/a /a.txt\nrm /f2.txt\n"),
        ("", "write {D}/b /sub/b.txt\n"),
        ("--differential", "write {D}/c /c.txt\nrm /f5.txt\n"),
        ("", "rm /a.txt\nwrite {D}/d /a.txt\n"),
    ];
    let mut states = Vec::new();
    for (i, (flag, cmds)) in steps.iter().enumerate() {
        for name in ["a", "b", "c", "d"] {
            std::fs::write(data.join(name), text(i as u64 * 31 + name.len() as u64, 30_000 + 20_000 * i)).unwrap();
        }
        if !cmds.is_empty() {
            debugfs_w(&disk, &cmds.replace("{D}", &p(&data)));
        }
        let state = t.join(format!("state{}.img", i + 1));
        std::fs::copy(&disk, &state).unwrap();
        // every byte: each mounted version is compared with the disk as it was, deleted data
        // included (used_blocks.rs mounts and restores used-blocks versions)
        let mut args = vec!["backup".to_string(), "-q".into(), "--sector-by-sector".into()];
        if !flag.is_empty() {
            args.push(flag.to_string());
        }
        args.extend([p(&disk), p(&repo)]);
        strata(&args).ok();
        states.push(state);
    }
    (repo, states)
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn mounted_versions_are_the_disk_as_it_was_and_read_only() {
    let test = "mounted_versions_are_the_disk_as_it_was_and_read_only";
    if !needs(test) || !capable(test, "root (loop mounts)", is_root()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (repo, states) = ext4_history(t);
    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);

    let mut names: Vec<String> =
        std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["1", "2", "3", "4", "5", "latest"]);
    assert_eq!(std::fs::read_link(m.path("latest")).unwrap(), Path::new("5"));
    for (i, state) in states.iter().enumerate() {
        let disk = m.path(&format!("{}/disk.img", i + 1));
        assert!(same_file(&disk, state), "version {} differs from the disk at its backup", i + 1);
        e2fsck_clean(&disk);
    }
    // only disk.img in a version of an unpartitioned disk
    let entries: Vec<_> = std::fs::read_dir(m.path("3")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["disk.img"]);

    // browse files: loop-mount version 3 read-only and compare with the disk as it was
    let v3 = Mounted::mount(&["-o", "loop,ro", &p(&m.path("3/disk.img"))], &t.join("v3"));
    let orig = Mounted::mount(&["-o", "loop,ro", &p(&states[2])], &t.join("orig3"));
    let diff = tool_status("diff", &["-r", &p(&v3.dir), &p(&orig.dir)]);
    assert_eq!(diff.code, Some(0), "files of version 3 differ:\n{}", diff.stdout);
    assert!(v3.dir.join("sub/b.txt").exists());
    drop(orig);

    // dd from the mount equals strata restore
    let dd_out = t.join("dd.img");
    tool("dd", &[&format!("if={}", p(&m.path("4/disk.img"))), &format!("of={}", p(&dd_out)), "bs=4M", "status=none"]);
    let restored = t.join("restored4.img");
    strata(["restore", "-q", &p(&repo), "4", &p(&restored)]).ok();
    assert!(same_file(&dd_out, &restored));

    // read-only everywhere, owned by the mounting user, mtime the backup time
    let meta = std::fs::metadata(m.path("2/disk.img")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o444);
    assert_eq!(std::fs::metadata(m.path("2")).unwrap().mode() & 0o777, 0o555);
    // SAFETY: getuid has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::getuid() });
    let info = strata(["info", "--json", &p(&repo), "2"]).ok().json();
    let created = humantime_secs(info["created"].as_str().unwrap());
    assert_eq!(meta.mtime(), created);
    let erofs = |r: std::io::Result<std::fs::File>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(erofs(std::fs::OpenOptions::new().write(true).open(m.path("2/disk.img"))), Some(libc::EROFS));
    assert_eq!(erofs(std::fs::File::create(m.path("2/new"))), Some(libc::EROFS));
    let chmod = std::fs::set_permissions(m.path("2/disk.img"), std::os::unix::fs::PermissionsExt::from_mode(0o666));
    assert_eq!(chmod.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    assert_eq!(std::fs::create_dir(m.path("9")).err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    let st = nix_statfs(&m.dir);
    assert!(st > 0, "statfs reports the size");

    // concurrent readers (several threads and a loop mount at once)
    let readers: Vec<_> = (1..=5)
        .map(|id| {
            let (disk, state) = (m.path(&format!("{id}/disk.img")), states[id - 1].clone());
            std::thread::spawn(move || read_all(&disk).unwrap() == std::fs::read(state).unwrap())
        })
        .collect();
    let listing = std::fs::read_dir(&v3.dir).unwrap().count();
    assert!(listing > 10);
    for r in readers {
        assert!(r.join().unwrap(), "a concurrent reader saw wrong data");
    }
    drop(v3);

    // a version made while mounted appears without remounting
    strata(["backup", "-q", "--full", "--sector-by-sector", &p(&states[4]), &p(&repo)]).ok();
    let mut appeared = false;
    for _ in 0..50 {
        if m.path("6/disk.img").exists() {
            appeared = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(appeared, "version 6 did not appear in the mount");
    assert!(same_file(&m.path("6/disk.img"), &states[4]));

    // unmount leaves no mount and no driver behind
    let pid = m.driver_pid.expect("strata mount reports the driver pid");
    let dir = m.dir.clone();
    drop(m);
    assert!(!std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&p(&dir)), "still mounted");
    assert!(process_gone(pid), "the driver is still running");
}

fn humantime_secs(rfc3339: &str) -> i64 {
    // YYYY-MM-DDTHH:MM:SSZ
    let n = |a: usize, b: usize| rfc3339[a..b].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, s) = (n(0, 4), n(5, 7), n(8, 10), n(11, 13), n(14, 16), n(17, 19));
    let (y2, m2) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + mi * 60 + s
}

fn nix_statfs(path: &Path) -> u64 {
    let c = std::ffi::CString::new(p(path)).unwrap();
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_blocks as u64 * st.f_frsize as u64
}

#[test]
fn partitions_appear_as_part_images_that_mount_and_browse() {
    let test = "partitions_appear_as_part_images_that_mount_and_browse";
    if !needs(test) || !capable(test, "sfdisk (fdisk)", has_tool("sfdisk")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let files = t.join("files");
    std::fs::create_dir_all(&files).unwrap();
    for i in 0..8u64 {
        std::fs::write(files.join(format!("p{i}.txt")), text(i + 500, 40_000)).unwrap();
    }
    let fs_img = t.join("fs.img");
    mkfs_ext4(&fs_img, "20M", &files);
    // a 32 MiB GPT disk with partition 1 at 1 MiB holding that ext4, partition 2 after it
    let disk = t.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    let script = t.join("layout");
    std::fs::write(&script, "label: gpt\nstart=2048, size=40960, type=L\nstart=43008, size=8192, type=L\n").unwrap();
    let out = std::process::Command::new(tool_path("sfdisk"))
        .arg(&disk)
        .stdin(std::fs::File::open(&script).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    let fs_bytes = std::fs::read(&fs_img).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(&fs_bytes, 1 << 20).unwrap();
    let repo = t.join("repo");
    strata(["backup", "-q", &p(&disk), &p(&repo)]).ok();

    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path("1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["disk.img", "part1.img", "part2.img"]);
    assert_eq!(std::fs::metadata(m.path("1/part1.img")).unwrap().len(), 40960 * 512);
    assert_eq!(std::fs::metadata(m.path("1/part2.img")).unwrap().len(), 8192 * 512);
    assert!(same_file(&m.path("1/part1.img"), &fs_img), "part1.img is the partition's bytes");
    e2fsck_clean(&m.path("1/part1.img"));
    assert!(same_file(&m.path("1/disk.img"), &disk));

    if capable(test, "root (loop mounts)", is_root()) {
        let lm = Mounted::mount(&["-o", "loop,ro", &p(&m.path("1/part1.img"))], &t.join("p1"));
        assert_eq!(std::fs::read(lm.dir.join("p3.txt")).unwrap(), text(503, 40_000));
    }
    // without root: fuse2fs -o ro on partN.img
    if capable(test, "fuse2fs", has_tool("fuse2fs")) {
        let dir = t.join("f2");
        std::fs::create_dir_all(&dir).unwrap();
        tool("fuse2fs", &["-o", "ro,fakeroot", &p(&m.path("1/part1.img")), &p(&dir)]);
        let _guard = FuseGuard(dir.clone());
        assert_eq!(std::fs::read(dir.join("p5.txt")).unwrap(), text(505, 40_000));
    }
}

/// Unmounts a plain FUSE mount (fuse2fs) on drop.
struct FuseGuard(PathBuf);

impl Drop for FuseGuard {
    fn drop(&mut self) {
        if tool_status("fusermount3", &["-u", &p(&self.0)]).code != Some(0) {
            let _ = tool_status("umount", &["-l", &p(&self.0)]);
        }
    }
}

#[test]
fn damaged_block_reads_eio_and_the_rest_still_reads() {
    let test = "damaged_block_reads_eio_and_the_rest_still_reads";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = one_version_repo(t, &["--block-size", "4K"]);
    // the first stored frame (data starts at offset 512) is the group of the leading run of
    // non-zero blocks, at most 255 of them (SPEC.md §3.2): exactly those blocks must fail
    flip_byte(&repo.join("v00000001.strata"), 512 + 5);
    let src_bytes = std::fs::read(&src).unwrap();
    let group = src_bytes.chunks(4096).take(255).take_while(|b| b.iter().any(|&x| x != 0)).count() as u64;
    assert!(group >= 1);
    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
    let f = std::fs::File::open(m.path("1/disk.img")).unwrap();
    let mut buf = vec![0u8; 4096];
    for block in 0..src_bytes.len() as u64 / 4096 {
        let got = f.read_exact_at(&mut buf, block * 4096);
        if block < group {
            assert_eq!(got.unwrap_err().raw_os_error(), Some(libc::EIO), "block {block}");
        } else {
            got.unwrap();
            assert_eq!(&buf[..], &src_bytes[block as usize * 4096..][..4096], "block {block}");
        }
    }
    // still serving after the error
    assert!(std::fs::metadata(m.path("latest")).is_ok());
}

#[test]
fn mount_errors_are_clear_and_version_option_shows_one_version() {
    let test = "mount_errors_are_clear_and_version_option_shows_one_version";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = (t.join("d"), t.join("repo"));
    write_disk(&src, 1 << 20, 3, |b| b % 2 == 0);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();
    write_disk(&src, 1 << 20, 4, |b| b % 3 == 0);
    strata(["backup", "-q", &p(&src), &p(&repo)]).ok();

    let r = strata(["mount", &p(&repo), &p(&t.join("nope"))]).expect_code(1);
    assert!(r.stderr.contains("no such folder"), "{}", r.stderr);
    let busy = t.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let r = strata(["mount", &p(&repo), &p(&busy)]).expect_code(1);
    assert!(r.stderr.contains("busy"), "{}", r.stderr);
    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = strata(["mount", &p(&busy), &p(&empty)]).expect_code(1);
    assert!(r.stderr.contains("not a strata repository"), "{}", r.stderr);
    let r = strata(["umount", &p(&empty)]).expect_code(1);
    assert!(r.stderr.contains("nothing is mounted"), "{}", r.stderr);

    let m = StrataMount::new(&repo, &t.join("v1"), &["--only", "1"]);
    let names: Vec<_> = std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.contains(&"1".into()) && !names.contains(&"2".into()), "{names:?}");
    // mounting again on a mount point in use is refused
    let r = strata(["mount", &p(&repo), &p(&m.dir)]).expect_code(1);
    assert!(r.stderr.contains("busy"), "{}", r.stderr);
    drop(m);

    // an unrestorable version is left out with a warning naming it
    std::fs::remove_file(repo.join("v00000001.strata")).unwrap();
    let dir = t.join("v2");
    std::fs::create_dir_all(&dir).unwrap();
    let run = strata(["mount", &p(&repo), &p(&dir)]).ok();
    let _m = StrataMount { dir: dir.clone(), driver_pid: None };
    assert!(run.stderr.contains("version 2 is not restorable"), "{}", run.stderr);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn foreground_mount_unmounts_cleanly_on_sigterm_and_sigint() {
    let test = "foreground_mount_unmounts_cleanly_on_sigterm_and_sigint";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = one_version_repo(t, &[]);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = t.join(format!("mnt{signal}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new(strata_bin())
            .args(["mount", "--foreground", &p(&repo), &p(&dir)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // the guard unmounts if anything below fails (which also ends the driver)
        let _guard = StrataMount { dir: dir.clone(), driver_pid: None };
        let mounted = || std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&format!(" {} ", p(&dir)));
        for _ in 0..100 {
            if mounted() && dir.join("1/disk.img").exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(same_file(&dir.join("1/disk.img"), &src));
        // SAFETY: signals the driver this test started, by its pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert!(status.success(), "driver exited with {status} after signal {signal}");
        assert!(!mounted(), "still mounted after signal {signal}");
    }
}

#[test]
fn a_first_version_with_large_blocks_appears_in_a_mount_of_an_empty_repository() {
    let test = "a_first_version_with_large_blocks_appears_in_a_mount_of_an_empty_repository";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo) = (t.join("d"), t.join("repo"));
    write_disk(&src, 3 << 20, 8, |b| b % 3 != 0);
    strata(["init", "-q", &p(&repo), "--block-size", "1M", "--source", &p(&src)]).ok();
    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
    strata(["backup", "-q", &p(&repo)]).ok();
    for _ in 0..50 {
        if m.path("1/disk.img").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(same_file(&m.path("1/disk.img"), &src));
}

/// Replaces the stored bytes of the raw block `block` of the image `path` with `forged` (as
/// long), and makes every crc32c agree (the entry's `data_crc` and `entry_crc`, the index crc
/// and the footer crc, at the offsets of SPEC.md §3.3-3.4): only the BLAKE3 hash can tell.
/// Returns the block's data offset.
fn forge_raw_block(path: &Path, block: u64, forged: &[u8]) -> u64 {
    let mut bytes = std::fs::read(path).unwrap();
    let footer = bytes.len() - 128;
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let (index, count) = (le64(&bytes, footer + 32), le64(&bytes, footer + 40));
    let entry = (0..count).map(|i| index + 64 * i).find(|&e| le64(&bytes, e) as u64 == block).expect("an entry");
    assert_eq!(bytes[entry + 20], 1, "block {block} is stored raw");
    let at = le64(&bytes, entry + 8);
    assert_eq!(u32::from_le_bytes(bytes[entry + 16..entry + 20].try_into().unwrap()) as usize, forged.len());
    bytes[at..at + forged.len()].copy_from_slice(forged);
    let put = |b: &mut Vec<u8>, at: usize, crc: u32| b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    put(&mut bytes, entry + 24, crc32c::crc32c(forged));
    let entry_crc = crc32c::crc32c(&bytes[entry..entry + 60]);
    put(&mut bytes, entry + 60, entry_crc);
    let index_crc = crc32c::crc32c(&bytes[index..index + 64 * count]);
    put(&mut bytes, footer + 48, index_crc);
    let footer_crc = crc32c::crc32c(&bytes[footer..footer + 124]);
    put(&mut bytes, footer + 124, footer_crc);
    std::fs::write(path, &bytes).unwrap();
    at as u64
}

#[test]
fn a_forged_block_whose_crcs_match_reads_eio_unless_hash_checks_are_turned_off() {
    let test = "a_forged_block_whose_crcs_match_reads_eio_unless_hash_checks_are_turned_off";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // noise does not compress: every 4 KiB block is stored raw, on its own
    let (src, repo) = (t.join("d"), t.join("repo"));
    std::fs::write(&src, noise(11, 1 << 20)).unwrap();
    strata(["backup", "-q", "--block-size", "4K", &p(&src), &p(&repo)]).ok();
    let image = repo.join("v00000001.strata");
    let forged = noise(12, 4096);
    let offset = forge_raw_block(&image, 100, &forged);
    let r = strata(["verify", &p(&repo)]).expect_code(1);
    assert!(r.stdout.contains("block 100") || r.stderr.contains("block 100"), "{}{}", r.stdout, r.stderr);
    let src_bytes = std::fs::read(&src).unwrap();

    // checked (the default): EIO for the forged block only, and one log line naming it
    let dir = t.join("checked");
    std::fs::create_dir_all(&dir).unwrap();
    let log = t.join("driver.log");
    let mut child = std::process::Command::new(strata_bin())
        .args(["mount", "--foreground", &p(&repo), &p(&dir)])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let m = StrataMount { dir: dir.clone(), driver_pid: Some(child.id() as i32) };
    for _ in 0..100 {
        if m.path("1/disk.img").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let f = std::fs::File::open(m.path("1/disk.img")).unwrap();
    let mut buf = vec![0u8; 4096];
    for block in 0..256u64 {
        let got = f.read_exact_at(&mut buf, block * 4096);
        if block == 100 {
            assert_eq!(got.unwrap_err().raw_os_error(), Some(libc::EIO), "block {block}");
        } else {
            got.unwrap();
            assert_eq!(&buf[..], &src_bytes[block as usize * 4096..][..4096], "block {block}");
        }
    }
    let dd = tool_status("dd", &[&format!("if={}", p(&m.path("1/disk.img"))), "of=/dev/null", "bs=4M"]);
    assert_ne!(dd.code, Some(0), "dd of a version with a forged block must fail");
    drop(f);
    drop(m);
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    let named = format!("{} (version 1) block 100 at offset {offset}: content hash mismatch", p(&image));
    assert!(log.lines().any(|l| l.contains(&named)), "the driver log names the block:\n{log}");

    // unchecked: the forged bytes are served, as their crc32c says they are sound
    let m = StrataMount::new(&repo, &t.join("unchecked"), &["--no-verify-hashes"]);
    let served = std::fs::read(m.path("1/disk.img")).unwrap();
    assert_eq!(&served[100 * 4096..101 * 4096], &forged[..]);
    assert_eq!(&served[..100 * 4096], &src_bytes[..100 * 4096]);
    assert_eq!(&served[101 * 4096..], &src_bytes[101 * 4096..]);
}

/// The pids of processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if state.contains(") Z ") {
            continue; // a zombie that PID 1 does not reap is not a driver
        }
        if String::from_utf8_lossy(&cmdline).split('\0').any(|arg| arg == needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A mount is handed over when its caller has said "mounted ..."; a caller killed before that
/// (a `timeout strata mount` that gave up) leaves neither a mount nor a driver behind, whatever
/// the driver was doing when the caller died: loading, mounting, or waiting to be taken over.
#[test]
fn a_mount_whose_caller_dies_before_it_is_ready_leaves_no_driver() {
    let test = "a_mount_whose_caller_dies_before_it_is_ready_leaves_no_driver";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, repo) = one_version_repo(t, &[]);
    let mut interrupted = 0;
    for (round, delay_us) in [0u64, 500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 7000, 10_000].into_iter().enumerate()
    {
        let dir = t.join(format!("mnt{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let _guard = StrataMount { dir: dir.clone(), driver_pid: None };
        let caller = Command::new(strata_bin())
            .args(["mount".to_string(), p(&repo), p(&dir)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        // SAFETY: signals the child this test started, by its pid, before reaping it.
        unsafe { libc::kill(caller.id() as i32, libc::SIGKILL) };
        if String::from_utf8_lossy(&caller.wait_with_output().unwrap().stdout).contains("mounted ") {
            continue; // handed over before the kill: the mount is the user's
        }
        interrupted += 1;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&format!(" {} ", p(&dir)));
            let drivers = processes_naming(&p(&dir));
            if !mounted && drivers.is_empty() {
                break;
            }
            let waited = std::time::Instant::now() > deadline;
            assert!(!waited, "killed after {delay_us} us: mounted {mounted}, drivers {drivers:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(interrupted > 0, "every mount was ready before its caller was killed; nothing was tested");
}

#[test]
fn the_demo_runs_the_whole_job_shows_the_mount_and_fits_a_terminal() {
    let test = "the_demo_runs_the_whole_job_shows_the_mount_and_fits_a_terminal";
    if !have_e2fsprogs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("demo");
    let run = strata(["demo", "--keep", &p(&work)]).ok();
    assert_eq!(run.stdout.matches("byte-identical to the disk at its backup").count(), 6, "{}", run.stdout);
    let table: Vec<&str> = run.stdout.lines().skip_while(|l| !l.starts_with("ID ")).take(7).collect();
    assert_eq!(table.len(), 7, "{}", run.stdout);
    for line in &table {
        assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
    }
    if have_fuse(test) {
        assert!(run.stdout.contains("1  2  3  4  5  6  latest"), "{}", run.stdout);
        assert!(run.stdout.contains("identical to /report.txt at backup 6"), "{}", run.stdout);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&p(&work.join("mnt"))), "the demo unmounted: {mounts}");
    } else {
        assert!(run.stdout.contains("mount: skipped"), "{}", run.stdout);
    }
}

/// What `qemu -drive file=MOUNT/N/disk.img,format=raw,snapshot=on` relies on: QEMU opens the
/// read-only image with its writes going to a temporary overlay, reads its own writes back, and
/// the mounted version is unchanged afterwards.
#[test]
fn a_virtual_machine_can_run_a_version_with_its_writes_in_a_throwaway_overlay() {
    let test = "a_virtual_machine_can_run_a_version_with_its_writes_in_a_throwaway_overlay";
    if !have_fuse(test)
        || !capable(test, "qemu-io and qemu-img (qemu-utils)", has_tool("qemu-io") && has_tool("qemu-img"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    write_disk(&disk, 8 << 20, 77, |b| b % 3 != 1);
    let repo = tmp.path().join("repo");
    strata(["backup", "-q", &p(&disk), &p(&repo)]).ok();
    let m = StrataMount::new(&repo, &tmp.path().join("mnt"), &[]);
    let image = p(&m.path("1/disk.img"));

    let snapshot =
        tool("qemu-io", &["-f", "raw", "-s", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k", &image]);
    assert!(snapshot.stdout.contains("wrote 65536/65536 bytes"), "{}{}", snapshot.stdout, snapshot.stderr);
    assert!(!snapshot.stdout.contains("Pattern verification failed"), "{}", snapshot.stdout);
    let after = tool_status("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0xab 0 64k", &image]);
    assert!(after.stdout.contains("Pattern verification failed"), "the mount kept the VM's write: {}", after.stdout);
    let compare = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &image, &p(&disk)]);
    assert!(compare.stdout.contains("Images are identical"), "{}", compare.stdout);
    let direct = tool_status("qemu-io", &["-f", "raw", "-c", "write -P 0xab 0 4k", &image]);
    assert_ne!(direct.code, Some(0), "a write without snapshot=on is refused: {}", direct.stdout);
}

/// Two versions of one XFS file system carry the same UUID; the kernel refuses the second
/// loop mount unless it is told `nouuid`, and a version made while it was mounted only with
/// `norecovery`, as README.md says.
#[test]
fn two_versions_of_an_xfs_file_system_mount_side_by_side_with_nouuid() {
    let test = "two_versions_of_an_xfs_file_system_mount_side_by_side_with_nouuid";
    if !have_fuse(test)
        || !capable(test, "root (loop mounts)", is_root())
        || !capable(test, "mkfs.xfs (xfsprogs)", has_tool("mkfs.xfs"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = t.join("xfs.img");
    std::fs::File::create(&disk).unwrap().set_len(320 << 20).unwrap();
    tool("mkfs.xfs", &["-q", &p(&disk)]);
    let repo = t.join("repo");
    let contents = [text(901, 200_000), text(902, 300_000)];
    for (i, content) in contents.iter().enumerate() {
        {
            let rw = Mounted::mount(&["-o", "loop", &p(&disk)], &t.join("rw"));
            std::fs::write(rw.dir.join(format!("v{}.txt", i + 1)), content).unwrap();
        }
        strata(["backup", "-q", &p(&disk), &p(&repo)]).ok();
    }
    {
        // version 3 is made while the file system is mounted (sector by sector: a used-blocks
        // backup of a live file system is refused): its log needs replaying
        let rw = Mounted::mount(&["-o", "loop", &p(&disk)], &t.join("rw"));
        std::fs::write(rw.dir.join("v3.txt"), b"live").unwrap();
        tool("sync", &[]);
        strata(["backup", "-q", &p(&disk), &p(&repo)]).expect_code(1);
        strata(["backup", "-q", "--sector-by-sector", &p(&disk), &p(&repo)]).ok();
    }
    let m = StrataMount::new(&repo, &t.join("mnt"), &[]);
    let first = Mounted::mount(&["-o", "loop,ro", &p(&m.path("1/disk.img"))], &t.join("x1"));
    assert_eq!(std::fs::read(first.dir.join("v1.txt")).unwrap(), contents[0]);
    assert!(!first.dir.join("v2.txt").exists());

    let second_dir = t.join("x2");
    refuse_to_mount("loop,ro", &m.path("2/disk.img"), &second_dir, "a second XFS with the same UUID");
    let second = Mounted::mount(&["-o", "loop,ro,nouuid", &p(&m.path("2/disk.img"))], &second_dir);
    assert_eq!(std::fs::read(second.dir.join("v2.txt")).unwrap(), contents[1]);
    assert_eq!(std::fs::read(second.dir.join("v1.txt")).unwrap(), contents[0]);

    let live_dir = t.join("x3");
    refuse_to_mount("loop,ro,nouuid", &m.path("3/disk.img"), &live_dir, "an XFS whose log needs replaying");
    let live = Mounted::mount(&["-o", "loop,ro,nouuid,norecovery", &p(&m.path("3/disk.img"))], &live_dir);
    assert_eq!(std::fs::read(live.dir.join("v2.txt")).unwrap(), contents[1]);
}

/// Asserts that `mount -o OPTIONS IMAGE DIR` fails (unmounting again if it did not).
fn refuse_to_mount(options: &str, image: &Path, dir: &Path, what: &str) {
    std::fs::create_dir_all(dir).unwrap();
    if tool_status("mount", &["-o", options, &p(image), &p(dir)]).code == Some(0) {
        let _ = tool_status("umount", &[&p(dir)]);
        panic!("the kernel mounted {what} with -o {options}");
    }
}

/// SEEK_DATA / SEEK_HOLE on a mounted disk.img skip the zero blocks of a version, so that
/// `cp --sparse`, `qemu-img map` and `dd conv=sparse` do not read them.
#[test]
fn seek_data_and_seek_hole_find_the_stored_blocks_of_a_mounted_version() {
    let test = "seek_data_and_seek_hole_find_the_stored_blocks_of_a_mounted_version";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    // 64 KiB blocks: 1 MiB of data at 1 MiB, 256 KiB at 3 MiB, zeros elsewhere (8 MiB).
    write_disk(&disk, 8 << 20, 5, |b| (256..512).contains(&b) || (768..832).contains(&b));
    let repo = tmp.path().join("repo");
    strata(["backup", "-q", &p(&disk), &p(&repo)]).ok();
    let m = StrataMount::new(&repo, &tmp.path().join("mnt"), &[]);
    let f = std::fs::File::open(m.path("1/disk.img")).unwrap();
    let seek = |offset: i64, whence: i32| {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor this test owns.
        let at = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if at < 0 {
            Err(std::io::Error::last_os_error().raw_os_error())
        } else {
            Ok(at)
        }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(1 << 20));
    assert_eq!(seek(1 << 20, libc::SEEK_HOLE), Ok(2 << 20));
    assert_eq!(seek((2 << 20) + 5, libc::SEEK_DATA), Ok(3 << 20));
    assert_eq!(seek((3 << 20) + 7, libc::SEEK_DATA), Ok((3 << 20) + 7));
    assert_eq!(seek(3 << 20, libc::SEEK_HOLE), Ok((3 << 20) + (256 << 10)));
    assert_eq!(seek(4 << 20, libc::SEEK_DATA), Err(Some(libc::ENXIO)));
    assert_eq!(seek(5 << 20, libc::SEEK_HOLE), Ok(5 << 20));
    assert_eq!(seek(8 << 20, libc::SEEK_HOLE), Err(Some(libc::ENXIO)));
    if has_tool("qemu-img") {
        let map = tool("qemu-img", &["map", "--output=json", "-f", "raw", &p(&m.path("1/disk.img"))]).stdout;
        let data_extents = map.matches("\"data\": true").count();
        assert_eq!(data_extents, 2, "{map}");
    }
}
