//! Partition tables inside a disk image: MBR (primary partitions 1-4 and logical partitions 5+
//! through the extended-partition chain) and GPT (512-byte or 4096-byte sectors). Each partition
//! becomes a window `[start, start + len)` of disk.img. Every number read from the image is
//! checked against the disk's size before use; a malformed table yields fewer partitions, never
//! a panic or an endless walk.

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

fn gpt<R: DiskRead + ?Sized>(disk: &R, disk_size: u64, sector: u64) -> Option<Vec<Partition>> {
    let header = read_sector(disk, sector, 92)?;
    if &header[0..8] != GPT_SIGNATURE {
        return None;
    }
    let entries_lba = u64_at(&header, 72);
    let count = u32_at(&header, 80);
    let entry_size = u32_at(&header, 84) as u64;
    if !(128..=4096).contains(&entry_size) || count == 0 || count > 1024 {
        return None;
    }
    let table_at = entries_lba.checked_mul(sector)?;
    let table_len = entry_size * u64::from(count);
    if table_at.checked_add(table_len)? > disk_size {
        return None;
    }
    let table = read_sector(disk, table_at, table_len as usize)?;
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

    #[test]
    fn gpt_partitions_are_found_and_bounded_by_the_disk() {
        let mut d = vec![0u8; 8 << 20];
        signed(&mut d, 0);
        mbr_entry(&mut d, 446, 0xEE, 1, 0xffff_ffff);
        let h = 512;
        d[h..h + 8].copy_from_slice(GPT_SIGNATURE);
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        let entry = |d: &mut Vec<u8>, i: usize, first: u64, last: u64| {
            let at = 1024 + i * 128;
            d[at] = 0xAF;
            d[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
            d[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
        };
        entry(&mut d, 0, 2048, 4095);
        entry(&mut d, 2, 4096, 8191);
        entry(&mut d, 3, 8192, 1 << 40); // beyond the disk: ignored
        let parts = find_partitions(&d, d.len() as u64);
        assert_eq!(
            parts,
            vec![
                Partition { number: 1, start: 1 << 20, len: 1 << 20 },
                Partition { number: 3, start: 2 << 20, len: 2 << 20 }
            ]
        );
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
