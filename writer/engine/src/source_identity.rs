//! Who the source is, so that a backup of another disk into the same repository is noticed
//! instead of being stored silently as an "incremental" that changed everything: its stable
//! name (a file's canonical path; a block device's `/dev/disk/by-id/` name, which survives
//! `/dev/sdX` renumbering) and the id its content carries (a partition table's disk GUID or
//! signature, a file system's UUID or serial), both recorded in every image header.

use std::path::{Path, PathBuf};

use strata_format::{ImageHeader, SourceId, SourceIdKind};

/// Bytes from the start of a source that `content_id` looks at (btrfs keeps its superblock at
/// 64 KiB).
pub const HEAD_BYTES: usize = 72 << 10;

/// The source's identity now.
#[derive(Debug, Clone)]
pub struct SourceIdentity {
    pub name: PathBuf,
    pub id: SourceId,
}

/// The stable name of `path`: for a block device the `/dev/disk/by-id/` link that leads to it
/// (one naming the model and serial rather than a WWN when there are several), else its
/// canonical path.
pub fn stable_name(path: &Path) -> PathBuf {
    stable_name_in(path, Path::new("/dev/disk/by-id"))
}

fn stable_name_in(path: &Path, by_id: &Path) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if !std::fs::metadata(&canonical).is_ok_and(|m| m.file_type().is_block_device()) {
        return canonical;
    }
    let Ok(entries) = std::fs::read_dir(by_id) else { return canonical };
    let mut names: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|link| link.canonicalize().is_ok_and(|target| target == canonical))
        .collect();
    let generic = |p: &PathBuf| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        n.starts_with("wwn-") || n.starts_with("nvme-eui.") || n.starts_with("dm-") || n.starts_with("lvm-pv-")
    };
    names.sort_by_key(|p| (generic(p), p.clone()));
    names.into_iter().next().unwrap_or(canonical)
}

fn non_zero(b: &[u8]) -> bool {
    b.iter().any(|&x| x != 0)
}

/// The id the content starting with `head` (the first `HEAD_BYTES` of the source, or all of
/// it when shorter) identifies itself by; `SourceId::PATH_ONLY` when it carries none strata knows.
pub fn content_id(head: &[u8]) -> SourceId {
    let at = |offset: usize, len: usize| head.get(offset..offset + len);
    let is = |offset: usize, magic: &[u8]| at(offset, magic.len()) == Some(magic);
    let id = |kind, offset: usize, len: usize| at(offset, len).filter(|b| non_zero(b)).map(|b| SourceId::new(kind, b));
    // A GPT header at LBA 1 (512- or 4096-byte sectors) behind a protective MBR: the whole disk.
    for sector in [512usize, 4096] {
        if is(510, &[0x55, 0xaa]) && is(sector, b"EFI PART") {
            if let Some(found) = id(SourceIdKind::Gpt, sector + 56, 16) {
                return found;
            }
        }
    }
    let file_system = if is(0, b"XFSB") {
        id(SourceIdKind::Xfs, 32, 16)
    } else if is(0, b"LUKS\xba\xbe") {
        at(168, 36)
            .and_then(|text| std::str::from_utf8(text).ok())
            .and_then(|text| {
                let hex: String = text.chars().filter(|c| *c != '-').collect();
                (0..16).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<Vec<u8>>>()
            })
            .map(|b| SourceId::new(SourceIdKind::Luks, &b))
    } else if is(3, b"NTFS    ") {
        id(SourceIdKind::Ntfs, 0x48, 8)
    } else if is(3, b"EXFAT   ") {
        id(SourceIdKind::Exfat, 100, 4)
    } else if is(82, b"FAT32   ") {
        id(SourceIdKind::Fat, 67, 4)
    } else if is(54, b"FAT1") && is(38, &[0x29]) {
        id(SourceIdKind::Fat, 39, 4)
    } else if is(1024 + 56, &[0x53, 0xef]) {
        id(SourceIdKind::Ext, 1024 + 104, 16)
    } else if is(0x10040, b"_BHRfS_M") {
        id(SourceIdKind::Btrfs, 0x10020, 16)
    } else if is(4096 - 10, b"SWAPSPACE2") {
        id(SourceIdKind::Swap, 1024 + 12, 16)
    } else {
        None
    };
    if let Some(found) = file_system {
        return found;
    }
    if is(510, &[0x55, 0xaa]) {
        if let Some(found) = id(SourceIdKind::Mbr, 440, 4) {
            return found;
        }
    }
    SourceId::PATH_ONLY
}

/// Why the source now is not the one `recorded` (the version a backup would build on) was
/// taken from, or `None` when it is the same or the version recorded no identity (older than
/// strata 0.4). When both contents carry an id the ids decide, so a disk that moved from
/// `/dev/sdb` to `/dev/sdc`, or an image file that was moved, is still the same source; when
/// either carries none, the stable names decide.
pub fn replaced(recorded: &ImageHeader, now: &SourceIdentity) -> Option<String> {
    let before = recorded.source_id?;
    let version = recorded.version;
    if before.has_content_id() && now.id.has_content_id() {
        return (before != now.id).then(|| {
            format!(
                "the source {} carries {}, but version {version} was taken from a source with {}: another disk \
                 or a new file system",
                now.name.display(),
                now.id,
                before
            )
        });
    }
    let name = now.name.to_string_lossy();
    (recorded.source != name).then(|| {
        format!(
            "the source is {name}, but version {version} was backed up from {} ({}): another disk or image",
            recorded.source,
            match before.has_content_id() {
                true => before.to_string(),
                false => "no content id".to_string(),
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(offset: usize, bytes: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; HEAD_BYTES];
        head[offset..offset + bytes.len()].copy_from_slice(bytes);
        head
    }

    #[test]
    fn file_systems_and_tables_are_recognized_by_their_ids() {
        let mut ext = head_with(1024 + 56, &[0x53, 0xef]);
        ext[1024 + 104..1024 + 120].copy_from_slice(&[7; 16]);
        assert_eq!(content_id(&ext), SourceId::new(SourceIdKind::Ext, &[7; 16]));
        let mut ntfs = head_with(3, b"NTFS    ");
        ntfs[0x48..0x50].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        ntfs[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(content_id(&ntfs).kind, SourceIdKind::Ntfs, "a boot sector is not taken for an MBR");
        let mut mbr = head_with(510, &[0x55, 0xaa]);
        mbr[440..444].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(content_id(&mbr), SourceId::new(SourceIdKind::Mbr, &[9; 4]));
        let mut gpt = mbr.clone();
        gpt[512..520].copy_from_slice(b"EFI PART");
        gpt[512 + 56..512 + 72].copy_from_slice(&[5; 16]);
        assert_eq!(content_id(&gpt), SourceId::new(SourceIdKind::Gpt, &[5; 16]));
        let mut luks = head_with(0, b"LUKS\xba\xbe");
        luks[168..204].copy_from_slice(b"0102030a-0b0c-0d0e-0f10-111213141516");
        assert_eq!(content_id(&luks).to_string(), "LUKS UUID 0102030a-0b0c-0d0e-0f10-111213141516");
        let zero_uuid = head_with(1024 + 56, &[0x53, 0xef]);
        assert_eq!(content_id(&zero_uuid), SourceId::PATH_ONLY, "an all-zero UUID identifies nothing");
        assert_eq!(content_id(&[0u8; 100]), SourceId::PATH_ONLY, "a short source");
    }

    #[test]
    fn versions_older_than_identities_are_never_called_replaced() {
        let mut header = strata_format::ImageHeader {
            repo_id: [0; 16],
            image_id: [0; 16],
            version: 4,
            kind: strata_format::Kind::Full,
            rule: strata_format::Rule::First,
            parent: None,
            full: strata_format::ImageRef { version: 4, image_id: [0; 16] },
            block_size: 4096,
            compression_level: 3,
            source_size: 1,
            created_secs: 0,
            created_nanos: 0,
            label: String::new(),
            source: "disk.img".into(),
            source_id: None,
            selection: Default::default(),
        };
        let now = SourceIdentity { name: "/elsewhere/other.img".into(), id: SourceId::PATH_ONLY };
        assert_eq!(replaced(&header, &now), None, "no identity recorded: nothing to compare");
        header.source_id = Some(SourceId::PATH_ONLY);
        assert!(replaced(&header, &now).unwrap().contains("backed up from disk.img"));
    }

    #[test]
    fn a_device_is_named_by_its_serial_link_and_a_file_by_its_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"x").unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        let relative = dir.path().join("sub/../disk.img");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(stable_name_in(&relative, &by_id), file.canonicalize().unwrap());
        let Some(dev) = ["/dev/loop0", "/dev/null"].iter().map(Path::new).find(|p| {
            std::fs::metadata(p).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        }) else {
            return; // no block device to point links at
        };
        std::os::unix::fs::symlink(dev, by_id.join("wwn-0x5000c500a1b2c3d4")).unwrap();
        std::os::unix::fs::symlink(dev, by_id.join("ata-ST2000DM008_ZFL1ABCD")).unwrap();
        assert_eq!(stable_name_in(dev, &by_id), by_id.join("ata-ST2000DM008_ZFL1ABCD"));
    }
}
