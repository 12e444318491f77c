//! ext2, ext3 and ext4: which blocks the block bitmaps mark free.
//!
//! Reads the superblock (at byte 1024), the group descriptor table (the classic table after the
//! superblock, and with `meta_bg` the descriptor block at the start of each meta group, as the
//! kernel's `descriptor_loc` finds them) and one block bitmap per group. A clear bit is a free
//! block (with `bigalloc`, a free cluster of blocks). A group flagged `BLOCK_UNINIT` has no
//! bitmap on disk: its used blocks are computed as the kernel and e2fsprogs do, from the
//! superblock backup, descriptor and reserved descriptor blocks it holds (`sparse_super`,
//! `sparse_super2`, `meta_bg` rules) and every group's block bitmap, inode bitmap and inode
//! table that lies in it. Blocks before `s_first_data_block` and after `s_blocks_count` are
//! never free.
//!
//! Cross-checks, any failure keeping the region whole: the superblock checksum and every group
//! descriptor checksum (`metadata_csum` crc32c, `gdt_csum` crc16); every block bitmap's
//! checksum (`metadata_csum`); per group, the free count of the bitmap (or of the computed
//! `BLOCK_UNINIT` map) equals the descriptor's free count; their sum equals the superblock's
//! free count (the kernel writes its exact count at a clean unmount, and e2fsprogs keeps it
//! exact); no metadata block (superblock or descriptor copy, reserved descriptor block, bitmap,
//! inode table) lies outside the file system, overlaps another one or is marked free.
//!
//! Refused: `needs_recovery` (a journal not replayed: mounted, or not cleanly unmounted), a
//! state without "valid" or with "errors", an external journal device, `snapshot`, any incompat
//! or ro_compat feature not listed in `KNOWN_INCOMPAT` / `KNOWN_RO_COMPAT`, revisions above 1,
//! block sizes above 64 KiB, geometry that does not fit the region. `bigalloc` is supported.

use super::{FreeRanges, Scan, Window};
use crate::le::{get_u16 as u16_at, get_u32 as u32_at};

const SUPERBLOCK: u64 = 1024;
const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;

/// Incompat features whose meaning for block allocation strata knows: filetype, recover (refused
/// separately), meta_bg, extent, 64bit, mmp, flex_bg, ea_inode, csum_seed, largedir,
/// inline_data, encrypt, casefold. Not here: compression, journal_dev (refused separately),
/// dirdata.
const KNOWN_INCOMPAT: u32 =
    0x2 | INCOMPAT_RECOVER | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_HAS_SNAPSHOT: u32 = 0x80;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Ro_compat features strata knows: sparse_super, large_file, huge_file, gdt_csum, dir_nlink,
/// extra_isize, quota, bigalloc, metadata_csum, readonly, project, shared_blocks, verity,
/// orphan_present (orphans still hold their blocks in the bitmaps). Not here: btree_dir,
/// snapshot (refused separately), replica.
const KNOWN_RO_COMPAT: u32 =
    0x1 | 0x2 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000;

/// The features blkid counts as beyond ext3 (anything but these names the file system ext4).
const EXT3_INCOMPAT: u32 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4;

const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;
const BG_INODE_ZEROED: u16 = 0x4;

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    let sb = w.read(SUPERBLOCK, 1024).ok()?;
    if u16_at(&sb, 0x38) != MAGIC {
        return None;
    }
    Some(Scan { file_system: name(&sb), free: free(w, &sb) })
}

/// The name blkid gives the file system.
fn name(sb: &[u8]) -> &'static str {
    let (compat, incompat, ro_compat) = (u32_at(sb, 0x5C), u32_at(sb, 0x60), u32_at(sb, 0x64));
    if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    }
}

fn free(w: &Window<'_>, sb: &[u8]) -> Result<FreeRanges, String> {
    check_state_and_features(sb)?;
    let csum = Checksums::read(sb)?;
    let geo = Geometry::read(sb, w.len())?;
    let groups = read_descriptors(w, &geo, &csum)?;
    let metadata = metadata_ranges(&geo, &groups)?;
    let mut free = FreeRanges::default();
    let mut total: u64 = 0;
    for (g, desc) in groups.iter().enumerate() {
        let g = g as u64;
        let bitmap = if desc.flags & BG_BLOCK_UNINIT != 0 {
            uninit_bitmap(&geo, g, &metadata)
        } else {
            read_bitmap(w, &geo, &csum, g, desc)?
        };
        let counted = emit_group(&geo, g, &bitmap, &mut free)?;
        if counted != desc.free {
            let kind = if desc.flags & BG_BLOCK_UNINIT != 0 { "computed block_uninit map" } else { "block bitmap" };
            return Err(format!(
                "group {g}: its {kind} has {counted} free clusters, its descriptor says {}",
                desc.free
            ));
        }
        total += counted;
    }
    let sb_free = geo.free_blocks;
    if total << geo.cluster_log != sb_free {
        return Err(format!("the groups have {} free blocks, the superblock says {sb_free}", total << geo.cluster_log));
    }
    check_metadata_is_used(&geo, &metadata, &free)?;
    Ok(free)
}

fn check_state_and_features(sb: &[u8]) -> Result<(), String> {
    let (incompat, ro_compat) = (u32_at(sb, 0x60), u32_at(sb, 0x64));
    let state = u16_at(sb, 0x3A);
    let rev = u32_at(sb, 0x4C);
    if rev > 1 {
        return Err(format!("superblock revision {rev} (strata reads revisions 0 and 1)"));
    }
    if rev == 0 && (u32_at(sb, 0x5C) | incompat | ro_compat) != 0 {
        return Err("feature flags on a revision 0 superblock (run e2fsck)".into());
    }
    if incompat & INCOMPAT_RECOVER != 0 {
        return Err("needs_recovery is set: the journal was not replayed (mount and unmount it, or run e2fsck)".into());
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err("an external journal device: its blocks are not mapped by bitmaps".into());
    }
    if ro_compat & RO_COMPAT_HAS_SNAPSHOT != 0 {
        return Err("the snapshot feature is set: snapshot blocks are not read".into());
    }
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(format!("incompat features 0x{:x} that strata does not know", incompat & !KNOWN_INCOMPAT));
    }
    if ro_compat & !KNOWN_RO_COMPAT != 0 {
        return Err(format!("ro_compat features 0x{:x} that strata does not know", ro_compat & !KNOWN_RO_COMPAT));
    }
    if state & STATE_ERROR != 0 {
        return Err("the file system has errors recorded (run e2fsck)".into());
    }
    if state & STATE_VALID == 0 {
        return Err("the file system is not marked clean: mounted or not cleanly unmounted (run e2fsck)".into());
    }
    if state & !(STATE_VALID | STATE_ERROR) != 0 {
        return Err(format!("file system state 0x{state:x} has bits strata does not know"));
    }
    Ok(())
}

/// The checksums that protect the superblock, the descriptors and the bitmaps.
enum Checksums {
    None,
    /// `gdt_csum`: crc16 of the uuid, the group number and the descriptor.
    Crc16 {
        uuid: [u8; 16],
    },
    /// `metadata_csum`: crc32c seeded from the uuid (or `s_checksum_seed`).
    Crc32c {
        seed: u32,
    },
}

impl Checksums {
    fn read(sb: &[u8]) -> Result<Self, String> {
        let (incompat, ro_compat) = (u32_at(sb, 0x60), u32_at(sb, 0x64));
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            if sb[0x175] != 1 {
                return Err(format!("checksum type {} (strata knows crc32c, type 1)", sb[0x175]));
            }
            let stored = u32_at(sb, 0x3FC);
            let computed = crc32c_raw(!0, &sb[..0x3FC]);
            if stored != computed {
                return Err(format!(
                    "superblock checksum 0x{stored:08x} does not match its contents (0x{computed:08x})"
                ));
            }
            let seed =
                if incompat & INCOMPAT_CSUM_SEED != 0 { u32_at(sb, 0x270) } else { crc32c_raw(!0, &sb[0x68..0x78]) };
            Ok(Checksums::Crc32c { seed })
        } else if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            Ok(Checksums::Crc16 { uuid: sb[0x68..0x78].try_into().unwrap() })
        } else {
            Ok(Checksums::None)
        }
    }

    /// Whether `BLOCK_UNINIT` is honoured (the kernel and e2fsprogs honour it only then).
    fn guards_descriptors(&self) -> bool {
        !matches!(self, Checksums::None)
    }
}

/// The crc32c as ext4 chains it: no inversion at either end.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The kernel's crc16 (poly 0x8005, reflected).
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

/// The layout the superblock describes, every figure checked against the region.
struct Geometry {
    block_size: u64,
    /// log2 of blocks per cluster (0 without bigalloc).
    cluster_log: u32,
    first_data_block: u64,
    blocks_count: u64,
    free_blocks: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    groups: u64,
    desc_size: usize,
    desc_per_block: u64,
    desc_blocks: u64,
    inode_table_blocks: u64,
    reserved_gdt: u64,
    /// `Some(s_first_meta_bg)` with meta_bg.
    first_meta_bg: Option<u64>,
    sparse_super: bool,
    /// `Some(s_backup_bgs)` with sparse_super2.
    backup_bgs: Option<[u64; 2]>,
    wide: bool,
}

impl Geometry {
    fn read(sb: &[u8], region: u64) -> Result<Self, String> {
        let (compat, incompat, ro_compat) = (u32_at(sb, 0x5C), u32_at(sb, 0x60), u32_at(sb, 0x64));
        let rev = u32_at(sb, 0x4C);
        let wide = incompat & INCOMPAT_64BIT != 0;
        let hi = |at: usize| if wide { u64::from(u32_at(sb, at)) << 32 } else { 0 };
        let log_block = u32_at(sb, 0x18);
        if log_block > 6 {
            return Err(format!("block size 1024 << {log_block} is above 64 KiB"));
        }
        let block_size = 1024u64 << log_block;
        let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
        let log_cluster = u32_at(sb, 0x1C);
        let cluster_log = match (bigalloc, log_cluster.checked_sub(log_block)) {
            (true, Some(l)) if l <= 16 => l,
            (false, Some(0)) => 0,
            _ => return Err(format!("cluster size 1024 << {log_cluster} with block size {block_size}")),
        };
        let blocks_count = u64::from(u32_at(sb, 0x04)) | hi(0x150);
        let free_blocks = u64::from(u32_at(sb, 0x0C)) | hi(0x158);
        let first_data_block = u64::from(u32_at(sb, 0x14));
        let expected_first = u64::from(block_size == 1024 && !bigalloc);
        if first_data_block != expected_first {
            return Err(format!("first data block {first_data_block} with block size {block_size}"));
        }
        if blocks_count <= first_data_block || blocks_count.checked_mul(block_size).is_none_or(|b| b > region) {
            return Err(format!("{blocks_count} blocks of {block_size} bytes do not fit the region of {region} bytes"));
        }
        if free_blocks > blocks_count {
            return Err(format!("{free_blocks} free blocks of {blocks_count}"));
        }
        let blocks_per_group = u64::from(u32_at(sb, 0x20));
        let clusters_per_group = if bigalloc { u64::from(u32_at(sb, 0x24)) } else { blocks_per_group };
        if clusters_per_group < 8
            || clusters_per_group > 8 * block_size
            || !clusters_per_group.is_multiple_of(8)
            || blocks_per_group != clusters_per_group << cluster_log
        {
            return Err(format!("{blocks_per_group} blocks and {clusters_per_group} clusters per group"));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if groups > u64::from(u32::MAX) {
            return Err(format!("{groups} groups"));
        }
        let desc_size = match (wide, u16_at(sb, 0xFE)) {
            (false, _) => 32,
            (true, s) if (64..=1024).contains(&s) && s.is_power_of_two() => usize::from(s),
            (true, s) => return Err(format!("group descriptor size {s}")),
        };
        let desc_per_block = block_size / desc_size as u64;
        let desc_blocks = groups.div_ceil(desc_per_block);
        let inode_size = if rev == 0 { 128 } else { u64::from(u16_at(sb, 0x58)) };
        if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
            return Err(format!("inode size {inode_size}"));
        }
        let inodes_per_group = u64::from(u32_at(sb, 0x28));
        if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
            return Err(format!("{inodes_per_group} inodes per group"));
        }
        let first_meta_bg = (incompat & INCOMPAT_META_BG != 0).then(|| u64::from(u32_at(sb, 0x104)));
        if let Some(f) = first_meta_bg.filter(|&f| f > desc_blocks) {
            return Err(format!("first meta group {f} beyond {desc_blocks} descriptor blocks"));
        }
        let reserved_gdt = u64::from(u16_at(sb, 0xCE));
        if reserved_gdt > block_size / 4 {
            return Err(format!("{reserved_gdt} reserved descriptor blocks"));
        }
        Ok(Geometry {
            block_size,
            cluster_log,
            first_data_block,
            blocks_count,
            free_blocks,
            blocks_per_group,
            clusters_per_group,
            groups,
            desc_size,
            desc_per_block,
            desc_blocks,
            inode_table_blocks: (inodes_per_group * inode_size).div_ceil(block_size),
            reserved_gdt,
            first_meta_bg,
            sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            backup_bgs: (compat & COMPAT_SPARSE_SUPER2 != 0)
                .then(|| [u64::from(u32_at(sb, 0x24C)), u64::from(u32_at(sb, 0x250))]),
            wide,
        })
    }

    /// The block of the primary superblock (1 with 1 KiB blocks, else 0).
    fn sb_block(&self) -> u64 {
        SUPERBLOCK / self.block_size
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }

    fn group_clusters(&self, g: u64) -> u64 {
        self.group_blocks(g).div_ceil(1 << self.cluster_log)
    }

    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if let Some(backups) = self.backup_bgs {
            return backups.contains(&g);
        }
        if g == 1 || !self.sparse_super {
            return true;
        }
        g % 2 == 1 && [3, 5, 7].iter().any(|&p| is_power_of(g, p))
    }

    /// Whether group `g` lies in the meta_bg part of the file system.
    fn in_meta_bg(&self, g: u64) -> bool {
        self.first_meta_bg.is_some_and(|f| g >= f * self.desc_per_block)
    }

    /// Where descriptor block `nr` lies (the kernel's `descriptor_loc`).
    fn descriptor_block(&self, nr: u64) -> u64 {
        match self.first_meta_bg {
            Some(f) if nr >= f => {
                let g = nr * self.desc_per_block;
                let mut has_super = u64::from(self.has_super(g));
                if self.block_size == 1024 && nr == 0 && self.first_data_block == 0 {
                    has_super += 1;
                }
                self.group_first_block(g) + has_super
            }
            _ => self.sb_block() + 1 + nr,
        }
    }

    /// The superblock copy, descriptor blocks and reserved descriptor blocks group `g` holds.
    fn base_metadata(&self, g: u64) -> Vec<(u64, u64)> {
        let start = self.group_first_block(g).max(if g == 0 { self.sb_block() } else { 0 });
        let has_super = self.has_super(g);
        let mut ranges = Vec::new();
        if has_super {
            ranges.push((start, start + 1));
        }
        if !self.in_meta_bg(g) {
            if has_super {
                let old_desc = self.first_meta_bg.unwrap_or(self.desc_blocks);
                ranges.push((start + 1, start + 1 + old_desc + self.reserved_gdt));
            }
        } else if [0, 1, self.desc_per_block - 1].contains(&(g % self.desc_per_block)) {
            let at = start + u64::from(has_super);
            ranges.push((at, at + 1));
        }
        ranges
    }
}

fn is_power_of(mut n: u64, p: u64) -> bool {
    while n > 1 && n.is_multiple_of(p) {
        n /= p;
    }
    n == 1
}

/// What one group descriptor says.
struct Group {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    /// Free clusters.
    free: u64,
    flags: u16,
    bitmap_csum: u32,
}

fn read_descriptors(w: &Window<'_>, geo: &Geometry, csum: &Checksums) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    for nr in 0..geo.desc_blocks {
        let block = geo.descriptor_block(nr);
        if block >= geo.blocks_count {
            return Err(format!("descriptor block {nr} at block {block} lies outside the file system"));
        }
        let data = w.read(block * geo.block_size, geo.block_size as usize)?;
        for (i, raw) in data.chunks_exact(geo.desc_size).enumerate() {
            let g = nr * geo.desc_per_block + i as u64;
            if g >= geo.groups {
                break;
            }
            groups.push(parse_descriptor(geo, csum, g, raw)?);
        }
    }
    Ok(groups)
}

fn parse_descriptor(geo: &Geometry, csum: &Checksums, g: u64, raw: &[u8]) -> Result<Group, String> {
    verify_descriptor(csum, g, raw)?;
    let wide = geo.wide && geo.desc_size >= 64;
    let lo_hi32 =
        |lo: usize, hi: usize| u64::from(u32_at(raw, lo)) | if wide { u64::from(u32_at(raw, hi)) << 32 } else { 0 };
    let free = u64::from(u16_at(raw, 0x0C)) | if wide { u64::from(u16_at(raw, 0x2C)) << 16 } else { 0 };
    let flags = u16_at(raw, 0x12);
    if flags & !(BG_INODE_UNINIT | BG_BLOCK_UNINIT | BG_INODE_ZEROED) != 0 {
        return Err(format!("group {g}: descriptor flags 0x{flags:x} that strata does not know"));
    }
    if flags & BG_BLOCK_UNINIT != 0 && (g == 0 || !csum.guards_descriptors()) {
        return Err(format!("group {g} is marked block_uninit where the kernel would not accept it"));
    }
    let bitmap_csum =
        u32::from(u16_at(raw, 0x18)) | if geo.desc_size >= 0x3C { u32::from(u16_at(raw, 0x38)) << 16 } else { 0 };
    Ok(Group {
        block_bitmap: lo_hi32(0x00, 0x20),
        inode_bitmap: lo_hi32(0x04, 0x24),
        inode_table: lo_hi32(0x08, 0x28),
        free,
        flags,
        bitmap_csum,
    })
}

fn verify_descriptor(csum: &Checksums, g: u64, raw: &[u8]) -> Result<(), String> {
    let group = (g as u32).to_le_bytes();
    let computed = match csum {
        Checksums::None => return Ok(()),
        Checksums::Crc32c { seed } => {
            let c = crc32c_raw(*seed, &group);
            let c = crc32c_raw(c, &raw[..0x1E]);
            let c = crc32c_raw(c, &[0, 0]);
            (crc32c_raw(c, &raw[0x20..]) & 0xFFFF) as u16
        }
        Checksums::Crc16 { uuid } => {
            let c = crc16(crc16(crc16(!0, uuid), &group), &raw[..0x1E]);
            crc16(c, &raw[0x20..])
        }
    };
    let stored = u16_at(raw, 0x1E);
    if stored != computed {
        return Err(format!(
            "group {g}: descriptor checksum 0x{stored:04x} does not match its contents (0x{computed:04x})"
        ));
    }
    Ok(())
}

/// Every metadata block range of the file system, in blocks, sorted; each inside the file
/// system and none overlapping another.
fn metadata_ranges(geo: &Geometry, groups: &[Group]) -> Result<Vec<(u64, u64)>, String> {
    let mut ranges = Vec::new();
    for (g, desc) in groups.iter().enumerate() {
        let g = g as u64;
        ranges.extend(geo.base_metadata(g));
        let own = [
            ("block bitmap", desc.block_bitmap, 1),
            ("inode bitmap", desc.inode_bitmap, 1),
            ("inode table", desc.inode_table, geo.inode_table_blocks),
        ];
        for (what, at, len) in own {
            if at < geo.first_data_block || at.saturating_add(len) > geo.blocks_count {
                return Err(format!("group {g}: its {what} at block {at} lies outside the file system"));
            }
            ranges.push((at, at + len));
        }
    }
    for r in &ranges {
        if r.1 > geo.blocks_count {
            return Err(format!("metadata at blocks {}-{} lies outside the file system", r.0, r.1 - 1));
        }
    }
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    if let Some(pair) = ranges.windows(2).find(|p| p[1].0 < p[0].1) {
        return Err(format!(
            "metadata blocks {}-{} and {}-{} overlap",
            pair[0].0,
            pair[0].1 - 1,
            pair[1].0,
            pair[1].1 - 1
        ));
    }
    Ok(ranges)
}

/// The map the kernel builds for a `BLOCK_UNINIT` group: its metadata clusters used, the rest
/// free.
fn uninit_bitmap(geo: &Geometry, g: u64, metadata: &[(u64, u64)]) -> Vec<u8> {
    let mut bitmap = vec![0u8; geo.block_size as usize];
    let first = geo.group_first_block(g);
    let end = first + geo.group_blocks(g);
    let from = metadata.partition_point(|r| r.1 <= first);
    for &(s, e) in metadata[from..].iter().take_while(|r| r.0 < end) {
        let (s, e) = (s.max(first) - first, e.min(end) - first);
        for cluster in s >> geo.cluster_log..=(e - 1) >> geo.cluster_log {
            bitmap[(cluster / 8) as usize] |= 1 << (cluster % 8);
        }
    }
    bitmap
}

fn read_bitmap(w: &Window<'_>, geo: &Geometry, csum: &Checksums, g: u64, desc: &Group) -> Result<Vec<u8>, String> {
    let bitmap = w.read(desc.block_bitmap * geo.block_size, geo.block_size as usize)?;
    if let Checksums::Crc32c { seed } = csum {
        let computed = crc32c_raw(*seed, &bitmap[..(geo.clusters_per_group / 8) as usize]);
        let computed = if geo.desc_size >= 0x3C { computed } else { computed & 0xFFFF };
        if computed != desc.bitmap_csum {
            return Err(format!(
                "group {g}: block bitmap checksum 0x{:x} does not match its contents (0x{computed:x})",
                desc.bitmap_csum
            ));
        }
    }
    Ok(bitmap)
}

/// Pushes the free byte ranges of group `g` and returns its free cluster count; bits past the
/// group's last cluster are ignored.
fn emit_group(geo: &Geometry, g: u64, bitmap: &[u8], free: &mut FreeRanges) -> Result<u64, String> {
    let first = geo.group_first_block(g);
    let clusters = geo.group_clusters(g);
    let to_byte = |cluster: u64| (first + (cluster << geo.cluster_log)).min(geo.blocks_count) * geo.block_size;
    let bit = |c: u64| bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0;
    let mut count = 0;
    let mut c = 0;
    while c < clusters {
        if c.is_multiple_of(8) && c + 8 <= clusters && bitmap[(c / 8) as usize] == 0xFF {
            c += 8;
            continue;
        }
        if bit(c) {
            c += 1;
            continue;
        }
        let start = c;
        while c < clusters && !bit(c) {
            c += if c.is_multiple_of(8) && c + 8 <= clusters && bitmap[(c / 8) as usize] == 0 { 8 } else { 1 };
        }
        count += c - start;
        free.push(to_byte(start), to_byte(c))?;
    }
    Ok(count)
}

/// Refuses a map that marks any metadata block free.
fn check_metadata_is_used(geo: &Geometry, metadata: &[(u64, u64)], free: &FreeRanges) -> Result<(), String> {
    let mut ranges = free.ranges().iter().peekable();
    for &(s, e) in metadata {
        let (s, e) = (s * geo.block_size, e * geo.block_size);
        while ranges.next_if(|r| r.1 <= s).is_some() {}
        if let Some(r) = ranges.peek().filter(|r| r.0 < e) {
            let block = r.0.max(s) / geo.block_size;
            return Err(format!("metadata block {block} is marked free"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::DiskRead;
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    struct FileDisk(File);

    impl DiskRead for FileDisk {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read_at(buf, offset)
        }
    }

    /// Whether the tools are installed; under CI=true a missing one fails the test.
    fn have(tools: &[&str]) -> bool {
        for tool in tools {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
            if !found.is_ok_and(|o| o.status.success()) {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} missing");
                eprintln!("skipped: {tool} missing");
                return false;
            }
        }
        true
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A file of `size_mib` MiB holding a file system made by `mke2fs args` (`fs_blocks`: a
    /// file system smaller than the file).
    fn mkfs(dir: &Path, size_mib: u64, args: &[&str], fs_blocks: Option<&str>) -> PathBuf {
        let path = dir.join("fs.img");
        File::create(&path).unwrap().set_len(size_mib << 20).unwrap();
        run(Command::new("mke2fs").args(["-F", "-q"]).args(args).arg(&path).args(fs_blocks));
        path
    }

    fn debugfs(path: &Path, commands: &str) {
        let script = path.with_extension("cmds");
        std::fs::write(&script, commands).unwrap();
        run(Command::new("debugfs").arg("-w").arg("-f").arg(&script).arg(path));
    }

    fn scan_disk(disk: &dyn DiskRead, len: u64) -> Option<Scan> {
        scan(&Window { disk, start: 0, len })
    }

    fn scan_path(path: &Path) -> Scan {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        scan_disk(&FileDisk(file), len).expect("an ext superblock")
    }

    fn dumpe2fs(path: &Path) -> String {
        run(Command::new("dumpe2fs").arg(path).stderr(std::process::Stdio::null()))
    }

    fn header_value(dump: &str, key: &str) -> Option<u64> {
        dump.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
    }

    /// The free byte ranges dumpe2fs lists per group ("  Free blocks: a-b, c"); with bigalloc
    /// each listed block stands for its whole cluster.
    fn dumpe2fs_free(path: &Path) -> FreeRanges {
        let dump = dumpe2fs(path);
        let block = header_value(&dump, "Block size:").unwrap();
        let cluster = header_value(&dump, "Cluster size:").unwrap_or(block) / block;
        let blocks = header_value(&dump, "Block count:").unwrap();
        let mut free = FreeRanges::default();
        for list in dump.lines().filter_map(|l| l.strip_prefix("  Free blocks: ")) {
            for item in list.split(", ").filter(|i| !i.is_empty()) {
                let (a, b) = item.split_once('-').unwrap_or((item, item));
                let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                free.push(a * block, (b + cluster).min(blocks) * block).unwrap();
            }
        }
        free
    }

    /// Scans the image, asserts its name and that its free ranges are exactly dumpe2fs's.
    fn assert_matches_dumpe2fs(path: &Path, file_system: &str) -> FreeRanges {
        let scan = scan_path(path);
        assert_eq!(scan.file_system, file_system);
        let free = scan.free.unwrap();
        let oracle = dumpe2fs_free(path);
        assert_eq!(free.ranges(), oracle.ranges());
        let dump = dumpe2fs(path);
        let block = header_value(&dump, "Block size:").unwrap();
        assert_eq!(free.bytes(), header_value(&dump, "Free blocks:").unwrap() * block);
        assert!(free.bytes() > 0);
        free
    }

    fn scan_err(path: &Path) -> String {
        match scan_path(path).free {
            Ok(f) => panic!("expected the region kept whole, got {} free bytes", f.bytes()),
            Err(why) => why,
        }
    }

    fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
        std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
    }

    fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// "Block bitmap at N" of group `g`, in bytes.
    fn bitmap_offset(path: &Path, g: usize) -> u64 {
        let dump = dumpe2fs(path);
        let block = header_value(&dump, "Block size:").unwrap();
        let group = dump.split(&format!("\nGroup {g}: ")).nth(1).unwrap();
        let at = group.split("Block bitmap at ").nth(1).unwrap();
        let n: u64 = at.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
        n * block
    }

    /// A source file of `len` bytes of varied content.
    fn source(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("src.bin");
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    /// Writes files through debugfs, then deletes some of them.
    fn age(dir: &Path, path: &Path) {
        let src = source(dir, 3 << 20);
        let mut cmds = String::new();
        for i in 0..8 {
            cmds += &format!("write {} f{i}\n", src.display());
        }
        cmds += "mkdir d\nwrite ";
        cmds += &format!("{} d/g\nrm f1\nrm f4\nrm f6\n", src.display());
        debugfs(path, &cmds);
    }

    #[test]
    fn a_default_ext4_image_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 256, &["-t", "ext4"], None);
        assert!(dumpe2fs(&path).matches("BLOCK_UNINIT").count() > 10, "expected many block_uninit groups");
        let free = assert_matches_dumpe2fs(&path, "ext4");
        eprintln!("default ext4: {} of {} bytes free", free.bytes(), 256u64 << 20);
    }

    #[test]
    fn an_aged_ext4_image_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 128, &["-t", "ext4", "-b", "4096", "-g", "4096", "-N", "2048"], None);
        let before = assert_matches_dumpe2fs(&path, "ext4").bytes();
        age(dir.path(), &path);
        let after = assert_matches_dumpe2fs(&path, "ext4").bytes();
        assert!(before - after >= 5 * (3 << 20), "{before} -> {after}");
    }

    #[test]
    fn ext4_with_1k_blocks_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 64, &["-t", "ext4", "-b", "1024"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn ext2_smaller_than_its_region_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 64, &["-t", "ext2", "-b", "4096"], Some("15000"));
        age(dir.path(), &path);
        let free = assert_matches_dumpe2fs(&path, "ext2");
        assert!(free.ranges().last().unwrap().1 <= 15000 * 4096);
    }

    #[test]
    fn ext3_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 96, &["-t", "ext3"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext3");
    }

    #[test]
    fn ext4_with_meta_bg_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 256, &["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext4");
        // A file system too small for a second meta group still reads its descriptors right.
        let path = mkfs(dir.path(), 300, &["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode,^64bit"], None);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn ext4_with_64bit_and_gdt_csum_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 128, &["-t", "ext4", "-O", "64bit,^metadata_csum,uninit_bg"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext4");
        let path = mkfs(dir.path(), 128, &["-t", "ext4", "-O", "^64bit,^metadata_csum,uninit_bg"], None);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn ext4_with_bigalloc_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 128, &["-t", "ext4", "-O", "bigalloc"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext4");
        let path = mkfs(dir.path(), 256, &["-t", "ext4", "-b", "4096", "-C", "65536", "-O", "bigalloc"], None);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn ext4_without_flex_bg_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 128, &["-t", "ext4", "-O", "^flex_bg"], None);
        age(dir.path(), &path);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn ext4_with_sparse_super2_frees_exactly_what_dumpe2fs_lists() {
        if !have(&["mke2fs", "dumpe2fs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 256, &["-t", "ext4", "-O", "sparse_super2", "-E", "num_backup_sb=1"], None);
        assert_matches_dumpe2fs(&path, "ext4");
    }

    struct Unmount<'a>(&'a Path);

    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }

    #[test]
    fn ext4_written_by_the_kernel_keeps_exact_counts_after_a_clean_unmount() {
        if !have(&["mke2fs", "dumpe2fs", "mount", "umount"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 128, &["-t", "ext4"], None);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount").arg("-o").arg("loop").arg(&path).arg(&mnt).output().unwrap();
        if !mounted.status.success() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "cannot loop mount");
            eprintln!("skipped: cannot loop mount: {}", String::from_utf8_lossy(&mounted.stderr));
            return;
        }
        {
            let _guard = Unmount(&mnt);
            let live = scan_err(&path);
            assert!(live.contains("needs_recovery"), "{live}");
            let src = source(dir.path(), 5 << 20);
            for i in 0..6 {
                std::fs::copy(&src, mnt.join(format!("f{i}"))).unwrap();
            }
            run(&mut Command::new("sync"));
            std::fs::remove_file(mnt.join("f2")).unwrap();
            std::fs::remove_file(mnt.join("f3")).unwrap();
        }
        assert_matches_dumpe2fs(&path, "ext4");
    }

    #[test]
    fn a_file_system_not_marked_clean_is_kept_whole() {
        if !have(&["mke2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 32, &["-t", "ext4"], None);
        debugfs(&path, "ssv state 0\n");
        assert!(scan_err(&path).contains("not marked clean"));
        debugfs(&path, "ssv state 3\n");
        assert!(scan_err(&path).contains("errors"));
    }

    #[test]
    fn a_journal_needing_recovery_keeps_the_region_whole() {
        if !have(&["mke2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 32, &["-t", "ext4"], None);
        debugfs(&path, "feature needs_recovery\n");
        assert!(scan_err(&path).contains("needs_recovery"));
    }

    #[test]
    fn an_external_journal_device_and_unknown_features_are_kept_whole() {
        if !have(&["mke2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 32, &["-O", "journal_dev", "-b", "4096"], None);
        let scan = scan_path(&path);
        assert!(scan.free.unwrap_err().contains("journal device"));
        let path = mkfs(dir.path(), 32, &["-t", "ext2"], None);
        let mut sb = read_at(&path, 1024, 1024);
        let incompat = u32_at(&sb, 0x60) | 0x1000;
        sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        write_at(&path, 1024, &sb);
        assert!(scan_err(&path).contains("incompat features 0x1000"));
    }

    #[test]
    fn a_changed_descriptor_free_count_keeps_the_region_whole() {
        if !have(&["mke2fs", "debugfs", "dumpe2fs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for group in [0, 5] {
            let path = mkfs(dir.path(), 64, &["-t", "ext4", "-b", "1024"], None);
            let dump = dumpe2fs(&path);
            let line = dump.split(&format!("\nGroup {group}: ")).nth(1).unwrap().lines().next().unwrap();
            assert_eq!(line.contains("BLOCK_UNINIT"), group == 5);
            debugfs(&path, &format!("set_bg {group} free_blocks_count 100\nset_bg {group} checksum calc\n"));
            let why = scan_err(&path);
            assert!(why.contains(&format!("group {group}:")) && why.contains("its descriptor says 100"), "{why}");
        }
    }

    #[test]
    fn a_changed_superblock_free_count_keeps_the_region_whole() {
        if !have(&["mke2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 64, &["-t", "ext4"], None);
        debugfs(&path, "ssv free_blocks_count 1000\n");
        assert!(scan_err(&path).contains("the superblock says 1000"));
    }

    #[test]
    fn a_flipped_bitmap_bit_makes_the_region_kept_whole() {
        if !have(&["mke2fs", "dumpe2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // metadata_csum: the bitmap checksum catches it; gdt_csum and ext2: the free counts.
        for (args, expect) in [
            (&["-t", "ext4"][..], "block bitmap checksum"),
            (&["-t", "ext4", "-O", "^metadata_csum,uninit_bg"][..], "free clusters"),
            (&["-t", "ext2"][..], "free clusters"),
        ] {
            let path = mkfs(dir.path(), 64, args, None);
            age(dir.path(), &path);
            let at = bitmap_offset(&path, 0) + 100;
            let byte = read_at(&path, at, 1)[0];
            write_at(&path, at, &[byte ^ 0x10]);
            let why = scan_err(&path);
            assert!(why.contains(expect), "{args:?}: {why}");
        }
    }

    #[test]
    fn a_metadata_block_marked_free_is_caught_even_when_the_counts_agree() {
        if !have(&["mke2fs", "dumpe2fs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 64, &["-t", "ext2", "-b", "4096"], None);
        let at = bitmap_offset(&path, 0);
        let free = assert_matches_dumpe2fs(&path, "ext2");
        let first_free = free.ranges()[0].0 / 4096;
        let mut map = read_at(&path, at, 4096);
        map[0] ^= 0x02; // the first descriptor block: now free
        map[(first_free / 8) as usize] ^= 1 << (first_free % 8); // a free block: now used
        write_at(&path, at, &map);
        assert!(scan_err(&path).contains("metadata block 1 is marked free"));
    }

    #[test]
    fn a_truncated_region_is_kept_whole() {
        if !have(&["mke2fs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = mkfs(dir.path(), 32, &["-t", "ext4"], None);
        let file = File::open(&path).unwrap();
        for len in [2048, 1 << 20, (32 << 20) - 1] {
            let scan = scan_disk(&FileDisk(file.try_clone().unwrap()), len).unwrap();
            assert!(scan.free.unwrap_err().contains("do not fit the region"));
        }
        assert!(scan_disk(&FileDisk(file), 1500).is_none());
    }

    #[test]
    fn a_mutated_image_never_panics_and_never_frees_more_than_the_honest_map() {
        if !have(&["mke2fs", "debugfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for args in [&["-t", "ext4", "-b", "1024"][..], &["-t", "ext2", "-b", "1024"][..]] {
            let path = mkfs(dir.path(), 24, args, None);
            age(dir.path(), &path);
            // Where the mutations go: the superblock, the descriptors, two bitmaps, anywhere.
            let targets =
                [(1024, 1024), (2048, 1024), (bitmap_offset(&path, 0), 1024), (bitmap_offset(&path, 2), 1024)];
            let image = std::fs::read(&path).unwrap();
            let honest = scan_disk(&image, image.len() as u64).unwrap().free.unwrap().bytes();
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let (mut kept, mut read) = (0, 0);
            for _ in 0..600 {
                let mut disk = image.clone();
                for _ in 0..1 + next() % 3 {
                    let (start, len) = targets.get(next() as usize % 5).copied().unwrap_or((0, image.len() as u64));
                    disk[(start + next() % len) as usize] = next() as u8;
                }
                match scan_disk(&disk, disk.len() as u64).map(|s| s.free) {
                    Some(Ok(free)) => {
                        assert!(free.bytes() <= honest, "{args:?}: {} > {honest}", free.bytes());
                        read += 1;
                    }
                    Some(Err(_)) | None => kept += 1,
                }
            }
            assert!(kept > 300, "{args:?}: only {kept} mutants kept whole");
            eprintln!("{args:?}: {read} mutants read, {kept} kept whole");
        }
    }
}
