//! The decoded layout of a patch group (encoding 5, SPEC.md §3.2): the parts of several patches
//! of one image in one zstd frame, so that they compress as one stream instead of one small
//! frame each. The frame starts with a table of one little-endian u32 per patch, where that
//! patch's parts start; patch `s` ends where patch `s + 1` starts, the last one at the frame's
//! end, so the table's first offset also says how many patches there are. This module owns that
//! arithmetic: the writer builds frames with `PatchGroupBuilder`, every reader finds a patch's
//! parts with `slot_parts`, which checks the table against the frame before using it.

use crate::layout::PATCH_TABLE_ENTRY;

/// The patches a patch group holds at most (its slot is one byte).
pub const PATCH_GROUP_MAX_PATCHES: usize = 255;

/// Gathers the parts of patches, in slot order, into the decoded bytes of a patch group.
#[derive(Default)]
pub struct PatchGroupBuilder {
    /// Where each patch's parts start, counted from the start of the parts.
    starts: Vec<u32>,
    parts: Vec<u8>,
}

impl PatchGroupBuilder {
    /// Adds the parts of the next patch (its slot is the number of patches added before).
    pub fn push(&mut self, parts: &[u8]) {
        assert!(self.starts.len() < PATCH_GROUP_MAX_PATCHES, "a patch group holds at most 255 patches");
        self.starts.push(self.parts.len() as u32);
        self.parts.extend_from_slice(parts);
    }

    pub fn patches(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Bytes the frame decodes to, table included.
    pub fn decoded_len(&self) -> usize {
        self.starts.len() * PATCH_TABLE_ENTRY + self.parts.len()
    }

    /// The decoded frame: the table, then the parts.
    pub fn finish(self) -> Vec<u8> {
        let table = self.starts.len() * PATCH_TABLE_ENTRY;
        let mut out = Vec::with_capacity(table + self.parts.len());
        for start in &self.starts {
            out.extend_from_slice(&(start + table as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.parts);
        out
    }
}

/// Where the parts of the patch at `slot` lie in the decoded patch group `frame`, which must
/// hold `len` bytes of them; an error saying what is wrong when the table does not allow it.
pub fn slot_parts(frame: &[u8], slot: usize, len: usize) -> Result<std::ops::Range<usize>, String> {
    let offset = |i: usize| -> Option<usize> {
        let at = i.checked_mul(PATCH_TABLE_ENTRY)?;
        let bytes = frame.get(at..at + PATCH_TABLE_ENTRY)?;
        Some(u32::from_le_bytes(bytes.try_into().expect("four bytes")) as usize)
    };
    let first = offset(0).ok_or_else(|| format!("a patch group of {} bytes has no table", frame.len()))?;
    if first == 0 || !first.is_multiple_of(PATCH_TABLE_ENTRY) || first > frame.len() {
        return Err(format!("patch group table of {first} bytes in a frame of {}", frame.len()));
    }
    let patches = first / PATCH_TABLE_ENTRY;
    if slot >= patches {
        return Err(format!("slot {slot} of a patch group of {patches} patches"));
    }
    let start = offset(slot).expect("inside the table");
    let end = if slot + 1 == patches { frame.len() } else { offset(slot + 1).expect("inside the table") };
    if start < first || end < start || end > frame.len() || end - start != len {
        return Err(format!(
            "patch {slot} of the group at {start}..{end} of {} bytes, not {len} bytes of parts",
            frame.len()
        ));
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_patch_is_found_where_the_builder_put_it() {
        let mut b = PatchGroupBuilder::default();
        let patches: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 256 * (usize::from(i) % 3 + 1)]).collect();
        for p in &patches {
            b.push(p);
        }
        let len = b.decoded_len();
        let frame = b.finish();
        assert_eq!(frame.len(), len);
        for (slot, p) in patches.iter().enumerate() {
            let r = slot_parts(&frame, slot, p.len()).unwrap();
            assert_eq!(&frame[r], &p[..]);
        }
        assert!(slot_parts(&frame, 5, 256).is_err(), "a slot past the table");
        assert!(slot_parts(&frame, 1, 256).is_err(), "a length the mask does not give");
    }

    #[test]
    fn a_damaged_table_is_an_error_never_a_panic() {
        let mut b = PatchGroupBuilder::default();
        b.push(&[1; 512]);
        b.push(&[2; 512]);
        let good = b.finish();
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), vec![0; 3], good[..6].to_vec()];
        for (at, value) in [(0usize, 0u32), (0, 3), (0, 4096), (0, u32::MAX), (4, 2), (4, 5000), (4, 7)] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            cases.push(bad);
        }
        for frame in &cases {
            for slot in 0..3 {
                assert!(slot_parts(frame, slot, 512).is_err(), "{:?} slot {slot}", &frame[..frame.len().min(8)]);
            }
        }
    }
}
