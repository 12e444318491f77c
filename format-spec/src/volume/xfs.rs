//! XFS: which blocks of the data device are free, read from each allocation group's free-space
//! B+trees. XFS is big-endian throughout.
//!
//! Read: the primary superblock (block 0), the AGF of every allocation group (its second sector),
//! both free-space B+trees of every group (by block number, `ABTB`/`AB3B`, and by size,
//! `ABTC`/`AB3C`) and the internal log. The free extents reported are the leaf records of the
//! by-block tree. The AGFL (the groups' reserve of free blocks kept for tree splits) is not in
//! that tree and is kept as used: it holds nothing, but its few blocks are not worth a parser.
//!
//! Cross-checks, any failure keeping the region whole: the superblock's geometry (block, sector
//! and group sizes, group count against the block count and the region); on v5 (CRC) file
//! systems the crc32c of the superblock, of each AGF and of each tree block, and each tree
//! block's uuid, disk address and owning group; each AGF's sequence number and length; each
//! tree walked with bounded levels, every block visited once, its sibling links forming one
//! chain per level, node keys equal to their child's first record, records in increasing order,
//! not overlapping and inside the group; the two trees holding exactly the same extents; their
//! total equal to the AGF's free count and their largest to the AGF's longest; no free extent
//! covering a group header, a tree block or the internal log; and the superblock's free count
//! equal to the sum over groups of free, free-list and tree blocks (the kernel writes it so at
//! a clean unmount, lazy counters included).
//!
//! The log must be provably clean: the head is found from the cycle numbers stamped in every
//! 512-byte log block (a run of cycle c then a run of c - 1, nothing else), and the last record
//! before it must be a single-operation unmount record ending exactly at the head, with a
//! matching LSN and, where present, a matching CRC. Refused: a log that is not shaped so (a
//! crash, a shutdown, a live or frozen file system), an external log, a realtime device, a
//! file system mkfs did not finish, one flagged as needing repair, and unknown feature bits
//! (v4 version or features2 bits, v5 read-only-compatible, incompatible or log-incompatible).

use super::{FreeRanges, Scan, Window, MAX_READ};
use std::collections::HashSet;

/// A 512-byte "basic block", the unit of disk addresses and of the log.
const BB: u64 = 512;
/// The deepest free-space tree accepted (the kernel's bound for these trees is lower).
const MAX_LEVELS: u32 = 9;
/// A null short-form block pointer (sibling links).
const NULL_AGBLOCK: u32 = u32::MAX;

const LOG_MAGIC: u32 = 0xFEED_BABE;
/// The span of a log record whose cycle words one header holds.
const LOG_HEADER_CYCLE_SIZE: u64 = 32 * 1024;
/// The longest a log record may be: the largest in-core log buffer plus its headers.
const MAX_LOG_RECORD_BBS: u64 = 2 * 256 * 1024 / BB;
const LOG_CLIENT_XFS_LOG: u8 = 0xAA;
const LOG_UNMOUNT_TRANS: u8 = 0x20;

/// v5 incompatible features that do not change where free space is recorded: file types in
/// directories, sparse inode chunks, a metadata uuid, big timestamps, 64-bit extent counters,
/// file range exchange, parent pointers.
const KNOWN_INCOMPAT: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
/// v5 read-only-compatible features: the free inode tree, the reverse-mapping tree, reflink,
/// inode tree block counts.
const KNOWN_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4 | 0x8;
/// v5 log-incompatible features: logged extended attributes.
const KNOWN_LOG_INCOMPAT: u32 = 0x1;
/// v4 version bits: attributes, 32-bit link counts, quotas, inode alignment, data alignment,
/// v2 logs, sector sizes, unwritten extents, v2 directories, "borg" bit, features2 present.
const KNOWN_V4_VERSION: u16 =
    0x000F | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x1000 | 0x2000 | 0x4000 | 0x8000;
/// features2: lazy counters, attr2, parent pointers (old), 32-bit project ids, CRCs, file types.
const KNOWN_FEATURES2: u32 = 0x2 | 0x8 | 0x10 | 0x80 | 0x100 | 0x200;

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    if !w.has(0, b"XFSB") {
        return None;
    }
    Some(Scan { file_system: "xfs", free: free(w) })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Whether the little-endian crc32c stored at `at` matches the rest of `buf`.
fn crc_ok(buf: &[u8], at: usize) -> bool {
    let stored = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4]));
    let crc = crc32c::crc32c(&buf[..at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[at + 4..]) == stored
}

/// The superblock fields this parser uses, checked.
struct Super {
    block: u64,
    sector: u64,
    dblocks: u64,
    ag_blocks: u64,
    ag_count: u64,
    ag_blk_log: u32,
    log_start: u64,
    log_blocks: u64,
    fdblocks: u64,
    v5: bool,
    uuid: [u8; 16],
    /// The uuid stamped in metadata blocks (the meta uuid when the file system has one).
    meta_uuid: [u8; 16],
}

impl Super {
    /// Where AG-relative block `agbno` of group `ag` lies, in bytes from the region's start.
    fn byte(&self, ag: u64, agbno: u64) -> u64 {
        (ag * self.ag_blocks + agbno) * self.block
    }

    fn ag_len(&self, ag: u64) -> u64 {
        (self.dblocks - ag * self.ag_blocks).min(self.ag_blocks)
    }
}

fn free(w: &Window<'_>) -> Result<FreeRanges, String> {
    let sb = read_super(w)?;
    check_log_clean(w, &sb)?;
    let mut free = FreeRanges::default();
    let mut total = 0u64;
    for ag in 0..sb.ag_count {
        let group = read_group(w, &sb, ag)?;
        total += group.counted;
        for &(start, count) in &group.extents {
            let start = sb.byte(ag, u64::from(start));
            free.push(start, start + u64::from(count) * sb.block)?;
        }
    }
    if total != sb.fdblocks {
        return Err(format!(
            "the superblock counts {} free blocks but the allocation groups count {total}",
            sb.fdblocks
        ));
    }
    Ok(free)
}

fn read_super(w: &Window<'_>) -> Result<Super, String> {
    let head = w.read(0, 512)?;
    let block = u64::from(u32_at(&head, 4));
    let sector = u64::from(u16_at(&head, 102));
    if !(512..=65536).contains(&block) || !block.is_power_of_two() || u64::from(head[120]) != block.ilog2().into() {
        return Err(format!("the superblock gives a block size of {block} bytes"));
    }
    if !(512..=32768).contains(&sector)
        || !sector.is_power_of_two()
        || sector > block
        || u64::from(head[121]) != sector.ilog2().into()
    {
        return Err(format!("the superblock gives a sector size of {sector} bytes"));
    }
    let b = w.read(0, sector as usize)?;
    let version = u16_at(&b, 100);
    let v5 = match version & 0xF {
        4 => false,
        5 => true,
        n => return Err(format!("superblock version {n} (strata reads versions 4 and 5)")),
    };
    if v5 && !crc_ok(&b, 224) {
        return Err("the superblock's crc32c does not match".into());
    }
    check_features(&b, version, v5)?;
    if b[126] != 0 {
        return Err("the superblock says mkfs did not finish (sb_inprogress)".into());
    }
    let rblocks = u64_at(&b, 16);
    if rblocks != 0 {
        return Err(format!("it has a realtime device of {rblocks} blocks, which strata does not read"));
    }
    let dblocks = u64_at(&b, 8);
    let ag_blocks = u64::from(u32_at(&b, 84));
    let ag_count = u64::from(u32_at(&b, 88));
    let ag_blk_log = u32::from(b[124]);
    if ag_blocks < 16 || ag_blk_log > 31 || ag_blocks > 1 << ag_blk_log || ag_blocks <= 1 << ag_blk_log >> 1 {
        return Err(format!("the superblock gives {ag_blocks} blocks per group (log2 {ag_blk_log})"));
    }
    if ag_count == 0 || dblocks > ag_count * ag_blocks || dblocks <= (ag_count - 1) * ag_blocks {
        return Err(format!("{ag_count} groups of {ag_blocks} blocks do not make {dblocks} blocks"));
    }
    if dblocks.checked_mul(block).is_none_or(|bytes| bytes > w.len()) {
        return Err(format!("{dblocks} blocks of {block} bytes do not fit in the region of {} bytes", w.len()));
    }
    let log_start = u64_at(&b, 48);
    if log_start == 0 {
        return Err("the log is on another device: whether it is clean cannot be seen".into());
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[32..48]);
    let mut meta_uuid = uuid;
    if v5 && u32_at(&b, 216) & INCOMPAT_META_UUID != 0 {
        meta_uuid.copy_from_slice(&b[248..264]);
    }
    Ok(Super {
        block,
        sector,
        dblocks,
        ag_blocks,
        ag_count,
        ag_blk_log,
        log_start,
        log_blocks: u64::from(u32_at(&b, 96)),
        fdblocks: u64_at(&b, 144),
        v5,
        uuid,
        meta_uuid,
    })
}

fn check_features(b: &[u8], version: u16, v5: bool) -> Result<(), String> {
    let features2 = if version & 0x8000 != 0 { u32_at(b, 200) } else { 0 };
    if features2 & !KNOWN_FEATURES2 != 0 {
        return Err(format!("unknown features2 bits {:#x}", features2 & !KNOWN_FEATURES2));
    }
    if !v5 {
        if version & !KNOWN_V4_VERSION != 0 {
            return Err(format!("unknown v4 version bits {:#x}", version & !KNOWN_V4_VERSION));
        }
        return Ok(());
    }
    let (ro_compat, incompat, log_incompat) = (u32_at(b, 212), u32_at(b, 216), u32_at(b, 220));
    if incompat & INCOMPAT_NEEDSREPAIR != 0 {
        return Err("the file system is flagged as needing xfs_repair".into());
    }
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(format!("unknown incompatible feature bits {:#x}", incompat & !KNOWN_INCOMPAT));
    }
    if ro_compat & !KNOWN_RO_COMPAT != 0 {
        return Err(format!("unknown read-only-compatible feature bits {:#x}", ro_compat & !KNOWN_RO_COMPAT));
    }
    if log_incompat & !KNOWN_LOG_INCOMPAT != 0 {
        return Err(format!("unknown log-incompatible feature bits {:#x}", log_incompat & !KNOWN_LOG_INCOMPAT));
    }
    Ok(())
}

/// The cycle number stamped in one log block: a record header carries it after its magic.
fn cycle_of(bb: &[u8]) -> u32 {
    if u32_at(bb, 0) == LOG_MAGIC {
        u32_at(bb, 4)
    } else {
        u32_at(bb, 0)
    }
}

/// Proves the internal log clean: its last record is an unmount record ending at the head.
fn check_log_clean(w: &Window<'_>, sb: &Super) -> Result<(), String> {
    let (ag, agbno) = (sb.log_start >> sb.ag_blk_log, sb.log_start & ((1 << sb.ag_blk_log) - 1));
    if ag >= sb.ag_count || sb.log_blocks == 0 || agbno + sb.log_blocks > sb.ag_len(ag) {
        return Err(format!(
            "the internal log (block {}, {} blocks) lies outside its group",
            sb.log_start, sb.log_blocks
        ));
    }
    let start = sb.byte(ag, agbno);
    let bbs = sb.log_blocks * sb.block / BB;
    let (first_cycle, head) = find_log_head(w, start, bbs)?;
    let dirty = "the log is dirty: its last record is not an unmount record (mount and unmount it, or run xfs_repair)";
    // The last record header before the head (data blocks start with a cycle, never the magic).
    let mut found = None;
    for back in 1..=MAX_LOG_RECORD_BBS.min(bbs) {
        let blk = (head + bbs - back) % bbs;
        let bb = w.read(start + blk * BB, BB as usize)?;
        if u32_at(&bb, 0) == LOG_MAGIC {
            found = Some((blk, bb));
            break;
        }
    }
    let (rblk, rh) = found.ok_or(dirty)?;
    let cycle = u32_at(&rh, 4);
    let expected_cycle = if rblk < head || head == 0 { first_cycle } else { first_cycle.wrapping_sub(1) };
    let (version, len, lsn, num_ops, h_size) =
        (u32_at(&rh, 8), u64::from(u32_at(&rh, 12)), u64_at(&rh, 16), u32_at(&rh, 40), u64::from(u32_at(&rh, 320)));
    if cycle != expected_cycle || lsn != (u64::from(cycle) << 32 | rblk) || !(1..=2).contains(&version) {
        return Err("the log's last record header does not match its position".into());
    }
    let hblks = if version == 2 && h_size > LOG_HEADER_CYCLE_SIZE { h_size.div_ceil(LOG_HEADER_CYCLE_SIZE) } else { 1 };
    if hblks + len.div_ceil(BB) > MAX_LOG_RECORD_BBS || (rblk + hblks + len.div_ceil(BB)) % bbs != head || num_ops != 1
    {
        return Err(dirty.into());
    }
    if rh[304..320] != [0; 16] && rh[304..320] != sb.uuid {
        return Err("the log belongs to another file system (its uuid differs)".into());
    }
    let data_blk = (rblk + hblks) % bbs;
    let data = w.read(start + data_blk * BB, BB as usize)?;
    if data[8] != LOG_CLIENT_XFS_LOG || data[9] & LOG_UNMOUNT_TRANS == 0 {
        return Err(dirty.into());
    }
    check_log_record_crc(w, start, bbs, rblk, &rh, hblks, len)
}

/// The head of the log: the first block whose cycle is one less than the first block's (or the
/// log's start when every block has the same cycle). Any other shape is refused.
fn find_log_head(w: &Window<'_>, start: u64, bbs: u64) -> Result<(u32, u64), String> {
    let chunk_bbs = (MAX_READ as u64 / 2) / BB;
    let mut first = None;
    let mut head = None;
    let mut blk = 0;
    while blk < bbs {
        let n = chunk_bbs.min(bbs - blk);
        let buf = w.read(start + blk * BB, (n * BB) as usize)?;
        for (i, bb) in buf.chunks_exact(BB as usize).enumerate() {
            let cycle = cycle_of(bb);
            let first = *first.get_or_insert(cycle);
            if first == 0 || first == LOG_MAGIC {
                return Err(format!("the log's first block has cycle {first}"));
            }
            match head {
                None if cycle == first => {}
                None if cycle == first - 1 => head = Some(blk + i as u64),
                Some(_) if cycle == first - 1 => {}
                _ => return Err("the log's cycle numbers are not in the order of a cleanly written log".into()),
            }
        }
        blk += n;
    }
    Ok((first.unwrap_or(0), head.unwrap_or(0)))
}

/// A record's CRC covers its header, the cycle words of its extension headers and its data. A
/// zero CRC means none was written (mkfs and xfs_repair write none, even on v5; the kernel
/// accepts that), and is accepted so.
fn check_log_record_crc(
    w: &Window<'_>,
    start: u64,
    bbs: u64,
    rblk: u64,
    rh: &[u8],
    hblks: u64,
    len: u64,
) -> Result<(), String> {
    let stored = u32::from_le_bytes(rh[32..36].try_into().unwrap_or([0; 4]));
    if stored == 0 {
        return Ok(());
    }
    let mut crc = crc32c::crc32c(&rh[..32]);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, &rh[36..328]);
    let ext = len.div_ceil(LOG_HEADER_CYCLE_SIZE);
    if ext > hblks {
        return Err("the log's last record is longer than its headers describe".into());
    }
    for i in 1..ext {
        let bb = w.read(start + (rblk + i) % bbs * BB, BB as usize)?;
        crc = crc32c::crc32c_append(crc, &bb[..256]);
    }
    let mut left = len;
    let mut blk = rblk + hblks;
    while left > 0 {
        let n = left.min(BB);
        let bb = w.read(start + blk % bbs * BB, BB as usize)?;
        crc = crc32c::crc32c_append(crc, &bb[..n as usize]);
        left -= n;
        blk += 1;
    }
    if crc != stored {
        return Err("the log's last record has a bad crc32c".into());
    }
    Ok(())
}

/// One allocation group's free extents (AG-relative blocks) and the blocks it counts as free in
/// the superblock's sense (free, free list and tree blocks).
struct Group {
    extents: Vec<(u32, u32)>,
    counted: u64,
}

/// The AGF fields used.
struct Agf {
    bno_root: u32,
    bno_level: u32,
    cnt_root: u32,
    cnt_level: u32,
    flcount: u32,
    freeblks: u32,
    longest: u32,
    btreeblks: u32,
}

fn read_agf(w: &Window<'_>, sb: &Super, ag: u64) -> Result<Agf, String> {
    let b = w.read(sb.byte(ag, 0) + sb.sector, sb.sector as usize)?;
    if &b[0..4] != b"XAGF" || u32_at(&b, 4) != 1 {
        return Err(format!("group {ag} has no AGF"));
    }
    if sb.v5 && (!crc_ok(&b, 216) || b[64..80] != sb.meta_uuid) {
        return Err(format!("the AGF of group {ag} has a bad crc32c or uuid"));
    }
    if u64::from(u32_at(&b, 8)) != ag || u64::from(u32_at(&b, 12)) != sb.ag_len(ag) {
        return Err(format!("the AGF of group {ag} gives another group number or length"));
    }
    let agfl_slots = (sb.sector - if sb.v5 { 36 } else { 0 }) / 4;
    let agf = Agf {
        bno_root: u32_at(&b, 16),
        cnt_root: u32_at(&b, 20),
        bno_level: u32_at(&b, 28),
        cnt_level: u32_at(&b, 32),
        flcount: u32_at(&b, 48),
        freeblks: u32_at(&b, 52),
        longest: u32_at(&b, 56),
        btreeblks: u32_at(&b, 60),
    };
    if u64::from(agf.flcount) > agfl_slots || u64::from(agf.freeblks) > sb.ag_len(ag) || agf.longest > agf.freeblks {
        return Err(format!("the AGF of group {ag} has counts out of range"));
    }
    Ok(agf)
}

fn read_group(w: &Window<'_>, sb: &Super, ag: u64) -> Result<Group, String> {
    let agf = read_agf(w, sb, ag)?;
    // The superblock, AGF, AGI and AGFL sectors.
    let headers = (4 * sb.sector).div_ceil(sb.block);
    let by_block = walk_tree(w, sb, ag, Tree::ByBlock, agf.bno_root, agf.bno_level)?;
    let by_size = walk_tree(w, sb, ag, Tree::BySize, agf.cnt_root, agf.cnt_level)?;
    let extents = by_block.records;
    let mut sorted = by_size.records;
    sorted.sort_unstable();
    if sorted != extents {
        return Err(format!("the two free-space trees of group {ag} disagree"));
    }
    let total: u64 = extents.iter().map(|&(_, n)| u64::from(n)).sum();
    let longest = extents.iter().map(|&(_, n)| n).max().unwrap_or(0);
    if total != u64::from(agf.freeblks) || longest != agf.longest {
        return Err(format!(
            "group {ag}: its free-space tree holds {total} blocks (longest {longest}), its AGF says {} (longest {})",
            agf.freeblks, agf.longest
        ));
    }
    let is_free = |b: u64| {
        let i = extents.partition_point(|&(s, _)| u64::from(s) <= b);
        i > 0 && b < u64::from(extents[i - 1].0) + u64::from(extents[i - 1].1)
    };
    if extents.first().is_some_and(|&(s, _)| u64::from(s) < headers) {
        return Err(format!("group {ag}: a free extent covers the group's headers"));
    }
    if by_block.blocks.iter().chain(&by_size.blocks).any(|&b| is_free(u64::from(b))) {
        return Err(format!("group {ag}: a free extent covers a block of its own tree"));
    }
    let (log_ag, log_bno) = (sb.log_start >> sb.ag_blk_log, sb.log_start & ((1 << sb.ag_blk_log) - 1));
    if log_ag == ag {
        let overlaps = extents
            .iter()
            .any(|&(s, n)| u64::from(s) < log_bno + sb.log_blocks && log_bno < u64::from(s) + u64::from(n));
        if overlaps {
            return Err(format!("group {ag}: a free extent covers the log"));
        }
    }
    Ok(Group { extents, counted: total + u64::from(agf.flcount) + u64::from(agf.btreeblks) })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tree {
    ByBlock,
    BySize,
}

impl Tree {
    fn magic(self, v5: bool) -> &'static [u8; 4] {
        match (self, v5) {
            (Tree::ByBlock, false) => b"ABTB",
            (Tree::ByBlock, true) => b"AB3B",
            (Tree::BySize, false) => b"ABTC",
            (Tree::BySize, true) => b"AB3C",
        }
    }

    /// The order of records and keys: by start block, or by length then start block.
    fn key(self, (start, count): (u32, u32)) -> (u32, u32) {
        match self {
            Tree::ByBlock => (start, 0),
            Tree::BySize => (count, start),
        }
    }
}

/// A tree's leaf records in tree order and the blocks the tree occupies.
struct Walked {
    records: Vec<(u32, u32)>,
    blocks: Vec<u32>,
}

/// Walks one short-form free-space tree depth first, in key order.
fn walk_tree(w: &Window<'_>, sb: &Super, ag: u64, tree: Tree, root: u32, levels: u32) -> Result<Walked, String> {
    let ag_len = sb.ag_len(ag);
    let bad = |what: &str| format!("group {ag}: its free-space tree {what}");
    if levels == 0 || levels > MAX_LEVELS {
        return Err(bad(&format!("has {levels} levels")));
    }
    let hdr = if sb.v5 { 56 } else { 16 };
    let leaf_max = (sb.block as usize - hdr) / 8;
    let node_max = (sb.block as usize - hdr) / 12;
    let mut out = Walked { records: Vec::new(), blocks: Vec::new() };
    let mut seen = HashSet::new();
    // Per level: the last block visited there and the right sibling it names.
    let mut prev = vec![None::<(u32, u32)>; levels as usize];
    // (block, level, the key its parent gives it)
    let mut stack = vec![(root, levels - 1, None::<(u32, u32)>)];
    let mut last_key = None;
    let mut last_end = 0u64;
    while let Some((bno, level, parent_key)) = stack.pop() {
        if bno == 0 || u64::from(bno) >= ag_len || !seen.insert(bno) {
            return Err(bad(&format!("points to block {bno} twice or outside the group")));
        }
        out.blocks.push(bno);
        let b = w.read(sb.byte(ag, u64::from(bno)), sb.block as usize)?;
        if &b[0..4] != tree.magic(sb.v5) || u32::from(u16_at(&b, 4)) != level {
            return Err(bad(&format!("has a bad block {bno}")));
        }
        if sb.v5 {
            let daddr = sb.byte(ag, u64::from(bno)) / BB;
            if !crc_ok(&b, 52)
                || u64_at(&b, 16) != daddr
                || b[32..48] != sb.meta_uuid
                || u64::from(u32_at(&b, 48)) != ag
            {
                return Err(bad(&format!("block {bno} has a bad crc32c, address, uuid or owner")));
            }
        }
        let (left, next) = (u32_at(&b, 8), u32_at(&b, 12));
        let linked = match prev[level as usize] {
            None => left == NULL_AGBLOCK,
            Some((prev_bno, prev_right)) => prev_right == bno && left == prev_bno,
        };
        if !linked {
            return Err(bad(&format!("has broken sibling links at block {bno}")));
        }
        prev[level as usize] = Some((bno, next));
        let numrecs = usize::from(u16_at(&b, 6));
        let is_root = bno == root && level == levels - 1;
        if numrecs > if level == 0 { leaf_max } else { node_max } || (numrecs == 0 && !(is_root && level == 0)) {
            return Err(bad(&format!("block {bno} holds {numrecs} records")));
        }
        if level == 0 {
            for i in 0..numrecs {
                let rec = (u32_at(&b, hdr + 8 * i), u32_at(&b, hdr + 8 * i + 4));
                let (start, count) = (u64::from(rec.0), u64::from(rec.1));
                let key = tree.key(rec);
                if i == 0 && parent_key.is_some_and(|k| tree.key(k) != key) {
                    return Err(bad(&format!("block {bno} does not start at its parent's key")));
                }
                if count == 0
                    || start + count > ag_len
                    || last_key.is_some_and(|k| k >= key)
                    || (tree == Tree::ByBlock && start < last_end)
                {
                    return Err(bad(&format!("holds a record out of order or outside the group in block {bno}")));
                }
                last_key = Some(key);
                last_end = start + count;
                out.records.push(rec);
            }
        } else {
            let children: Vec<_> = (0..numrecs)
                .map(|i| {
                    let key = (u32_at(&b, hdr + 8 * i), u32_at(&b, hdr + 8 * i + 4));
                    (u32_at(&b, hdr + 8 * node_max + 4 * i), level - 1, Some(key))
                })
                .collect();
            if starts_off_key(tree, parent_key, children.first().and_then(|c| c.2)) {
                return Err(bad(&format!("block {bno} does not start at its parent's key")));
            }
            stack.extend(children.into_iter().rev());
        }
        if out.blocks.len() as u64 > ag_len {
            return Err(bad("has more blocks than the group"));
        }
    }
    if prev.iter().any(|p| !p.is_some_and(|(_, r)| r == NULL_AGBLOCK)) {
        return Err(bad("has a level whose last block names a right sibling"));
    }
    Ok(out)
}

/// Whether a node's first key differs from the key its parent gives it.
fn starts_off_key(tree: Tree, parent: Option<(u32, u32)>, first: Option<(u32, u32)>) -> bool {
    match (parent, first) {
        (Some(p), Some(f)) => tree.key(p) != tree.key(f),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{have_tools, pseudo_random, run};
    use super::super::DiskRead;
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// An image file with byte patches laid over it, read without loading it whole.
    struct Disk {
        file: File,
        patches: Vec<(u64, Vec<u8>)>,
    }

    impl DiskRead for Disk {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.file.read_at(buf, offset)?;
            for (at, bytes) in &self.patches {
                for (i, &byte) in bytes.iter().enumerate() {
                    let pos = at + i as u64;
                    if pos >= offset && pos < offset + n as u64 {
                        buf[(pos - offset) as usize] = byte;
                    }
                }
            }
            Ok(n)
        }
    }

    fn disk(img: &Path) -> Disk {
        Disk { file: File::open(img).unwrap(), patches: Vec::new() }
    }

    fn scan_disk(d: &Disk) -> Result<FreeRanges, String> {
        let len = d.file.metadata().unwrap().len();
        scan(&Window { disk: d, start: 0, len }).expect("an xfs signature").free
    }

    fn mkfs(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let img = dir.join(name);
        File::create(&img).unwrap().set_len(320 << 20).unwrap();
        let mut all = vec!["-q", "-f"];
        all.extend(args);
        all.push(img.to_str().unwrap());
        run("mkfs.xfs", &all);
        img
    }

    /// A fresh default XFS image in `dir`, opened for patching, and its primary superblock's
    /// first sector.
    fn fresh_with_superblock(dir: &Path) -> (Disk, Vec<u8>) {
        let d = disk(&mkfs(dir, "x.img", &[]));
        let mut sb = vec![0u8; 512];
        d.file.read_exact_at(&mut sb, 0).unwrap();
        (d, sb)
    }

    fn db(img: &Path, cmds: &[&str]) -> String {
        let mut args = vec!["-r"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(img.to_str().unwrap());
        run("xfs_db", &args)
    }

    /// A numeric field of `xfs_db ... print field` output.
    fn field(out: &str, name: &str) -> u64 {
        let line =
            out.lines().find(|l| l.starts_with(&format!("{name} = "))).unwrap_or_else(|| panic!("{name} in {out}"));
        line[name.len() + 3..].trim().parse().unwrap()
    }

    /// The oracle: xfs_db's free extents less the AGFL blocks it lists among them, in bytes.
    fn oracle(img: &Path) -> Vec<(u64, u64)> {
        let sb = db(img, &["sb 0", "print blocksize agblocks agcount"]);
        let (bs, agb, agc) = (field(&sb, "blocksize"), field(&sb, "agblocks"), field(&sb, "agcount"));
        let mut agfl = HashSet::new();
        for ag in 0..agc {
            let out = db(img, &[&format!("agfl {ag}"), "print bno"]);
            for entry in out.split_whitespace().filter_map(|e| e.split_once(':')) {
                if let Ok(b) = entry.1.parse::<u64>() {
                    agfl.insert((ag, b));
                }
            }
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for line in db(img, &["freesp -d"]).lines() {
            let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if v.len() != 3 || (v[2] == 1 && agfl.contains(&(v[0], v[1]))) {
                continue;
            }
            let start = (v[0] * agb + v[1]) * bs;
            ranges.push((start, start + v[2] * bs));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            if !Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }

    fn mount(img: &Path, dir: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run("mount", &["-o", opts, img.to_str().unwrap(), dir.to_str().unwrap()]);
        Mount(dir.to_path_buf())
    }

    fn age(mnt: &Path, files: u64, size: impl Fn(u64) -> usize) -> Vec<(PathBuf, blake3::Hash)> {
        for i in 0..files {
            std::fs::write(mnt.join(format!("a{i}")), pseudo_random(i, size(i))).unwrap();
        }
        run("sync", &[]);
        for i in (0..files).filter(|i| i % 3 != 0) {
            std::fs::remove_file(mnt.join(format!("a{i}"))).unwrap();
        }
        for i in 0..files / 4 {
            std::fs::write(mnt.join(format!("b{i}")), pseudo_random(files + i, size(i) / 2 + 1)).unwrap();
        }
        let mut hashes: Vec<_> = std::fs::read_dir(mnt).unwrap().map(|e| e.unwrap().path()).collect();
        hashes.sort();
        hashes
            .into_iter()
            .map(|p| (p.strip_prefix(mnt).unwrap().to_path_buf(), blake3::hash(&std::fs::read(&p).unwrap())))
            .collect()
    }

    /// The free ranges equal the oracle's, and filling them with 0xA5 leaves a file system
    /// xfs_repair finds clean.
    fn check_free_and_fill(img: &Path) -> FreeRanges {
        assert!(run("xfs_logprint", &["-t", img.to_str().unwrap()]).contains("CLEAN"));
        let free = scan_disk(&disk(img)).unwrap();
        assert_eq!(free.ranges(), oracle(img).as_slice());
        eprintln!("{} free bytes in {} ranges, as xfs_db lists", free.bytes(), free.ranges().len());
        let file = OpenOptions::new().write(true).open(img).unwrap();
        for &(s, e) in free.ranges() {
            let mut at = s;
            while at < e {
                let n = (e - at).min(1 << 20);
                file.write_all_at(&vec![0xA5; n as usize], at).unwrap();
                at += n;
            }
        }
        file.sync_all().unwrap();
        run("xfs_repair", &["-n", img.to_str().unwrap()]);
        free
    }

    /// The strongest check: free ranges equal the oracle's, and filling them with 0xA5 leaves a
    /// file system xfs_repair finds clean, every file reading back as written.
    fn check_aged(mkfs_args: &[&str], files: u64, size: impl Fn(u64) -> usize) -> (Vec<(u64, u64)>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "x.img", mkfs_args);
        let mnt = dir.path().join("mnt");
        let hashes = {
            let _m = mount(&img, &mnt, "loop");
            age(&mnt, files, size)
        };
        let levels = (0..4).map(|ag| field(&db(&img, &[&format!("agf {ag}"), "print bnolevel"]), "bnolevel")).max();
        let free = check_free_and_fill(&img);
        let _m = mount(&img, &mnt, "loop,ro");
        for (name, hash) in &hashes {
            assert_eq!(blake3::hash(&std::fs::read(mnt.join(name)).unwrap()), *hash, "{name:?}");
        }
        (free.ranges().to_vec(), levels.unwrap_or(0))
    }

    #[test]
    fn an_aged_v5_file_system_frees_exactly_what_xfs_db_lists_and_nothing_in_use() {
        if !have_tools(&["mkfs.xfs", "xfs_db", "xfs_repair", "xfs_logprint"]) {
            return;
        }
        // 1 KiB blocks and many small files make free-space trees of more than one level.
        let (free, levels) = check_aged(&["-b", "size=1024"], 6000, |i| 1024 * (1 + i as usize % 3));
        assert!(free.len() > 1000, "{} free ranges", free.len());
        assert!(levels >= 2, "the deepest by-block tree has {levels} levels");
    }

    #[test]
    fn a_populated_v4_file_system_frees_exactly_what_xfs_db_lists_and_nothing_in_use() {
        if !have_tools(&["mkfs.xfs", "xfs_db", "xfs_repair", "xfs_logprint"]) {
            return;
        }
        // Kernels may no longer mount v4, so mkfs itself writes the files from a prototype.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
        let mut hashes = Vec::new();
        for i in 0..300u64 {
            let data = pseudo_random(i, 1000 * (1 + (i as usize * 7919) % 97));
            let path = src.join(format!("f{i}"));
            std::fs::write(&path, &data).unwrap();
            proto.push_str(&format!("f{i} ---644 0 0 {}\n", path.display()));
            hashes.push((PathBuf::from(format!("f{i}")), blake3::hash(&data)));
        }
        proto.push_str("$\n");
        let proto_path = dir.path().join("proto");
        std::fs::write(&proto_path, proto).unwrap();
        let img = mkfs(dir.path(), "x.img", &["-m", "crc=0", "-p", proto_path.to_str().unwrap()]);
        let free = check_free_and_fill(&img);
        assert!(free.bytes() > 100 << 20 && free.bytes() < 300 << 20, "{} free bytes", free.bytes());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let status = Command::new("mount").args(["-o", "loop,ro"]).arg(&img).arg(&mnt).output().unwrap().status;
        if !status.success() {
            eprintln!("note: this kernel cannot mount v4 xfs; the files' contents were not read back");
            return;
        }
        let _m = Mount(mnt.clone());
        for (name, hash) in &hashes {
            assert_eq!(blake3::hash(&std::fs::read(mnt.join(name)).unwrap()), *hash, "{name:?}");
        }
    }

    #[test]
    fn a_fresh_file_system_frees_what_xfs_db_lists() {
        if !have_tools(&["mkfs.xfs", "xfs_db"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, args) in [("v5.img", &[][..]), ("v4.img", &["-m", "crc=0"][..])] {
            let img = mkfs(dir.path(), name, args);
            let free = scan_disk(&disk(&img)).unwrap();
            assert_eq!(free.ranges(), oracle(&img).as_slice(), "{name}");
            assert!(free.bytes() > 200 << 20, "{name}: {} free bytes", free.bytes());
        }
    }

    #[test]
    fn a_file_system_shut_down_while_mounted_has_a_dirty_log_and_is_kept_whole() {
        if !have_tools(&["mkfs.xfs", "xfs_io", "xfs_logprint"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "x.img", &[]);
        let mnt = dir.path().join("mnt");
        {
            let _m = mount(&img, &mnt, "loop");
            for i in 0..50 {
                std::fs::write(mnt.join(format!("f{i}")), pseudo_random(i, 50_000)).unwrap();
            }
            run("xfs_io", &["-x", "-c", "shutdown -f", mnt.to_str().unwrap()]);
        }
        assert!(run("xfs_logprint", &["-t", img.to_str().unwrap()]).contains("DIRTY"));
        let err = scan_disk(&disk(&img)).unwrap_err();
        assert!(err.contains("log"), "{err}");
    }

    /// Locations in a fresh image: (block size, sector size, AG 0's bnobt root, AG 0's cntbt
    /// root) read by xfs_db.
    fn layout(img: &Path) -> (u64, u64, u64, u64) {
        let sb = db(img, &["sb 0", "print blocksize sectsize"]);
        let agf = db(img, &["agf 0", "print bnoroot cntroot"]);
        (field(&sb, "blocksize"), field(&sb, "sectsize"), field(&agf, "bnoroot"), field(&agf, "cntroot"))
    }

    fn fix_crc(buf: &mut [u8], at: usize) {
        buf[at..at + 4].fill(0);
        let crc = crc32c::crc32c(buf);
        buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_changed_free_extent_or_free_count_makes_the_region_kept_whole() {
        if !have_tools(&["mkfs.xfs", "xfs_db"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, args, v5) in [("v4.img", &["-m", "crc=0"][..], false), ("v5.img", &[][..], true)] {
            let img = mkfs(dir.path(), name, args);
            let (bs, sect, bno_root, _) = layout(&img);
            let mut d = disk(&img);
            assert!(scan_disk(&d).is_ok());
            // The last record of the by-block tree grows by one block (its CRC recomputed).
            let mut leaf = vec![0u8; bs as usize];
            d.file.read_exact_at(&mut leaf, bno_root * bs).unwrap();
            let hdr = if v5 { 56 } else { 16 };
            let last = hdr + 8 * (usize::from(u16_at(&leaf, 6)) - 1);
            let count = u32_at(&leaf, last + 4) - 1;
            leaf[last + 4..last + 8].copy_from_slice(&count.to_be_bytes());
            if v5 {
                fix_crc(&mut leaf, 52);
            }
            d.patches = vec![(bno_root * bs, leaf)];
            let err = scan_disk(&d).unwrap_err();
            assert!(err.contains("disagree"), "{name}: {err}");
            // The AGF's free count is one higher.
            let mut agf = vec![0u8; sect as usize];
            d.file.read_exact_at(&mut agf, sect).unwrap();
            let freeblks = u32_at(&agf, 52) + 1;
            agf[52..56].copy_from_slice(&freeblks.to_be_bytes());
            if v5 {
                fix_crc(&mut agf, 216);
            }
            d.patches = vec![(sect, agf)];
            let err = scan_disk(&d).unwrap_err();
            assert!(err.contains("AGF says"), "{name}: {err}");
        }
    }

    #[test]
    fn an_unknown_incompatible_feature_makes_the_region_kept_whole() {
        if !have_tools(&["mkfs.xfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mut sb) = fresh_with_superblock(dir.path());
        let incompat = u32_at(&sb, 216) | 1 << 30;
        sb[216..220].copy_from_slice(&incompat.to_be_bytes());
        d.patches = vec![(0, sb.clone())];
        assert!(scan_disk(&d).unwrap_err().contains("crc32c"));
        fix_crc(&mut sb, 224);
        d.patches = vec![(0, sb)];
        assert!(scan_disk(&d).unwrap_err().contains("unknown incompatible"));
    }

    #[test]
    fn a_superblock_free_count_unlike_the_groups_makes_the_region_kept_whole() {
        if !have_tools(&["mkfs.xfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mut sb) = fresh_with_superblock(dir.path());
        let fdblocks = u64_at(&sb, 144) + 1;
        sb[144..152].copy_from_slice(&fdblocks.to_be_bytes());
        fix_crc(&mut sb, 224);
        d.patches = vec![(0, sb)];
        let err = scan_disk(&d).unwrap_err();
        assert!(err.contains("superblock counts"), "{err}");
    }

    #[test]
    fn a_truncated_region_is_kept_whole() {
        if !have_tools(&["mkfs.xfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "x.img", &[]);
        let d = disk(&img);
        for len in [200, 4096, 100 << 20, (320 << 20) - 4096] {
            let scan = scan(&Window { disk: &d, start: 0, len }).unwrap();
            assert!(scan.free.is_err(), "{len}");
        }
    }

    #[test]
    fn random_mutations_of_the_metadata_never_panic_nor_free_more() {
        if !have_tools(&["mkfs.xfs", "xfs_db"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, args) in [("v4.img", &["-m", "crc=0"][..]), ("v5.img", &[][..])] {
            let img = mkfs(dir.path(), name, args);
            let (bs, sect, bno_root, cnt_root) = layout(&img);
            let log = field(&db(&img, &["sb 0", "print logstart"]), "logstart");
            let agb = field(&db(&img, &["sb 0", "print agblocks agblklog"]), "agblocks");
            let agblklog = field(&db(&img, &["sb 0", "print agblklog"]), "agblklog");
            let log_byte = ((log >> agblklog) * agb + (log & ((1 << agblklog) - 1))) * bs;
            let mut d = disk(&img);
            let honest = scan_disk(&d).unwrap().bytes();
            // The superblock, AG 0's AGF, both tree roots and the log's first two blocks.
            let targets = [(0, 264), (sect, 224), (bno_root * bs, 64), (cnt_root * bs, 64), (log_byte, 1024)];
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let mut rng = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for _ in 0..300 {
                let (at, span) = targets[(rng() % targets.len() as u64) as usize];
                let mut buf = [0u8; 1];
                let pos = at + rng() % span;
                d.file.read_exact_at(&mut buf, pos).unwrap();
                d.patches = vec![(pos, vec![buf[0] ^ (1 << (rng() % 8))])];
                if let Ok(free) = scan_disk(&d) {
                    assert!(free.bytes() <= honest, "{name}: byte {pos} changed frees {} > {honest}", free.bytes());
                }
            }
        }
    }
}
