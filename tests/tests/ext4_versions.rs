//! A real ext4 disk image changes between backups (full, incr, incr, diff, incr, diff), backed
//! up sector by sector; every version restores byte-identical to the disk as it was, passes e2fsck, and its files read back
//! equal to what was written.

use std::path::Path;

use strata_tests::*;

#[test]
fn every_version_of_an_ext4_disk_restores_byte_identical() {
    if !have_e2fsprogs("every_version_of_an_ext4_disk_restores_byte_identical") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let files = t.join("files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    // real files from this machine, plus generated ones
    for (i, src) in ["/etc/passwd", "/etc/os-release", "/etc/services", "/etc/hostname"].iter().enumerate() {
        if let Ok(data) = std::fs::read(src) {
            std::fs::write(files.join("etc").join(format!("f{i}")), data).unwrap();
        }
    }
    for i in 0..30u64 {
        std::fs::write(files.join(format!("doc{i}.txt")), text(i, 3000 + (i as usize * 7919) % 200_000)).unwrap();
    }
    let disk = t.join("disk.img");
    let repo = t.join("repo");
    mkfs_ext4(&disk, "48M", &files);

    // (flag, debugfs commands before the backup, a file whose content we then check)
    let steps: [(&str, &str, &str); 6] = [
        ("", "", "/doc5.txt"),
        ("", "write {D}/new1 /new1.txt\nrm /doc3.txt\n", "/new1.txt"),
        ("--incremental", "write {D}/new2 /new2.txt\nmkdir /dir\nwrite {D}/new1 /dir/copy.txt\n", "/dir/copy.txt"),
        ("--differential", "rm /new1.txt\nwrite {D}/new3 /new1.txt\n", "/new1.txt"),
        ("", "write {D}/new4 /big.txt\n", "/big.txt"),
        ("--differential", "rm /big.txt\nwrite {D}/new5 /doc9.txt.v2\n", "/doc9.txt.v2"),
    ];
    let kinds = ["full", "incremental", "incremental", "differential", "incremental", "differential"];
    let parents = [None, Some(1), Some(2), Some(1), Some(4), Some(1)];
    let data_dir = t.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut expected_files = Vec::new();
    for (i, (flag, cmds, check)) in steps.iter().enumerate() {
        for n in 1..=5u64 {
            std::fs::write(data_dir.join(format!("new{n}")), text(100 * i as u64 + n, 10_000 + 40_000 * n as usize))
                .unwrap();
        }
        if !cmds.is_empty() {
            debugfs_w(&disk, &cmds.replace("{D}", &p(&data_dir)));
        }
        let state = t.join(format!("state{}.img", i + 1));
        std::fs::copy(&disk, &state).unwrap();
        expected_files.push((check.to_string(), debugfs_cat(&disk, check)));
        // every byte, so that each version restores byte-identical to the disk as it was, deleted
        // data included (used_blocks.rs has the used-blocks chain of an aged ext4)
        let mut args = vec!["backup", "--json", "--sector-by-sector"];
        if !flag.is_empty() {
            args.push(flag);
        }
        let (d, r) = (p(&disk), p(&repo));
        args.extend([d.as_str(), r.as_str()]);
        let summary = strata(&args).ok().json();
        assert_eq!(summary["id"], i as u64 + 1);
        assert_eq!(summary["kind"], kinds[i], "step {}", i + 1);
    }
    assert!(expected_files.iter().all(|(_, c)| !c.is_empty()), "debugfs read the files");

    let rows = list_json(&repo);
    assert_eq!(rows.len(), 6);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["kind"], kinds[i]);
        assert_eq!(r["parent"], serde_json::json!(parents[i]));
        assert_eq!(r["restorable"], true);
        assert_eq!(r["problem"], serde_json::Value::Null);
        assert_eq!(r["source_size"], 48u64 << 20);
        assert_eq!(r["block_size"], 65536);
        assert_eq!(r["file"], format!("v{:08}.strata", i + 1));
        assert!(r["created"].as_str().unwrap().ends_with('Z'));
        for key in ["label", "changed_blocks", "stored_bytes"] {
            assert!(r.get(key).is_some(), "list --json lacks {key}");
        }
    }
    // deltas store far less than the full
    let full_stored = rows[0]["stored_bytes"].as_u64().unwrap();
    assert!(rows[1]["stored_bytes"].as_u64().unwrap() * 4 < full_stored);

    let verify = strata(["verify", &p(&repo)]).ok();
    assert!(verify.stdout.contains("everything checked is sound"), "{}", verify.stdout);

    for (i, (check, content)) in expected_files.iter().enumerate() {
        let id = i + 1;
        let out = t.join(format!("restored{id}.img"));
        let run = strata(["restore", &p(&repo), &id.to_string(), &p(&out)]).ok();
        assert!(run.stdout.contains("digest verified"), "{}", run.stdout);
        assert!(same_file(&out, &t.join(format!("state{id}.img"))), "version {id} differs from the disk at its backup");
        e2fsck_clean(&out);
        assert_eq!(&debugfs_cat(&out, check), content, "version {id}: {check} differs");
    }
    // `latest` names the newest restorable version
    let latest = t.join("latest.img");
    strata(["restore", &p(&repo), "latest", &p(&latest)]).ok();
    assert!(same_file(&latest, &t.join("state6.img")));

    let info = strata(["info", "--json", &p(&repo), "5"]).ok().json();
    assert_eq!(info["chain"], serde_json::json!([1, 4, 5]));
    assert_eq!(info["kind"], "incremental");
    assert!(Path::new(&p(&repo)).join("v00000005.strata").exists());
}
