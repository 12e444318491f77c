//! exFAT: which clusters of the cluster heap the allocation bitmap marks free.
//!
//! Reads the main boot sector and its checksum sector, the root folder (following its FAT
//! chain), the allocation bitmap and up-case table entries found there, the bitmap itself
//! (following its FAT chain), and every folder of the tree. A cluster whose bitmap bit is clear
//! is free; the boot regions, the FAT and everything outside the cluster heap are kept.
//!
//! Cross-checks, each of which keeps the region whole when it fails: the boot checksum; the
//! geometry (FAT, heap and volume inside one another and inside the region); the clusters of
//! the bitmap, the up-case table, the root folder, and of every folder and file reached from
//! it (contiguous or chained) are marked used in the bitmap; every chain stays in the heap and
//! ends exactly where its length says (a folder's walk is bounded by exFAT's largest folder
//! size and all folders together by the cluster count, which bounds a cyclic chain). The
//! bitmap, up-case table and root folder are read through their FAT chains, as the
//! specification describes them; a volume whose FAT lacks those chains is kept whole.
//!
//! Refused: a set VolumeDirty or MediaFailure flag, two FATs (TexFAT), a file system revision
//! other than 1.x. Not compared: PercentInUse, which mkfs.exfat writes as 0 and Linux's exfat
//! driver does not update, so it is stale on most volumes that Linux wrote.
//! Volumes with more clusters than `MAX_CLUSTERS` are kept whole (the bitmap is held in memory).

use super::{FreeRanges, Scan, Window};
use crate::le::{get_u16 as u16_at, get_u32 as u32_at, get_u64 as u64_at};

/// The largest cluster count whose bitmap (one bit per cluster) is held in memory.
const MAX_CLUSTERS: u64 = 1 << 28;

/// The boot sector fields this parser uses; offsets and lengths in bytes.
struct Geometry {
    cluster: u64,
    fat_start: u64,
    heap_start: u64,
    clusters: u64,
    root: u64,
}

impl Geometry {
    fn cluster_offset(&self, c: u64) -> u64 {
        self.heap_start + (c - 2) * self.cluster
    }

    fn in_heap(&self, c: u64) -> bool {
        (2..self.clusters + 2).contains(&c)
    }
}

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    if !w.has(3, b"EXFAT   ") {
        return None;
    }
    Some(Scan { file_system: "exfat", free: free(w) })
}

fn free(w: &Window<'_>) -> Result<FreeRanges, String> {
    let boot = w.read(0, 512)?;
    check_boot_checksum(w, &boot)?;
    let g = geometry(w, &boot)?;
    check_flags(&boot)?;
    let mut fat = Fat { w, start: g.fat_start, clusters: g.clusters, cluster: g.cluster, cached: None };
    let root = fat.chain(g.root, None, g.cluster, "the root folder")?;
    let (bitmap_entry, upcase_entry) = find_bitmap_and_upcase(w, &g, &root)?;
    let bitmap = read_bitmap(w, &g, &mut fat, bitmap_entry)?;
    let used = |c: u64| bitmap[(c - 2) as usize / 8] & (1 << ((c - 2) % 8)) != 0;
    let upcase = fat.chain(upcase_entry.0, Some(upcase_entry.1), g.cluster, "the up-case table")?;
    let bitmap_clusters = fat.chain(bitmap_entry.0, Some(bitmap_entry.1), g.cluster, "the allocation bitmap")?;
    for (what, clusters) in
        [("root folder", &root), ("up-case table", &upcase), ("allocation bitmap", &bitmap_clusters)]
    {
        if let Some(c) = clusters.iter().find(|&&c| !used(c)) {
            return Err(format!("exfat: cluster {c} of the {what} is marked free in the allocation bitmap"));
        }
    }
    walk_tree(w, &g, &mut fat, &used)?;
    free_ranges(&g, &used)
}

fn geometry(w: &Window<'_>, b: &[u8]) -> Result<Geometry, String> {
    if b[510..512] != [0x55, 0xAA] || b[11..64].iter().any(|&x| x != 0) {
        return Err("exfat boot sector without its 0x55AA mark or with a non-zero legacy BPB".into());
    }
    if b[0x69] != 1 {
        return Err(format!("exfat revision {}.{} (strata reads 1.x)", b[0x69], b[0x68]));
    }
    let (sector_shift, cluster_shift) = (u32::from(b[0x6C]), u32::from(b[0x6D]));
    if !(9..=12).contains(&sector_shift) || sector_shift + cluster_shift > 25 {
        return Err(format!("exfat sector shift {sector_shift} or cluster shift {cluster_shift} out of range"));
    }
    if b[0x6E] != 1 {
        return Err(format!("exfat with {} FATs (TexFAT is not read)", b[0x6E]));
    }
    let sector = 1u64 << sector_shift;
    let volume = u64_at(b, 0x48);
    let (fat_offset, fat_length) = (u64::from(u32_at(b, 0x50)), u64::from(u32_at(b, 0x54)));
    let (heap, clusters) = (u64::from(u32_at(b, 0x58)), u64::from(u32_at(b, 0x5C)));
    let g = Geometry {
        cluster: sector << cluster_shift,
        fat_start: fat_offset * sector,
        heap_start: heap * sector,
        clusters,
        root: u64::from(u32_at(b, 0x60)),
    };
    let heap_end = heap + (clusters << cluster_shift);
    let consistent = fat_offset >= 24
        && fat_length * sector >= (clusters + 2) * 4
        && heap >= fat_offset + fat_length
        && heap_end <= volume
        && clusters <= MAX_CLUSTERS
        && g.in_heap(g.root);
    if !consistent {
        return Err("exfat boot sector geometry is inconsistent (FAT, cluster heap, root and volume length)".into());
    }
    if volume.saturating_mul(sector) > w.len() {
        return Err(format!("the exfat volume is {} sectors long but its region only {} bytes", volume, w.len()));
    }
    Ok(g)
}

fn check_flags(b: &[u8]) -> Result<(), String> {
    let flags = u16_at(b, 0x6A);
    if flags & 0x02 != 0 {
        return Err("exfat VolumeDirty is set: not cleanly unmounted (mount and unmount it, or run fsck.exfat)".into());
    }
    if flags & 0x04 != 0 {
        return Err("exfat MediaFailure is set: the disk reported errors (run fsck.exfat)".into());
    }
    if flags & 0x01 != 0 {
        return Err("exfat ActiveFat names a second FAT that a one-FAT volume has not".into());
    }
    Ok(())
}

/// Sector 11 repeats the checksum of sectors 0..=10, which skips VolumeFlags and PercentInUse.
fn check_boot_checksum(w: &Window<'_>, boot: &[u8]) -> Result<(), String> {
    if !(9..=12).contains(&boot[0x6C]) {
        return Err(format!("exfat sector shift {} out of range", boot[0x6C]));
    }
    let sector = 1usize << boot[0x6C];
    let region = w.read(0, 12 * sector)?;
    let mut sum: u32 = 0;
    for (i, &byte) in region[..11 * sector].iter().enumerate() {
        if matches!(i, 106 | 107 | 112) {
            continue;
        }
        sum = sum.rotate_right(1).wrapping_add(u32::from(byte));
    }
    if region[11 * sector..].chunks_exact(4).any(|c| u32_at(c, 0) != sum) {
        return Err("exfat boot checksum does not match the boot sectors".into());
    }
    Ok(())
}

/// FAT entries read through a one-block cache.
struct Fat<'a, 'w> {
    w: &'a Window<'w>,
    start: u64,
    clusters: u64,
    cluster: u64,
    cached: Option<(u64, Vec<u8>)>,
}

const FAT_BLOCK: u64 = 64 << 10;

impl Fat<'_, '_> {
    fn entry(&mut self, c: u64) -> Result<u32, String> {
        let at = self.start + c * 4;
        let block = at / FAT_BLOCK * FAT_BLOCK;
        if self.cached.as_ref().map(|(b, _)| *b) != Some(block) {
            let end = (self.start + (self.clusters + 2) * 4).min(block + FAT_BLOCK);
            self.cached = Some((block, self.w.read(block, (end - block) as usize)?));
        }
        let data = &self.cached.as_ref().map(|(_, d)| d).ok_or("exfat FAT cache empty")?;
        Ok(u32_at(data, (at - block) as usize))
    }

    /// The clusters of the chain from `first` (see `Walk`), collected.
    fn chain(&mut self, first: u64, len: Option<u64>, cluster: u64, what: &str) -> Result<Vec<u64>, String> {
        let mut walk = Walk::chain(first, len, cluster);
        let mut clusters = Vec::new();
        while let Some(c) = walk.next(self, what)? {
            clusters.push(c);
        }
        Ok(clusters)
    }
}

/// The largest folder exFAT allows, in bytes.
const MAX_FOLDER: u64 = 256 << 20;

/// The clusters of a file or folder, one at a time: a contiguous run, or a FAT chain that
/// must end exactly after `left` clusters (or, for the root folder, wherever it ends).
struct Walk {
    next: Option<u64>,
    left: Option<u64>,
    contiguous: bool,
    steps: u64,
}

impl Walk {
    fn chain(first: u64, len: Option<u64>, cluster: u64) -> Walk {
        Walk { next: Some(first), left: len.map(|l| l.div_ceil(cluster).max(1)), contiguous: false, steps: 0 }
    }

    fn run(first: u64, len: u64, cluster: u64) -> Walk {
        Walk { next: Some(first), left: Some(len.div_ceil(cluster).max(1)), contiguous: true, steps: 0 }
    }

    fn next(&mut self, fat: &mut Fat<'_, '_>, what: &str) -> Result<Option<u64>, String> {
        let Some(c) = self.next else { return Ok(None) };
        self.steps += 1;
        let too_long = self.left.is_none() && self.steps.saturating_mul(fat.cluster) > MAX_FOLDER;
        if !(2..fat.clusters + 2).contains(&c) || self.steps > fat.clusters || too_long {
            return Err(format!("exfat: {what} leaves the cluster heap or loops (cluster {c})"));
        }
        let last = self.left == Some(self.steps);
        self.next = if self.contiguous {
            (!last).then_some(c + 1)
        } else {
            match fat.entry(c)? {
                0xFFFF_FFFF if self.left.is_none() || last => None,
                0xFFFF_FFFF => return Err(format!("exfat: the chain of {what} ends early at cluster {c}")),
                _ if last => return Err(format!("exfat: the chain of {what} goes on past its length at cluster {c}")),
                n @ 2..0xFFFF_FFF7 => Some(u64::from(n)),
                n => return Err(format!("exfat: the chain of {what} reaches FAT entry {n:#x} at cluster {c}")),
            }
        };
        Ok(Some(c))
    }
}

/// The (first cluster, length) of the allocation bitmap and of the up-case table.
type Extent = (u64, u64);

fn find_bitmap_and_upcase(w: &Window<'_>, g: &Geometry, root: &[u64]) -> Result<(Extent, Extent), String> {
    let (mut bitmap, mut upcase) = (None, None);
    'clusters: for &c in root {
        let data = w.read(g.cluster_offset(c), g.cluster as usize)?;
        for e in data.chunks_exact(32) {
            let extent = (u64::from(u32_at(e, 20)), u64_at(e, 24));
            match e[0] {
                0x00 => break 'clusters,
                0x81 if bitmap.is_some() || e[1] & 1 != 0 => {
                    return Err("exfat root folder has a second allocation bitmap".into())
                }
                0x81 => bitmap = Some(extent),
                0x82 => upcase = Some(extent),
                _ => {}
            }
        }
    }
    match (bitmap, upcase) {
        (Some(b), Some(u)) => Ok((b, u)),
        _ => Err("exfat root folder lacks its allocation bitmap or up-case table entry".into()),
    }
}

fn read_bitmap(w: &Window<'_>, g: &Geometry, fat: &mut Fat<'_, '_>, (first, len): Extent) -> Result<Vec<u8>, String> {
    let needed = g.clusters.div_ceil(8);
    if len < needed || len > g.clusters * g.cluster {
        return Err(format!("exfat allocation bitmap of {len} bytes for {} clusters", g.clusters));
    }
    let clusters = fat.chain(first, Some(len), g.cluster, "the allocation bitmap")?;
    let mut bitmap = Vec::with_capacity(needed as usize);
    for c in clusters {
        let n = (needed - bitmap.len() as u64).min(g.cluster) as usize;
        if n == 0 {
            break;
        }
        bitmap.extend_from_slice(&w.read(g.cluster_offset(c), n)?);
    }
    Ok(bitmap)
}

/// Walks every folder from the root: each folder's and file's clusters must be marked used.
fn walk_tree(w: &Window<'_>, g: &Geometry, fat: &mut Fat<'_, '_>, used: &dyn Fn(u64) -> bool) -> Result<(), String> {
    let mut folders = vec![Walk::chain(g.root, None, g.cluster)];
    let mut budget = g.clusters;
    while let Some(mut walk) = folders.pop() {
        let mut pending_folder = None;
        while let Some(c) = walk.next(fat, "a folder")? {
            if !used(c) {
                return Err(format!("exfat: cluster {c} of a folder is marked free in the bitmap"));
            }
            budget = budget.checked_sub(1).ok_or("exfat folders hold more clusters than the volume (a loop)")?;
            let data = w.read(g.cluster_offset(c), g.cluster as usize)?;
            if read_entries(g, fat, &data, used, &mut pending_folder, &mut folders)? {
                break;
            }
        }
    }
    Ok(())
}

/// Checks the clusters of every stream extension in a folder cluster and queues subfolders;
/// true at the folder's end mark. `pending_folder` carries a file entry (is it a folder?)
/// whose stream extension is still to come, across clusters.
fn read_entries(
    g: &Geometry,
    fat: &mut Fat<'_, '_>,
    data: &[u8],
    used: &dyn Fn(u64) -> bool,
    pending_folder: &mut Option<bool>,
    folders: &mut Vec<Walk>,
) -> Result<bool, String> {
    for e in data.chunks_exact(32) {
        match e[0] {
            0x00 => return Ok(true),
            0x85 => *pending_folder = Some(u16_at(e, 4) & 0x10 != 0),
            0xC0 => {
                let Some(is_folder) = pending_folder.take() else {
                    return Err("exfat stream extension without its file entry".into());
                };
                match stream(g, e, is_folder)? {
                    Some(walk) if is_folder => folders.push(walk),
                    Some(mut walk) => {
                        while let Some(c) = walk.next(fat, "a file")? {
                            if !used(c) {
                                return Err(format!("exfat: cluster {c} of a file is marked free in the bitmap"));
                            }
                        }
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The clusters a stream extension entry names, or none for an empty file.
fn stream(g: &Geometry, e: &[u8], is_folder: bool) -> Result<Option<Walk>, String> {
    let (flags, first, len) = (e[1], u64::from(u32_at(e, 20)), u64_at(e, 24));
    if flags & 0x01 == 0 || (first == 0 && len == 0) {
        if first != 0 {
            return Err("exfat: a file that may not have clusters names a first cluster".into());
        }
        return Ok(None);
    }
    if first == 0 || len > g.clusters * g.cluster || (is_folder && len > MAX_FOLDER) {
        return Err(format!("exfat: a file or folder of {len} bytes from cluster {first}"));
    }
    Ok(Some(if flags & 0x02 != 0 {
        Walk::run(first, len, g.cluster)
    } else {
        Walk::chain(first, Some(len), g.cluster)
    }))
}

fn free_ranges(g: &Geometry, used: &dyn Fn(u64) -> bool) -> Result<FreeRanges, String> {
    let mut free = FreeRanges::default();
    let end = g.clusters + 2;
    let mut c = 2;
    while c < end {
        if used(c) {
            c += 1;
            continue;
        }
        let start = c;
        while c < end && !used(c) {
            c += 1;
        }
        free.push(g.cluster_offset(start), g.cluster_offset(c))?;
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::test_support::{have_tools, pseudo_random, run, Bytes};
    use std::process::Command;

    fn free_of(d: &[u8]) -> Result<FreeRanges, String> {
        scan(&Window { disk: &Bytes(d), start: 0, len: d.len() as u64 }).expect("not recognized as exfat").free
    }

    /// A mkfs.exfat image to which files are added by hand (no exfat driver is needed):
    /// directory entry sets, bitmap bits and, for fragmented files, FAT chains.
    struct Image {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        d: Vec<u8>,
        cluster: usize,
        heap: usize,
        fat: usize,
        bitmap: usize,
        /// Each file's data and the clusters that hold it.
        files: Vec<(Vec<u8>, Vec<u64>)>,
    }

    impl Image {
        fn new() -> Option<Image> {
            if !have_tools(&["mkfs.exfat", "fsck.exfat", "dump.exfat"]) {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("exfat.img");
            std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
            run("mkfs.exfat", &[path.to_str().unwrap()]);
            let d = std::fs::read(&path).unwrap();
            let sector = 1usize << d[0x6C];
            let cluster = sector << d[0x6D];
            let heap = u32_at(&d, 0x58) as usize * sector;
            let fat = u32_at(&d, 0x50) as usize * sector;
            let mut img = Image { _dir: dir, path, d, cluster, heap, fat, bitmap: 0, files: Vec::new() };
            img.bitmap = img.off(2); // mkfs.exfat puts the bitmap first; checked below
            assert_eq!(img.d[img.root_entry(0x81) + 20], 2);
            Some(img)
        }

        fn off(&self, c: u64) -> usize {
            self.heap + (c as usize - 2) * self.cluster
        }

        fn root(&self) -> usize {
            self.off(u64::from(u32_at(&self.d, 0x60)))
        }

        fn root_entry(&self, kind: u8) -> usize {
            (0..self.cluster / 32).map(|i| self.root() + 32 * i).find(|&at| self.d[at] == kind).unwrap()
        }

        fn used(&self, c: u64) -> bool {
            self.d[self.bitmap + (c as usize - 2) / 8] & (1 << ((c - 2) % 8)) != 0
        }

        fn set_used(&mut self, c: u64, on: bool) {
            let byte = &mut self.d[self.bitmap + (c as usize - 2) / 8];
            if on {
                *byte |= 1 << ((c - 2) % 8)
            } else {
                *byte &= !(1 << ((c - 2) % 8))
            }
        }

        /// `count` free clusters: a contiguous run for `stride` 1, else every `stride`-th free one.
        fn take(&mut self, count: usize, stride: usize) -> Vec<u64> {
            let end = u64::from(u32_at(&self.d, 0x5C)) + 2;
            let got: Vec<u64> = if stride == 1 {
                let start = (2..end).find(|&s| (s..s + count as u64).all(|c| c < end && !self.used(c))).unwrap();
                (start..start + count as u64).collect()
            } else {
                let free = (2..end).filter(|&c| !self.used(c)).collect::<Vec<_>>();
                free.into_iter().step_by(stride).take(count).collect()
            };
            got.iter().for_each(|&c| self.set_used(c, true));
            got
        }

        /// Writes a file (or, with `folder`, a folder cluster) in `parent`'s first cluster;
        /// contiguous when `stride` is 1, else chained through the FAT.
        fn add(&mut self, parent: usize, name: &str, data: &[u8], stride: usize, folder: bool) -> Vec<u64> {
            let count = data.len().div_ceil(self.cluster).max(1);
            let clusters = self.take(count, stride);
            for (i, &c) in clusters.iter().enumerate() {
                let chunk = &data[(i * self.cluster).min(data.len())..((i + 1) * self.cluster).min(data.len())];
                let at = self.off(c);
                self.d[at..at + self.cluster].fill(0);
                self.d[at..at + chunk.len()].copy_from_slice(chunk);
                if stride > 1 {
                    let next = clusters.get(i + 1).map_or(0xFFFF_FFFF, |&n| n as u32);
                    self.d[self.fat + 4 * c as usize..][..4].copy_from_slice(&next.to_le_bytes());
                }
            }
            let len = if folder { self.cluster } else { data.len() } as u64;
            let set = entry_set(name, clusters[0], len, stride == 1, folder);
            let slot = (0..self.cluster / 32).map(|i| parent + 32 * i).find(|&at| self.d[at] == 0).unwrap();
            self.d[slot..slot + set.len()].copy_from_slice(&set);
            if !folder {
                self.files.push((data.to_vec(), clusters.clone()));
            }
            clusters
        }

        /// Files in the root and in a folder, contiguous and fragmented, and freed clusters
        /// that still hold a deleted file's data.
        fn filled() -> Option<Image> {
            let mut img = Image::new()?;
            let root = img.root();
            for i in 0..6u64 {
                let data = pseudo_random(i, 5000 + 7919 * i as usize);
                img.add(root, &format!("file{i}"), &data, 1 + (i as usize % 3), false);
            }
            let sub = img.add(root, "sub", &[], 1, true)[0];
            let sub = img.off(sub);
            for i in 0..4u64 {
                img.add(sub, &format!("inner{i}"), &pseudo_random(100 + i, 30_000), 2, false);
            }
            let deleted = img.take(5, 1);
            for c in deleted {
                img.set_used(c, false);
                let at = img.off(c);
                img.d[at..at + img.cluster].fill(0x77);
            }
            img.save();
            Some(img)
        }

        fn save(&self) {
            std::fs::write(&self.path, &self.d).unwrap();
        }

        fn fsck_clean(&self) -> bool {
            let out = Command::new("fsck.exfat").arg("-n").arg(&self.path).output().unwrap();
            let clean = out.status.success() && String::from_utf8_lossy(&out.stdout).contains("clean");
            if !clean {
                eprintln!(
                    "fsck.exfat: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            clean
        }

        fn free_clusters_by_dump(&self) -> u64 {
            let out = run("dump.exfat", &[self.path.to_str().unwrap()]);
            let line = out.lines().find(|l| l.starts_with("Free Clusters:")).unwrap();
            line.split_whitespace().last().unwrap().parse().unwrap()
        }
    }

    fn name_hash(name: &[u16]) -> u16 {
        let mut h: u16 = 0;
        for &ch in name {
            let up = if (b'a' as u16..=b'z' as u16).contains(&ch) { ch - 32 } else { ch };
            for b in up.to_le_bytes() {
                h = h.rotate_right(1).wrapping_add(u16::from(b));
            }
        }
        h
    }

    /// A file entry, its stream extension and name entries, with their checksum.
    fn entry_set(name: &str, first: u64, len: u64, contiguous: bool, folder: bool) -> Vec<u8> {
        let units: Vec<u16> = name.encode_utf16().collect();
        let names = units.len().div_ceil(15);
        let mut set = vec![0u8; 32 * (2 + names)];
        set[0] = 0x85;
        set[1] = (1 + names) as u8;
        set[4] = if folder { 0x10 } else { 0x20 };
        set[32] = 0xC0;
        set[33] = 0x01 | if contiguous { 0x02 } else { 0 };
        set[35] = units.len() as u8;
        set[36..38].copy_from_slice(&name_hash(&units).to_le_bytes());
        set[40..48].copy_from_slice(&len.to_le_bytes());
        set[52..56].copy_from_slice(&(first as u32).to_le_bytes());
        set[56..64].copy_from_slice(&len.to_le_bytes());
        for (i, unit) in units.iter().enumerate() {
            let at = 64 + 32 * (i / 15);
            set[at] = 0xC1;
            set[at + 2 + 2 * (i % 15)..][..2].copy_from_slice(&unit.to_le_bytes());
        }
        let mut sum: u16 = 0;
        for (i, &b) in set.iter().enumerate() {
            if i != 2 && i != 3 {
                sum = sum.rotate_right(1).wrapping_add(u16::from(b));
            }
        }
        set[2..4].copy_from_slice(&sum.to_le_bytes());
        set
    }

    #[test]
    fn hand_filled_volume_frees_what_dump_exfat_counts_and_its_files_survive_garbage_there() {
        let Some(mut img) = Image::filled() else { return };
        assert!(img.fsck_clean(), "the test's own files should pass fsck.exfat");
        let free = free_of(&img.d).unwrap();
        let expected = img.free_clusters_by_dump() * img.cluster as u64;
        eprintln!("exfat: {} free bytes in {} ranges, dump.exfat: {expected}", free.bytes(), free.ranges().len());
        assert_eq!(free.bytes(), expected);
        for &(s, e) in free.ranges() {
            for (i, b) in img.d[s as usize..e as usize].iter_mut().enumerate() {
                *b = (i as u8) ^ 0x5A;
            }
        }
        img.save();
        assert!(img.fsck_clean(), "fsck.exfat after the free ranges were overwritten");
        for (data, clusters) in &img.files {
            let back: Vec<u8> =
                clusters.iter().flat_map(|&c| img.d[img.off(c)..img.off(c) + img.cluster].to_vec()).collect();
            assert!(back[..data.len()] == data[..], "a file's clusters were overwritten");
        }
    }

    #[test]
    fn fsck_exfat_as_oracle_notices_a_file_cluster_missing_from_the_bitmap() {
        let Some(mut img) = Image::filled() else { return };
        let c = img.files[0].1[0];
        img.set_used(c, false);
        img.save();
        assert!(!img.fsck_clean());
        assert!(free_of(&img.d).unwrap_err().contains("marked free"));
    }

    #[test]
    fn a_cleared_bitmap_bit_of_any_file_folder_or_metadata_cluster_keeps_the_region_whole() {
        let Some(mut img) = Image::filled() else { return };
        let clusters: Vec<u64> = (2..u64::from(u32_at(&img.d, 0x5C)) + 2).filter(|&c| img.used(c)).collect();
        assert!(clusters.len() > 20);
        for c in clusters {
            img.set_used(c, false);
            assert!(free_of(&img.d).is_err(), "cluster {c} cleared in the bitmap was not noticed");
            img.set_used(c, true);
        }
    }

    #[test]
    fn a_set_volume_dirty_flag_keeps_the_region_whole() {
        let Some(mut img) = Image::new() else { return };
        assert!(free_of(&img.d).is_ok());
        img.d[0x6A] |= 0x02; // outside the boot checksum
        assert!(free_of(&img.d).unwrap_err().contains("not cleanly unmounted"));
    }

    #[test]
    fn a_changed_boot_sector_fails_its_checksum_and_a_truncated_region_is_kept_whole() {
        let Some(img) = Image::new() else { return };
        let mut d = img.d.clone();
        d[0x5C] ^= 1;
        assert!(free_of(&d).unwrap_err().contains("checksum"));
        assert!(free_of(&img.d[..img.d.len() / 2]).is_err());
        assert!(free_of(&img.d[..4096]).is_err());
    }

    /// A mutated bitmap, FAT or folder may make strata store more, never fewer bytes.
    #[test]
    fn random_mutations_of_the_metadata_never_free_more_than_the_honest_result_nor_panic() {
        let Some(img) = Image::filled() else { return };
        let honest = free_of(&img.d).unwrap();
        let meta_end = img.off(200);
        let rng = pseudo_random(9, 4 * 2000);
        let mut m = img.d.clone();
        for round in 0..2000 {
            let r = u32_at(&rng, 4 * round) as usize;
            let at = if round % 4 == 0 { r % 512 } else { img.fat + r % (meta_end - img.fat) };
            m[at] = (r >> 24) as u8;
            let scanned = scan(&Window { disk: &Bytes(&m), start: 0, len: m.len() as u64 });
            if let Some(Scan { free: Ok(free), .. }) = scanned {
                assert!(free.bytes() <= honest.bytes(), "byte {at} set to {:#x} frees more", m[at]);
            }
            m[at] = img.d[at];
        }
    }
}
