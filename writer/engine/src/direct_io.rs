//! Writes of a restore that bypass the page cache (`O_DIRECT`) where the target allows it. A
//! restored disk is written once and not read back, so caching it only costs: the copy into
//! freshly allocated cache pages took half of a restore's CPU on the benchmark machine, the
//! flush of gigabytes of dirty pages waited for the final fsync, and the cache the machine had
//! was evicted for pages nobody reads. Direct writes need their buffer, offset and length
//! aligned to [`ALIGN`]; the one piece that cannot be (the tail of a disk whose size is not a
//! multiple of it) and targets that refuse `O_DIRECT` (character devices, some file systems)
//! are written through the page cache. Targets that cannot seek (a pipe, a terminal) are
//! written in order, as a stream. The fsync at the end stays the durability point.

use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Alignment of the buffers, offsets and lengths of direct writes: a multiple of the logical
/// block size of common devices (512 or 4096 bytes).
pub const ALIGN: usize = 4096;

/// Writes to one restore target, directly while it can.
pub struct TargetWriter<'f> {
    file: &'f File,
    direct: bool,
    /// The target takes no direct writes: it refused `O_DIRECT`, or a direct write that met
    /// the alignment rules (`EINVAL`).
    refused: bool,
    /// For a target that cannot seek: where the next write must start.
    stream_at: Option<u64>,
}

impl<'f> TargetWriter<'f> {
    /// Turns `O_DIRECT` on for `file` when it supports it; otherwise writes go through the page
    /// cache.
    pub fn new(file: &'f File) -> Self {
        // SEEK_CUR by 0 moves nothing.
        let seekable = nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekCur).is_ok();
        if !seekable {
            return TargetWriter { file, direct: false, refused: true, stream_at: Some(0) };
        }
        let direct = set_direct(file, true).is_ok();
        TargetWriter { file, direct, refused: !direct, stream_at: None }
    }

    /// Whether the aligned writes so far bypassed the page cache.
    pub fn bypassed_cache(&self) -> bool {
        !self.refused
    }

    /// Writes all of `buf` at `offset`: its aligned head directly, the rest through the cache
    /// (after which every write does: only the tail of the disk is unaligned).
    /// On a stream, writes must come in order, without gaps.
    pub fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(at) = self.stream_at.as_mut() {
            if offset != *at {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a stream takes writes in order: offset {offset} after {at} bytes"),
                ));
            }
            io::Write::write_all(&mut &*self.file, buf)?;
            *at += buf.len() as u64;
            return Ok(());
        }
        if !self.direct {
            return self.file.write_all_at(buf, offset);
        }
        let aligned = (buf.as_ptr() as usize).is_multiple_of(ALIGN) && offset.is_multiple_of(ALIGN as u64);
        let head = if aligned { buf.len() / ALIGN * ALIGN } else { 0 };
        if head > 0 {
            match self.file.write_all_at(&buf[..head], offset) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::debug!("direct write refused ({e}); writing through the page cache");
                    self.refused = true;
                    self.stop_direct()?;
                    return self.file.write_all_at(buf, offset);
                }
                Err(e) => return Err(e),
            }
        }
        if head < buf.len() {
            self.stop_direct()?;
            self.file.write_all_at(&buf[head..], offset + head as u64)?;
        }
        Ok(())
    }

    fn stop_direct(&mut self) -> io::Result<()> {
        self.direct = false;
        set_direct(self.file, false)
    }
}

/// Sets or clears `O_DIRECT` on the open file description of `file`.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = file.as_raw_fd();
    let mut flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_DIRECT, on);
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A byte buffer that starts on an [`ALIGN`] boundary, as direct writes need. Its bytes are
/// unspecified after [`AlignedBuf::resize`]: the caller fills what it writes.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn resize(&mut self, len: usize) {
        if self.raw.len() < len + ALIGN {
            self.raw = vec![0u8; len + ALIGN];
        }
        self.start = self.raw.as_ptr().align_offset(ALIGN);
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn scratch_file(name: &str) -> (std::path::PathBuf, File) {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("direct-io-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn aligned_runs_and_an_unaligned_tail_land_where_they_belong() {
        let (path, file) = scratch_file("tail");
        let size = 3 * 65536 + 1000;
        file.set_len(size as u64).unwrap();
        let mut buf = AlignedBuf::default();
        buf.resize(2 * 65536);
        buf.copy_from_slice(&pattern(2 * 65536, 1));
        let mut w = TargetWriter::new(&file);
        w.write_all_at(&buf, 0).unwrap();
        // a hole at 128 KiB..192 KiB, then the tail of the disk
        let tail = pattern(size - 3 * 65536, 2);
        buf.resize(tail.len());
        buf.copy_from_slice(&tail);
        w.write_all_at(&buf, 3 * 65536).unwrap();
        file.sync_all().unwrap();
        let mut want = pattern(2 * 65536, 1);
        want.extend(vec![0u8; 65536]);
        want.extend(tail);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn misaligned_buffers_and_offsets_go_through_the_cache() {
        let (path, file) = scratch_file("misaligned");
        let data = pattern(3 * ALIGN, 3);
        let mut w = TargetWriter::new(&file);
        w.write_all_at(&data[1..ALIGN + 1], 512).unwrap();
        w.write_all_at(&data[..ALIGN], 8 * ALIGN as u64).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 9 * ALIGN);
        assert_eq!(&back[512..512 + ALIGN], &data[1..ALIGN + 1]);
        assert_eq!(&back[8 * ALIGN..], &data[..ALIGN]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_target_that_refuses_direct_writes_is_written_through_the_cache() {
        let file = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        let mut w = TargetWriter::new(&file);
        assert!(!w.bypassed_cache(), "a character device takes no O_DIRECT");
        let mut buf = AlignedBuf::default();
        buf.resize(2 * ALIGN);
        w.write_all_at(&buf, 0).unwrap();
    }

    #[test]
    fn ext4_takes_direct_writes() {
        let (path, file) = scratch_file("ext4");
        let on_ext4 = nix::sys::statfs::statfs(&path).unwrap().filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC;
        let mut w = TargetWriter::new(&file);
        let mut buf = AlignedBuf::default();
        buf.resize(1 << 20);
        buf.fill(9);
        w.write_all_at(&buf, 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![9u8; 1 << 20]);
        std::fs::remove_file(&path).unwrap();
        if !on_ext4 {
            eprintln!("skipped the O_DIRECT check: {} is not on ext4", path.display());
            return;
        }
        assert!(w.bypassed_cache(), "ext4 takes O_DIRECT");
    }

    #[test]
    fn aligned_buffers_start_on_the_boundary() {
        let mut buf = AlignedBuf::default();
        for len in [1, ALIGN, 8 << 20, 100] {
            buf.resize(len);
            assert_eq!(buf.len(), len);
            assert!((buf.as_ptr() as usize).is_multiple_of(ALIGN));
        }
    }

    #[test]
    fn a_pipe_takes_writes_in_order_and_refuses_a_jump() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        {
            let file = File::from(write_end);
            let mut w = TargetWriter::new(&file);
            w.write_all_at(b"abc", 0).unwrap();
            w.write_all_at(b"def", 3).unwrap();
            assert_eq!(w.write_all_at(b"x", 10).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        let mut got = String::new();
        io::Read::read_to_string(&mut File::from(read_end), &mut got).unwrap();
        assert_eq!(got, "abcdef");
    }
}
