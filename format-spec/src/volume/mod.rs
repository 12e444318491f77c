//! What a source disk holds, read for used-blocks backups ("intelligent sector"): its partition
//! table, the file system of each region, and the byte ranges those file systems do not use.
//! A backup stores only the used ranges; the unused ones read back as zeros (SPEC.md §5).
//!
//! Whatever the analysis does not understand is kept whole: partition tables and the gaps
//! between partitions, unknown, encrypted, damaged or uncleanly unmounted file systems, and a
//! region where two file systems' signatures are found. A parser says "these ranges are free"
//! only after its own cross-checks agree; in doubt it keeps the region whole and says why.
//! Every number read from the disk is checked against the region before it is used: a hostile
//! disk makes a region kept whole, never a panic, an unbounded allocation or an endless walk.

mod exfat;
mod ext;
mod fat;
mod ntfs;
pub mod partitions;
mod swap;
#[cfg(test)]
mod test_support;
mod xfs;

use partitions::{find_partitions, Partition};

/// Reads `buf.len()` bytes at an offset of the disk (short only at its end).
pub trait DiskRead {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl DiskRead for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl DiskRead for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.as_slice().read_at(offset, buf)
    }
}

/// The most one parser reads in one call; larger maps are read in pieces.
pub(crate) const MAX_READ: usize = 16 << 20;

/// A region of the disk as a parser sees it: offsets from the region's start, reads bounded by
/// its length.
pub(crate) struct Window<'a> {
    disk: &'a dyn DiskRead,
    start: u64,
    len: u64,
}

impl Window<'_> {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Exactly `buf.len()` bytes at `offset` of the region, or why not (outside the region, a
    /// read error, a short read).
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() || buf.len() > MAX_READ {
            return Err(format!("a read of {} bytes at offset {offset} falls outside the region", buf.len()));
        }
        let mut done = 0;
        while done < buf.len() {
            match self.disk.read_at(self.start + offset + done as u64, &mut buf[done..]) {
                Ok(0) => return Err(format!("the disk ends before offset {}", offset + done as u64)),
                Ok(n) => done += n,
                Err(e) => return Err(format!("cannot read offset {}: {e}", offset + done as u64)),
            }
        }
        Ok(())
    }

    /// `len` bytes at `offset` of the region (see `read_into`).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        if len > MAX_READ {
            return Err(format!("a read of {len} bytes at offset {offset} is larger than any map strata reads"));
        }
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf)?;
        Ok(buf)
    }

    /// Whether the region holds `magic` at `offset` (false when it cannot be read).
    pub fn has(&self, offset: u64, magic: &[u8]) -> bool {
        self.read(offset, magic.len()).is_ok_and(|b| b == magic)
    }
}

/// What one file system's parser found in a region.
pub(crate) struct Scan {
    /// The file system's name as users know it ("ext4", "ntfs", "vfat", ...).
    pub file_system: &'static str,
    /// The byte ranges (from the region's start) the file system does not use, or why the
    /// region must be kept whole.
    pub free: Result<FreeRanges, String>,
}

/// Free byte ranges of a region, collected in increasing order and merged where they touch.
/// Ranges that overlap or go backwards are a parser's inconsistency and are refused. Memory is
/// bounded: past `MAX_FREE_RUNS` runs (a badly fragmented file system), the shortest runs are
/// counted as used from then on, the threshold doubling until half the runs are left. That only
/// stores more (in doubt, keep it), and mostly what a partly free block would zero anyway.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct FreeRanges {
    ranges: Vec<(u64, u64)>,
    /// Where the last range pushed ended, kept or not: pushes never go backwards.
    pushed_to: u64,
    /// Runs shorter than this are counted as used (0: none is).
    shortest: u64,
}

/// Most free runs kept per region (16 bytes each: 4 MiB).
pub(crate) const MAX_FREE_RUNS: usize = 256 << 10;

impl FreeRanges {
    /// Adds `[start, end)`; an empty range is ignored.
    pub fn push(&mut self, start: u64, end: u64) -> Result<(), String> {
        if start >= end {
            return Ok(());
        }
        if start < self.pushed_to {
            return Err(format!("free ranges out of order at byte {start}"));
        }
        self.pushed_to = end;
        match self.ranges.last_mut() {
            Some(last) if start == last.1 => last.1 = end,
            _ if end - start < self.shortest => {}
            _ => {
                self.ranges.push((start, end));
                if self.ranges.len() > MAX_FREE_RUNS {
                    self.coarsen();
                }
            }
        }
        Ok(())
    }

    /// Counts the shortest runs as used until at most half of `MAX_FREE_RUNS` are left.
    fn coarsen(&mut self) {
        while self.ranges.len() > MAX_FREE_RUNS / 2 {
            let shortest = self.shortest.saturating_mul(2).max(4096);
            self.shortest = shortest;
            self.ranges.retain(|&(s, e)| e - s >= shortest);
        }
        log::info!(
            "more than {MAX_FREE_RUNS} free runs: those shorter than {} bytes are backed up as if used",
            self.shortest
        );
    }

    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}

/// The parsers, each answering `None` when the region does not carry its file system's
/// signature. Every one is asked: two answers mean an old signature survived a reformat, and
/// nobody can tell which file system is real.
const PARSERS: &[fn(&Window<'_>) -> Option<Scan>] =
    &[ext::scan, xfs::scan, ntfs::scan, fat::scan, exfat::scan, swap::scan, kept_whole_kinds];

/// Containers and file systems that strata recognizes but keeps whole, so that `info` can name
/// them.
fn kept_whole_kinds(w: &Window<'_>) -> Option<Scan> {
    let kind = if w.has(0, b"LUKS\xba\xbe") {
        ("LUKS", "encrypted: which of its blocks are used cannot be seen from outside")
    } else if w.has(512, b"LABELONE") && w.has(536, b"LVM2 001") {
        ("LVM2 PV", "an LVM physical volume: its logical volumes are not read")
    } else if w.has(65536 + 64, b"_BHRfS_M") {
        ("btrfs", "btrfs: every block is kept (its chunk tree is not read yet)")
    } else {
        return None;
    };
    Some(Scan { file_system: kind.0, free: Err(kind.1.to_string()) })
}

/// One region of the disk: a partition, or the whole disk when it has no partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The partition's number in its table; `None` for a disk without a table.
    pub partition: Option<u32>,
    /// Where the region lies on the disk, in bytes.
    pub start: u64,
    pub len: u64,
    /// The file system found there, `None` when none was recognized.
    pub file_system: Option<&'static str>,
    /// Bytes of the region that its file system does not use (0 when kept whole).
    pub unused_bytes: u64,
    /// Why every byte of the region is kept; `None` when only its used blocks are.
    pub kept_whole: Option<String>,
}

/// The result of `analyse`: the regions, and the unused byte ranges of the whole disk.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub regions: Vec<Region>,
    unused: Vec<(u64, u64)>,
}

impl Analysis {
    /// Byte ranges of the disk that no file system uses: sorted, disjoint, absolute.
    pub fn unused(&self) -> &[(u64, u64)] {
        &self.unused
    }

    pub fn unused_bytes(&self) -> u64 {
        self.unused.iter().map(|(s, e)| e - s).sum()
    }

    /// The unused ranges, taken out of the analysis (see `unused`).
    pub fn into_unused(self) -> Vec<(u64, u64)> {
        self.unused
    }
}

/// Finds the regions of a disk of `size` bytes, recognizes the file system of each and reads
/// which of its bytes are unused.
pub fn analyse(disk: &dyn DiskRead, size: u64) -> Analysis {
    let mut parts = find_partitions(disk, size);
    if parts.is_empty() {
        parts.push(Partition { number: 0, start: 0, len: size });
    }
    parts.sort_by_key(|p| p.start);
    let mut analysis = Analysis::default();
    for (i, part) in parts.iter().enumerate() {
        let overlapping = parts
            .iter()
            .enumerate()
            .find(|&(j, q)| j != i && q.start < part.start + part.len && part.start < q.start + q.len);
        let mut region = Region {
            partition: (part.number != 0).then_some(part.number),
            start: part.start,
            len: part.len,
            file_system: None,
            unused_bytes: 0,
            kept_whole: None,
        };
        if let Some((_, q)) = overlapping {
            region.kept_whole = Some(format!("it overlaps partition {} in the partition table", q.number));
        } else {
            let window = Window { disk, start: part.start, len: part.len };
            match scan_region(&window) {
                (fs, Ok(free)) => {
                    region.file_system = fs;
                    region.unused_bytes = free.bytes();
                    analysis.unused.extend(free.ranges().iter().map(|&(s, e)| (part.start + s, part.start + e)));
                }
                (fs, Err(why)) => {
                    region.file_system = fs;
                    region.kept_whole = Some(why);
                }
            }
        }
        analysis.regions.push(region);
    }
    analysis
}

/// The file system of one region and its free ranges, or why it is kept whole.
fn scan_region(window: &Window<'_>) -> (Option<&'static str>, Result<FreeRanges, String>) {
    let mut found: Vec<Scan> = PARSERS.iter().filter_map(|parse| parse(window)).collect();
    match found.len() {
        0 => (None, Err("no file system strata can read was found".into())),
        1 => {
            let scan = found.remove(0);
            (Some(scan.file_system), scan.free)
        }
        _ => {
            let names: Vec<&str> = found.iter().map(|s| s.file_system).collect();
            (None, Err(format!("it carries the signatures of {}: which one is real is unclear", names.join(" and "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ranges_merge_when_they_touch_and_refuse_going_backwards() {
        let mut f = FreeRanges::default();
        f.push(0, 10).unwrap();
        f.push(10, 20).unwrap();
        f.push(30, 30).unwrap();
        f.push(40, 50).unwrap();
        assert_eq!(f.ranges(), &[(0, 20), (40, 50)]);
        assert_eq!(f.bytes(), 30);
        assert!(f.push(45, 60).is_err());
    }

    #[test]
    fn a_fragmented_free_space_keeps_its_long_runs_within_the_cap_and_drops_only_free_bytes() {
        let mut f = FreeRanges::default();
        let mut pushed = Vec::new();
        let mut at = 0u64;
        for i in 0..3 * MAX_FREE_RUNS as u64 {
            let len = if i % 1000 == 0 { 1 << 20 } else { 512 * (1 + i % 7) };
            f.push(at, at + len).unwrap();
            pushed.push((at, at + len));
            at += len + 4096; // a used block between free runs
        }
        assert!(f.ranges().len() <= MAX_FREE_RUNS, "{} runs kept", f.ranges().len());
        let long: Vec<(u64, u64)> = pushed.iter().copied().filter(|(s, e)| e - s == 1 << 20).collect();
        assert!(long.iter().all(|r| f.ranges().contains(r)), "every long run is kept");
        // Nothing kept is outside what was pushed as free: coarsening only counts free bytes as used.
        let mut p = pushed.iter().peekable();
        for &(s, e) in f.ranges() {
            while p.peek().is_some_and(|&&(_, pe)| pe <= s) {
                p.next();
            }
            let &&(ps, pe) = p.peek().expect("a kept run lies in a pushed one");
            assert!(ps <= s && e <= pe, "{s}..{e} is not within a pushed run");
        }
        assert!(f.push(0, 10).is_err(), "pushes never go backwards, even behind dropped runs");
    }

    #[test]
    fn a_disk_with_nothing_known_is_one_region_kept_whole() {
        let disk = vec![7u8; 1 << 20];
        let a = analyse(&disk, disk.len() as u64);
        assert_eq!(a.regions.len(), 1);
        assert_eq!(a.regions[0].partition, None);
        assert!(a.regions[0].kept_whole.as_deref().unwrap().contains("no file system"));
        assert!(a.unused().is_empty());
    }

    #[test]
    fn windows_refuse_reads_outside_their_region() {
        let disk = vec![1u8; 4096];
        let w = Window { disk: &disk, start: 1024, len: 2048 };
        assert!(w.read(0, 2048).is_ok());
        assert!(w.read(1, 2048).is_err());
        assert!(w.read(u64::MAX, 2).is_err());
        assert!(w.read(0, MAX_READ + 1).is_err());
    }
}
