//! Block devices as source and target (through losetup; needs root): the size comes from the
//! device, restore writes every byte, and restore refuses a device that is too small, mounted,
//! or holds data without --force.

use strata_tests::*;

fn root_and_tools(test: &str) -> bool {
    capable(test, "root (loop devices)", is_root())
        && capable(test, "losetup and mount", has_tool("losetup") && has_tool("mount"))
        && have_e2fsprogs(test)
}

#[test]
fn loop_device_backs_up_and_restores_onto_another_device() {
    if !root_and_tools("loop_device_backs_up_and_restores_onto_another_device") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let files = t.join("files");
    std::fs::create_dir_all(&files).unwrap();
    for i in 0..10u64 {
        std::fs::write(files.join(format!("f{i}")), text(i, 50_000)).unwrap();
    }
    let img = t.join("src.img");
    mkfs_ext4(&img, "24M", &files);
    let src = LoopDevice::attach(&img);
    let repo = t.join("repo");
    let s = strata(["backup", "--json", &p(&src.path), &p(&repo)]).ok().json();
    assert_eq!(s["source_size"], 24u64 << 20, "size from BLKGETSIZE64");
    // change it through the device, back up an incremental
    debugfs_w(&src.path, &format!("write {} /extra\n", p(&files.join("f3"))));
    let s2 = strata(["backup", "--json", &p(&src.path), &p(&repo)]).ok().json();
    assert_eq!(s2["kind"], "incremental");
    let snapshot = t.join("snapshot.img");
    std::fs::copy(&img, &snapshot).unwrap();

    // a same-size device holding data: refused without --force, then restored with it
    let target_file = t.join("target.img");
    write_disk(&target_file, 24 << 20, 77, |_| true);
    let target = LoopDevice::attach(&target_file);
    let r = strata(["restore", &p(&repo), "2", &p(&target.path)]).expect_code(1);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    strata(["restore", "--force", &p(&repo), "2", &p(&target.path)]).ok();
    drop(target);
    assert!(same_file(&target_file, &snapshot), "device restore is byte-identical, zeros included");
    e2fsck_clean(&target_file);

    // too small a device
    let small_file = t.join("small.img");
    std::fs::File::create(&small_file).unwrap().set_len(8 << 20).unwrap();
    let small = LoopDevice::attach(&small_file);
    let r = strata(["restore", "--force", &p(&repo), "2", &p(&small.path)]).expect_code(1);
    assert!(r.stderr.contains("less than the version's"), "{}", r.stderr);

    // a mounted device
    let mounted_file = t.join("mounted.img");
    mkfs_ext4(&mounted_file, "32M", &files);
    let dev = LoopDevice::attach(&mounted_file);
    let mnt = Mounted::mount(&[&p(&dev.path)], &t.join("mnt"));
    let r = strata(["restore", "--force", &p(&repo), "2", &p(&dev.path)]).expect_code(1);
    assert!(r.stderr.contains("mounted"), "{}", r.stderr);
    drop(mnt);
}
