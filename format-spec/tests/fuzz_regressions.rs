//! Every input a fuzzer ever crashed on, kept in tests/fuzz-regressions/ and opened the way the
//! `open_image` fuzz target does: each must end in data or an error, never a panic or an abort.

use std::sync::Arc;

use strata_format::{ImageFile, ReadScratch, VersionReader};

#[test]
fn fuzz_crashes_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let input = entry.unwrap().path();
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("v00000001.strata");
        std::fs::copy(&input, &path).unwrap();
        seen += 1;
        let Ok(image) = ImageFile::open(&path) else { continue };
        let _ = image.check_index();
        let Ok(reader) = VersionReader::from_chain(vec![Arc::new(image)]) else { continue };
        if reader.block_count() <= 4096 {
            let mut out = vec![0u8; reader.block_size() as usize];
            for b in 0..reader.block_count() {
                let _ = reader.read_block(b, &mut ReadScratch::new(), &mut out);
            }
        }
    }
    assert!(seen > 0, "no regression inputs in {}", dir.display());
}
