//! Every input a fuzzer ever crashed on, kept in tests/fuzz-regressions/, and the `open_image`
//! seed corpus, opened and read the way the `open_image` fuzz target does
//! (`strata_format::fuzzing::open_and_read`): each must end in data or an error, never a panic
//! or an abort.

#[test]
fn fuzz_crashes_and_the_image_corpus_stay_fixed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for folder in ["tests/fuzz-regressions", "fuzz/corpus/open_image"] {
        let dir = root.join(folder);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let work = tempfile::tempdir().unwrap();
            let path = work.path().join("v00000001.strata");
            std::fs::copy(entry.unwrap().path(), &path).unwrap();
            strata_format::fuzzing::open_and_read(&path);
            seen += 1;
        }
        assert!(seen > 0, "no inputs in {}", dir.display());
    }
}

/// The `volume_maps` seed corpus holds what its names say, and the fuzz target's invariant
/// holds on it: unused ranges sorted, disjoint and inside a region read by its used blocks.
#[test]
fn volume_seeds_are_recognized_and_keep_the_fuzz_invariant() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/volume_maps");
    for (name, file_system) in [("ext2", "ext2"), ("fat12", "vfat"), ("swap", "swap")] {
        let disk = std::fs::read(dir.join(name)).unwrap();
        let analysis = strata_format::volume::analyse(&disk, disk.len() as u64);
        let region = &analysis.regions[0];
        assert_eq!((region.file_system, &region.kept_whole), (Some(file_system), &None), "{name}");
        assert!(analysis.unused_bytes() > 0, "{name}");
        let mut last_end = 0;
        for &(start, end) in analysis.unused() {
            assert!(start >= last_end && start < end && end <= disk.len() as u64, "{name}: {start}..{end}");
            last_end = end;
        }
    }
}
