//! Images that declare a huge source and store a few blocks: what `list`, `verify`, `restore`
//! and the mount cost is bounded by what the files hold, not by the size their headers declare
//! (a few hundred bytes of image must not make strata allocate gigabytes or take minutes).

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_format::block::hash_block;
use strata_format::digest::{zero_block_hash, SourceDigest};
use strata_format::header::new_id;
use strata_format::{Encoding, Finish, ImageHeader, ImageRef, ImageWriter, Kind, Repository, Rule};
use strata_tests::*;

const BS: u32 = 64 << 10;
/// 16 TiB: a dense block map of it is 2 GiB.
const SIZE: u64 = 16 << 40;
const LAST: u64 = SIZE / BS as u64 - 1;
const MIDDLE: u64 = LAST / 2;
/// Peak memory allowed to any process below (it needs a few MiB).
const MAX_RSS_KIB: i64 = 100 * 1024;
/// Time allowed to any process below (a hang, not a speed target).
const TIMEOUT: Duration = Duration::from_secs(300);

fn block(seed: u64) -> Vec<u8> {
    text(seed, BS as usize)
}

/// Writes `versions` versions of a 16 TiB source into a new repository at `repo`: a full storing
/// blocks 0 and the last; version 2 zeroes block 0, writes a block in the middle and patches
/// the first part of the last block; each later one rewrites the last block. Returns the last
/// block of each version.
fn craft(repo: &Path, versions: u64) -> Vec<Vec<u8>> {
    let repository = Repository::create(repo, BS).unwrap();
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    let mut blocks: Vec<(u64, Vec<u8>)> = vec![(0, block(1)), (LAST, block(2))];
    let mut parent: Option<ImageRef> = None;
    let mut full = None;
    let mut last_blocks = Vec::new();
    for id in 1..=versions {
        let image_id = new_id();
        let this = ImageRef { version: id, image_id };
        let header = ImageHeader {
            repo_id: repository.repo_id,
            image_id,
            version: id,
            kind: if id == 1 { Kind::Full } else { Kind::Incremental },
            rule: Rule::Requested,
            parent,
            full: full.unwrap_or(this),
            block_size: BS,
            compression_level: 3,
            source_size: SIZE,
            created_secs: 1_700_000_000 + id as i64,
            created_nanos: 0,
            label: format!("16 TiB, version {id}"),
            source: "crafted".into(),
            source_id: None,
            selection: Default::default(),
        };
        let mut w = ImageWriter::create(&repository.image_path(id), header).unwrap();
        let store = |w: &mut ImageWriter, c: &mut zstd::bulk::Compressor, b: u64, bytes: &[u8]| {
            let frame = c.compress(bytes).unwrap();
            w.append_block(b, Encoding::Zstd, &frame, hash_block(bytes)).unwrap();
        };
        match id {
            1 => blocks.iter().for_each(|(b, bytes)| store(&mut w, &mut compressor, *b, bytes)),
            2 => {
                w.append_zero(0, zero_block_hash(BS)).unwrap();
                store(&mut w, &mut compressor, MIDDLE, &block(3));
                let mut patched = blocks[1].1.clone();
                let part = BS as usize / 16;
                patched[..part].copy_from_slice(&block(4)[..part]);
                let frame = compressor.compress(&patched[..part]).unwrap();
                w.append_patch(LAST, 1, &frame, hash_block(&patched)).unwrap();
                blocks = vec![(MIDDLE, block(3)), (LAST, patched)];
            }
            _ => {
                blocks[1].1 = block(id * 10);
                store(&mut w, &mut compressor, LAST, &blocks[1].1);
            }
        }
        let mut digest = SourceDigest::new(SIZE, BS);
        let mut next = 0;
        for (b, bytes) in &blocks {
            digest.push_repeated(&zero_block_hash(BS), b - next);
            digest.push(&hash_block(bytes));
            next = b + 1;
        }
        digest.push_repeated(&zero_block_hash(BS), LAST + 1 - next);
        let finish = Finish { present_blocks: blocks.len() as u64, source_digest: digest.finish() };
        w.finish(finish).unwrap();
        last_blocks.push(blocks[1].1.clone());
        parent = Some(this);
        full = full.or(Some(this));
    }
    last_blocks
}

/// What one measured run of strata gave.
struct Measured {
    code: i32,
    stdout: String,
    stderr: String,
    peak_rss_kib: i64,
    seconds: f64,
}

/// Runs `strata ARGS...` to its end (killed after `TIMEOUT`), with its peak RSS from wait4.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, or killed and reaped on timeout
fn measured(args: &[&str]) -> Measured {
    let started = Instant::now();
    let mut child =
        Command::new(strata_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 polls and reaps the child this test spawned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid {
            break;
        }
        if started.elapsed() > TIMEOUT {
            // SAFETY: signals the child this test started, by its pid, then reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!("strata {args:?} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let m = Measured {
        code,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        peak_rss_kib: usage.ru_maxrss,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("strata {}: exit {code}, peak RSS {} KiB, {:.2} s", args[0], m.peak_rss_kib, m.seconds);
    m
}

fn expect_small_and_ok(m: &Measured, what: &str) {
    assert!(!m.stderr.contains("panicked"), "{what} panicked:\n{}", m.stderr);
    assert_eq!(m.code, 0, "{what} failed:\n{}{}", m.stdout, m.stderr);
    assert!(m.peak_rss_kib < MAX_RSS_KIB, "{what} peaked at {} KiB", m.peak_rss_kib);
}

#[test]
fn a_tiny_image_declaring_16_tib_is_listed_verified_and_restored_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    craft(&repo, 2);
    let bytes: u64 = std::fs::read_dir(&repo).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(bytes < 1 << 20, "the repository holds {bytes} bytes");

    let list = measured(&["list", "--json", &p(&repo)]);
    expect_small_and_ok(&list, "list");
    let rows: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    for id in [1, 2] {
        assert_eq!(row(rows.as_array().unwrap(), id)["restorable"], true, "{rows}");
    }
    let verify = measured(&["verify", &p(&repo)]);
    expect_small_and_ok(&verify, "verify");
    assert!(verify.stdout.contains("versions 1-2: restorable, digest verified"), "{}", verify.stdout);
    let restore = measured(&["restore", "-q", &p(&repo), "2", "/dev/null"]);
    expect_small_and_ok(&restore, "restore to /dev/null");
}

#[test]
fn mounting_versions_that_declare_16_tib_each_keeps_the_driver_small() {
    let test = "mounting_versions_that_declare_16_tib_each_keeps_the_driver_small";
    if !have_fuse(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let versions = 6;
    let last_blocks = craft(&repo, versions);
    let m = StrataMount::new(&repo, &tmp.path().join("mnt"), &[]);
    let pid = m.driver_pid.expect("strata mount reports the driver pid");
    for (id, want) in (1..=versions).zip(&last_blocks) {
        let disk = std::fs::File::open(m.path(&format!("{id}/disk.img"))).unwrap();
        assert_eq!(disk.metadata().unwrap().len(), SIZE);
        let mut got = vec![0u8; BS as usize];
        disk.read_exact_at(&mut got, LAST * BS as u64).unwrap();
        assert!(got == *want, "the last block of version {id} differs");
        let mut first = vec![1u8; BS as usize];
        disk.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first.iter().any(|&b| b != 0), id == 1, "block 0 of version {id}");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap();
    eprintln!("peak RSS of the mount driver with {versions} versions of 16 TiB: {hwm} KiB");
    assert!(hwm < MAX_RSS_KIB, "the mount driver peaked at {hwm} KiB");
}
