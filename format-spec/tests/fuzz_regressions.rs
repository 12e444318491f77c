//! Every input a fuzzer ever crashed on, kept in tests/fuzz-regressions/, and the
//! `decode_structures`, `open_image` and `open_repository` corpora, decoded, opened and read the
//! way those fuzz targets do (`strata_format::fuzzing`): each must end in data or an error,
//! never a panic or an abort.

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
    let dir = root.join("fuzz/corpus/open_repository");
    let _ = replay(&dir, |data| {
        strata_format::fuzzing::open_repository_and_read(data);
    });
    // A full and two incrementals whose patches are in patch groups (4 KiB blocks), made by
    // strata 0.6.0: the seed that brings the fuzzer to patches laid over their bases.
    let seed = std::fs::read(dir.join(PATCH_GROUP_SEED)).unwrap();
    assert_eq!(strata_format::fuzzing::open_repository_and_read(&seed), 3, "the patch group seed reads");
}

/// Runs `f` on every input in `dir`, which must hold some; returns how many.
fn replay(dir: &std::path::Path, mut f: impl FnMut(&[u8])) -> usize {
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        f(&std::fs::read(entry.unwrap().path()).unwrap());
        seen += 1;
    }
    assert!(seen > 0, "no inputs in {}", dir.display());
    seen
}

const PATCH_GROUP_SEED: &str = "539122ed83545a79bfc91256c380ee1dc10ea89e";

/// A key slots file with a passphrase slot and a key file slot, as strata renders it.
const KEY_SLOTS_SEED: &str = "fae6ef8084bad70ea2b64bcccbf293feca572b9e";

#[test]
fn the_structure_corpus_decodes_without_panic_and_holds_a_key_slots_file() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_structures");
    let seen = replay(&dir, |data| {
        strata_format::fuzzing::decode_structures(data);
    });
    assert!(seen > 1, "no inputs in {}", dir.display());
    let seed = std::fs::read(dir.join(KEY_SLOTS_SEED)).unwrap();
    assert!(strata_format::fuzzing::decode_structures(&seed), "the key slots seed parses");
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
