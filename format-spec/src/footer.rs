//! The 128-byte footer that ends every finished image: where the index is, its checksum, the
//! version's statistics and its whole-source digest. A file without a valid footer is an
//! incomplete write and is never a version.

use crate::error::{FormatError, Loc, Result};
use crate::header::Id128;
use crate::layout::{self, footer as off, FOOTER_SIZE};
use crate::le::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFooter {
    /// Must equal the header's image id: ties the footer to the file it ends.
    pub image_id: Id128,
    pub index_offset: u64,
    pub entry_count: u64,
    pub index_crc: u32,
    /// Sum of the stored (compressed or raw) lengths of this image's blocks.
    pub stored_bytes: u64,
    /// Blocks of the version (this image resolved through its chain) that are not zero.
    pub present_blocks: u64,
    /// The whole-source digest of the version (see SPEC.md, "Source digest").
    pub source_digest: [u8; 32],
}

impl ImageFooter {
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        put_bytes(&mut b, off::MAGIC, &layout::FOOTER_MAGIC);
        put_u32(&mut b, off::FORMAT_VERSION, layout::FORMAT_VERSION);
        put_u32(&mut b, off::FOOTER_SIZE, FOOTER_SIZE as u32);
        put_bytes(&mut b, off::IMAGE_ID, &self.image_id);
        put_u64(&mut b, off::INDEX_OFFSET, self.index_offset);
        put_u64(&mut b, off::ENTRY_COUNT, self.entry_count);
        put_u32(&mut b, off::INDEX_CRC, self.index_crc);
        put_u64(&mut b, off::STORED_BYTES, self.stored_bytes);
        put_u64(&mut b, off::PRESENT_BLOCKS, self.present_blocks);
        put_bytes(&mut b, off::SOURCE_DIGEST, &self.source_digest);
        let crc = crc32c::crc32c(&b[..off::CRC]);
        put_u32(&mut b, off::CRC, crc);
        b
    }

    /// Decodes a footer read from `file_offset` of the file `loc` names.
    pub fn decode(b: &[u8; FOOTER_SIZE], loc: &Loc, file_offset: u64) -> Result<ImageFooter> {
        let at = |o: usize| loc.clone().at(file_offset + o as u64);
        if b[off::MAGIC..off::MAGIC + 8] != layout::FOOTER_MAGIC {
            return Err(FormatError::Incomplete {
                loc: at(off::MAGIC),
                detail: "no footer: the backup that wrote it did not finish".into(),
            });
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
            return Err(FormatError::Checksum { loc: at(off::CRC), what: "footer", expected, actual });
        }
        let size = get_u32(b, off::FOOTER_SIZE);
        if size as usize != FOOTER_SIZE {
            return Err(FormatError::Corrupt {
                loc: at(off::FOOTER_SIZE),
                what: "footer",
                detail: format!("footer size {size}"),
            });
        }
        Ok(ImageFooter {
            image_id: get_array(b, off::IMAGE_ID),
            index_offset: get_u64(b, off::INDEX_OFFSET),
            entry_count: get_u64(b, off::ENTRY_COUNT),
            index_crc: get_u32(b, off::INDEX_CRC),
            stored_bytes: get_u64(b, off::STORED_BYTES),
            present_blocks: get_u64(b, off::PRESENT_BLOCKS),
            source_digest: get_array(b, off::SOURCE_DIGEST),
        })
    }
}
