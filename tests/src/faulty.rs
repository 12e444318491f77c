//! A FUSE file system serving one file, `disk.img`, whose reads fail with EIO over a chosen byte
//! range: a source device that returns read errors, for the tests (the kernel here has no
//! device-mapper error target). Unmounted when the guard is dropped.

use std::ffi::OsStr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

struct Faulty {
    size: u64,
    bad: Range<u64>,
    seed: u64,
}

const TTL: Duration = Duration::from_secs(1);

impl Faulty {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o555 } else { 0o444 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// The content of the file: block b is `text(seed ^ b, 4096)`.
    fn content(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let block = pos / 4096;
            let data = crate::text(self.seed ^ block, 4096);
            let within = (pos % 4096) as usize;
            let take = (4096 - within).min(len - out.len());
            out.extend_from_slice(&data[within..within + take]);
            pos += take as u64;
        }
        out
    }
}

impl Filesystem for Faulty {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "disk.img" {
            reply.entry(&TTL, &self.attr(2), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = (offset + u64::from(size)).min(self.size);
        if offset >= end {
            return reply.data(&[]);
        }
        if offset < self.bad.end && end > self.bad.start {
            return reply.error(Errno::EIO);
        }
        reply.data(&self.content(offset, (end - offset) as usize));
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries =
            [(1, FileType::Directory, "."), (1, FileType::Directory, ".."), (2, FileType::RegularFile, "disk.img")];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted faulty source; `path()` is the file to back up.
pub struct FaultySource {
    _session: fuser::BackgroundSession,
    dir: PathBuf,
}

impl FaultySource {
    /// Serves a `size`-byte file whose reads overlapping `bad` fail with EIO.
    pub fn mount(dir: &Path, size: u64, bad: Range<u64>, seed: u64) -> FaultySource {
        std::fs::create_dir_all(dir).unwrap();
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::RO, MountOption::FSName("strata-faulty-source".into())];
        let session = fuser::spawn_mount(Faulty { size, bad, seed }, dir, &config).expect("mount the faulty source");
        FaultySource { _session: session, dir: dir.to_path_buf() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
}
