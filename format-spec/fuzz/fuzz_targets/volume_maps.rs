//! The volume analysis (partition tables and every file system's allocation map) on arbitrary
//! disks: never a panic, and what it calls unused is sorted, disjoint, inside the disk and
//! inside a region it recognized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_format::volume::analyse;

fuzz_target!(|data: &[u8]| {
    let disk = data.to_vec();
    let analysis = analyse(&disk, disk.len() as u64);
    let mut last_end = 0;
    for &(start, end) in analysis.unused() {
        assert!(start >= last_end && start < end && end <= disk.len() as u64, "{start}..{end}");
        let inside = analysis
            .regions
            .iter()
            .any(|r| r.kept_whole.is_none() && r.start <= start && end <= r.start + r.len);
        assert!(inside, "unused {start}..{end} outside every region read by its used blocks");
        last_end = end;
    }
    for r in &analysis.regions {
        assert!(r.kept_whole.is_none() || r.unused_bytes == 0);
    }
});
