//! One block index entry: which source block, where its stored bytes are, how they are encoded,
//! their crc32c, and the BLAKE3 hash of the block's content. Each entry carries its own crc32c so
//! that a single entry read on the hot path is verified without rereading the whole index.
//! A patch entry (format 3) names only some parts of its block; the rest comes from the block's
//! base in an older layer, which `version` resolves. A patch in a patch group (format 4) also
//! names its slot in the group's frame.

use crate::error::{FormatError, Loc, Result};
use crate::layout::{self, entry as off, INDEX_ENTRY_SIZE};
use crate::le::*;

/// How a block's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The block is all zeros in this version; nothing is stored (a delta's tombstone).
    Zero,
    /// Stored uncompressed (compression did not help).
    Raw,
    /// Stored as one zstd frame.
    Zstd,
    /// Part of a group: one zstd frame holding `group_len` consecutive stored blocks of the
    /// image; this block is the `group_slot`-th.
    ZstdGroup,
    /// One zstd frame holding the parts of the block named by `patch_mask`, in order; the other
    /// parts are those of the block's base (deltas only, format 3).
    Patch,
    /// A patch whose parts lie in a patch group, a frame shared with other patches of the image,
    /// at `group_slot` (deltas only, format 4; see `patch_group`).
    PatchGroup,
}

impl Encoding {
    fn to_byte(self) -> u8 {
        match self {
            Encoding::Zero => layout::ENCODING_ZERO,
            Encoding::Raw => layout::ENCODING_RAW,
            Encoding::Zstd => layout::ENCODING_ZSTD,
            Encoding::ZstdGroup => layout::ENCODING_ZSTD_GROUP,
            Encoding::Patch => layout::ENCODING_PATCH,
            Encoding::PatchGroup => layout::ENCODING_PATCH_GROUP,
        }
    }

    /// Whether the entry stores some parts of its block over the block's base.
    pub fn is_patch(self) -> bool {
        matches!(self, Encoding::Patch | Encoding::PatchGroup)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub block: u64,
    pub data_offset: u64,
    pub stored_len: u32,
    pub encoding: Encoding,
    /// crc32c of the stored bytes (0 for `Zero`).
    pub data_crc: u32,
    /// BLAKE3 of the block's content, zero-padded to the block size.
    pub hash: [u8; 32],
    /// Blocks in this entry's group and this block's place in it (0 and 0 unless `ZstdGroup`);
    /// `PatchGroup`: `group_len` is 0 and `group_slot` the patch's place in its group.
    pub group_len: u8,
    pub group_slot: u8,
    /// Patches: bit i set when part i (of `PATCH_PARTS`) is stored; 0 for other encodings.
    pub patch_mask: u16,
}

impl IndexEntry {
    /// Whether this entry and `other`, of one image, name the same stored frame: one group, one
    /// patch group, or one stored block that several entries share (deduplication).
    pub fn same_frame(&self, other: &IndexEntry) -> bool {
        self.encoding != Encoding::Zero
            && self.encoding == other.encoding
            && self.data_offset == other.data_offset
            && self.stored_len == other.stored_len
            && self.data_crc == other.data_crc
            && self.group_len == other.group_len
            && (self.encoding == Encoding::PatchGroup || self.patch_mask == other.patch_mask)
    }

    /// What names this entry's stored frame, for caches of decoded frames within one image:
    /// where its bytes are, their length and crc32c, and how they decode (encoding, group
    /// length, patch mask but for a patch group's slots). Entries that share a frame
    /// (`same_frame`) have the same name; one that names the same bytes with another shape (a
    /// damaged or hostile index) has another, so it is decoded and checked on its own.
    pub fn frame_name(&self) -> (u64, u64, u32) {
        let mask = if self.encoding == Encoding::PatchGroup { 0 } else { self.patch_mask };
        let shape = u32::from(self.encoding.to_byte()) << 24 | u32::from(mask) << 8 | u32::from(self.group_len);
        (self.data_offset, u64::from(self.stored_len) << 32 | u64::from(self.data_crc), shape)
    }

    /// Bytes one part of a patch covers.
    pub fn patch_part_len(block_size: u32) -> usize {
        (block_size / layout::PATCH_PARTS) as usize
    }

    pub fn encode(&self) -> [u8; INDEX_ENTRY_SIZE] {
        let mut b = [0u8; INDEX_ENTRY_SIZE];
        put_u64(&mut b, off::BLOCK, self.block);
        put_u64(&mut b, off::DATA_OFFSET, self.data_offset);
        put_u32(&mut b, off::STORED_LEN, self.stored_len);
        b[off::ENCODING] = self.encoding.to_byte();
        if self.encoding.is_patch() {
            put_u16(&mut b, off::PATCH_MASK, self.patch_mask);
            if self.encoding == Encoding::PatchGroup {
                b[off::PATCH_SLOT] = self.group_slot;
            }
        } else {
            b[off::GROUP_LEN] = self.group_len;
            b[off::GROUP_SLOT] = self.group_slot;
        }
        put_u32(&mut b, off::DATA_CRC, self.data_crc);
        put_bytes(&mut b, off::HASH, &self.hash);
        let crc = crc32c::crc32c(&b[..off::ENTRY_CRC]);
        put_u32(&mut b, off::ENTRY_CRC, crc);
        b
    }

    /// Decodes one entry read from `file_offset` and checks its own crc and that its stored
    /// range lies in `[data_start, data_end)` and is no longer than `max_stored`.
    pub fn decode(b: &[u8], loc: &Loc, file_offset: u64, limits: &EntryLimits) -> Result<IndexEntry> {
        let at = |o: usize| loc.clone().at(file_offset + o as u64);
        let expected = get_u32(b, off::ENTRY_CRC);
        let actual = crc32c::crc32c(&b[..off::ENTRY_CRC]);
        if !crate::layout::checksum_matches(expected, actual) {
            return Err(FormatError::Checksum { loc: at(0), what: "index entry", expected, actual });
        }
        let corrupt = |o: usize, detail: String| FormatError::Corrupt { loc: at(o), what: "index entry", detail };
        let encoding = match b[off::ENCODING] {
            layout::ENCODING_ZERO => Encoding::Zero,
            layout::ENCODING_RAW => Encoding::Raw,
            layout::ENCODING_ZSTD => Encoding::Zstd,
            layout::ENCODING_ZSTD_GROUP => Encoding::ZstdGroup,
            layout::ENCODING_PATCH => Encoding::Patch,
            layout::ENCODING_PATCH_GROUP => Encoding::PatchGroup,
            other => return Err(corrupt(off::ENCODING, format!("unknown encoding {other}"))),
        };
        let patch = encoding.is_patch();
        let slot = match encoding {
            Encoding::PatchGroup => b[off::PATCH_SLOT],
            _ if patch => 0,
            _ => b[off::GROUP_SLOT],
        };
        let entry = IndexEntry {
            block: get_u64(b, off::BLOCK),
            data_offset: get_u64(b, off::DATA_OFFSET),
            stored_len: get_u32(b, off::STORED_LEN),
            encoding,
            data_crc: get_u32(b, off::DATA_CRC),
            hash: get_array(b, off::HASH),
            group_len: if patch { 0 } else { b[off::GROUP_LEN] },
            group_slot: slot,
            patch_mask: if patch { get_u16(b, off::PATCH_MASK) } else { 0 },
        };
        if entry.block >= limits.block_count {
            return Err(corrupt(
                off::BLOCK,
                format!("block {} beyond the source's {} blocks", entry.block, limits.block_count),
            ));
        }
        let mut max_stored = limits.max_stored;
        if encoding == Encoding::ZstdGroup && !limits.groups {
            return Err(corrupt(off::ENCODING, "a group in a format 1 image".into()));
        }
        if encoding == Encoding::ZstdGroup {
            let len = u32::from(entry.group_len);
            // (group_len ≤ GROUP_MAX_BLOCKS = 255 holds for every u8)
            if len < 2
                || u64::from(len) * u64::from(limits.block_size) > limits.group_max_bytes
                || entry.group_slot >= entry.group_len
            {
                return Err(corrupt(
                    off::GROUP_LEN,
                    format!("slot {} of a group of {} blocks of {} bytes", entry.group_slot, len, limits.block_size),
                ));
            }
            max_stored = len * limits.block_size;
        } else if patch {
            if !limits.patches {
                return Err(corrupt(off::ENCODING, "a patch in an image of format 2 or older".into()));
            }
            if encoding == Encoding::PatchGroup {
                if !limits.patch_groups {
                    return Err(corrupt(off::ENCODING, "a patch group in an image of format 3 or older".into()));
                }
                max_stored = u32::try_from(limits.group_max_bytes).unwrap_or(u32::MAX);
            }
            if !limits.zero_entries {
                return Err(corrupt(off::ENCODING, "a patch in a full".into()));
            }
            if entry.patch_mask == 0 || !limits.block_size.is_multiple_of(layout::PATCH_PARTS) {
                return Err(corrupt(
                    off::PATCH_MASK,
                    format!("patch mask {:#06x} of a {}-byte block", entry.patch_mask, limits.block_size),
                ));
            }
        } else if entry.group_len != 0 || entry.group_slot != 0 {
            return Err(corrupt(off::GROUP_LEN, "group fields set on a block outside a group".into()));
        }
        match encoding {
            Encoding::Zero => {
                if entry.stored_len != 0 || entry.data_offset != 0 || entry.data_crc != 0 {
                    return Err(corrupt(off::STORED_LEN, "a zero block with stored bytes".into()));
                }
                if !limits.zero_entries {
                    return Err(corrupt(off::ENCODING, "a zero entry in a full".into()));
                }
            }
            Encoding::Raw | Encoding::Zstd | Encoding::ZstdGroup | Encoding::Patch | Encoding::PatchGroup => {
                let end = entry.data_offset.checked_add(u64::from(entry.stored_len));
                let in_range = entry.data_offset >= limits.data_start && end.is_some_and(|e| e <= limits.data_end);
                if !in_range || entry.stored_len == 0 || entry.stored_len > max_stored {
                    return Err(corrupt(
                        off::DATA_OFFSET,
                        format!(
                            "stored range {}+{} outside the data region {}..{}",
                            entry.data_offset, entry.stored_len, limits.data_start, limits.data_end
                        ),
                    ));
                }
                if encoding == Encoding::Raw && entry.stored_len != limits.block_size {
                    return Err(corrupt(off::STORED_LEN, format!("raw block of {} bytes", entry.stored_len)));
                }
            }
        }
        Ok(entry)
    }
}

/// What an entry of one image may contain, derived from its header and footer.
#[derive(Debug, Clone, Copy)]
pub struct EntryLimits {
    pub block_count: u64,
    pub block_size: u32,
    pub data_start: u64,
    pub data_end: u64,
    pub max_stored: u32,
    /// Whether zero entries may appear (deltas only: a full lists only stored blocks).
    pub zero_entries: bool,
    /// Whether groups may appear (format 2 onwards).
    pub groups: bool,
    /// What a group may decode to at most (`layout::GROUP_MAX_BYTES` from format 4 on).
    pub group_max_bytes: u64,
    /// Whether patches may appear (format 3 onwards).
    pub patches: bool,
    /// Whether patch groups may appear (format 4 onwards).
    pub patch_groups: bool,
}
