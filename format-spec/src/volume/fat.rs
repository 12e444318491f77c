//! FAT12, FAT16 and FAT32 ("vfat", as blkid names them): which data clusters are free.
//!
//! Reads the boot sector's BIOS parameter block, every copy of the file allocation table and
//! the directory tree. The FAT type follows from the cluster count, as Microsoft's
//! specification says (fewer than 4085 clusters is FAT12, fewer than 65525 FAT16, else FAT32);
//! a BPB whose FAT16/FAT32 fields disagree with that count is refused, because Linux tells
//! FAT32 by its FAT-size fields instead. A data cluster whose FAT entry is 0 is free; the
//! reserved sectors, the FATs, the FAT12/16 root folder and whatever follows the last cluster
//! are always kept.
//!
//! Cross-checks, each of which keeps the region whole when it fails:
//! - every FAT copy is identical to the first, except on FAT32 with mirroring disabled (bit 7
//!   of the extended flags), where only the active FAT counts and the others are not read;
//! - the FAT32 backup boot sector carries the same BPB as the boot sector;
//! - FAT[0] carries the BPB's media byte; every entry is free, a cluster number in range, or a
//!   reserved, bad or end-of-chain value; no chain leads into a free cluster;
//! - the directory tree is walked from the root: every folder's and file's chain starts at a
//!   used cluster, no cluster belongs to two chains (which also bounds the walk on a cyclic
//!   chain), and each file's chain is long enough for its size. The FAT32 root cluster is used.
//!
//! Refused as not cleanly unmounted: the dirty bit of the boot sector's state byte (set by
//! Linux while mounted) and a cleared clean-shutdown bit in FAT[1] (Windows); a set hard-error
//! bit in FAT[1] is refused too.
//!
//! Not compared: the FAT32 FSInfo free-cluster count. Microsoft's specification calls it a
//! hint that need not be correct, Windows leaves it stale, and it describes the FAT that is
//! read and cross-checked here anyway. A FAT12/16 boot sector has no backup: a damaged BPB
//! that still looks valid cannot be caught, beyond the FAT and directory checks it upsets.
//! Volumes with more clusters than `MAX_CLUSTERS` are kept whole (the FAT is held in memory).

use super::{FreeRanges, Scan, Window, MAX_READ};
use crate::le::{get_u16 as u16_at, get_u32 as u32_at};

/// The largest cluster count whose FAT is held in memory for the directory walk (4 bytes per
/// cluster).
const MAX_CLUSTERS: u64 = 1 << 26;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fat12 => "FAT12",
            Kind::Fat16 => "FAT16",
            Kind::Fat32 => "FAT32",
        }
    }

    /// The bits of a FAT entry that hold its value.
    fn mask(self) -> u32 {
        match self {
            Kind::Fat12 => 0xFFF,
            Kind::Fat16 => 0xFFFF,
            Kind::Fat32 => 0x0FFF_FFFF,
        }
    }

    fn bits(self) -> u64 {
        match self {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        }
    }

    /// Bytes of FAT that `entries` entries take.
    fn fat_bytes(self, entries: u64) -> u64 {
        match self {
            Kind::Fat12 => (entries * 3).div_ceil(2),
            Kind::Fat16 => entries * 2,
            Kind::Fat32 => entries * 4,
        }
    }
}

/// The BPB fields this parser uses, in sectors unless named otherwise.
#[derive(Debug)]
struct Bpb {
    kind: Kind,
    sector: u64,
    cluster_sectors: u64,
    reserved: u64,
    fats: u64,
    fat_sectors: u64,
    root_entries: u64,
    total: u64,
    first_data: u64,
    clusters: u64,
    media: u8,
    ext_flags: u16,
    root_cluster: u32,
    backup_boot: u64,
}

impl Bpb {
    fn cluster_bytes(&self) -> u64 {
        self.cluster_sectors * self.sector
    }

    /// Byte offset of data cluster `c` (2 or more) from the region's start.
    fn cluster_offset(&self, c: u64) -> u64 {
        (self.first_data + (c - 2) * self.cluster_sectors) * self.sector
    }

    fn max_cluster(&self) -> u64 {
        self.clusters + 1
    }

    /// Whether only the active FAT counts (FAT32 with mirroring disabled).
    fn mirroring_disabled(&self) -> bool {
        self.kind == Kind::Fat32 && self.ext_flags & 0x80 != 0
    }
}

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    let boot = w.read(0, 512).ok()?;
    if !has_fat_signature(&boot) {
        return None;
    }
    Some(Scan { file_system: "vfat", free: free(w, &boot) })
}

/// The 0x55AA mark, a FAT type string, no NTFS or exFAT name, and a BPB whose basic fields
/// are valid.
fn has_fat_signature(b: &[u8]) -> bool {
    let names_fat = matches!(&b[0x36..0x3E], b"FAT12   " | b"FAT16   " | b"FAT     ") || &b[0x52..0x5A] == b"FAT32   ";
    let other = matches!(&b[3..11], b"NTFS    " | b"EXFAT   ");
    let sector = u16_at(b, 0x0B);
    let cluster = b[0x0D];
    b[510..512] == [0x55, 0xAA]
        && names_fat
        && !other
        && (512..=4096).contains(&sector)
        && sector.is_power_of_two()
        && cluster.is_power_of_two()
        && u16_at(b, 0x0E) > 0
        && b[0x10] > 0
}

fn free(w: &Window<'_>, boot: &[u8]) -> Result<FreeRanges, String> {
    let bpb = parse_bpb(boot)?;
    let fs_bytes = bpb.total * bpb.sector;
    if fs_bytes > w.len() {
        return Err(format!(
            "the {} file system is {fs_bytes} bytes long but its region only {}",
            bpb.kind.name(),
            w.len()
        ));
    }
    check_state_byte(&bpb, boot)?;
    check_backup_boot(w, &bpb, boot)?;
    let fat = read_fat(w, &bpb)?;
    check_reserved_entries(&bpb, &fat)?;
    check_entries(&bpb, &fat)?;
    walk_tree(w, &bpb, &fat)?;
    free_ranges(&bpb, &fat)
}

fn parse_bpb(b: &[u8]) -> Result<Bpb, String> {
    let sector = u64::from(u16_at(b, 0x0B));
    let cluster_sectors = u64::from(b[0x0D]);
    let reserved = u64::from(u16_at(b, 0x0E));
    let fats = u64::from(b[0x10]);
    let root_entries = u64::from(u16_at(b, 0x11));
    let total16 = u64::from(u16_at(b, 0x13));
    let fat16 = u64::from(u16_at(b, 0x16));
    let fat32 = u64::from(u32_at(b, 0x24));
    let total = if total16 != 0 { total16 } else { u64::from(u32_at(b, 0x20)) };
    let fat_sectors = if fat16 != 0 { fat16 } else { fat32 };
    if total == 0 || fat_sectors == 0 {
        return Err("the FAT boot sector gives no total size or no FAT size".into());
    }
    let root_sectors = (root_entries * 32).div_ceil(sector);
    let first_data = reserved + fats * fat_sectors + root_sectors;
    if first_data >= total {
        return Err(format!(
            "the FAT boot sector places its data area ({first_data} sectors in) past its end ({total} sectors)"
        ));
    }
    let clusters = (total - first_data) / cluster_sectors;
    let kind = match clusters {
        0..4085 => Kind::Fat12,
        4085..65525 => Kind::Fat16,
        _ => Kind::Fat32,
    };
    let bpb = Bpb {
        kind,
        sector,
        cluster_sectors,
        reserved,
        fats,
        fat_sectors,
        root_entries,
        total,
        first_data,
        clusters,
        media: b[0x15],
        ext_flags: u16_at(b, 0x28),
        root_cluster: u32_at(b, 0x2C),
        backup_boot: u64::from(u16_at(b, 0x32)),
    };
    check_kind_fields(&bpb, b, fat16)?;
    Ok(bpb)
}

/// The FAT16/FAT32 fields must agree with the type the cluster count gives, and the FAT must
/// be large enough for every cluster.
fn check_kind_fields(bpb: &Bpb, b: &[u8], fat16: u64) -> Result<(), String> {
    let name = bpb.kind.name();
    let clusters = bpb.clusters;
    if bpb.kind == Kind::Fat32 {
        if fat16 != 0 || bpb.root_entries != 0 {
            return Err(format!(
                "{clusters} clusters make it FAT32, but its boot sector has FAT12/16 fields (FAT size or root entries)"
            ));
        }
        if u16_at(b, 0x2A) != 0 {
            return Err(format!("FAT32 version {:#06x} (strata reads version 0)", u16_at(b, 0x2A)));
        }
        if clusters > MAX_CLUSTERS {
            return Err(format!("{clusters} clusters: more than strata checks in memory ({MAX_CLUSTERS})"));
        }
    } else if fat16 == 0 {
        return Err(format!("{clusters} clusters make it {name}, but its boot sector has only a FAT32 FAT size"));
    }
    if bpb.kind.fat_bytes(clusters + 2) > bpb.fat_sectors * bpb.sector {
        return Err(format!("its {name} FAT of {} sectors is too small for {clusters} clusters", bpb.fat_sectors));
    }
    if bpb.mirroring_disabled() && u64::from(bpb.ext_flags & 0x0F) >= bpb.fats {
        return Err(format!("FAT32 active FAT {} does not exist ({} FATs)", bpb.ext_flags & 0x0F, bpb.fats));
    }
    Ok(())
}

/// Linux sets bit 0 of the boot sector's state byte while the volume is mounted.
fn check_state_byte(bpb: &Bpb, boot: &[u8]) -> Result<(), String> {
    let at = if bpb.kind == Kind::Fat32 { 0x41 } else { 0x25 };
    if boot[at] & 0x01 != 0 {
        return Err(format!(
            "{}: the boot sector's dirty bit is set: not cleanly unmounted (mount and unmount it, or run fsck.vfat)",
            bpb.kind.name()
        ));
    }
    Ok(())
}

/// The FAT32 backup boot sector must carry the same BPB (its state byte and label may differ).
fn check_backup_boot(w: &Window<'_>, bpb: &Bpb, boot: &[u8]) -> Result<(), String> {
    if bpb.kind != Kind::Fat32 || bpb.backup_boot == 0 || bpb.backup_boot == 0xFFFF {
        return Ok(());
    }
    if bpb.backup_boot >= bpb.reserved {
        return Err(format!("the FAT32 backup boot sector {} lies outside the reserved sectors", bpb.backup_boot));
    }
    let backup = w.read(bpb.backup_boot * bpb.sector, 512)?;
    if backup[0x0B..0x41] != boot[0x0B..0x41] {
        return Err("the FAT32 backup boot sector's BPB differs from the boot sector's".into());
    }
    Ok(())
}

/// The entries of the FAT that counts, after checking that the other copies match it.
fn read_fat(w: &Window<'_>, bpb: &Bpb) -> Result<Vec<u32>, String> {
    let entries = bpb.clusters + 2;
    let bytes = bpb.kind.fat_bytes(entries);
    let fat_len = bpb.fat_sectors * bpb.sector;
    let active = if bpb.mirroring_disabled() { u64::from(bpb.ext_flags & 0x0F) } else { 0 };
    let fat_start = |i: u64| (bpb.reserved * bpb.sector) + i * fat_len;
    // A multiple of 3 bytes, so that a piece of a FAT12 FAT holds whole pairs of entries.
    let chunk = (MAX_READ as u64 / 16) - (MAX_READ as u64 / 16) % 12;
    let mut fat = Vec::with_capacity(entries as usize);
    let mut done = 0;
    while done < bytes {
        let n = chunk.min(bytes - done) as usize;
        let piece = w.read(fat_start(active) + done, n)?;
        if !bpb.mirroring_disabled() {
            for i in 1..bpb.fats {
                if w.read(fat_start(i) + done, n)? != piece {
                    return Err(format!("{} FAT copy {} differs from copy 1", bpb.kind.name(), i + 1));
                }
            }
        }
        let in_piece = (entries - fat.len() as u64).min(n as u64 * 8 / bpb.kind.bits());
        decode(bpb.kind, &piece, in_piece, &mut fat);
        done += n as u64;
    }
    Ok(fat)
}

/// Appends the first `entries` entries of a piece of FAT that starts at an even entry.
fn decode(kind: Kind, raw: &[u8], entries: u64, fat: &mut Vec<u32>) {
    fat.extend((0..entries as usize).map(|n| match kind {
        Kind::Fat12 => {
            let v = u16_at(raw, n + n / 2);
            u32::from(if n % 2 == 1 { v >> 4 } else { v & 0xFFF })
        }
        Kind::Fat16 => u32::from(u16_at(raw, n * 2)),
        Kind::Fat32 => u32_at(raw, n * 4) & 0x0FFF_FFFF,
    }));
}

/// FAT[0] carries the media byte; FAT[1] the clean-shutdown and hard-error bits (FAT16/32).
fn check_reserved_entries(bpb: &Bpb, fat: &[u32]) -> Result<(), String> {
    let name = bpb.kind.name();
    if fat[0] & 0xFF != u32::from(bpb.media) {
        return Err(format!("{name} FAT[0] {:#x} does not carry the media byte {:#04x}", fat[0], bpb.media));
    }
    let (clean, no_error) = match bpb.kind {
        Kind::Fat12 => return Ok(()),
        Kind::Fat16 => (0x8000, 0x4000),
        Kind::Fat32 => (0x0800_0000, 0x0400_0000),
    };
    if fat[1] & clean == 0 {
        return Err(format!("{name} FAT[1] says not cleanly unmounted (mount and unmount it, or run fsck.vfat)"));
    }
    if fat[1] & no_error == 0 {
        return Err(format!("{name} FAT[1] says the disk had I/O errors (run fsck.vfat)"));
    }
    Ok(())
}

/// What a FAT entry says about its cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Free,
    Next(u64),
    Bad,
    /// End of chain, or a value the specification reserves: used, with no next cluster.
    End,
}

fn classify(bpb: &Bpb, v: u32) -> Result<Entry, String> {
    let mask = bpb.kind.mask();
    let v64 = u64::from(v);
    Ok(match v {
        0 => Entry::Free,
        _ if (2..=bpb.max_cluster()).contains(&v64) => Entry::Next(v64),
        _ if v == mask - 8 => Entry::Bad,
        _ if v >= mask - 15 => Entry::End,
        _ => {
            return Err(format!(
                "a {} FAT entry holds {v:#x}, not a cluster of the {} there are",
                bpb.kind.name(),
                bpb.clusters
            ))
        }
    })
}

/// Every entry is valid, and no chain leads into a free cluster.
fn check_entries(bpb: &Bpb, fat: &[u32]) -> Result<(), String> {
    for c in 2..fat.len() {
        if let Entry::Next(next) = classify(bpb, fat[c])? {
            if fat[next as usize] == 0 {
                return Err(format!("{} cluster {c} leads to cluster {next}, which is marked free", bpb.kind.name()));
            }
        }
    }
    Ok(())
}

/// Clusters already found in a chain; a second visit means cross-linked or cyclic chains.
struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    fn new(entries: usize) -> Self {
        Seen { bits: vec![0; entries.div_ceil(64)] }
    }

    /// Marks `c`; false when it was marked already.
    fn mark(&mut self, c: u64) -> bool {
        let (word, bit) = ((c / 64) as usize, c % 64);
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        fresh
    }
}

/// The length of the chain starting at `first`, each cluster checked used and not seen before.
fn chain(bpb: &Bpb, fat: &[u32], seen: &mut Seen, first: u64, what: &str) -> Result<u64, String> {
    let name = bpb.kind.name();
    let mut len = 0;
    let mut c = first;
    loop {
        if !(2..=bpb.max_cluster()).contains(&c) {
            return Err(format!("{name}: {what} uses cluster {c}, outside the {} clusters", bpb.clusters));
        }
        if !seen.mark(c) {
            return Err(format!("{name}: cluster {c} of {what} belongs to another chain too (cross-linked or cyclic)"));
        }
        len += 1;
        match classify(bpb, fat[c as usize])? {
            Entry::Free => return Err(format!("{name}: cluster {c} of {what} is marked free")),
            Entry::Bad => return Err(format!("{name}: {what} runs into bad cluster {c}")),
            Entry::End => return Ok(len),
            Entry::Next(next) => c = next,
        }
    }
}

/// A folder still to be read: the FAT12/16 root area, or a checked chain of clusters.
enum Folder {
    FixedRoot,
    Chain { first: u64, len: u64 },
}

/// Walks every folder from the root, checking each chain (see the module doc).
fn walk_tree(w: &Window<'_>, bpb: &Bpb, fat: &[u32]) -> Result<(), String> {
    let mut seen = Seen::new(fat.len());
    let mut folders = Vec::new();
    if bpb.kind == Kind::Fat32 {
        let first = u64::from(bpb.root_cluster);
        let len = chain(bpb, fat, &mut seen, first, "the root folder")?;
        folders.push(Folder::Chain { first, len });
    } else {
        folders.push(Folder::FixedRoot);
    }
    while let Some(folder) = folders.pop() {
        match folder {
            Folder::FixedRoot => {
                let at = (bpb.reserved + bpb.fats * bpb.fat_sectors) * bpb.sector;
                let data = w.read(at, (bpb.root_entries * 32) as usize)?;
                read_entries(bpb, fat, &mut seen, &data, &mut folders)?;
            }
            Folder::Chain { first, len } => {
                // The chain was checked when it was found: `len` clusters linked by `Next`.
                let mut c = first;
                for i in 0..len {
                    let data = w.read(bpb.cluster_offset(c), bpb.cluster_bytes() as usize)?;
                    if read_entries(bpb, fat, &mut seen, &data, &mut folders)? {
                        break;
                    }
                    if i + 1 < len {
                        c = u64::from(fat[c as usize]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Checks the chain of every entry in a piece of folder and queues its subfolders; true when
/// the folder's end mark was found.
fn read_entries(
    bpb: &Bpb,
    fat: &[u32],
    seen: &mut Seen,
    data: &[u8],
    folders: &mut Vec<Folder>,
) -> Result<bool, String> {
    let name = bpb.kind.name();
    for entry in data.chunks_exact(32) {
        match entry[0] {
            0x00 => return Ok(true),
            0xE5 => continue,
            _ => {}
        }
        let attr = entry[11];
        if attr & 0x3F == 0x0F || attr & 0x08 != 0 || entry[0] == b'.' {
            continue;
        }
        let high = if bpb.kind == Kind::Fat32 { u64::from(u16_at(entry, 0x14)) << 16 } else { 0 };
        let first = high | u64::from(u16_at(entry, 0x1A));
        let size = u64::from(u32_at(entry, 0x1C));
        let is_folder = attr & 0x10 != 0;
        if first == 0 {
            if is_folder || size != 0 {
                return Err(format!("{name}: a directory entry of {size} bytes has no first cluster"));
            }
            continue;
        }
        let what = if is_folder { "a folder" } else { "a file" };
        let len = chain(bpb, fat, seen, first, what)?;
        if is_folder {
            folders.push(Folder::Chain { first, len });
        } else if len < size.div_ceil(bpb.cluster_bytes()) {
            return Err(format!("{name}: a file of {size} bytes has a chain of only {len} clusters"));
        }
    }
    Ok(false)
}

fn free_ranges(bpb: &Bpb, fat: &[u32]) -> Result<FreeRanges, String> {
    let mut free = FreeRanges::default();
    let mut c = 2;
    while c <= bpb.max_cluster() {
        if fat[c as usize] != 0 {
            c += 1;
            continue;
        }
        let start = c;
        while c <= bpb.max_cluster() && fat[c as usize] == 0 {
            c += 1;
        }
        free.push(bpb.cluster_offset(start), bpb.cluster_offset(c))?;
    }
    Ok(free)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::volume::test_support::{have_tools, pseudo_random, run, Bytes};
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    pub(crate) fn scan_bytes(d: &[u8]) -> Option<Scan> {
        scan(&Window { disk: &Bytes(d), start: 0, len: d.len() as u64 })
    }

    fn free_of(d: &[u8]) -> Result<FreeRanges, String> {
        scan_bytes(d).expect("not recognized as FAT").free
    }

    struct Image {
        _dir: tempfile::TempDir,
        path: PathBuf,
        files: BTreeMap<String, Vec<u8>>,
        src: PathBuf,
    }

    impl Image {
        fn new(fat: u8, kib: u32, extra: &[&str]) -> Image {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fat.img");
            let src = dir.path().join("src");
            std::fs::create_dir(&src).unwrap();
            let fat = fat.to_string();
            let kib = kib.to_string();
            let mut args = vec!["-F", &fat];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-C", path.to_str().unwrap(), &kib]);
            run("mkfs.vfat", &args);
            Image { _dir: dir, path, files: BTreeMap::new(), src }
        }

        fn img(&self) -> &str {
            self.path.to_str().unwrap()
        }

        /// Copies files named `name{i}` of pseudo-random sizes up to `max` bytes into `folder`.
        fn copy(&mut self, folder: &str, prefix: &str, count: u64, max: usize) {
            let mut paths = Vec::new();
            for i in 0..count {
                let name = format!("{prefix}{i}");
                let len = (pseudo_random(i * 7 + prefix.len() as u64, 4).iter().map(|&b| b as usize).sum::<usize>()
                    * max)
                    / 1020;
                let data = pseudo_random(i + 1000 * prefix.len() as u64, len);
                let p = self.src.join(&name);
                std::fs::write(&p, &data).unwrap();
                paths.push(p.to_str().unwrap().to_string());
                self.files.insert(format!("{folder}/{name}"), data);
            }
            let mut args: Vec<&str> = vec!["-i", self.img()];
            let img = self.img().to_string();
            args[1] = &img;
            args.extend(paths.iter().map(String::as_str));
            let target = format!("::{folder}/");
            args.push(&target);
            run("mcopy", &args);
        }

        fn delete(&mut self, keep: impl Fn(usize) -> bool) {
            let doomed: Vec<String> =
                self.files.keys().enumerate().filter(|&(i, _)| !keep(i)).map(|(_, k)| k.clone()).collect();
            let img = self.img().to_string();
            let targets: Vec<String> = doomed.iter().map(|k| format!("::{k}")).collect();
            let mut args = vec!["-i", &img];
            args.extend(targets.iter().map(String::as_str));
            run("mdel", &args);
            for k in doomed {
                self.files.remove(&k);
            }
        }

        /// Many files copied, most deleted, more copied, in the root and in a subfolder.
        fn aged(fat: u8, kib: u32, extra: &[&str], max: usize) -> Image {
            let mut img = Image::new(fat, kib, extra);
            run("mmd", &["-i", img.img(), "::/sub"]);
            img.copy("", "a", 40, max);
            img.copy("/sub", "b", 30, max);
            img.delete(|i| i % 4 == 0);
            img.copy("/sub", "c", 20, max);
            img.copy("", "d", 10, max);
            img
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }

        fn write(&self, d: &[u8]) {
            std::fs::write(&self.path, d).unwrap()
        }

        /// Every file read back with mtools is the one that was copied in.
        fn assert_files_intact(&self) {
            let out = self._dir.path().join("out");
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir(&out).unwrap();
            run("mcopy", &["-s", "-n", "-i", self.img(), "::/*", out.to_str().unwrap()]);
            for (name, data) in &self.files {
                let back = std::fs::read(out.join(name.trim_start_matches('/'))).unwrap();
                assert!(back == *data, "{name} differs after its free clusters were overwritten");
            }
        }
    }

    /// Free bytes by fsck.vfat's "used/total clusters" and by mdir's "bytes free".
    fn oracle_free_bytes(img: &Image, cluster: u64) -> u64 {
        let out = run("fsck.vfat", &["-n", img.img()]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let counts = words[words.iter().position(|&w| w == "clusters").unwrap() - 1];
        let (used, total) = counts.split_once('/').unwrap();
        let by_fsck = (total.parse::<u64>().unwrap() - used.parse::<u64>().unwrap()) * cluster;
        let listing = run("mdir", &["-i", img.img(), "::/"]);
        let line = listing.lines().find(|l| l.contains("bytes free")).unwrap();
        let by_mdir: u64 = line.chars().filter(char::is_ascii_digit).collect::<String>().parse().unwrap();
        assert_eq!(by_fsck, by_mdir, "fsck.vfat and mdir disagree");
        by_fsck
    }

    fn cluster_bytes(d: &[u8]) -> u64 {
        u64::from(u16_at(d, 0x0B)) * u64::from(d[0x0D])
    }

    fn overwrite(d: &mut [u8], free: &FreeRanges) {
        for &(s, e) in free.ranges() {
            for (i, b) in d[s as usize..e as usize].iter_mut().enumerate() {
                *b = (i as u8) ^ 0xA5;
            }
        }
    }

    fn check_aged(fat: u8, kib: u32, extra: &[&str], max: usize) {
        if !have_tools(&["mkfs.vfat", "fsck.vfat", "mcopy", "mdir", "mdel", "mmd"]) {
            return;
        }
        let img = Image::aged(fat, kib, extra, max);
        let mut d = img.bytes();
        let scan = scan_bytes(&d).unwrap();
        assert_eq!(scan.file_system, "vfat");
        let free = scan.free.unwrap();
        let expected = oracle_free_bytes(&img, cluster_bytes(&d));
        assert_eq!(free.bytes(), expected, "FAT{fat}: free bytes against fsck.vfat and mdir");
        eprintln!(
            "FAT{fat}: {} free bytes in {} ranges, fsck.vfat and mdir: {expected}",
            free.bytes(),
            free.ranges().len()
        );
        assert!(free.bytes() > (kib as u64) << 8, "FAT{fat}: the test image should have free space");
        overwrite(&mut d, &free);
        img.write(&d);
        run("fsck.vfat", &["-n", img.img()]);
        img.assert_files_intact();
    }

    #[test]
    fn an_aged_fat12_volume_frees_exactly_what_fsck_counts_and_its_files_survive_garbage_there() {
        check_aged(12, 4000, &[], 40_000);
    }

    #[test]
    fn an_aged_fat16_volume_frees_exactly_what_fsck_counts_and_its_files_survive_garbage_there() {
        check_aged(16, 32768, &[], 300_000);
    }

    #[test]
    fn an_aged_fat32_volume_frees_exactly_what_fsck_counts_and_its_files_survive_garbage_there() {
        check_aged(32, 40000, &["-s", "1"], 300_000);
    }

    fn fresh(fat: u8) -> Option<Image> {
        if !have_tools(&["mkfs.vfat", "mcopy", "mmd"]) {
            return None;
        }
        let mut img = match fat {
            12 => Image::new(12, 4000, &[]),
            16 => Image::new(16, 32768, &[]),
            _ => Image::new(32, 40000, &["-s", "1"]),
        };
        run("mmd", &["-i", img.img(), "::/sub"]);
        img.copy("/sub", "f", 5, 20_000);
        Some(img)
    }

    #[test]
    fn a_set_dirty_bit_in_the_boot_sector_keeps_the_region_whole() {
        for (fat, at) in [(12, 0x25), (16, 0x25), (32, 0x41)] {
            let Some(img) = fresh(fat) else { return };
            let mut d = img.bytes();
            assert!(free_of(&d).is_ok());
            d[at] |= 1;
            let why = free_of(&d).unwrap_err();
            assert!(why.contains("not cleanly unmounted"), "{why}");
        }
    }

    #[test]
    fn a_cleared_clean_shutdown_bit_in_fat1_keeps_the_region_whole() {
        for (fat, at, bit) in [(16, 2 + 1, 0x80u8), (32, 4 + 3, 0x08)] {
            let Some(img) = fresh(fat) else { return };
            let mut d = img.bytes();
            let reserved = u16_at(&d, 0x0E) as usize * 512;
            let fat_len = if fat == 16 { u16_at(&d, 0x16) as usize } else { u32_at(&d, 0x24) as usize } * 512;
            for copy in 0..2 {
                d[reserved + copy * fat_len + at] &= !bit;
            }
            let why = free_of(&d).unwrap_err();
            assert!(why.contains("not cleanly unmounted"), "{why}");
        }
    }

    #[test]
    fn fat_copies_that_differ_keep_the_region_whole_unless_fat32_mirroring_is_off() {
        for fat in [12, 16, 32] {
            let Some(img) = fresh(fat) else { return };
            let mut d = img.bytes();
            let honest = free_of(&d).unwrap();
            let reserved = u16_at(&d, 0x0E) as usize * 512;
            let fat_len = if fat == 32 { u32_at(&d, 0x24) as usize } else { u16_at(&d, 0x16) as usize } * 512;
            // The second copy claims a free cluster in the middle of the data area is used.
            d[reserved + fat_len + 600..][..4].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
            let why = free_of(&d).unwrap_err();
            assert!(why.contains("differs"), "FAT{fat}: {why}");
            if fat == 32 {
                let backup = u16_at(&d, 0x32) as usize * 512;
                for at in [0x28, backup + 0x28] {
                    d[at] = 0x80; // mirroring off, FAT 0 active
                }
                assert_eq!(free_of(&d).unwrap(), honest);
                for at in [0x28, backup + 0x28] {
                    d[at] = 0x81; // mirroring off, FAT 1 active: that FAT counts
                }
                assert!(free_of(&d).unwrap().bytes() < honest.bytes());
            }
        }
    }

    #[test]
    fn a_cluster_freed_in_every_fat_copy_but_still_in_a_file_keeps_the_region_whole() {
        let Some(img) = fresh(16) else { return };
        let mut d = img.bytes();
        let reserved = u16_at(&d, 0x0E) as usize * 512;
        let fat_len = u16_at(&d, 0x16) as usize * 512;
        let fat: Vec<u16> = (0..64).map(|i| u16_at(&d, reserved + 2 * i)).collect();
        // The last used cluster ends a file's chain (or is a one-cluster file): freeing it
        // is seen either from the chain that leads to it or from the file's directory entry.
        let last = fat.iter().rposition(|&v| v != 0).unwrap();
        for copy in 0..2 {
            d[reserved + copy * fat_len + 2 * last..][..2].fill(0);
        }
        assert!(free_of(&d).is_err());
    }

    #[test]
    fn a_wrong_media_byte_or_out_of_range_entry_keeps_the_region_whole() {
        let Some(img) = fresh(16) else { return };
        let d = img.bytes();
        let reserved = u16_at(&d, 0x0E) as usize * 512;
        let mut wrong_media = d.clone();
        wrong_media[0x15] = 0xF0;
        assert!(free_of(&wrong_media).unwrap_err().contains("media"));
        let mut out_of_range = d.clone();
        let fat_len = u16_at(&d, 0x16) as usize * 512;
        for copy in 0..2 {
            out_of_range[reserved + copy * fat_len + 2 * 5000..][..2].copy_from_slice(&0xFFEFu16.to_le_bytes());
        }
        assert!(free_of(&out_of_range).unwrap_err().contains("not a cluster"));
    }

    #[test]
    fn a_truncated_region_keeps_the_volume_whole() {
        let Some(img) = fresh(32) else { return };
        let d = img.bytes();
        assert!(free_of(&d[..d.len() / 2]).unwrap_err().contains("only"));
        assert!(free_of(&d[..4096]).is_err());
    }

    #[test]
    fn ntfs_and_exfat_boot_sectors_are_not_claimed() {
        let Some(img) = fresh(16) else { return };
        let mut d = img.bytes();
        d[3..11].copy_from_slice(b"NTFS    ");
        assert!(scan_bytes(&d).is_none());
        d[3..11].copy_from_slice(b"EXFAT   ");
        assert!(scan_bytes(&d).is_none());
        assert!(scan_bytes(&vec![0u8; 1 << 20]).is_none());
    }

    /// A mutated FAT or folder may make strata store more, never fewer bytes; a mutated boot
    /// sector must not make it panic.
    #[test]
    fn random_mutations_of_the_metadata_never_free_more_than_the_honest_result_nor_panic() {
        for fat in [12, 16, 32] {
            let Some(img) = fresh(fat) else { return };
            let d = img.bytes();
            let honest = free_of(&d).unwrap();
            let reserved = u16_at(&d, 0x0E) as usize * 512;
            let fats = d[0x10] as usize;
            let fat_len = if fat == 32 { u32_at(&d, 0x24) as usize } else { u16_at(&d, 0x16) as usize } * 512;
            let meta_end = (reserved + fats * fat_len + 32 * 1024).min(d.len());
            let rng = pseudo_random(fat as u64, 4 * 1000);
            let mut m = d.clone();
            for round in 0..1000 {
                let r = u32_at(&rng, 4 * round) as usize;
                let at = reserved + r % (meta_end - reserved);
                let value = (r >> 24) as u8;
                // Mirrored into every FAT copy, so that the copy check alone does not catch it.
                let copies = if at < reserved + fat_len { fats } else { 1 };
                for copy in 0..copies {
                    m[at + copy * fat_len] = value;
                }
                if let Ok(free) = free_of(&m) {
                    assert!(free.bytes() <= honest.bytes(), "FAT{fat}: byte {at} set to {value:#x} frees more");
                }
                for copy in 0..copies {
                    m[at + copy * fat_len] = d[at + copy * fat_len];
                }
                m[r % 512] = value;
                let _ = scan_bytes(&m);
                m[r % 512] = d[r % 512];
            }
        }
    }
}
