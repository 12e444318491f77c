//! Patches (format 3; in patch groups, format 4): a block rewritten in a few 4 KiB pages is
//! stored as those pages over its base, the pages of a backup's patches compressed together. The pages must cost about what they are, every version must read back byte for byte
//! through restore and the mount, a merge below a patch must not change what the patch means,
//! and a damaged patch must make exactly the versions that need it unrestorable.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_tests::*;

const PAGE: u64 = 4096;
/// 16 MiB: 256 blocks of 64 KiB.
const SIZE: u64 = 16 << 20;

/// Writes `count` pseudo-random 4 KiB pages at page-aligned places chosen by `seed`.
fn write_pages(disk: &Path, seed: u64, count: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut x = seed | 1;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % (SIZE / PAGE);
        f.write_all_at(&noise(seed ^ i, PAGE as usize), page * PAGE).unwrap();
    }
}

fn backup_json(src: &Path, repo: &Path) -> serde_json::Value {
    strata(["backup", "--json", &p(src), &p(repo)]).ok().json()
}

/// A repository in `dir` holding a full of a disk of noise (`dir/disk`).
fn noise_repo(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let (src, repo) = (dir.join("disk"), dir.join("repo"));
    std::fs::write(&src, noise(seed, SIZE as usize)).unwrap();
    backup_json(&src, &repo);
    (src, repo)
}

fn snapshot(src: &Path, dir: &Path, id: u64) -> PathBuf {
    let copy = dir.join(format!("disk-v{id}"));
    std::fs::copy(src, &copy).unwrap();
    copy
}

#[test]
fn scattered_page_writes_cost_about_their_pages_and_every_version_reads_back() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 1);
    let mut copies = vec![snapshot(&src, t.path(), 1)];
    // v2: 100 pages; v3: 100 more, many in blocks v2 patched already (patch over patch)
    for (id, seed) in [(2u64, 11u64), (3, 12)] {
        write_pages(&src, seed, 100);
        let s = backup_json(&src, &repo);
        let stored = s["stored_bytes"].as_u64().unwrap();
        let changed = s["changed_blocks"].as_u64().unwrap();
        // ~100 new pages of noise; a version made of whole 64 KiB blocks would be ~6 MiB
        let pages_bytes = 100 * PAGE;
        assert!(stored < pages_bytes * 3, "v{id}: {stored} bytes stored for {changed} blocks of 100 page writes");
        assert!(stored >= pages_bytes - 8 * PAGE, "v{id}: {stored} bytes cannot hold 100 pages of noise");
        copies.push(snapshot(&src, t.path(), id));
    }
    for (i, copy) in copies.iter().enumerate() {
        assert_restores_to(&repo, &(i + 1).to_string(), copy, t.path());
    }
    let v = strata(["verify", "--json", &p(&repo)]).ok().json();
    assert_eq!(v["ok"], true, "{v}");
    if have_fuse("scattered_page_writes_cost_about_their_pages_and_every_version_reads_back") {
        let m = StrataMount::new(&repo, &t.path().join("mnt"), &[]);
        for (i, copy) in copies.iter().enumerate() {
            assert!(same_file(&m.path(&format!("{}/disk.img", i + 1)), copy), "mounted v{} differs", i + 1);
        }
    }
}

/// Writes noise over pages `pages` of 64 KiB block `block`.
fn write_block_pages(disk: &Path, seed: u64, block: u64, pages: std::ops::Range<u64>) {
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    for page in pages {
        f.write_all_at(&noise(seed ^ page, PAGE as usize), block * 65536 + page * PAGE).unwrap();
    }
}

#[test]
fn a_first_patch_may_leave_out_one_page_and_a_growing_patch_stops_at_half_the_block() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 5);
    let mut copies = vec![snapshot(&src, t.path(), 1)];
    let mut stored = Vec::new();
    // v2: 15 of block 3's 16 pages over the full's whole block: a patch of 15 pages. v3: one more
    // page of block 3, whose patch would grow to 16: whole. v4: 3 pages of block 9 (a patch);
    // v5: 6 more (a patch of 9 over a patch, past half): whole.
    let steps: [(u64, u64, std::ops::Range<u64>); 4] = [(21, 3, 0..15), (22, 3, 15..16), (23, 9, 0..3), (24, 9, 3..9)];
    for (id, (seed, block, pages)) in (2u64..).zip(steps) {
        write_block_pages(&src, seed, block, pages);
        stored.push(backup_json(&src, &repo)["stored_bytes"].as_u64().unwrap());
        copies.push(snapshot(&src, t.path(), id));
    }
    let pages = |n: u64| n * PAGE;
    assert!((pages(15)..pages(15) + 512).contains(&stored[0]), "v2 stored {} for 15 pages", stored[0]);
    assert!(stored[1] >= pages(16), "v3 stored {}: the block whole", stored[1]);
    assert!((pages(3)..pages(3) + 512).contains(&stored[2]), "v4 stored {} for 3 pages", stored[2]);
    assert!(stored[3] >= pages(16), "v5 stored {}: a patch of 9 over a patch is stored whole", stored[3]);
    for (i, copy) in copies.iter().enumerate() {
        assert_restores_to(&repo, &(i + 1).to_string(), copy, t.path());
    }
}

#[test]
fn a_merge_below_a_patch_leaves_the_patch_meaning_the_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 2);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&src).unwrap();
    let mut original = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut original, 3 * PAGE).unwrap();
    // v2: page 3 of block 0 rewritten; v3: page 3 back as it was in v1, page 5 rewritten. v3's
    // patch must still name page 3, or after v2 is merged into a full (which makes v2's block
    // v3's base) v3 would read v2's page 3.
    f.write_all_at(&noise(20, PAGE as usize), 3 * PAGE).unwrap();
    backup_json(&src, &repo);
    f.write_all_at(&original, 3 * PAGE).unwrap();
    f.write_all_at(&noise(21, PAGE as usize), 5 * PAGE).unwrap();
    backup_json(&src, &repo);
    let v3 = snapshot(&src, t.path(), 3);
    strata(["merge", "-q", &p(&repo), "2"]).ok();
    assert_restores_to(&repo, "3", &v3, t.path());
    let v = strata(["verify", "--json", &p(&repo)]).ok().json();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn a_damaged_patch_makes_exactly_the_versions_that_need_it_unrestorable() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 3);
    write_pages(&src, 30, 1);
    backup_json(&src, &repo); // v2: one patch
                              // v3: a differential, patched against the full, not against v2
    let diff = strata(["backup", "--json", "--differential", &p(&src), &p(&repo)]).ok().json();
    assert_eq!(diff["kind"], "differential");
    write_pages(&src, 31, 1);
    backup_json(&src, &repo); // v4: incremental on v3
                              // The one stored frame of v2 is its patch, right after the 512-byte header.
    flip_byte(&repo.join("v00000002.strata"), 512 + 4);
    let v = strata(["verify", "--json", &p(&repo)]).expect_code(1).json();
    let restorable: Vec<(u64, bool)> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["restorable"] == true))
        .collect();
    assert_eq!(restorable, [(1, true), (2, false), (3, true), (4, true)], "{v}");
    let image2 = v["images"].as_array().unwrap().iter().find(|i| i["version"] == 2).unwrap();
    let problem = image2["problems"][0].as_str().unwrap();
    assert!(problem.contains("v00000002.strata") && problem.contains("block "), "{problem}");
    let r = strata(["restore", &p(&repo), "2", &p(&t.path().join("out"))]).expect_code(1);
    assert!(r.stderr.contains("v00000002.strata"), "{}", r.stderr);
}

/// The index entries of the image at `path` (64 bytes each).
fn index_entries(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let footer = bytes.len() - 128;
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let (index, count) = (le64(footer + 32), le64(footer + 40));
    (0..count).map(|i| bytes[index + 64 * i..index + 64 * (i + 1)].to_vec()).collect()
}

#[test]
fn the_patches_of_a_backup_share_one_frame_and_its_damage_fails_exactly_them() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 6);
    let v1 = snapshot(&src, t.path(), 1);
    // v2: one page of the same noise in each of 100 blocks. Alone, each patch is a page of
    // noise that zstd cannot shrink; in one frame, the copies compress to about one page.
    let page = noise(60, PAGE as usize);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    for block in 0..100u64 {
        f.write_all_at(&page, block * 2 * 65536 + (block % 16) * PAGE).unwrap();
    }
    let s = backup_json(&src, &repo);
    let stored = s["stored_bytes"].as_u64().unwrap();
    assert!(stored < 10 * PAGE, "{stored} bytes stored for 100 copies of one page: each patch compressed alone?");
    let v2 = snapshot(&src, t.path(), 2);
    let image = repo.join("v00000002.strata");
    let entries = index_entries(&image);
    assert_eq!(entries.len(), 100);
    let offset = |e: &[u8]| u64::from_le_bytes(e[8..16].try_into().unwrap());
    for (slot, e) in entries.iter().enumerate() {
        assert_eq!((e[20], e[23], offset(e)), (5, slot as u8, offset(&entries[0])), "entry {slot}: one patch group");
    }
    assert_restores_to(&repo, "2", &v2, t.path());
    if have_fuse("the_patches_of_a_backup_share_one_frame_and_its_damage_fails_exactly_them") {
        let m = StrataMount::new(&repo, &t.path().join("mnt"), &[]);
        assert!(same_file(&m.path("2/disk.img"), &v2), "mounted v2 differs");
    }

    flip_byte(&image, offset(&entries[0]) + 7);
    let v = strata(["verify", "--json", &p(&repo)]).expect_code(1).json();
    let image2 = v["images"].as_array().unwrap().iter().find(|i| i["version"] == 2).unwrap();
    assert_eq!(image2["bad_blocks"], 100, "every patch of the group, nothing else: {v}");
    let restorable: Vec<bool> = v["versions"].as_array().unwrap().iter().map(|r| r["restorable"] == true).collect();
    assert_eq!(restorable, [true, false], "{v}");
    let r = strata(["restore", &p(&repo), "2", &p(&t.path().join("out"))]).expect_code(1);
    assert!(r.stderr.contains("v00000002.strata") && r.stderr.contains("block "), "{}", r.stderr);
    assert_restores_to(&repo, "1", &v1, t.path());
}

#[test]
fn a_patch_laid_over_the_wrong_parts_is_found_by_verify() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 4);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(40, PAGE as usize), 3 * PAGE).unwrap();
    backup_json(&src, &repo); // v2: one patch of block 0, part 3, in a patch group
                              // Move the patch to part 4: its slot still holds one part and every crc is made to match,
                              // so only the content hash over the base can tell.
    let v2 = repo.join("v00000002.strata");
    let mut bytes = std::fs::read(&v2).unwrap();
    let footer = bytes.len() - 128;
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let (index, count) = (le64(footer + 32), le64(footer + 40));
    let entry = (0..count).map(|i| index + 64 * i).find(|&e| bytes[e + 20] == 5).expect("a patch entry");
    assert_eq!(&bytes[entry + 21..entry + 23], &(1u16 << 3).to_le_bytes());
    bytes[entry + 21..entry + 23].copy_from_slice(&(1u16 << 4).to_le_bytes());
    let entry_crc = crc32c::crc32c(&bytes[entry..entry + 60]);
    bytes[entry + 60..entry + 64].copy_from_slice(&entry_crc.to_le_bytes());
    let index_crc = crc32c::crc32c(&bytes[index..index + 64 * count]);
    bytes[footer + 48..footer + 52].copy_from_slice(&index_crc.to_le_bytes());
    let footer_crc = crc32c::crc32c(&bytes[footer..footer + 124]);
    bytes[footer + 124..].copy_from_slice(&footer_crc.to_le_bytes());
    std::fs::write(&v2, &bytes).unwrap();

    let quick = strata(["verify", "--quick", "--json", &p(&repo)]).ok().json();
    assert_eq!(quick["ok"], true, "indexes and digests alone cannot see it: {quick}");
    let v = strata(["verify", "--json", &p(&repo)]).expect_code(1).json();
    let image2 = v["images"].as_array().unwrap().iter().find(|i| i["version"] == 2).unwrap();
    assert_eq!((image2["sound"].clone(), image2["bad_blocks"].clone()), (false.into(), 1.into()), "{v}");
    assert!(image2["problems"][0].as_str().unwrap().contains("block 0"), "{v}");
    let restorable: Vec<bool> = v["versions"].as_array().unwrap().iter().map(|r| r["restorable"] == true).collect();
    assert_eq!(restorable, [true, false], "{v}");
}

#[test]
fn a_rotted_parent_block_is_marked_damaged_and_later_backups_go_on() {
    let t = tempfile::tempdir().unwrap();
    let (src, repo) = noise_repo(t.path(), 5);
    let block_5 = 5 * 16 * PAGE;
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(50, 16 * PAGE as usize), block_5).unwrap();
    let v2 = backup_json(&src, &repo);
    assert_eq!((v2["id"].as_u64(), v2["changed_blocks"].as_u64()), (Some(2), Some(1)));
    // v2 holds one frame, block 5 whole (noise does not compress), right after its header: rot it
    flip_byte(&repo.join("v00000002.strata"), 512 + 20);
    // the next backup patches one page of block 5 over that frame, so it must read it
    f.write_all_at(&noise(51, PAGE as usize), block_5 + 3 * PAGE).unwrap();
    let run = strata(["backup", "--json", &p(&src), &p(&repo)]).ok();
    assert!(run.stderr.contains("version 2 is damaged"), "{}", run.stderr);
    let v3 = run.json();
    assert_eq!(v3["id"], 3);
    assert_eq!(v3["parent"], 1, "v3 builds on the sound version 1: {v3}");
    assert!(v3["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("version 2 is damaged")));
    assert_restores_to(&repo, "3", &src, t.path());
    // and the backups after it go on as usual
    write_pages(&src, 52, 10);
    let v4 = backup_json(&src, &repo);
    assert_eq!((v4["id"].as_u64(), v4["parent"].as_u64()), (Some(4), Some(3)));
    assert_restores_to(&repo, "4", &src, t.path());
    let verify = strata(["verify", &p(&repo)]).expect_code(1);
    assert!(verify.stdout.contains("version 2: NOT restorable"), "{}", verify.stdout);
    assert!(verify.stdout.contains("versions 3-4: restorable"), "{}", verify.stdout);
}
