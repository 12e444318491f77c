//! Partition tables inside a disk image: MBR (primary partitions 1-4 and logical partitions 5+
//! through the extended-partition chain) and GPT (512-byte or 4096-byte sectors). Each partition
//! becomes a window `[start, start + len)` of disk.img. Every number read from the image is
//! checked against the disk's size before use; a malformed table yields fewer partitions, never
//! a panic or an endless walk. A GPT is used only when its header's and its partition array's
//! CRC-32s hold; when the primary's do not, the backup header at the end of the disk (and its
//! own copy of the array) is used, with a warning; with neither, the disk has no partitions
//! (a backup then keeps it whole).

/// One partition, numbered as in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

/// Highest partition number shown (inode numbering keeps 8 bits per version).
pub const MAX_PARTITION_NUMBER: u32 = 254;
/// Most logical partitions followed in an extended-partition chain.
const MAX_LOGICAL: u32 = 128;

const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

use super::DiskRead;
use crate::le::{get_u32 as u32_at, get_u64 as u64_at};

fn read_sector<R: DiskRead + ?Sized>(disk: &R, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    match disk.read_at(offset, &mut buf) {
        Ok(n) if n == len => Some(buf),
        _ => None,
    }
}

/// The partitions of the disk, by number; empty when there is no partition table (a
/// partition backup, or an unpartitioned disk).
pub fn find_partitions<R: DiskRead + ?Sized>(disk: &R, disk_size: u64) -> Vec<Partition> {
    let Some(mbr) = read_sector(disk, 0, 512) else { return Vec::new() };
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Vec::new();
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (e[4], u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)))
        })
        .collect();
    // A boot sector of a file system (FAT, NTFS) also ends in 55 AA: a real MBR's entries have
    // status 0x00 or 0x80.
    let statuses_ok = (0..4).all(|i| matches!(mbr[446 + 16 * i], 0x00 | 0x80));
    if !statuses_ok {
        return Vec::new();
    }
    if entries.iter().any(|e| e.0 == 0xEE) {
        for sector in [512u64, 4096] {
            if let Some(parts) = gpt(disk, disk_size, sector) {
                return parts;
            }
        }
        return Vec::new();
    }
    let mut parts = Vec::new();
    for (i, &(kind, lba, sectors)) in entries.iter().enumerate() {
        if kind == 0 || sectors == 0 {
            continue;
        }
        if let Some(p) = window(i as u32 + 1, lba * 512, sectors * 512, disk_size) {
            parts.push(p);
        }
        if matches!(kind, 0x05 | 0x0F | 0x85) {
            logical(disk, disk_size, lba, &mut parts);
        }
    }
    parts.retain(|p| !matches!(kind_of(&entries, p.number), Some(0x05 | 0x0F | 0x85)));
    parts
}

fn kind_of(entries: &[(u8, u64, u64)], number: u32) -> Option<u8> {
    (1..=4).contains(&number).then(|| entries[number as usize - 1].0)
}

fn window(number: u32, start: u64, len: u64, disk_size: u64) -> Option<Partition> {
    if number == 0 || number > MAX_PARTITION_NUMBER || len == 0 || start >= disk_size {
        return None;
    }
    let end = start.checked_add(len)?;
    (end <= disk_size).then_some(Partition { number, start, len })
}

/// Walks the chain of extended boot records that starts at sector `ext_lba`.
fn logical<R: DiskRead + ?Sized>(disk: &R, disk_size: u64, ext_lba: u64, parts: &mut Vec<Partition>) {
    let mut ebr_lba = ext_lba;
    for n in 0..MAX_LOGICAL {
        let Some(ebr) = read_sector(disk, ebr_lba * 512, 512) else { return };
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            return;
        }
        let (e1, e2) = (&ebr[446..462], &ebr[462..478]);
        let (start, sectors) = (u64::from(u32_at(e1, 8)), u64::from(u32_at(e1, 12)));
        if e1[4] != 0 && sectors != 0 {
            if let Some(p) = window(5 + n, (ebr_lba + start) * 512, sectors * 512, disk_size) {
                parts.push(p);
            }
        }
        let next = u64::from(u32_at(e2, 8));
        if e2[4] == 0 || next == 0 {
            return;
        }
        let next_lba = ext_lba + next;
        if next_lba <= ebr_lba {
            return; // chains only move forward; anything else is a loop
        }
        ebr_lba = next_lba;
    }
}

/// CRC-32 as GPT uses it (IEEE 802.3: reflected polynomial 0xEDB88320, initial and final
/// value all ones); not the crc32c of strata's own structures.
fn crc32_ieee(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Offsets in a GPT header.
const GPT_HEADER_SIZE: usize = 12;
const GPT_HEADER_CRC: usize = 16;
const GPT_ALTERNATE_LBA: usize = 32;
const GPT_ENTRIES_LBA: usize = 72;
const GPT_ENTRY_COUNT: usize = 80;
const GPT_ENTRY_SIZE: usize = 84;
const GPT_ENTRIES_CRC: usize = 88;

/// The GPT of a disk with `sector`-byte sectors: from the primary header, or from the backup
/// when the primary fails its checks; `None` when neither holds.
fn gpt<R: DiskRead + ?Sized>(disk: &R, disk_size: u64, sector: u64) -> Option<Vec<Partition>> {
    let primary = read_sector(disk, sector, sector as usize)?;
    if &primary[0..8] != GPT_SIGNATURE {
        return None;
    }
    let primary_sound = sound_gpt_header(&primary);
    if let Some(parts) = primary_sound.then(|| gpt_entries(disk, disk_size, sector, &primary)).flatten() {
        return Some(parts);
    }
    let last = disk_size / sector - 1;
    let alternate = if primary_sound { u64_at(&primary, GPT_ALTERNATE_LBA) } else { last };
    let backup = [alternate, last].into_iter().filter(|&lba| lba > 1 && lba <= last).find_map(|lba| {
        let header = read_sector(disk, lba.checked_mul(sector)?, sector as usize)?;
        (&header[0..8] == GPT_SIGNATURE && sound_gpt_header(&header)).then_some(header)
    });
    match backup.and_then(|header| gpt_entries(disk, disk_size, sector, &header)) {
        Some(parts) => {
            log::warn!(
                "the primary GPT header or partition array fails its CRC-32; the partitions are read from the                  backup GPT at the end of the disk"
            );
            Some(parts)
        }
        None => {
            log::warn!("the disk's GPT fails its CRC-32 checks, primary and backup; its partitions are not used");
            None
        }
    }
}

/// Whether a GPT header's size is sane and its CRC-32 holds.
fn sound_gpt_header(header: &[u8]) -> bool {
    let size = u32_at(header, GPT_HEADER_SIZE) as usize;
    if !(92..=header.len()).contains(&size) {
        return false;
    }
    let mut copy = header[..size].to_vec();
    copy[GPT_HEADER_CRC..GPT_HEADER_CRC + 4].fill(0);
    crc32_ieee(&copy) == u32_at(header, GPT_HEADER_CRC)
}

/// The partitions the (sound) GPT `header` lists, when its partition array is within the disk
/// and its CRC-32 holds.
fn gpt_entries<R: DiskRead + ?Sized>(disk: &R, disk_size: u64, sector: u64, header: &[u8]) -> Option<Vec<Partition>> {
    let entries_lba = u64_at(header, GPT_ENTRIES_LBA);
    let count = u32_at(header, GPT_ENTRY_COUNT);
    let entry_size = u32_at(header, GPT_ENTRY_SIZE) as u64;
    if !(128..=4096).contains(&entry_size) || count == 0 || count > 1024 {
        return None;
    }
    let table_at = entries_lba.checked_mul(sector)?;
    let table_len = entry_size * u64::from(count);
    if table_at.checked_add(table_len)? > disk_size {
        return None;
    }
    let table = read_sector(disk, table_at, table_len as usize)?;
    if crc32_ieee(&table) != u32_at(header, GPT_ENTRIES_CRC) {
        return None;
    }
    let mut parts = Vec::new();
    for i in 0..count {
        let e = &table[(i as u64 * entry_size) as usize..((i as u64 + 1) * entry_size) as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if last < first {
            continue;
        }
        let (Some(start), Some(len)) = (first.checked_mul(sector), (last - first + 1).checked_mul(sector)) else {
            continue;
        };
        if let Some(p) = window(i + 1, start, len, disk_size) {
            parts.push(p);
        }
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_entry(disk: &mut [u8], at: usize, kind: u8, lba: u32, sectors: u32) {
        disk[at + 4] = kind;
        disk[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        disk[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn signed(disk: &mut [u8], sector_at: usize) {
        disk[sector_at + 510] = 0x55;
        disk[sector_at + 511] = 0xAA;
    }

    #[test]
    fn mbr_primary_and_logical_partitions_are_numbered_as_in_the_table() {
        let mut d = vec![0u8; 4 << 20];
        signed(&mut d, 0);
        mbr_entry(&mut d, 446, 0x83, 2048, 2048); // 1: 1 MiB at 1 MiB
        mbr_entry(&mut d, 462, 0x05, 4096, 4096); // 2: extended
                                                  // EBR at sector 4096: logical 5 at +1 .. 1023 sectors; next EBR at ext+2048
        let ebr = 4096 * 512;
        signed(&mut d, ebr);
        mbr_entry(&mut d, ebr + 446, 0x83, 1, 1023);
        mbr_entry(&mut d, ebr + 462, 0x05, 2048, 2048);
        let ebr2 = (4096 + 2048) * 512;
        signed(&mut d, ebr2);
        mbr_entry(&mut d, ebr2 + 446, 0x83, 1, 100);
        let parts = find_partitions(&d, d.len() as u64);
        assert_eq!(
            parts,
            vec![
                Partition { number: 1, start: 1 << 20, len: 1 << 20 },
                Partition { number: 5, start: 4097 * 512, len: 1023 * 512 },
                Partition { number: 6, start: (4096 + 2049) * 512, len: 100 * 512 },
            ]
        );
    }

    #[test]
    fn ebr_chain_that_loops_is_cut() {
        let mut d = vec![0u8; 4 << 20];
        signed(&mut d, 0);
        mbr_entry(&mut d, 446, 0x0F, 100, 4000);
        let ebr = 100 * 512;
        signed(&mut d, ebr);
        mbr_entry(&mut d, ebr + 446, 0x83, 1, 10);
        mbr_entry(&mut d, ebr + 462, 0x05, 0x7fff_ffff, 10); // beyond the disk
        assert_eq!(find_partitions(&d, d.len() as u64).len(), 1);
        mbr_entry(&mut d, ebr + 462, 0x05, 0, 10); // points at itself
        assert_eq!(find_partitions(&d, d.len() as u64).len(), 1);
    }

    /// Writes a GPT header at sector `lba` (512-byte sectors) whose array of 128 entries is at
    /// `entries_lba`, with both CRC-32s right.
    fn gpt_header(d: &mut [u8], lba: u64, alternate: u64, entries_lba: u64) {
        let h = lba as usize * 512;
        d[h..h + 8].copy_from_slice(GPT_SIGNATURE);
        d[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
        d[h + 24..h + 32].copy_from_slice(&lba.to_le_bytes());
        d[h + 32..h + 40].copy_from_slice(&alternate.to_le_bytes());
        d[h + 72..h + 80].copy_from_slice(&entries_lba.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        let at = entries_lba as usize * 512;
        let array_crc = crc32_ieee(&d[at..at + 128 * 128]);
        d[h + 88..h + 92].copy_from_slice(&array_crc.to_le_bytes());
        d[h + 16..h + 20].fill(0);
        let crc = crc32_ieee(&d[h..h + 92]);
        d[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }

    /// An 8 MiB GPT disk with partitions 1 and 3 (and a 4th beyond the disk), both headers and
    /// both arrays sound.
    fn gpt_disk() -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        signed(&mut d, 0);
        mbr_entry(&mut d, 446, 0xEE, 1, 0xffff_ffff);
        let last = d.len() as u64 / 512 - 1;
        let backup_entries = last - 32;
        for table in [2, backup_entries] {
            let entry = |d: &mut Vec<u8>, i: usize, first: u64, last: u64| {
                let at = table as usize * 512 + i * 128;
                d[at] = 0xAF;
                d[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
                d[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
            };
            entry(&mut d, 0, 2048, 4095);
            entry(&mut d, 2, 4096, 8191);
            entry(&mut d, 3, 8192, 1 << 40); // beyond the disk: ignored
        }
        gpt_header(&mut d, 1, last, 2);
        gpt_header(&mut d, last, 1, backup_entries);
        d
    }

    const GPT_PARTS: [Partition; 2] =
        [Partition { number: 1, start: 1 << 20, len: 1 << 20 }, Partition { number: 3, start: 2 << 20, len: 2 << 20 }];

    #[test]
    fn gpt_partitions_are_found_and_bounded_by_the_disk() {
        let d = gpt_disk();
        assert_eq!(find_partitions(&d, d.len() as u64), GPT_PARTS);
    }

    #[test]
    fn the_crc32_is_gpts() {
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_damaged_primary_gpt_is_read_from_its_backup_and_two_damaged_ones_give_no_partitions() {
        let last = (8u64 << 20) / 512 - 1;
        // Damage in the primary header, in the primary array, in both headers, in both arrays.
        let primary_header = 512 + 40;
        let primary_array = 1024 + 5;
        let backup_header = last as usize * 512 + 40;
        let backup_array = (last as usize - 32) * 512 + 5;
        for (damage, found) in [
            (vec![primary_header], GPT_PARTS.to_vec()),
            (vec![primary_array], GPT_PARTS.to_vec()),
            (vec![backup_header], GPT_PARTS.to_vec()),
            (vec![primary_header, backup_header], vec![]),
            (vec![primary_array, backup_array], vec![]),
            (vec![primary_header, backup_array], vec![]),
        ] {
            let mut d = gpt_disk();
            for at in &damage {
                d[*at] ^= 0x40;
            }
            assert_eq!(find_partitions(&d, d.len() as u64), found, "damage at {damage:?}");
        }
    }

    #[test]
    fn file_system_without_a_table_has_no_partitions() {
        let mut d = vec![0u8; 1 << 20];
        assert!(find_partitions(&d, d.len() as u64).is_empty());
        signed(&mut d, 0);
        d[446] = 0x12; // not a status byte: a boot sector, not an MBR
        assert!(find_partitions(&d, d.len() as u64).is_empty());
        assert!(find_partitions(&vec![0u8; 100], 100).is_empty());
    }
}
