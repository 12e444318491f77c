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
    /// `REPEATED` copies of the hash `push_repeated` was last given, fed to BLAKE3 in one
    /// update each (which hashes its chunks side by side, where 32-byte updates go one by one).
    repeated: Vec<u8>,
}

/// Hashes in one update of `push_repeated` (64 KiB of them).
const REPEATED: usize = 2048;

impl SourceDigest {
    pub fn new(source_size: u64, block_size: u32) -> SourceDigest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(DIGEST_CONTEXT);
        hasher.update(&source_size.to_le_bytes());
        hasher.update(&block_size.to_le_bytes());
        SourceDigest {
            hasher,
            expected_blocks: source_size.div_ceil(u64::from(block_size)),
            pushed: 0,
            repeated: Vec::new(),
        }
    }

    /// Adds the hash of the next block (blocks must come in order, each exactly once).
    pub fn push(&mut self, block_hash: &[u8; 32]) {
        self.hasher.update(block_hash);
        self.pushed += 1;
    }

    /// Adds `count` blocks that all hash to `block_hash` (a run of zero blocks): the same digest
    /// as `count` calls of `push`, in bulk.
    pub fn push_repeated(&mut self, block_hash: &[u8; 32], count: u64) {
        if count < 4 {
            (0..count).for_each(|_| self.push(block_hash));
            return;
        }
        if self.repeated.get(..32) != Some(block_hash.as_slice()) {
            self.repeated = block_hash.repeat(REPEATED);
        }
        let mut left = count;
        while left > 0 {
            let n = left.min(REPEATED as u64) as usize;
            self.hasher.update(&self.repeated[..n * 32]);
            left -= n as u64;
        }
        self.pushed += count;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_hashes_digest_like_one_push_each() {
        let (zero, other) = (zero_block_hash(4096), [7u8; 32]);
        for runs in [vec![0u64, 1, 0], vec![3, 4, 5], vec![2047, 2048, 2049], vec![5000, 1, 4097, 9]] {
            let size = 4096 * (runs.iter().sum::<u64>() + runs.len() as u64);
            let (mut one_by_one, mut bulk) = (SourceDigest::new(size, 4096), SourceDigest::new(size, 4096));
            for (i, &run) in runs.iter().enumerate() {
                let hash = if i % 2 == 0 { zero } else { [i as u8; 32] };
                (0..run).for_each(|_| one_by_one.push(&hash));
                bulk.push_repeated(&hash, run);
                one_by_one.push(&other);
                bulk.push(&other);
            }
            assert_eq!(one_by_one.finish(), bulk.finish(), "runs {runs:?}");
        }
    }
}
