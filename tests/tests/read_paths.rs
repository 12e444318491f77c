//! How backup reads its source must not change what it records: data already in the page cache
//! is hashed through a memory map, cold data is read with pread, holes are not read at all and
//! blocks that are partly holes (or end the source) are read and padded. The same source backed
//! up while cached and after its pages were dropped gives the same versions, and each restores
//! byte for byte. Restore writes its target past the page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use strata_tests::*;

const BLOCK: u64 = 64 << 10;
/// Several 8 MiB batches and a last block that is not whole.
const SIZE: u64 = 40 * BLOCK * 16 + 12345;

/// A sparse source whose blocks cycle through: whole data, a hole, data in two 4 KiB pieces with
/// holes between, written zeros, whole data again.
fn sparse_source(path: &Path, seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for b in 0..SIZE.div_ceil(BLOCK) {
        let at = b * BLOCK;
        let whole = (SIZE - at).min(BLOCK) as usize;
        match b % 5 {
            0 | 4 => f.write_all_at(&text(seed + b, whole), at).unwrap(),
            2 if whole == BLOCK as usize => {
                f.write_all_at(&text(seed ^ b, 4096), at).unwrap();
                f.write_all_at(&text(seed + 7 * b, 4096), at + 32 * 1024).unwrap();
            }
            3 => f.write_all_at(&vec![0u8; whole], at).unwrap(),
            _ => {}
        }
    }
    f.sync_all().unwrap();
}

/// Drops the file's pages from the page cache (they are clean: written and synced).
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: advisory call on a descriptor we own.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    assert_eq!(resident_pages(&f), 0, "{} still has pages in the page cache", p(path));
}

/// Pages of the file in the page cache (mincore over a map of it).
fn resident_pages(f: &File) -> usize {
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a private read-only map of the whole file, unmapped below; mincore writes one
    // byte per page into `pages`.
    unsafe {
        let base = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(base, libc::MAP_FAILED);
        let mut pages = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(base, len, pages.as_mut_ptr()), 0);
        libc::munmap(base, len);
        pages.iter().filter(|p| *p & 1 == 1).count()
    }
}

fn backup(source: &Path, repo: &Path) -> serde_json::Value {
    strata(["backup", "--json", &p(source), &p(repo)]).ok().json()
}

fn digest(repo: &Path, version: &str) -> serde_json::Value {
    let rows = list_json(repo);
    let id: u64 = version.parse().unwrap();
    row(&rows, id)["source_digest"].clone()
}

#[test]
fn cached_cold_and_sparse_sources_give_the_same_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("disk.img");
    sparse_source(&src, 1);
    let (cached, cold) = (t.join("cached"), t.join("cold"));

    let _ = std::fs::read(&src).unwrap();
    let a = backup(&src, &cached);
    evict(&src);
    let b = backup(&src, &cold);
    for key in ["changed_blocks", "stored_bytes", "bytes_read"] {
        assert_eq!(a[key], b[key], "{key} of the full differs between a cached and a cold source");
    }
    assert_eq!(digest(&cached, "1"), digest(&cold, "1"));

    // Change whole blocks, a hole, a piece of a partly-hole block and the tail.
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    for b in [0u64, 1, 7, 12, 300, 639] {
        f.write_all_at(&text(99 + b, 5000), b * BLOCK + 100).unwrap();
    }
    f.write_all_at(b"tail", SIZE - 4).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let _ = std::fs::read(&src).unwrap();
    let a = backup(&src, &cached);
    evict(&src);
    let b = backup(&src, &cold);
    assert_eq!(a["kind"], "incremental");
    for key in ["changed_blocks", "stored_bytes"] {
        assert_eq!(a[key], b[key], "{key} of the incremental differs between a cached and a cold source");
    }
    assert_eq!(a["changed_blocks"], 7);
    assert_eq!(digest(&cached, "2"), digest(&cold, "2"));
    assert_restores_to(&cached, "2", &src, t);
    assert_restores_to(&cold, "2", &src, t);
}

#[test]
fn restore_writes_its_target_past_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (src, repo, out) = (t.join("disk.img"), t.join("repo"), t.join("restored.img"));
    sparse_source(&src, 3);
    backup(&src, &repo);
    let r = strata(["restore", "--json", &p(&repo), "1", &p(&out)]).ok().json();
    assert_eq!(r["digest_verified"], true);
    // SAFETY: statfs of a path we own into a zeroed struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let dir = std::ffi::CString::new(t.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::statfs(dir.as_ptr(), &mut fs) }, 0);
    if fs.f_type == 0xEF53 {
        assert_eq!(r["direct_io"], true, "a restore onto ext4 writes with O_DIRECT");
        // only the page that holds the last 57 bytes (not a whole page) went through the cache
        let resident = resident_pages(&File::open(&out).unwrap());
        assert!(resident <= 1, "{resident} pages of the restored file in the page cache");
    } else {
        eprintln!("skipped the page-cache check: {} is not on ext4", p(t));
    }
    assert!(same_file(&out, &src), "the restored file differs from its source");
}

#[test]
fn restore_to_a_pipe_streams_every_byte_in_order() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = (t.path().join("disk"), t.path().join("repo"));
    sparse_source(&src, 21);
    backup(&src, &repo);
    let out = std::process::Command::new(strata_bin())
        .args(["restore", &p(&repo), "1", "/dev/stdout"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len() as u64, SIZE);
    assert!(out.stdout == std::fs::read(&src).unwrap(), "the stream differs from the source");
    // and through a shell pipeline into a reader that takes its time
    let piped = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' restore -q '{}' 1 /dev/stdout | (sleep 0.2; cat) > '{}'",
            p(&strata_bin()),
            p(&repo),
            p(&t.path().join("copy"))
        ))
        .status()
        .unwrap();
    assert!(piped.success());
    assert!(same_file(&src, &t.path().join("copy")));
}
