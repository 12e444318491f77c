//! Header, footer, index-entry and key-slots-file decoding on arbitrary bytes: never a panic
//! (`strata_format::fuzzing::decode_structures`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_format::fuzzing::decode_structures(data);
});
