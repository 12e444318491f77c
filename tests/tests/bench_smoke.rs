//! The benchmark harness (tests/bench/) on a tiny dataset against qcow2+zstd, so that the
//! documented benchmark command keeps working: every phase runs, every mount and restore is
//! byte-identical to its source, and the report has every table. Figures are not checked here
//! (speed targets live in the benchmark report, not in tests).

use std::path::Path;

use strata_tests::*;

#[test]
fn benchmark_harness_runs_every_phase_and_every_copy_compares_equal() {
    let test = "benchmark_harness_runs_every_phase_and_every_copy_compares_equal";
    let tools = ["python3", "qemu-img", "qemu-storage-daemon", "zstd", "b3sum", "mkfs.ext4"];
    let have_all = tools.iter().all(|t| has_tool(t)) && Path::new("/usr/bin/time").exists();
    if !capable(test, "root (loop mounts, dropping caches)", is_root())
        || !have_fuse(test)
        || !capable(test, "python3, qemu-utils, zstd, b3sum, e2fsprogs and GNU time", have_all)
    {
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let report = tmp.path().join("report.md");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::process::Command::new("python3")
        .arg(root.join("tests/bench/bench.py"))
        .args(["--smoke", "--runs", "1", "--tools", "strata,qcow2", "--work"])
        .arg(tmp.path().join("work"))
        .arg("--strata")
        .arg(strata_bin())
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench.py failed:\n{stderr}");
    let text = std::fs::read_to_string(&report).unwrap();
    for section in [
        "## Dataset",
        "## Backups",
        "## Mounts",
        "## Restores",
        "## Targets",
        "## strata: block sizes",
        "## strata: chain depth, scattered writes",
        "## strata: chain depth, clustered writes",
    ] {
        assert!(text.contains(section), "report lacks {section}:\n{text}");
    }
    assert!(!text.contains("**NO**"), "a mount or restore differs from its source:\n{text}");
    // strata and qcow2 mounted and restored, both depth chains mounted at 1 and 10, all compared
    assert_eq!(text.matches("| yes |").count(), 8, "{text}");
}
