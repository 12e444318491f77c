//! Every magic, format version, size and offset of the on-disk format, in one place.
//!
//! DO NOT MODIFY a released value: images written by earlier strata must stay readable. A change
//! of layout means a new `FORMAT_VERSION`, a row in SPEC.md's version history, and a decoder for
//! the old version. `tests::constants_match_spec` ties these numbers to `SPEC.md`.

/// The one image format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format this crate still reads (format 1: no groups).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// First eight bytes of every image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"STRATAIM";
/// First eight bytes of every image footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"STRATAFT";

/// Size of the fixed image header at offset 0.
pub const HEADER_SIZE: usize = 512;
/// Size of the fixed footer that ends every finished image.
pub const FOOTER_SIZE: usize = 128;
/// Size of one block index entry.
pub const INDEX_ENTRY_SIZE: usize = 64;

pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// Longest label, in bytes of UTF-8.
pub const LABEL_MAX: usize = 128;
/// Longest recorded source description, in bytes of UTF-8 (longer ones are shortened).
pub const SOURCE_MAX: usize = 200;

/// A chain holds at most this many images (the reader packs the layer number in 16 bits).
pub const MAX_CHAIN_LEN: usize = 65_535;

/// Domain-separation prefix of the whole-source digest.
pub const DIGEST_CONTEXT: &[u8; 24] = b"strata source digest v1\0";

/// Byte offsets of the image header fields (all integers little-endian).
pub mod header {
    pub const MAGIC: usize = 0;
    pub const FORMAT_VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const REPO_ID: usize = 16;
    pub const IMAGE_ID: usize = 32;
    pub const VERSION_ID: usize = 48;
    pub const KIND: usize = 56;
    pub const RULE: usize = 57;
    pub const RESERVED_KIND: usize = 58;
    pub const PARENT_ID: usize = 64;
    pub const PARENT_IMAGE_ID: usize = 72;
    pub const FULL_ID: usize = 88;
    pub const FULL_IMAGE_ID: usize = 96;
    pub const BLOCK_SIZE: usize = 112;
    pub const COMPRESSION_LEVEL: usize = 116;
    pub const SOURCE_SIZE: usize = 120;
    pub const CREATED_SECS: usize = 128;
    pub const CREATED_NANOS: usize = 136;
    pub const LABEL_LEN: usize = 140;
    pub const SOURCE_LEN: usize = 142;
    pub const LABEL: usize = 144;
    pub const SOURCE: usize = 272;
    pub const SOURCE_ID_KIND: usize = 472;
    pub const SOURCE_ID: usize = 473;
    pub const BLOCK_SELECTION: usize = 489;
    pub const UNUSED_BYTES: usize = 490;
    pub const RESERVED: usize = 498;
    pub const CRC: usize = 508;
}

/// Byte offsets of the footer fields, relative to the footer's start.
pub mod footer {
    pub const MAGIC: usize = 0;
    pub const FORMAT_VERSION: usize = 8;
    pub const FOOTER_SIZE: usize = 12;
    pub const IMAGE_ID: usize = 16;
    pub const INDEX_OFFSET: usize = 32;
    pub const ENTRY_COUNT: usize = 40;
    pub const INDEX_CRC: usize = 48;
    pub const RESERVED0: usize = 52;
    pub const STORED_BYTES: usize = 56;
    pub const PRESENT_BLOCKS: usize = 64;
    pub const SOURCE_DIGEST: usize = 72;
    pub const RESERVED1: usize = 104;
    pub const CRC: usize = 124;
}

/// Byte offsets of the fields of one index entry.
pub mod entry {
    pub const BLOCK: usize = 0;
    pub const DATA_OFFSET: usize = 8;
    pub const STORED_LEN: usize = 16;
    pub const ENCODING: usize = 20;
    pub const GROUP_LEN: usize = 21;
    pub const GROUP_SLOT: usize = 22;
    /// Encodings 4 (format 3) and 5 (format 4): the patch's 16-bit part mask, over the group
    /// fields' two bytes.
    pub const PATCH_MASK: usize = 21;
    /// Encoding 5: the patch's place in its patch group (0 for the other encodings).
    pub const PATCH_SLOT: usize = 23;
    pub const DATA_CRC: usize = 24;
    pub const HASH: usize = 28;
    pub const ENTRY_CRC: usize = 60;
}

/// Image kinds as stored in the header's `kind` byte.
pub const KIND_FULL: u8 = 1;
pub const KIND_INCREMENTAL: u8 = 2;
pub const KIND_DIFFERENTIAL: u8 = 3;

/// Why a version was made the kind it is (header `rule` byte; informational).
pub const RULE_UNSPECIFIED: u8 = 0;
pub const RULE_FIRST: u8 = 1;
pub const RULE_REQUESTED: u8 = 2;
pub const RULE_SCHEME: u8 = 3;
pub const RULE_FULL_EVERY: u8 = 4;
pub const RULE_FULL_EVERY_DAYS: u8 = 5;
pub const RULE_NO_USABLE_FULL: u8 = 6;
pub const RULE_SOURCE_RESIZED: u8 = 7;
pub const RULE_MERGED: u8 = 8;
pub const RULE_CHAIN_LIMIT: u8 = 9;
pub const RULE_SOURCE_REPLACED: u8 = 10;

/// Which blocks a version holds (header `block_selection` byte; informational).
pub const SELECTION_EVERY: u8 = 0;
pub const SELECTION_USED: u8 = 1;

/// Block encodings as stored in an index entry's `encoding` byte.
pub const ENCODING_ZERO: u8 = 0;
pub const ENCODING_RAW: u8 = 1;
pub const ENCODING_ZSTD: u8 = 2;
pub const ENCODING_ZSTD_GROUP: u8 = 3;
pub const ENCODING_PATCH: u8 = 4;
pub const ENCODING_PATCH_GROUP: u8 = 5;

/// A patch (encoding 4) replaces some of a block's `PATCH_PARTS` equal parts (4 KiB of a 64 KiB
/// block: a file system page) and takes the rest from the block's base (SPEC.md §3.2).
pub const PATCH_PARTS: u32 = 16;

/// A patch group (encoding 5, format 4) is one zstd frame holding the parts of 1..=255 patches
/// of an image, after a table of one little-endian u32 of this size per patch: where its parts
/// start in the decoded frame (SPEC.md §3.2). It decodes to at most GROUP_MAX_BYTES.
pub const PATCH_TABLE_ENTRY: usize = 4;

/// A group (encoding 3) is one zstd frame holding 2..=GROUP_MAX_BLOCKS stored blocks of an
/// image, decoding to at most GROUP_MAX_BYTES (format 4; GROUP_MAX_BYTES_FORMAT_2 in formats 2
/// and 3): this bounds what one read decodes.
pub const GROUP_MAX_BLOCKS: u8 = 255;
pub const GROUP_MAX_BYTES: u32 = 4 << 20;
pub const GROUP_MAX_BYTES_FORMAT_2: u32 = 1 << 20;

/// Image file names in a repository: `v` + 8-digit zero-padded id + this suffix.
pub const IMAGE_SUFFIX: &str = ".strata";
/// Temporary files of a backup in progress start with this prefix; never listed, removed by the
/// next backup.
pub const TEMP_PREFIX: &str = ".tmp-";
/// The repository identity file.
pub const REPO_FILE: &str = "strata.repo";
/// The lock file a backup holds an exclusive flock on.
pub const LOCK_FILE: &str = "lock";

const _: () = assert!(header::CRC + 4 == HEADER_SIZE);
const _: () = assert!(header::SOURCE + SOURCE_MAX == header::SOURCE_ID_KIND);
const _: () = assert!(header::SOURCE_ID + 16 == header::BLOCK_SELECTION);
const _: () = assert!(header::UNUSED_BYTES + 8 == header::RESERVED);
const _: () = assert!(header::LABEL + LABEL_MAX == header::SOURCE);
const _: () = assert!(footer::CRC + 4 == FOOTER_SIZE);
const _: () = assert!(footer::SOURCE_DIGEST + 32 == footer::RESERVED1);
const _: () = assert!(entry::HASH + 32 == entry::ENTRY_CRC);
const _: () = assert!(entry::ENTRY_CRC + 4 == INDEX_ENTRY_SIZE);
const _: () = assert!(entry::PATCH_MASK + 2 == entry::PATCH_SLOT && PATCH_PARTS == u16::BITS);

/// Whether a stored crc32c matches the computed one. Fuzzing builds (`--cfg fuzzing`, set by
/// cargo fuzz) accept every checksum so that the fuzzer reaches the parsing behind them.
#[inline]
pub fn checksum_matches(expected: u32, actual: u32) -> bool {
    cfg!(fuzzing) || expected == actual
}
