//! `fuser::Filesystem` over the catalogue: a thin adapter. Lookups and attributes come from
//! `tree`, data from the version readers through the block cache. Read-only in every path:
//! mutating calls get EROFS, a damaged block gets EIO for that read only.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use strata_format::VersionReader;

use crate::tree::{Catalogue, Node, VersionInfo};
use strata_format::frame_cache::{self, FrameCache};
use strata_format::read_plan::{all_zero, read_window};

/// Versions never change: the kernel may keep their attributes, entries and pages for long.
const VERSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// The root and `latest` change when backups are made.
const ROOT_TTL: Duration = Duration::from_secs(1);
/// Largest read the kernel is asked to send (with FUSE_MAX_PAGES).
const MAX_READ: u32 = 1 << 20;
/// Readahead requests the kernel may have in flight. At the congestion threshold (3/4 of it)
/// the kernel drops async readahead instead of queueing it, and the reader then waits for
/// synchronous reads one at a time: fuser's default (16) is about two readahead windows.
const MAX_BACKGROUND: u16 = 64;

struct Handle {
    reader: Arc<VersionReader>,
    start: u64,
    len: u64,
    version: u64,
    name: String,
    /// Where the previous read ended, to detect sequential reading.
    next: AtomicU64,
    /// The first block of the disk that no read of this handle has gone past: prefetch leaves
    /// the blocks before it alone.
    reached: Arc<AtomicU64>,
}

pub struct StrataFs {
    catalogue: Catalogue,
    cache: Arc<FrameCache>,
    uid: u32,
    gid: u32,
    readahead_blocks: u64,
    /// Reads being served now: when the kernel sends several at once they share the cores, and
    /// one read alone decodes its blocks on all cores.
    active_reads: AtomicUsize,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

impl StrataFs {
    /// With `check_hashes`, every block served is checked against its entry's BLAKE3 hash.
    pub fn new(catalogue: Catalogue, cache_bytes: u64, check_hashes: bool) -> StrataFs {
        let block_size = catalogue.block_size();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        StrataFs {
            catalogue,
            cache: Arc::new(FrameCache::new(cache_bytes, block_size, check_hashes)),
            uid,
            gid,
            readahead_blocks: (4u64 << 20).div_ceil(u64::from(block_size)).max(2),
            active_reads: AtomicUsize::new(0),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, time: SystemTime, blksize: u32) -> FileAttr {
        let perm = match kind {
            FileType::Directory => 0o555,
            FileType::Symlink => 0o777,
            _ => 0o444,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize,
        }
    }

    fn newest_time(&self) -> SystemTime {
        self.catalogue.versions().iter().map(|v| v.created).max().unwrap_or(UNIX_EPOCH)
    }

    /// The attributes of a node and how long the kernel may keep them.
    fn node_attr(&self, node: Node) -> Option<(FileAttr, Duration)> {
        let ino = node.ino();
        match node {
            Node::Root => Some((self.attr(ino, FileType::Directory, 0, self.newest_time(), 4096), ROOT_TTL)),
            Node::Latest => {
                let id = self.catalogue.latest()?;
                let target = id.to_string();
                let v = self.catalogue.version(id)?;
                Some((self.attr(ino, FileType::Symlink, target.len() as u64, v.created, 4096), ROOT_TTL))
            }
            Node::VersionDir(id) => {
                let v = self.catalogue.version(id)?;
                Some((self.attr(ino, FileType::Directory, 0, v.created, 4096), VERSION_TTL))
            }
            Node::Disk(id) => {
                let v = self.catalogue.version(id)?;
                let mut a = self.attr(ino, FileType::RegularFile, v.source_size, v.created, v.block_size);
                a.blocks = (v.present_blocks * u64::from(v.block_size)).div_ceil(512).min(a.blocks);
                Some((a, VERSION_TTL))
            }
            Node::Part(id, n) => {
                let v = self.catalogue.version(id)?;
                let p = self.partition(&v, n)?;
                Some((self.attr(ino, FileType::RegularFile, p.1, v.created, v.block_size), VERSION_TTL))
            }
        }
    }

    /// (start, len) of partition `n` of a version.
    fn partition(&self, v: &VersionInfo, n: u32) -> Option<(u64, u64)> {
        self.catalogue.partitions(v, &self.cache).iter().find(|p| p.number == n).map(|p| (p.start, p.len))
    }

    fn children(&self, node: Node) -> Option<Vec<(Node, FileType, String)>> {
        match node {
            Node::Root => {
                self.catalogue.refresh_if_changed();
                let mut out: Vec<_> = self
                    .catalogue
                    .versions()
                    .iter()
                    .map(|v| (Node::VersionDir(v.id), FileType::Directory, v.id.to_string()))
                    .collect();
                if self.catalogue.latest().is_some() {
                    out.push((Node::Latest, FileType::Symlink, "latest".into()));
                }
                Some(out)
            }
            Node::VersionDir(id) => {
                let v = self.catalogue.version(id)?;
                let mut out = vec![(Node::Disk(id), FileType::RegularFile, "disk.img".to_string())];
                for p in self.catalogue.partitions(&v, &self.cache) {
                    out.push((Node::Part(id, p.number), FileType::RegularFile, format!("part{}.img", p.number)));
                }
                Some(out)
            }
            _ => None,
        }
    }

    fn is_dir(node: Node) -> bool {
        matches!(node, Node::Root | Node::VersionDir(_))
    }
}

/// Counts a read in `active_reads` while it is served.
struct Active<'a> {
    count: &'a AtomicUsize,
    /// Reads that were being served when this one started.
    others: usize,
}

impl<'a> Active<'a> {
    fn enter(count: &'a AtomicUsize) -> Active<'a> {
        Active { count, others: count.fetch_add(1, Ordering::Relaxed) }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(parent) = Node::from_ino(parent.0) else { return reply.error(Errno::ENOENT) };
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        let found = self.children(parent).and_then(|c| c.into_iter().find(|(_, _, n)| n == name));
        match found.and_then(|(node, _, _)| self.node_attr(node)) {
            Some((attr, ttl)) => reply.entry(&ttl, &attr, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match Node::from_ino(ino.0).and_then(|n| self.node_attr(n)) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match (Node::from_ino(ino.0), self.catalogue.latest()) {
            (Some(Node::Latest), Some(id)) => reply.data(id.to_string().as_bytes()),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = Node::from_ino(ino.0) else { return reply.error(Errno::ENOENT) };
        let Some(children) = self.children(node) else { return reply.error(Errno::ENOTDIR) };
        let parent = match node {
            Node::VersionDir(_) => Node::Root.ino(),
            _ => ino.0,
        };
        let mut entries =
            vec![(ino.0, FileType::Directory, ".".to_string()), (parent, FileType::Directory, "..".into())];
        entries.extend(children.into_iter().map(|(n, k, name)| (n.ino(), k, name)));
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let (id, part) = match Node::from_ino(ino.0) {
            Some(Node::Disk(id)) => (id, None),
            Some(Node::Part(id, n)) => (id, Some(n)),
            Some(n) if Self::is_dir(n) => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::ENOENT),
        };
        let Some(v) = self.catalogue.version(id) else { return reply.error(Errno::ENOENT) };
        let reader = match self.catalogue.reader(&v) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("version {id}: cannot open: {e}");
                return reply.error(Errno::EIO);
            }
        };
        let (start, len, name) = match part {
            None => (0, v.source_size, "disk.img".to_string()),
            Some(n) => match self.partition(&v, n) {
                Some((s, l)) => (s, l, format!("part{n}.img")),
                None => return reply.error(Errno::ENOENT),
            },
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let reached = Arc::new(AtomicU64::new(0));
        let handle = Handle { reader, start, len, version: id, name, next: AtomicU64::new(u64::MAX), reached };
        self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(fh, Arc::new(handle));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        log::trace!("read fh {} offset {offset} size {size}", fh.0);
        let Some(h) = self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let want = (u64::from(size)).min(h.len.saturating_sub(offset)) as usize;
        let bs = u64::from(h.reader.block_size());
        let active = Active::enter(&self.active_reads);
        let alone = active.others == 0;
        // The next blocks of a sequential reader are decoded ahead, on the other cores; its
        // groups even while the kernel's readahead keeps other requests in flight (see
        // `FrameCache::prefetch`).
        let first = (h.start + offset) / bs;
        frame_cache::note_read(&h.reached, first, (h.start + offset + want as u64) / bs, self.readahead_blocks);
        if h.next.swap(offset + want as u64, Ordering::Relaxed) == offset && want > 0 {
            let next_block = (h.start + offset + want as u64).div_ceil(bs);
            self.cache.prefetch(&h.reader, next_block..next_block + self.readahead_blocks, &h.reached, !alone);
        }
        h.reader.prime_from(first);
        if want > 0 && want <= MAX_READ as usize && all_zero(&h.reader, h.start + offset, want) {
            static ZEROS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            return reply.data(&ZEROS.get_or_init(|| vec![0; MAX_READ as usize])[..want]);
        }
        // One reply buffer per FUSE thread: a fresh 1 MiB allocation would be fresh pages to
        // fault in and zero on every request.
        thread_local! {
            static REPLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        REPLY.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(want, 0);
            match read_window(&h.reader, &self.cache, h.start, h.len, offset, &mut buf[..want], alone) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    log::warn!("{}/{} (version {}) at offset {offset}: {e}", h.version, h.name, h.version);
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    /// SEEK_DATA and SEEK_HOLE, so that `cp --sparse`, `qemu-img map` and the like skip the
    /// zero (and unused) blocks of a version; other seeks are the kernel's business.
    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Some(h) = self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        if offset >= h.len {
            return reply.error(Errno::ENXIO);
        }
        let at = h.start + offset;
        let found = match whence {
            libc::SEEK_DATA => match h.reader.data_from(at) {
                Some(data) if data < h.start + h.len => data,
                _ => return reply.error(Errno::ENXIO),
            },
            libc::SEEK_HOLE => h.reader.hole_from(at).min(h.start + h.len),
            _ => return reply.error(Errno::EINVAL),
        };
        reply.offset((found - h.start) as i64);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&fh.0);
        reply.ok();
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let versions = self.catalogue.versions();
        let bsize = self.catalogue.block_size();
        let bytes: u64 = versions.iter().map(|v| v.source_size).sum();
        reply.statfs(bytes.div_ceil(u64::from(bsize)), 0, 0, 2 + 2 * versions.len() as u64, 0, bsize, 255, bsize);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }
}
