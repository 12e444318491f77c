//! The 512-byte image header: who the image belongs to (repository, version, chain references),
//! the geometry of the source, and when and from where it was made. Checksummed by a crc32c in
//! its last four bytes; reserved bytes are written as zero and ignored on read.

use crate::error::{FormatError, Loc, Result};
use crate::layout::{self, header as off, HEADER_SIZE};
use crate::le::*;
use crate::source_id::{SourceId, SourceIdKind};

/// A 16-byte random identifier (of a repository or of one image file).
pub type Id128 = [u8; 16];

pub fn hex_id(id: &Id128) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random identifier.
pub fn new_id() -> Id128 {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).expect("the operating system's random source failed");
    id
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Full,
    Incremental,
    Differential,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
            Kind::Differential => "differential",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Kind::Full => layout::KIND_FULL,
            Kind::Incremental => layout::KIND_INCREMENTAL,
            Kind::Differential => layout::KIND_DIFFERENTIAL,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            layout::KIND_FULL => Some(Kind::Full),
            layout::KIND_INCREMENTAL => Some(Kind::Incremental),
            layout::KIND_DIFFERENTIAL => Some(Kind::Differential),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a version is the kind it is, as recorded when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    Unspecified,
    /// The first backup of a repository.
    First,
    /// Asked for on the command line (--full, --incremental, --differential).
    Requested,
    /// The repository's scheme (or the default) for an ordinary run.
    Scheme,
    /// A full because the scheme's "full every N backups" came due.
    FullEvery,
    /// A full because the scheme's "full every D days" came due.
    FullEveryDays,
    /// A full because there was no usable full to build a delta on.
    NoUsableFull,
    /// A full because the source's size differs from the chain's.
    SourceResized,
    /// A synthetic full made by merging the version's chain (no source read).
    Merged,
    /// A full because the chain reached the longest a chain may be.
    ChainLimit,
    /// A full because the source's identity (its stable name, or the id its content carries)
    /// differs from that of the version the backup would build on: another disk.
    SourceReplaced,
    /// A value this strata does not know (written by a newer one).
    Other(u8),
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Unspecified => "unspecified",
            Rule::First => "first backup",
            Rule::Requested => "requested",
            Rule::Scheme => "scheme",
            Rule::FullEvery => "full every N backups",
            Rule::FullEveryDays => "full every D days",
            Rule::NoUsableFull => "no usable full",
            Rule::SourceResized => "source resized",
            Rule::Merged => "synthetic full (merged)",
            Rule::ChainLimit => "chain limit",
            Rule::SourceReplaced => "source replaced",
            Rule::Other(_) => "unknown",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Rule::Unspecified => layout::RULE_UNSPECIFIED,
            Rule::First => layout::RULE_FIRST,
            Rule::Requested => layout::RULE_REQUESTED,
            Rule::Scheme => layout::RULE_SCHEME,
            Rule::FullEvery => layout::RULE_FULL_EVERY,
            Rule::FullEveryDays => layout::RULE_FULL_EVERY_DAYS,
            Rule::NoUsableFull => layout::RULE_NO_USABLE_FULL,
            Rule::SourceResized => layout::RULE_SOURCE_RESIZED,
            Rule::Merged => layout::RULE_MERGED,
            Rule::ChainLimit => layout::RULE_CHAIN_LIMIT,
            Rule::SourceReplaced => layout::RULE_SOURCE_REPLACED,
            Rule::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Rule {
        match b {
            layout::RULE_UNSPECIFIED => Rule::Unspecified,
            layout::RULE_FIRST => Rule::First,
            layout::RULE_REQUESTED => Rule::Requested,
            layout::RULE_SCHEME => Rule::Scheme,
            layout::RULE_FULL_EVERY => Rule::FullEvery,
            layout::RULE_FULL_EVERY_DAYS => Rule::FullEveryDays,
            layout::RULE_NO_USABLE_FULL => Rule::NoUsableFull,
            layout::RULE_SOURCE_RESIZED => Rule::SourceResized,
            layout::RULE_MERGED => Rule::Merged,
            layout::RULE_CHAIN_LIMIT => Rule::ChainLimit,
            layout::RULE_SOURCE_REPLACED => Rule::SourceReplaced,
            other => Rule::Other(other),
        }
    }
}

/// A reference to another image of the same repository: its version id and its unique image id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef {
    pub version: u64,
    pub image_id: Id128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub repo_id: Id128,
    pub image_id: Id128,
    pub version: u64,
    pub kind: Kind,
    pub rule: Rule,
    /// The version this one is a delta against; `None` for a full.
    pub parent: Option<ImageRef>,
    /// The full that starts this image's chain (the image itself for a full).
    pub full: ImageRef,
    pub block_size: u32,
    pub compression_level: i32,
    pub source_size: u64,
    pub created_secs: i64,
    pub created_nanos: u32,
    pub label: String,
    pub source: String,
    /// The id the source's content carried (`None`: not recorded, an image older than 0.4).
    pub source_id: Option<SourceId>,
    /// Which of the source's blocks the version holds.
    pub selection: BlockSelection,
}

/// Which blocks of the source a version holds, as recorded when it was written (informational:
/// either way the version reads as one whole disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockSelection {
    /// Every byte of the source as read: sector by sector, and every image before strata 0.5.
    #[default]
    Every,
    /// What the source's file systems use; the `unused_bytes` they do not use read as zeros.
    Used { unused_bytes: u64 },
}

impl BlockSelection {
    /// `every` or `used`, as `list`, `info` and their JSON show it.
    pub fn name(self) -> &'static str {
        match self {
            BlockSelection::Every => "every",
            BlockSelection::Used { .. } => "used",
        }
    }

    /// Bytes left out as unused (0 when every byte was read).
    pub fn unused_bytes(self) -> u64 {
        match self {
            BlockSelection::Every => 0,
            BlockSelection::Used { unused_bytes } => unused_bytes,
        }
    }
}

/// Checks that a block size is a power of two between the format's limits.
pub fn check_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(layout::MIN_BLOCK_SIZE..=layout::MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(FormatError::Invalid(format!(
            "block size {block_size} is not a power of two from {} KiB to {} MiB",
            layout::MIN_BLOCK_SIZE / 1024,
            layout::MAX_BLOCK_SIZE / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ImageHeader {
    pub fn block_count(&self) -> u64 {
        self.source_size.div_ceil(u64::from(self.block_size))
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        put_bytes(&mut b, off::MAGIC, &layout::IMAGE_MAGIC);
        put_u32(&mut b, off::FORMAT_VERSION, layout::FORMAT_VERSION);
        put_u32(&mut b, off::HEADER_SIZE, HEADER_SIZE as u32);
        put_bytes(&mut b, off::REPO_ID, &self.repo_id);
        put_bytes(&mut b, off::IMAGE_ID, &self.image_id);
        put_u64(&mut b, off::VERSION_ID, self.version);
        b[off::KIND] = self.kind.to_byte();
        b[off::RULE] = self.rule.to_byte();
        let parent = self.parent.unwrap_or(ImageRef { version: 0, image_id: [0; 16] });
        put_u64(&mut b, off::PARENT_ID, parent.version);
        put_bytes(&mut b, off::PARENT_IMAGE_ID, &parent.image_id);
        put_u64(&mut b, off::FULL_ID, self.full.version);
        put_bytes(&mut b, off::FULL_IMAGE_ID, &self.full.image_id);
        put_u32(&mut b, off::BLOCK_SIZE, self.block_size);
        put_i32(&mut b, off::COMPRESSION_LEVEL, self.compression_level);
        put_u64(&mut b, off::SOURCE_SIZE, self.source_size);
        put_i64(&mut b, off::CREATED_SECS, self.created_secs);
        put_u32(&mut b, off::CREATED_NANOS, self.created_nanos);
        let label = truncate_utf8(&self.label, layout::LABEL_MAX).as_bytes();
        let source = truncate_utf8(&self.source, layout::SOURCE_MAX).as_bytes();
        put_u16(&mut b, off::LABEL_LEN, label.len() as u16);
        put_u16(&mut b, off::SOURCE_LEN, source.len() as u16);
        put_bytes(&mut b, off::LABEL, label);
        put_bytes(&mut b, off::SOURCE, source);
        if let Some(id) = &self.source_id {
            b[off::SOURCE_ID_KIND] = id.kind.to_byte();
            put_bytes(&mut b, off::SOURCE_ID, &id.bytes);
        }
        if let BlockSelection::Used { unused_bytes } = self.selection {
            b[off::BLOCK_SELECTION] = layout::SELECTION_USED;
            put_u64(&mut b, off::UNUSED_BYTES, unused_bytes);
        }
        let crc = crc32c::crc32c(&b[..off::CRC]);
        put_u32(&mut b, off::CRC, crc);
        b
    }

    /// Decodes and validates a header. `loc` names the file for errors.
    pub fn decode(b: &[u8], loc: &Loc) -> Result<ImageHeader> {
        let at = |o: usize| loc.clone().at(o as u64);
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Incomplete {
                loc: loc.clone(),
                detail: format!("{} bytes, shorter than the {HEADER_SIZE}-byte header", b.len()),
            });
        }
        if b[off::MAGIC..off::MAGIC + 8] != layout::IMAGE_MAGIC {
            return Err(FormatError::NotAnImage { loc: at(off::MAGIC) });
        }
        let format = get_u32(b, off::FORMAT_VERSION);
        if !(layout::OLDEST_FORMAT_VERSION..=layout::FORMAT_VERSION).contains(&format) {
            return Err(FormatError::UnsupportedFormat {
                loc: at(off::FORMAT_VERSION),
                found: format,
                supported: layout::FORMAT_VERSION,
            });
        }
        let expected = get_u32(b, off::CRC);
        let actual = crc32c::crc32c(&b[..off::CRC]);
        if !layout::checksum_matches(expected, actual) {
            return Err(FormatError::Checksum { loc: at(off::CRC), what: "header", expected, actual });
        }
        let corrupt = |o: usize, detail: String| FormatError::Corrupt { loc: at(o), what: "header", detail };
        let header_size = get_u32(b, off::HEADER_SIZE);
        if header_size as usize != HEADER_SIZE {
            return Err(corrupt(off::HEADER_SIZE, format!("header size {header_size}")));
        }
        let version = get_u64(b, off::VERSION_ID);
        if version == 0 {
            return Err(corrupt(off::VERSION_ID, "version id 0".into()));
        }
        let kind = Kind::from_byte(b[off::KIND])
            .ok_or_else(|| corrupt(off::KIND, format!("unknown kind {}", b[off::KIND])))?;
        let parent_id = get_u64(b, off::PARENT_ID);
        let parent = ImageRef { version: parent_id, image_id: get_array(b, off::PARENT_IMAGE_ID) };
        let full = ImageRef { version: get_u64(b, off::FULL_ID), image_id: get_array(b, off::FULL_IMAGE_ID) };
        let image_id: Id128 = get_array(b, off::IMAGE_ID);
        let parent = match kind {
            Kind::Full => {
                if parent_id != 0 || full.version != version || full.image_id != image_id {
                    return Err(corrupt(off::PARENT_ID, "a full with a parent".into()));
                }
                None
            }
            Kind::Incremental | Kind::Differential => {
                if parent_id == 0 || parent_id >= version || full.version == 0 || full.version > parent_id {
                    return Err(corrupt(
                        off::PARENT_ID,
                        format!("parent {parent_id} and full {} for version {version}", full.version),
                    ));
                }
                if kind == Kind::Differential && parent != full {
                    return Err(corrupt(off::PARENT_ID, "a differential whose parent is not its full".into()));
                }
                Some(parent)
            }
        };
        let block_size = get_u32(b, off::BLOCK_SIZE);
        check_block_size(block_size).map_err(|e| corrupt(off::BLOCK_SIZE, e.to_string()))?;
        let label_len = get_u16(b, off::LABEL_LEN) as usize;
        let source_len = get_u16(b, off::SOURCE_LEN) as usize;
        if label_len > layout::LABEL_MAX || source_len > layout::SOURCE_MAX {
            return Err(corrupt(off::LABEL_LEN, "label or source longer than its field".into()));
        }
        let text = |o: usize, n: usize| String::from_utf8_lossy(&b[o..o + n]).into_owned();
        let created_nanos = get_u32(b, off::CREATED_NANOS);
        if created_nanos >= 1_000_000_000 {
            return Err(corrupt(off::CREATED_NANOS, format!("nanoseconds {created_nanos}")));
        }
        Ok(ImageHeader {
            repo_id: get_array(b, off::REPO_ID),
            image_id,
            version,
            kind,
            rule: Rule::from_byte(b[off::RULE]),
            parent,
            full,
            block_size,
            compression_level: get_i32(b, off::COMPRESSION_LEVEL),
            source_size: get_u64(b, off::SOURCE_SIZE),
            created_secs: get_i64(b, off::CREATED_SECS),
            created_nanos,
            label: text(off::LABEL, label_len),
            source: text(off::SOURCE, source_len),
            source_id: SourceIdKind::from_byte(b[off::SOURCE_ID_KIND])
                .map(|kind| SourceId { kind, bytes: get_array(b, off::SOURCE_ID) }),
            selection: match b[off::BLOCK_SELECTION] {
                layout::SELECTION_USED => BlockSelection::Used { unused_bytes: get_u64(b, off::UNUSED_BYTES) },
                _ => BlockSelection::Every,
            },
        })
    }
}
