//! The whole-source digest: BLAKE3 over a context string, the source size, the block size and
//! the BLAKE3 hash of every block in order (see SPEC.md, "Source digest"). It is computed by the
//! writer from what it read, by restore from what it wrote, and by verify from a version's
//! resolved index; all three must agree.

use crate::block::hash_block;
use crate::layout::DIGEST_CONTEXT;

pub struct SourceDigest {
    hasher: blake3::Hasher,
    expected_blocks: u64,
    pushed: u64,
}

impl SourceDigest {
    pub fn new(source_size: u64, block_size: u32) -> SourceDigest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(DIGEST_CONTEXT);
        hasher.update(&source_size.to_le_bytes());
        hasher.update(&block_size.to_le_bytes());
        SourceDigest { hasher, expected_blocks: source_size.div_ceil(u64::from(block_size)), pushed: 0 }
    }

    /// Adds the hash of the next block (blocks must come in order, each exactly once).
    pub fn push(&mut self, block_hash: &[u8; 32]) {
        self.hasher.update(block_hash);
        self.pushed += 1;
    }

    pub fn finish(self) -> [u8; 32] {
        assert_eq!(self.pushed, self.expected_blocks, "digest fed the wrong number of blocks");
        *self.hasher.finalize().as_bytes()
    }
}

/// The hash of an all-zero block of `block_size` bytes (what a sparse block hashes to).
pub fn zero_block_hash(block_size: u32) -> [u8; 32] {
    hash_block(&vec![0u8; block_size as usize])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
