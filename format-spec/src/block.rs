//! One stored block: zero detection, content hashing, compression (zstd, or raw when that is
//! not smaller) and the checked way back (crc32c of the stored bytes, then decompression to
//! exactly one block).

use crate::index::Encoding;

/// Largest stored form of a block: a raw block, or a zstd frame that is never kept when it is
/// not smaller than raw. Bounds every length read from disk before allocating.
pub fn max_stored_len(block_size: u32) -> u32 {
    block_size
}

pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { buf.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

pub fn hash_block(buf: &[u8]) -> [u8; 32] {
    *blake3::hash(buf).as_bytes()
}

/// Compresses one block with a reusable compressor; returns the encoding and the stored bytes
/// (`out` holds them when compressed; otherwise the caller stores `block` itself).
pub fn compress_into(compressor: &mut zstd::bulk::Compressor<'_>, block: &[u8], out: &mut Vec<u8>) -> Encoding {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(block.len()));
    match compressor.compress_to_buffer(block, out) {
        Ok(n) if n < block.len() => Encoding::Zstd,
        _ => Encoding::Raw,
    }
}

/// Why stored bytes did not decode to a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Crc { expected: u32, actual: u32 },
    Decompress(String),
}

/// Checks the crc32c of `stored` and turns it back into exactly `out.len()` bytes: one block,
/// a whole group, or a patch's parts.
pub fn decode_into(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    encoding: Encoding,
    stored: &[u8],
    expected_crc: u32,
    out: &mut [u8],
) -> Result<(), DecodeError> {
    let actual = crc32c::crc32c(stored);
    if !crate::layout::checksum_matches(expected_crc, actual) {
        return Err(DecodeError::Crc { expected: expected_crc, actual });
    }
    match encoding {
        Encoding::Zero => out.fill(0),
        Encoding::Raw => {
            if stored.len() != out.len() {
                return Err(DecodeError::Decompress(format!("raw block of {} bytes", stored.len())));
            }
            out.copy_from_slice(stored);
        }
        Encoding::Zstd | Encoding::ZstdGroup | Encoding::Patch | Encoding::PatchGroup => {
            match decompressor.decompress_to_buffer(stored, out) {
                Ok(n) if n == out.len() => {}
                Ok(n) => return Err(DecodeError::Decompress(format!("decompressed to {n} bytes, not {}", out.len()))),
                Err(e) => return Err(DecodeError::Decompress(e.to_string())),
            }
        }
    }
    Ok(())
}
