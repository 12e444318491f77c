//! NTFS: which clusters of a volume its `$Bitmap` marks free.
//!
//! Reads the boot sector (geometry, where `$MFT` and `$MFTMirr` start), MFT record 0 (`$MFT`:
//! the runlist of its unnamed `$DATA`, which maps record numbers to disk positions, the MFT may
//! be fragmented), records 1 (`$MFTMirr`), 2 (`$LogFile`), 3 (`$Volume`), 6 (`$Bitmap`) and
//! 7 (`$Boot`), every record with its update sequence fixups applied and checked. Bit `i` of
//! `$Bitmap`'s data is cluster `i`; a clear bit below the volume's cluster count is a free
//! cluster. The backup boot sector (the volume's last sector), the tail of the volume that does
//! not fill a cluster and whatever follows the volume in its region are kept.
//!
//! NTFS keeps no free counts, so the cross-checks are these:
//! - records 0 to 3 equal their copies in `$MFTMirr`, and `$MFT`'s and `$MFTMirr`'s first runs
//!   start where the boot sector says;
//! - every runlist is well formed, matches its attribute's VCN range and lies inside the volume;
//! - `$Bitmap`'s data covers every cluster of the volume;
//! - cluster 0, `$MFTMirr`'s cluster and the runs of `$MFT`, `$MFTMirr`, `$LogFile`, `$Bitmap`
//!   and `$Boot` are marked used;
//! - every in-use MFT record up to the MFT's initialized size is read (fixups checked), and the
//!   runs of each of its non-resident attributes, named or not, must be marked used. This walk
//!   is what makes a flipped used→free bit anywhere detectable; it reads the whole MFT once.
//!   What no check can see: a cluster used by a file whose MFT record itself was lost or
//!   zeroed while its bitmap bit was cleared (that file is gone for NTFS too). A free cluster
//!   marked used (a leak) is not looked for: it is only stored needlessly.
//!
//! Refused (the region is kept whole): a volume marked dirty or with an unfinished chkdsk,
//! `$Volume` versions other than 3.0 and 3.1, a `$LogFile` whose restart pages say the volume
//! was not shut down cleanly (Windows hibernation or fast startup, a crash; an emptied log, as
//! mkntfs and ntfs-3g leave it, is clean), `$ATTRIBUTE_LIST` in `$MFT`, `$MFTMirr`, `$LogFile`,
//! `$Bitmap` or `$Boot` (their runs would continue in extension records, not read yet),
//! compressed, encrypted or sparse system files, a failed fixup in any in-use record, and any
//! geometry or size out of range.

use super::{FreeRanges, Scan, Window};
use crate::le::{get_u16 as u16_at, get_u32 as u32_at, get_u64 as u64_at};

const SIGNATURE: &[u8] = b"NTFS    ";
/// Update sequence fixups protect each 512-byte stride of a record, whatever the sector size.
const STRIDE: usize = 512;
/// The largest cluster NTFS formats (Windows 10 and later).
const MAX_CLUSTER: u64 = 2 << 20;
/// How much of the MFT or of `$Bitmap` is read at once.
const CHUNK: u64 = 1 << 20;

const ATTR_ATTRIBUTE_LIST: u32 = 0x20;
const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_END: u32 = 0xFFFF_FFFF;
const RECORD_IN_USE: u16 = 0x0001;
const VOLUME_IS_DIRTY: u16 = 0x0001;
const VOLUME_CHKDSK_UNDERWAY: u16 = 0x4000;
/// Compressed (any compression method), encrypted, sparse.
const ATTR_FLAGS_NOT_PLAIN: u16 = 0x00FF | 0x4000 | 0x8000;

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    if !w.has(3, SIGNATURE) {
        return None;
    }
    Some(Scan { file_system: "ntfs", free: free(w, true) })
}

/// The free ranges of the volume; `walk` adds the check of every in-use record's runs.
fn free(w: &Window<'_>, walk: bool) -> Result<FreeRanges, String> {
    let v = Volume::open(w)?;
    v.check_volume_information()?;
    v.check_mirror()?;
    let logfile = v.system_stream(2, "$LogFile")?;
    v.check_logfile_clean(&logfile)?;
    let bitmap = v.system_stream(6, "$Bitmap")?;
    let free = v.free_ranges(&bitmap)?;
    let mirror = v.system_stream(1, "$MFTMirr")?;
    let boot = v.system_stream(7, "$Boot")?;
    v.check_used(&free, 0, 1, "the boot sector")?;
    v.check_used(&free, v.g.mirror_lcn, 1, "$MFTMirr")?;
    for (stream, name) in
        [(&v.mft, "$MFT"), (&mirror, "$MFTMirr"), (&logfile, "$LogFile"), (&bitmap, "$Bitmap"), (&boot, "$Boot")]
    {
        v.check_runs_used(&free, stream, name)?;
    }
    if walk {
        v.check_every_record(&free)?;
    }
    Ok(free)
}

/// What the boot sector says.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    cluster: u64,
    clusters: u64,
    mft_lcn: u64,
    mirror_lcn: u64,
    record: usize,
}

fn geometry(w: &Window<'_>) -> Result<Geometry, String> {
    let b = w.read(0, 512)?;
    if b[510..512] != [0x55, 0xAA] {
        return Err("the ntfs boot sector lacks its 0x55aa end mark".into());
    }
    let sector = u64::from(u16_at(&b, 0x0B));
    if !(512..=4096).contains(&sector) || !sector.is_power_of_two() {
        return Err(format!("ntfs sector size {sector} is out of range"));
    }
    let spc = match b[0x0D] {
        0 => return Err("ntfs sectors per cluster is 0".into()),
        v if v > 0x80 => 1u64.checked_shl(256 - u32::from(v)).unwrap_or(0),
        v => u64::from(v),
    };
    let cluster = sector.saturating_mul(spc);
    if !spc.is_power_of_two() || cluster > MAX_CLUSTER {
        return Err(format!("ntfs sectors per cluster value {:#x} is out of range", b[0x0D]));
    }
    let total_sectors = u64_at(&b, 0x28);
    if total_sectors.checked_mul(sector).is_none_or(|bytes| bytes > w.len()) {
        return Err(format!("the ntfs volume ({total_sectors} sectors) is larger than its region"));
    }
    let clusters = total_sectors / spc;
    let record = match b[0x40] as i8 {
        v if v > 0 => u64::from(v.unsigned_abs()) * cluster,
        v if (-16..=-9).contains(&v) => 1u64 << v.unsigned_abs(),
        v => return Err(format!("ntfs clusters per mft record value {v} is out of range")),
    };
    if !(512..=65536).contains(&record) || !record.is_power_of_two() {
        return Err(format!("ntfs mft record size {record} is out of range"));
    }
    let (mft_lcn, mirror_lcn) = (u64_at(&b, 0x30), u64_at(&b, 0x38));
    if clusters < 16 || mft_lcn >= clusters || mirror_lcn >= clusters || mft_lcn == 0 {
        return Err("the ntfs boot sector places $MFT or $MFTMirr outside the volume".into());
    }
    Ok(Geometry { cluster, clusters, mft_lcn, mirror_lcn, record: record as usize })
}

/// One run of a non-resident attribute: `len` clusters from `vcn`, at `lcn` (`None`: sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    vcn: u64,
    lcn: Option<u64>,
    len: u64,
}

/// A non-resident attribute: its runs and sizes in bytes.
#[derive(Debug, Clone)]
struct Stream {
    runs: Vec<Run>,
    size: u64,
    initialized: u64,
}

/// One attribute of a record: its header fields and its bytes (header included).
struct Attr<'r> {
    kind: u32,
    non_resident: bool,
    named: bool,
    flags: u16,
    bytes: &'r [u8],
}

/// The attributes of a record whose fixups were applied, bounded by its used size.
fn attributes(rec: &[u8]) -> Result<Vec<Attr<'_>>, String> {
    let used = (u32_at(rec, 0x18) as usize).min(rec.len());
    let mut at = usize::from(u16_at(rec, 0x14));
    let mut found = Vec::new();
    loop {
        if at + 4 > used {
            return Err("an mft record's attributes run past its used size".into());
        }
        let kind = u32_at(rec, at);
        if kind == ATTR_END {
            return Ok(found);
        }
        if at + 0x18 > used {
            return Err("an mft record's attribute header runs past its used size".into());
        }
        let len = u32_at(rec, at + 4) as usize;
        let non_resident = rec[at + 8] != 0;
        let min = if non_resident { 0x40 } else { 0x18 };
        if len < min || !len.is_multiple_of(8) || at + len > used {
            return Err(format!("an mft record's attribute {kind:#x} has length {len}"));
        }
        let bytes = &rec[at..at + len];
        let named = bytes[9] != 0;
        found.push(Attr { kind, non_resident, named, flags: u16_at(bytes, 0x0C), bytes });
        at += len;
    }
}

/// The value of a resident attribute.
fn resident_value<'r>(a: &Attr<'r>) -> Result<&'r [u8], String> {
    let len = u32_at(a.bytes, 0x10) as usize;
    let off = usize::from(u16_at(a.bytes, 0x14));
    a.bytes
        .get(off..off.saturating_add(len))
        .ok_or_else(|| format!("resident attribute {:#x} overruns its record", a.kind))
}

/// Little-endian signed integer of 1 to 8 bytes.
fn signed_le(b: &[u8]) -> i64 {
    let mut v = [if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xFF } else { 0 }; 8];
    v[..b.len()].copy_from_slice(b);
    i64::from_le_bytes(v)
}

/// Decodes a non-resident attribute's runlist; every run must lie inside the volume and the
/// runs must cover exactly the attribute's VCN range.
fn stream(a: &Attr<'_>, clusters: u64) -> Result<Stream, String> {
    let b = a.bytes;
    let (first_vcn, last_vcn) = (u64_at(b, 0x10), u64_at(b, 0x18));
    let mut at = usize::from(u16_at(b, 0x20));
    let (size, initialized) = (u64_at(b, 0x30), u64_at(b, 0x38));
    let bad = |why: &str| format!("attribute {:#x}: {why}", a.kind);
    if initialized > size {
        return Err(bad("initialized size exceeds its size"));
    }
    let mut runs = Vec::new();
    let (mut vcn, mut lcn) = (first_vcn, 0i64);
    loop {
        let header = *b.get(at).ok_or_else(|| bad("runlist runs past the attribute"))?;
        if header == 0 {
            break;
        }
        let (len_bytes, off_bytes) = (usize::from(header & 0x0F), usize::from(header >> 4));
        if !(1..=8).contains(&len_bytes) || off_bytes > 8 {
            return Err(bad("runlist header out of range"));
        }
        let field =
            b.get(at + 1..at + 1 + len_bytes + off_bytes).ok_or_else(|| bad("runlist runs past the attribute"))?;
        let len = signed_le(&field[..len_bytes]);
        if len <= 0 {
            return Err(bad("runlist has a run of no length"));
        }
        let len = len as u64;
        let run_lcn = if off_bytes == 0 {
            None
        } else {
            lcn = lcn.checked_add(signed_le(&field[len_bytes..])).ok_or_else(|| bad("runlist lcn overflows"))?;
            let start = u64::try_from(lcn).map_err(|_| bad("runlist lcn is negative"))?;
            if start.checked_add(len).is_none_or(|end| end > clusters) {
                return Err(bad("a run lies outside the volume"));
            }
            Some(start)
        };
        runs.push(Run { vcn, lcn: run_lcn, len });
        vcn = vcn.checked_add(len).filter(|&v| v < 1 << 62).ok_or_else(|| bad("runlist vcn overflows"))?;
        at += 1 + len_bytes + off_bytes;
    }
    if vcn != last_vcn.wrapping_add(1) {
        return Err(bad("runlist does not cover its vcn range"));
    }
    Ok(Stream { runs, size, initialized })
}

/// Checks and removes the update sequence fixups of a record or restart page read from disk;
/// its update sequence array starts at or after `min_offset`, past the header.
fn apply_fixups(buf: &mut [u8], min_offset: usize) -> Result<(), String> {
    let off = usize::from(u16_at(buf, 4));
    let count = usize::from(u16_at(buf, 6));
    if count != buf.len() / STRIDE + 1 || off < min_offset || !off.is_multiple_of(2) || off + 2 * count > buf.len() {
        return Err("its update sequence array is out of range".into());
    }
    let usn = [buf[off], buf[off + 1]];
    for i in 1..count {
        let end = i * STRIDE;
        if buf[end - 2..end] != usn {
            return Err("its update sequence does not match (a torn write)".into());
        }
        buf[end - 2] = buf[off + 2 * i];
        buf[end - 1] = buf[off + 2 * i + 1];
    }
    Ok(())
}

/// Checks an MFT record read from disk and applies its fixups; `Ok(false)`: not in use.
fn check_record(rec: &mut [u8], n: u64) -> Result<bool, String> {
    let fail = |why: String| format!("mft record {n}: {why}");
    match &rec[0..4] {
        b"FILE" => {}
        b"BAAD" => return Err(fail("marked bad by chkdsk".into())),
        _ => return Ok(false),
    }
    if u16_at(rec, 0x16) & RECORD_IN_USE == 0 {
        return Ok(false);
    }
    apply_fixups(rec, 0x28).map_err(fail)?;
    let used = u32_at(rec, 0x18) as usize;
    let first = usize::from(u16_at(rec, 0x14));
    if used > rec.len() || u32_at(rec, 0x1C) as usize != rec.len() || first < 0x2A || first >= used {
        return Err(fail("its header is out of range".into()));
    }
    if u16_at(rec, 4) >= 0x30 && u64::from(u32_at(rec, 0x2C)) != n {
        return Err(fail(format!("it says it is record {}", u32_at(rec, 0x2C))));
    }
    Ok(true)
}

struct Volume<'a, 'w> {
    w: &'a Window<'w>,
    g: Geometry,
    mft: Stream,
}

impl<'a, 'w> Volume<'a, 'w> {
    /// Reads the boot sector and `$MFT`'s own record, whose `$DATA` maps all the others.
    fn open(w: &'a Window<'w>) -> Result<Self, String> {
        let g = geometry(w)?;
        let mut rec = w.read(g.mft_lcn * g.cluster, g.record)?;
        if !check_record(&mut rec, 0)? {
            return Err("mft record 0 ($MFT) is not in use".into());
        }
        let mft = system_data(&rec, 0, "$MFT", &g)?;
        let first = mft.runs.first().copied();
        if first.is_none_or(|r| r.lcn != Some(g.mft_lcn) || r.len * g.cluster < g.record as u64) {
            return Err("$MFT's runlist does not start where the boot sector says".into());
        }
        if !mft.size.is_multiple_of(g.record as u64)
            || mft.size < 16 * g.record as u64
            || mft.initialized < 16 * g.record as u64
        {
            return Err(format!("$MFT's size {} is out of range", mft.size));
        }
        Ok(Volume { w, g, mft })
    }

    /// Reads `buf.len()` bytes at `offset` of a non-sparse stream, in pieces along its runs.
    fn read_stream(&self, s: &Stream, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let vcn = at / self.g.cluster;
            let i = s.runs.partition_point(|r| r.vcn + r.len <= vcn);
            let run = s.runs.get(i).filter(|r| r.vcn <= vcn).ok_or("a read falls outside an attribute's runs")?;
            let lcn = run.lcn.ok_or("a system file has a sparse run")?;
            let run_end = (run.vcn + run.len) * self.g.cluster;
            let n = ((run_end - at) as usize).min(buf.len() - done).min(CHUNK as usize);
            let disk = lcn * self.g.cluster + (at - run.vcn * self.g.cluster);
            self.w.read_into(disk, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// MFT record `n`, checked and fixed up; it must be in use.
    fn record(&self, n: u64) -> Result<Vec<u8>, String> {
        let offset = n * self.g.record as u64;
        let mut rec = vec![0u8; self.g.record];
        self.read_stream(&self.mft, offset, &mut rec)?;
        if !check_record(&mut rec, n)? {
            return Err(format!("mft record {n} (a system file) is not in use"));
        }
        if u64_at(&rec, 0x20) != 0 {
            return Err(format!("mft record {n} (a system file) is an extension record"));
        }
        Ok(rec)
    }

    /// The unnamed `$DATA` of system file `n`.
    fn system_stream(&self, n: u64, name: &str) -> Result<Stream, String> {
        system_data(&self.record(n)?, n, name, &self.g)
    }

    /// `$Volume`'s version and dirty flag.
    fn check_volume_information(&self) -> Result<(), String> {
        let rec = self.record(3)?;
        let attrs = attributes(&rec).map_err(|e| format!("$Volume: {e}"))?;
        let info = attrs
            .iter()
            .find(|a| a.kind == ATTR_VOLUME_INFORMATION && !a.non_resident)
            .ok_or("$Volume has no $VOLUME_INFORMATION")?;
        let value = resident_value(info)?;
        if value.len() < 12 {
            return Err("$VOLUME_INFORMATION is too short".into());
        }
        let (major, minor, flags) = (value[8], value[9], u16_at(value, 10));
        if major != 3 || minor > 1 {
            return Err(format!("ntfs version {major}.{minor} (strata reads 3.0 and 3.1)"));
        }
        if flags & VOLUME_IS_DIRTY != 0 {
            return Err("the ntfs volume is marked dirty (run chkdsk or ntfsfix)".into());
        }
        if flags & VOLUME_CHKDSK_UNDERWAY != 0 {
            return Err("a chkdsk of the ntfs volume did not finish (run chkdsk)".into());
        }
        Ok(())
    }

    /// Records 0 to 3 must equal their copies in `$MFTMirr`, as ntfs-3g requires.
    fn check_mirror(&self) -> Result<(), String> {
        let mirror = self.system_stream(1, "$MFTMirr")?;
        if mirror.runs.first().and_then(|r| r.lcn) != Some(self.g.mirror_lcn) {
            return Err("$MFTMirr's runlist does not start where the boot sector says".into());
        }
        let record = self.g.record as u64;
        if mirror.initialized < 4 * record {
            return Err("$MFTMirr holds fewer than 4 records".into());
        }
        for n in 0..4 {
            let rec = self.record(n)?;
            let mut copy = vec![0u8; self.g.record];
            self.read_stream(&mirror, n * record, &mut copy)?;
            if !check_record(&mut copy, n).map_err(|e| format!("$MFTMirr: {e}"))? {
                return Err(format!("$MFTMirr: its copy of record {n} is not in use"));
            }
            let used = u32_at(&rec, 0x18) as usize;
            if rec[..used] != copy[..used] {
                return Err(format!("$MFTMirr does not match $MFT (record {n})"));
            }
        }
        Ok(())
    }

    /// `$LogFile`'s restart pages: an emptied log (all 0xff, as ntfs-3g and mkntfs leave it)
    /// or restart areas that say the volume was shut down cleanly.
    fn check_logfile_clean(&self, log: &Stream) -> Result<(), String> {
        let mut head = vec![0u8; 512];
        if log.size < 8192 {
            return Err("$LogFile is too small".into());
        }
        self.read_stream(log, 0, &mut head)?;
        if head.iter().all(|&b| b == 0xFF) {
            return Ok(());
        }
        let page = u32_at(&head, 0x10) as u64;
        if !(512..=65536).contains(&page) || !page.is_power_of_two() || 2 * page > log.size {
            return Err("$LogFile's restart page size is out of range".into());
        }
        for at in [0, page] {
            let mut p = vec![0u8; page as usize];
            self.read_stream(log, at, &mut p)?;
            if p.iter().all(|&b| b == 0xFF) {
                continue;
            }
            if &p[0..4] != b"RSTR" && &p[0..4] != b"CHKD" {
                return Err("$LogFile's restart page is not recognized".into());
            }
            apply_fixups(&mut p, 0x1E).map_err(|e| format!("$LogFile restart page: {e}"))?;
            let ra = usize::from(u16_at(&p, 0x18));
            if ra + 0x10 > p.len() {
                return Err("$LogFile's restart area is out of range".into());
            }
            let (in_use_list, flags) = (u16_at(&p, ra + 0x0C), u16_at(&p, ra + 0x0E));
            if in_use_list != 0xFFFF && flags & 0x0002 == 0 {
                return Err("$LogFile holds changes not yet written: the volume was not shut down cleanly (windows hibernation or fast startup, a crash); boot windows and shut it down fully, or run ntfsfix".into());
            }
        }
        Ok(())
    }

    /// Reads `$Bitmap` in pieces; clear bits below the cluster count are free clusters.
    fn free_ranges(&self, bitmap: &Stream) -> Result<FreeRanges, String> {
        let need = self.g.clusters.div_ceil(8);
        if bitmap.size < need || bitmap.initialized < need {
            return Err(format!(
                "$Bitmap's {} bytes do not cover the volume's {} clusters",
                bitmap.size, self.g.clusters
            ));
        }
        let mut free = FreeRanges::default();
        let mut run_start: Option<u64> = None;
        let mut piece = vec![0u8; CHUNK as usize];
        let mut at = 0u64;
        while at < need {
            let n = (need - at).min(CHUNK) as usize;
            self.read_stream(bitmap, at, &mut piece[..n])?;
            for (i, &byte) in piece[..n].iter().enumerate() {
                let base = (at + i as u64) * 8;
                if (byte == 0xFF && run_start.is_none())
                    || (byte == 0 && run_start.is_some() && base + 8 <= self.g.clusters)
                {
                    continue;
                }
                for bit in 0..8u64 {
                    let c = base + bit;
                    let used = byte & (1 << bit) != 0 || c >= self.g.clusters;
                    match (used, run_start) {
                        (false, None) => run_start = Some(c),
                        (true, Some(s)) => {
                            free.push(s * self.g.cluster, c * self.g.cluster)?;
                            run_start = None;
                        }
                        _ => {}
                    }
                }
            }
            at += n as u64;
        }
        if let Some(s) = run_start {
            free.push(s * self.g.cluster, self.g.clusters * self.g.cluster)?;
        }
        Ok(free)
    }

    /// Clusters `[lcn, lcn + len)` must not overlap a free range.
    fn check_used(&self, free: &FreeRanges, lcn: u64, len: u64, what: &str) -> Result<(), String> {
        let (start, end) = (lcn * self.g.cluster, (lcn + len) * self.g.cluster);
        let r = free.ranges();
        let i = r.partition_point(|&(_, e)| e <= start);
        if r.get(i).is_some_and(|&(s, _)| s < end) {
            return Err(format!("$Bitmap marks clusters of {what} free (from cluster {lcn}, {len} clusters)"));
        }
        Ok(())
    }

    fn check_runs_used(&self, free: &FreeRanges, s: &Stream, what: &str) -> Result<(), String> {
        for run in &s.runs {
            if let Some(lcn) = run.lcn {
                self.check_used(free, lcn, run.len, what)?;
            }
        }
        Ok(())
    }

    /// Every in-use record up to the MFT's initialized size: each non-resident attribute's runs
    /// must be marked used.
    fn check_every_record(&self, free: &FreeRanges) -> Result<(), String> {
        let record = self.g.record as u64;
        let records = self.mft.initialized.min(self.mft.size) / record;
        let per_chunk = (CHUNK / record).max(1);
        let mut buf = vec![0u8; (per_chunk * record) as usize];
        let mut first = 0u64;
        while first < records {
            let count = (records - first).min(per_chunk);
            let bytes = &mut buf[..(count * record) as usize];
            self.read_stream(&self.mft, first * record, bytes)?;
            for (i, rec) in bytes.chunks_exact_mut(self.g.record).enumerate() {
                let n = first + i as u64;
                if !check_record(rec, n)? {
                    continue;
                }
                for a in attributes(rec).map_err(|e| format!("mft record {n}: {e}"))? {
                    if a.non_resident {
                        let s = stream(&a, self.g.clusters).map_err(|e| format!("mft record {n}: {e}"))?;
                        self.check_runs_used(free, &s, &format!("mft record {n}"))?;
                    }
                }
            }
            first += count;
        }
        Ok(())
    }
}

/// The unnamed, plain, non-resident `$DATA` of system file `n`, which must have no attribute
/// list.
fn system_data(rec: &[u8], n: u64, name: &str, g: &Geometry) -> Result<Stream, String> {
    let attrs = attributes(rec).map_err(|e| format!("{name}: {e}"))?;
    if attrs.iter().any(|a| a.kind == ATTR_ATTRIBUTE_LIST) {
        return Err(format!("{name} (mft record {n}) has an $ATTRIBUTE_LIST: its extension records are not read yet"));
    }
    let mut data = attrs.iter().filter(|a| a.kind == ATTR_DATA && !a.named);
    let (Some(a), None) = (data.next(), data.next()) else {
        return Err(format!("{name} does not have exactly one unnamed $DATA"));
    };
    if !a.non_resident || a.flags & ATTR_FLAGS_NOT_PLAIN != 0 {
        return Err(format!("{name}'s $DATA is resident, compressed, encrypted or sparse"));
    }
    let s = stream(a, g.clusters).map_err(|e| format!("{name}: {e}"))?;
    if u64_at(a.bytes, 0x10) != 0 || s.runs.iter().any(|r| r.lcn.is_none()) {
        return Err(format!("{name}'s runlist does not start at vcn 0 or has holes"));
    }
    let covered = s.runs.iter().try_fold(0u64, |sum, r| sum.checked_add(r.len)).and_then(|c| c.checked_mul(g.cluster));
    if covered.is_none_or(|c| s.size > c) {
        return Err(format!("{name}'s size {} exceeds its runs", s.size));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::volume::test_support::{have_tools, Rng};

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh volume of `mib` MiB made by mkntfs with the given sector and cluster sizes.
    fn mkntfs(dir: &Path, mib: u64, sector: u32, cluster: u32) -> PathBuf {
        let img = dir.join(format!("ntfs-{sector}-{cluster}.img"));
        std::fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        run(Command::new("mkntfs").args(["-F", "-Q", "-s", &sector.to_string(), "-c", &cluster.to_string()]).arg(&img));
        img
    }

    #[allow(clippy::ptr_arg)]
    fn scan_bytes(d: &Vec<u8>, walk: bool) -> Result<FreeRanges, String> {
        let w = Window { disk: d, start: 0, len: d.len() as u64 };
        assert!(w.has(3, SIGNATURE));
        free(&w, walk)
    }

    /// ntfscluster's count of free bytes: an oracle that reads the bitmap with libntfs-3g.
    fn ntfscluster_free(img: &Path) -> u64 {
        let out = run(Command::new("ntfscluster").arg("-i").arg(img));
        let line = out.lines().find(|l| l.starts_with("bytes of free space")).unwrap();
        line.rsplit(':').next().unwrap().trim().parse().unwrap()
    }

    /// An ntfs-3g mount, unmounted when dropped (also when the test fails).
    struct Mount(PathBuf);

    impl Mount {
        fn new(img: &Path, dir: &Path, read_only: bool) -> Mount {
            let mnt = dir.join("mnt");
            std::fs::create_dir_all(&mnt).unwrap();
            let mut cmd = Command::new("ntfs-3g");
            if read_only {
                cmd.args(["-o", "ro"]);
            }
            run(cmd.arg(img).arg(&mnt));
            Mount(mnt)
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let ok = Command::new("fusermount").arg("-u").arg(&self.0).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
    }

    fn hashes(root: &Path) -> BTreeMap<PathBuf, blake3::Hash> {
        let mut found = BTreeMap::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    found
                        .insert(p.strip_prefix(root).unwrap().to_path_buf(), blake3::hash(&std::fs::read(&p).unwrap()));
                }
            }
        }
        found
    }

    const MARK: &[u8] = b"STRATA-NTFS-MARK";

    /// Fills a mounted volume: many files, most deleted, more written, a fragmented file
    /// (two files appended in turns) and a file whose every 4 KiB block starts with MARK.
    fn age(mnt: &Path) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        std::fs::create_dir_all(mnt.join("d/e")).unwrap();
        for i in 0..400 {
            let len = (rng.next() % 96_000) as usize + 1;
            std::fs::write(mnt.join(format!("d/f{i}")), rng.bytes(len)).unwrap();
        }
        for i in (0..400).filter(|i| i % 4 != 0) {
            std::fs::remove_file(mnt.join(format!("d/f{i}"))).unwrap();
        }
        let mut a = std::fs::File::options().create(true).append(true).open(mnt.join("d/e/frag-a")).unwrap();
        let mut b = std::fs::File::options().create(true).append(true).open(mnt.join("d/e/frag-b")).unwrap();
        for _ in 0..200 {
            std::io::Write::write_all(&mut a, &rng.bytes(8192)).unwrap();
            std::io::Write::write_all(&mut b, &rng.bytes(4096)).unwrap();
            a.sync_all().unwrap();
            b.sync_all().unwrap();
        }
        for i in 0..60 {
            std::fs::write(mnt.join(format!("g{i}")), rng.bytes(i * 700 + 5)).unwrap();
        }
        let marked: Vec<u8> = (0..64u32).flat_map(|i| [MARK, &i.to_le_bytes(), &[0x5Au8; 4076][..]].concat()).collect();
        std::fs::write(mnt.join("marked"), marked).unwrap();
    }

    /// An aged volume and the hashes of its files.
    fn aged(dir: &Path, mib: u64, cluster: u32) -> (PathBuf, BTreeMap<PathBuf, blake3::Hash>) {
        let img = mkntfs(dir, mib, 512, cluster);
        let m = Mount::new(&img, dir, false);
        age(&m.0);
        let before = hashes(&m.0);
        drop(m);
        (img, before)
    }

    fn tools() -> bool {
        have_tools(&["mkntfs", "ntfs-3g", "ntfscluster", "ntfsfix", "fusermount"])
    }

    /// The disk offset of the `$Bitmap` byte holding cluster `c`'s bit.
    #[allow(clippy::ptr_arg)]
    fn bitmap_byte(d: &Vec<u8>, c: u64) -> usize {
        let w = Window { disk: d, start: 0, len: d.len() as u64 };
        let v = Volume::open(&w).unwrap();
        let bitmap = v.system_stream(6, "$Bitmap").unwrap();
        let vcn = c / 8 / v.g.cluster;
        let run = bitmap.runs.iter().find(|r| r.vcn <= vcn && vcn < r.vcn + r.len).unwrap();
        (run.lcn.unwrap() * v.g.cluster + (c / 8 - run.vcn * v.g.cluster)) as usize
    }

    fn clear_bit(d: &mut Vec<u8>, c: u64) {
        let at = bitmap_byte(d, c);
        assert!(d[at] & (1 << (c % 8)) != 0, "cluster {c} was not marked used");
        d[at] &= !(1 << (c % 8));
    }

    #[test]
    fn fresh_volumes_free_exactly_what_ntfscluster_counts() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (mib, sector, cluster) in
            [(64, 512, 4096), (64, 512, 512), (96, 512, 1024), (128, 4096, 4096), (64, 512, 65536)]
        {
            let img = mkntfs(dir.path(), mib, sector, cluster);
            let free = scan_bytes(&std::fs::read(&img).unwrap(), true).unwrap();
            assert_eq!(free.bytes(), ntfscluster_free(&img), "{sector}/{cluster}");
            let volume_end = (mib << 20) - u64::from(sector);
            assert!(free.ranges().last().unwrap().1 <= volume_end, "the backup boot sector is kept");
            std::fs::remove_file(img).unwrap();
        }
    }

    #[test]
    fn garbage_in_every_free_range_of_an_aged_volume_changes_no_file() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for cluster in [4096, 512] {
            let (img, before) = aged(dir.path(), 128, cluster);
            let free = scan_bytes(&std::fs::read(&img).unwrap(), true).unwrap();
            let oracle = ntfscluster_free(&img);
            println!("cluster {cluster}: strata frees {} bytes, ntfscluster counts {oracle}", free.bytes());
            assert_eq!(free.bytes(), oracle);
            assert!(free.ranges().len() > 3, "an aged volume has several free ranges");
            let f = std::fs::File::options().write(true).open(&img).unwrap();
            for &(s, e) in free.ranges() {
                f.write_all_at(&vec![0xA5; (e - s) as usize], s).unwrap();
            }
            drop(f);
            let fix = run(Command::new("ntfsfix").arg("-n").arg(&img));
            assert!(fix.contains("processed successfully"), "{fix}");
            let m = Mount::new(&img, dir.path(), true);
            assert_eq!(hashes(&m.0), before, "cluster {cluster}");
            drop(m);
            std::fs::remove_file(img).unwrap();
        }
    }

    #[test]
    fn a_volume_ntfsresize_marked_dirty_is_kept_whole_until_ntfsfix_clears_it() {
        if !tools() || !have_tools(&["ntfsresize"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = mkntfs(dir.path(), 64, 512, 4096);
        run(Command::new("ntfsresize").args(["-f", "-f", "-s", "48M"]).arg(&img));
        let why = scan_bytes(&std::fs::read(&img).unwrap(), true).unwrap_err();
        assert!(why.contains("marked dirty"), "{why}");
        run(Command::new("ntfsfix").arg("-d").arg(&img));
        let free = scan_bytes(&std::fs::read(&img).unwrap(), true).unwrap();
        assert_eq!(free.bytes(), ntfscluster_free(&img));
        assert!(free.ranges().last().unwrap().1 <= 48 << 20, "nothing after the shrunk volume is freed");
    }

    #[test]
    fn a_cleared_bit_of_any_system_file_makes_the_region_kept_whole() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = mkntfs(dir.path(), 64, 512, 4096);
        let d = std::fs::read(&img).unwrap();
        let w = Window { disk: &d, start: 0, len: d.len() as u64 };
        let v = Volume::open(&w).unwrap();
        let first = |n: u64| v.system_stream(n, "").unwrap().runs[0].lcn.unwrap();
        let last_bitmap_cluster = {
            let r = *v.system_stream(6, "").unwrap().runs.last().unwrap();
            r.lcn.unwrap() + r.len - 1
        };
        let targets = [
            (0, "boot sector"),
            (v.g.mft_lcn, "$MFT"),
            (v.g.mirror_lcn, "$MFTMirr"),
            (first(2), "$LogFile"),
            (last_bitmap_cluster, "$Bitmap"),
        ];
        for (c, what) in targets {
            let mut m = d.clone();
            clear_bit(&mut m, c);
            let why = scan_bytes(&m, false).unwrap_err();
            assert!(why.contains(what) && why.contains("free"), "{what}: {why}");
        }
    }

    #[test]
    fn a_cleared_bit_of_a_file_is_caught_by_the_walk_of_every_record() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = aged(dir.path(), 64, 4096);
        let mut d = std::fs::read(&img).unwrap();
        let at = d.windows(MARK.len()).position(|x| x == MARK).unwrap() as u64 + 5 * 4096;
        clear_bit(&mut d, at / 4096);
        assert!(scan_bytes(&d, false).is_ok(), "without the walk nothing can see it");
        let why = scan_bytes(&d, true).unwrap_err();
        assert!(why.contains("mft record") && why.contains("free"), "{why}");
        let t = std::time::Instant::now();
        scan_bytes(&std::fs::read(&img).unwrap(), true).unwrap();
        println!("a scan with the walk of every record took {:?}", t.elapsed());
    }

    #[test]
    fn a_truncated_region_is_kept_whole() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = mkntfs(dir.path(), 64, 512, 4096);
        let d = std::fs::read(&img).unwrap();
        for len in [512, 8192, 1 << 20, d.len() - 4096] {
            let w = Window { disk: &d, start: 0, len: len as u64 };
            assert!(scan(&w).unwrap().free.is_err(), "{len}");
        }
    }

    /// A fresh 4 KiB-cluster volume, the disk offset of its MFT and of its `$LogFile`.
    fn fresh_with_offsets(dir: &Path) -> Option<(Vec<u8>, usize, usize)> {
        if !tools() {
            return None;
        }
        let d = std::fs::read(mkntfs(dir, 64, 512, 4096)).unwrap();
        let w = Window { disk: &d, start: 0, len: d.len() as u64 };
        let v = Volume::open(&w).unwrap();
        let log = v.system_stream(2, "").unwrap().runs[0].lcn.unwrap() * v.g.cluster;
        let mft = v.g.mft_lcn * v.g.cluster;
        Some((d.clone(), mft as usize, log as usize))
    }

    #[test]
    fn a_torn_write_in_a_system_record_makes_the_region_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let Some((mut d, mft, _)) = fresh_with_offsets(dir.path()) else { return };
        d[mft + 6 * 1024 + 510] ^= 0xFF;
        let why = scan_bytes(&d, true).unwrap_err();
        assert!(why.contains("mft record 6") && why.contains("update sequence"), "{why}");
    }

    #[test]
    fn an_attribute_list_in_the_bitmap_record_is_refused_not_half_read() {
        let dir = tempfile::tempdir().unwrap();
        let Some((mut d, mft, _)) = fresh_with_offsets(dir.path()) else { return };
        let rec = mft + 6 * 1024;
        let first = rec + usize::from(u16_at(&d, rec + 0x14));
        assert_eq!(u32_at(&d, first), 0x10, "$STANDARD_INFORMATION comes first");
        d[first] = 0x20;
        let why = scan_bytes(&d, true).unwrap_err();
        assert!(why.contains("$ATTRIBUTE_LIST"), "{why}");
    }

    /// Restart pages as Windows writes them (layout of ntfs-3g's logfile.h): "RSTR", update
    /// sequence at 0x1e, 4 KiB pages, the restart area at 0x30.
    fn restart_pages(d: &mut [u8], log: usize, client_in_use: u16, flags: u16) {
        for page in [log, log + 4096] {
            let p = &mut d[page..page + 4096];
            p.fill(0);
            p[0..4].copy_from_slice(b"RSTR");
            p[4..6].copy_from_slice(&0x1Eu16.to_le_bytes());
            p[6..8].copy_from_slice(&9u16.to_le_bytes());
            p[0x10..0x14].copy_from_slice(&4096u32.to_le_bytes());
            p[0x14..0x18].copy_from_slice(&4096u32.to_le_bytes());
            p[0x18..0x1A].copy_from_slice(&0x30u16.to_le_bytes());
            p[0x1E..0x20].copy_from_slice(&7u16.to_le_bytes());
            for i in 1..=8 {
                p[i * 512 - 2..i * 512].copy_from_slice(&7u16.to_le_bytes());
            }
            p[0x30 + 0x0C..0x30 + 0x0E].copy_from_slice(&client_in_use.to_le_bytes());
            p[0x30 + 0x0E..0x30 + 0x10].copy_from_slice(&flags.to_le_bytes());
        }
    }

    #[test]
    fn a_log_file_left_by_an_unclean_shutdown_makes_the_region_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let Some((mut d, _, log)) = fresh_with_offsets(dir.path()) else { return };
        let honest = scan_bytes(&d, true).unwrap().bytes();
        restart_pages(&mut d, log, 0, 0);
        let why = scan_bytes(&d, true).unwrap_err();
        assert!(why.contains("not shut down cleanly"), "{why}");
        restart_pages(&mut d, log, 0, 0x0002);
        assert_eq!(scan_bytes(&d, true).unwrap().bytes(), honest, "a clean restart area");
        restart_pages(&mut d, log, 0xFFFF, 0);
        assert_eq!(scan_bytes(&d, true).unwrap().bytes(), honest, "no client in use");
        d[log + 1022] ^= 1;
        assert!(scan_bytes(&d, true).unwrap_err().contains("update sequence"));
    }

    #[test]
    fn random_mutations_never_panic_nor_free_more_than_the_honest_map() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = aged(dir.path(), 64, 4096);
        let mut d = std::fs::read(&img).unwrap();
        let honest = scan_bytes(&d, true).unwrap().bytes();
        let (mft, bitmap) = {
            let w = Window { disk: &d, start: 0, len: d.len() as u64 };
            let v = Volume::open(&w).unwrap();
            let b = v.system_stream(6, "").unwrap().runs[0].lcn.unwrap();
            ((v.g.mft_lcn * v.g.cluster) as usize, (b * v.g.cluster) as usize)
        };
        let targets = [(0, 512), (mft, 64 * 1024), (bitmap, 2048)];
        let mut rng = Rng(12345);
        let (mut refused, mut fewer) = (0, 0);
        for i in 0..1500 {
            let (base, span) = targets[i % targets.len()];
            let at = base + (rng.next() % span) as usize;
            let old = d[at];
            d[at] = rng.next() as u8;
            let w = Window { disk: &d, start: 0, len: d.len() as u64 };
            match scan(&w).map(|s| s.free) {
                Some(Ok(free)) => {
                    assert!(free.bytes() <= honest, "a mutation at {at} freed {} > {honest}", free.bytes());
                    fewer += usize::from(free.bytes() < honest);
                }
                Some(Err(_)) | None => refused += 1,
            }
            d[at] = old;
        }
        println!("{refused} mutations refused, {fewer} freed less");
    }
}
