//! Repositories written by the real earlier releases of strata (tests/fixtures/releases, made by
//! its `make.sh` from this repository's history: a full, an incremental, a differential and an
//! incremental of one small disk per release) still list, verify, restore and mount to the
//! disk as it was at each version, and take a new backup on top of their chains.

use std::path::{Path, PathBuf};

use strata_tests::*;

/// One release's fixture: its version, the repository, and per version id the kind and the
/// SHA-256 of the disk it holds.
struct Fixture {
    release: String,
    repo: PathBuf,
    versions: Vec<(u64, String, String)>,
}

fn fixtures(work: &Path) -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/releases");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let release = dir.file_name().unwrap().to_string_lossy().into_owned();
        // A copy, so that nothing a reader might write lands in the fixtures.
        let repo = work.join(&release);
        tool("cp", &["-r", &p(&dir.join("repo")), &p(&repo)]);
        let manifest = std::fs::read_to_string(dir.join("manifest")).unwrap();
        let versions = manifest
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].to_string(), f[2].to_string())
            })
            .collect();
        found.push(Fixture { release, repo, versions });
    }
    found.sort_by(|a, b| a.release.cmp(&b.release));
    let releases: Vec<&str> = found.iter().map(|f| f.release.as_str()).collect();
    assert_eq!(releases, ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0"], "the fixtures of every earlier release");
    found
}

fn sha256(path: &Path) -> String {
    let out = tool("sha256sum", &[&p(path)]);
    out.stdout.split_whitespace().next().unwrap().to_string()
}

/// The format number in an image's header.
fn image_format(image: &Path) -> u32 {
    let bytes = std::fs::read(image).unwrap();
    let at = strata_format::layout::header::FORMAT_VERSION;
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

#[test]
fn every_release_s_repository_lists_verifies_and_restores_bit_identical() {
    let work = tempfile::tempdir().unwrap();
    let mut formats = Vec::new();
    for f in fixtures(work.path()) {
        let what = format!("repository of strata {}", f.release);
        let rows = list_json(&f.repo);
        assert_eq!(rows.len(), f.versions.len(), "{what}: {rows:?}");
        for (id, kind, digest) in &f.versions {
            let r = row(&rows, *id);
            assert_eq!(r["restorable"], true, "{what}: version {id}: {r}");
            assert!(r["kind"].as_str().unwrap().starts_with(&kind[..4]), "{what}: version {id} is a {kind}: {r}");
            let target = work.path().join(format!("{}-{id}.img", f.release));
            strata(["restore", &p(&f.repo), &id.to_string(), &p(&target)]).ok();
            assert_eq!(&sha256(&target), digest, "{what}: version {id} restores to another disk");
        }
        strata(["verify", &p(&f.repo)]).ok();
        formats.push(image_format(&f.repo.join("v00000001.strata")));
    }
    assert_eq!(formats, [1, 2, 3, 3, 3], "the releases wrote formats 1, 2 and 3");
}

#[test]
fn every_release_s_versions_mount_as_their_disks() {
    if !have_fuse("every_release_s_versions_mount_as_their_disks") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    for f in fixtures(work.path()) {
        let mount = StrataMount::new(&f.repo, &work.path().join(format!("mnt-{}", f.release)), &[]);
        for (id, _, digest) in &f.versions {
            let disk = mount.path(&format!("{id}/disk.img"));
            assert_eq!(&sha256(&disk), digest, "strata {}: version {id} through the mount", f.release);
        }
    }
}

#[test]
fn a_new_backup_builds_on_every_release_s_chain() {
    let work = tempfile::tempdir().unwrap();
    for f in fixtures(work.path()) {
        let (last, _, _) = f.versions.last().unwrap();
        let source = work.path().join(format!("{}-source.img", f.release));
        strata(["restore", &p(&f.repo), &last.to_string(), &p(&source)]).ok();
        let mut bytes = std::fs::read(&source).unwrap();
        bytes[5000..5100].fill(0xA5); // a few bytes of one block: a patch over an old image
        bytes[40_000..48_192].fill(0x5A); // two whole blocks
        std::fs::write(&source, &bytes).unwrap();
        let run = strata(["backup", "--incremental", "--json", &p(&source), &p(&f.repo)]).ok();
        let id = run.json()["id"].as_u64().unwrap();
        assert_eq!(id, last + 1, "strata {}: the next id", f.release);
        assert_restores_to(&f.repo, &id.to_string(), &source, work.path());
        strata(["verify", &p(&f.repo)]).ok();
    }
}
