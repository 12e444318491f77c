//! The identity a source's content carries, as recorded in every image header (SPEC.md §3.1,
//! bytes 472–488): what kind of id it is and its 16 bytes. It lets a backup notice that the disk
//! it reads is not the one the repository's versions came from (rule "source replaced").

use std::fmt;

/// The kind of id, one byte in the header. 0 (no identity recorded: images written before
/// strata 0.4) is `Option::None` of the header's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceIdKind {
    /// Identity recorded, but the content carries no id strata knows: the source's path decides.
    PathOnly,
    /// A GPT disk GUID.
    Gpt,
    /// An MBR disk signature (4 bytes).
    Mbr,
    /// An ext2/3/4 file system UUID.
    Ext,
    Xfs,
    Btrfs,
    /// An NTFS volume serial number (8 bytes).
    Ntfs,
    /// A FAT12/16/32 volume id (4 bytes).
    Fat,
    /// An exFAT volume serial number (4 bytes).
    Exfat,
    /// A LUKS header UUID.
    Luks,
    /// A Linux swap area UUID.
    Swap,
    /// A kind this strata does not know (written by a newer one).
    Other(u8),
}

impl SourceIdKind {
    pub fn to_byte(self) -> u8 {
        match self {
            SourceIdKind::PathOnly => 1,
            SourceIdKind::Gpt => 2,
            SourceIdKind::Mbr => 3,
            SourceIdKind::Ext => 4,
            SourceIdKind::Xfs => 5,
            SourceIdKind::Btrfs => 6,
            SourceIdKind::Ntfs => 7,
            SourceIdKind::Fat => 8,
            SourceIdKind::Exfat => 9,
            SourceIdKind::Luks => 10,
            SourceIdKind::Swap => 11,
            SourceIdKind::Other(b) => b,
        }
    }

    /// `None` for 0: no identity recorded.
    pub fn from_byte(b: u8) -> Option<SourceIdKind> {
        Some(match b {
            0 => return None,
            1 => SourceIdKind::PathOnly,
            2 => SourceIdKind::Gpt,
            3 => SourceIdKind::Mbr,
            4 => SourceIdKind::Ext,
            5 => SourceIdKind::Xfs,
            6 => SourceIdKind::Btrfs,
            7 => SourceIdKind::Ntfs,
            8 => SourceIdKind::Fat,
            9 => SourceIdKind::Exfat,
            10 => SourceIdKind::Luks,
            11 => SourceIdKind::Swap,
            other => SourceIdKind::Other(other),
        })
    }

    /// How many of the 16 bytes the id uses.
    fn len(self) -> usize {
        match self {
            SourceIdKind::PathOnly => 0,
            SourceIdKind::Mbr | SourceIdKind::Fat | SourceIdKind::Exfat => 4,
            SourceIdKind::Ntfs => 8,
            _ => 16,
        }
    }
}

/// A source content id: its kind and bytes (unused bytes zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId {
    pub kind: SourceIdKind,
    pub bytes: [u8; 16],
}

impl SourceId {
    /// The id of a source whose content carries none that strata knows.
    pub const PATH_ONLY: SourceId = SourceId { kind: SourceIdKind::PathOnly, bytes: [0; 16] };

    /// An id of `kind` from its bytes (at most 16; fewer are zero-padded).
    pub fn new(kind: SourceIdKind, id: &[u8]) -> SourceId {
        let mut bytes = [0u8; 16];
        let n = id.len().min(16);
        bytes[..n].copy_from_slice(&id[..n]);
        SourceId { kind, bytes }
    }

    /// Whether the content carries an id (not `PathOnly`).
    pub fn has_content_id(&self) -> bool {
        self.kind != SourceIdKind::PathOnly
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid(b: &[u8; 16]) -> String {
    format!("{}-{}-{}-{}-{}", hex(&b[..4]), hex(&b[4..6]), hex(&b[6..8]), hex(&b[8..10]), hex(&b[10..]))
}

/// As `blkid` prints them: UUIDs in their usual form, a GPT GUID with its first three fields
/// little-endian, serials as the tools that make the file systems show them.
impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.bytes;
        let le = |r: std::ops::Range<usize>| b[r].iter().rev().map(|x| format!("{x:02x}")).collect::<String>();
        match self.kind {
            SourceIdKind::PathOnly => write!(f, "no content id"),
            SourceIdKind::Gpt => {
                write!(f, "GPT disk GUID {}-{}-{}-{}-{}", le(0..4), le(4..6), le(6..8), hex(&b[8..10]), hex(&b[10..]))
            }
            SourceIdKind::Mbr => write!(f, "MBR disk signature 0x{}", le(0..4)),
            SourceIdKind::Ext => write!(f, "ext2/3/4 UUID {}", uuid(b)),
            SourceIdKind::Xfs => write!(f, "XFS UUID {}", uuid(b)),
            SourceIdKind::Btrfs => write!(f, "btrfs UUID {}", uuid(b)),
            SourceIdKind::Luks => write!(f, "LUKS UUID {}", uuid(b)),
            SourceIdKind::Swap => write!(f, "swap UUID {}", uuid(b)),
            SourceIdKind::Ntfs => write!(f, "NTFS serial {}", le(0..8).to_uppercase()),
            SourceIdKind::Fat | SourceIdKind::Exfat => {
                let name = if self.kind == SourceIdKind::Fat { "FAT" } else { "exFAT" };
                let s = le(0..4).to_uppercase();
                write!(f, "{name} volume id {}-{}", &s[..4], &s[4..])
            }
            SourceIdKind::Other(k) => write!(f, "content id of kind {k} {}", hex(&b[..self.kind.len().max(16)])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_blkid_does() {
        let ext =
            SourceId::new(SourceIdKind::Ext, &[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(ext.to_string(), "ext2/3/4 UUID 12345678-9abc-def0-0102-030405060708");
        let fat = SourceId::new(SourceIdKind::Fat, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(fat.to_string(), "FAT volume id 1234-5678");
        let gpt =
            SourceId::new(SourceIdKind::Gpt, &[0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(gpt.to_string(), "GPT disk GUID 12345678-9abc-def0-0102-030405060708");
        for b in 1..=12u8 {
            let kind = SourceIdKind::from_byte(b).unwrap();
            assert_eq!(kind.to_byte(), b);
        }
        assert_eq!(SourceIdKind::from_byte(0), None);
    }
}
