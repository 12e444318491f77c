//! The backup source: a block device (size from the BLKGETSIZE64 ioctl) or a regular file (a raw
//! disk image). Read positionally or through a read-only map of a range (`source_map`); in a
//! regular file, holes (SEEK_DATA/SEEK_HOLE) are known per block and never read. In a used-blocks
//! backup, the ranges no file system uses (`leave_out`) are treated like holes: never read,
//! zero.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::source_map::SourceMap;

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Size in bytes of an open block device.
pub fn block_device_size(file: &File, path: &Path) -> Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass, which lives on our stack.
    unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }
        .with_context(|| format!("{}: cannot read the device size (BLKGETSIZE64)", path.display()))?;
    Ok(size)
}

/// How one block lies in the source (see `Source::fills`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Wholly data, inside the source.
    Data,
    /// Wholly a hole: zero without reading.
    Hole,
    /// Partly data and partly a hole, or reaching past the source's end.
    Mixed,
}

pub struct Source {
    path: PathBuf,
    file: File,
    size: u64,
    is_block_device: bool,
    /// Bytes actually read (holes excluded).
    bytes_read: std::sync::atomic::AtomicU64,
    /// Byte ranges read as zeros without reading them: sorted, disjoint.
    unused: Vec<(u64, u64)>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let file = File::open(path).with_context(|| format!("{}: cannot open the source", path.display()))?;
        let meta = file.metadata().with_context(|| format!("{}: cannot stat the source", path.display()))?;
        let ft = meta.file_type();
        let (size, is_block_device) = if ft.is_block_device() {
            (block_device_size(&file, path)?, true)
        } else if ft.is_file() {
            (meta.len(), false)
        } else {
            bail!("{}: the source must be a block device or a regular file (a raw disk image)", path.display());
        };
        if size == 0 {
            bail!("{}: the source is empty (0 bytes); nothing to back up", path.display());
        }
        crate::claim::claim_source(&file, path)?;
        // Advice: a failure changes nothing but speed.
        let _ =
            nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
        Ok(Source { path: path.to_path_buf(), file, size, is_block_device, bytes_read: 0.into(), unused: Vec::new() })
    }

    /// Why the source must not be backed up by its used blocks now (see `live_source`).
    pub fn in_use_read_write(&self) -> Option<String> {
        let meta = self.file.metadata().ok()?;
        crate::live_source::in_use_read_write(&self.path, &meta)
    }

    /// From now on, reads `unused` (sorted, disjoint byte ranges) as zeros without reading it,
    /// as holes are.
    pub fn leave_out(&mut self, unused: Vec<(u64, u64)>) {
        self.unused = unused;
    }

    /// Who this source is: its stable name and the id its content carries.
    pub fn identity(&self, path: &Path) -> Result<crate::source_identity::SourceIdentity> {
        use crate::source_identity::{content_id, stable_name, SourceIdentity, HEAD_BYTES};
        let mut head = vec![0u8; (self.size as usize).min(HEAD_BYTES)];
        self.read_into(0, &mut head)?;
        Ok(SourceIdentity { name: stable_name(path), id: content_id(&head) })
    }

    /// A read-only map of `[offset, offset + len)`, which must lie inside the source and start
    /// on a page boundary; `None` when the kernel refuses (read with `read_into` then).
    pub fn map(&self, offset: u64, len: usize) -> Option<SourceMap> {
        SourceMap::new(&self.file, &self.path, offset, len)
    }

    /// Adds `bytes` read through a `map` to `bytes_read`.
    pub fn count_mapped(&self, bytes: u64) {
        self.bytes_read.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Asks the kernel to start reading the data (not the holes, which it would fill with
    /// zeroed pages) of `[offset, offset + len)` into the page cache now.
    pub fn will_need(&self, offset: u64, len: usize) -> Result<()> {
        self.for_each_data(offset, offset + len as u64, |data, data_end| {
            // SAFETY: advisory call on a descriptor we own.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    data as i64,
                    (data_end - data) as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            Ok(())
        })
    }

    /// How each of the `n` blocks of `bs` bytes from block `first` lies in the source: wholly
    /// data, wholly a hole (zero without reading), or partly either (or past the end).
    pub fn fills(&self, first: u64, n: usize, bs: usize) -> Result<Vec<Fill>> {
        let (start, end) = (first * bs as u64, (first + n as u64) * bs as u64);
        let mut fills = vec![Fill::Hole; n];
        self.for_each_data(start, end, |data, data_end| {
            let (a, b) = ((data - start) / bs as u64, (data_end - start).div_ceil(bs as u64));
            for (i, fill) in fills.iter_mut().enumerate().take(b as usize).skip(a as usize) {
                let (bstart, bend) = (start + (i * bs) as u64, start + ((i + 1) * bs) as u64);
                *fill = match *fill {
                    Fill::Hole if data <= bstart && data_end >= bend && bend <= self.size => Fill::Data,
                    _ => Fill::Mixed,
                };
            }
            Ok(())
        })?;
        if end > self.size {
            fills[((self.size - start) / bs as u64) as usize..].fill(Fill::Mixed);
        }
        Ok(fills)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fails when the source's size is no longer the one it had when opened: a file truncated
    /// while it was read answers "no more data" where its old end was, which must never be
    /// stored as zeros. Called where SEEK_DATA finds no data, and once after the last read.
    pub fn check_size(&self) -> Result<()> {
        let now = if self.is_block_device {
            block_device_size(&self.file, &self.path)?
        } else {
            self.file.metadata().with_context(|| format!("{}: cannot stat the source", self.path.display()))?.len()
        };
        if now != self.size {
            bail!(
                "{}: the source changed size during the backup (from {} to {}); no version was written. \
                 Back up a source that nothing writes to (unmount it, or take a snapshot) and run the backup again",
                self.path.display(),
                crate::units::size(self.size),
                crate::units::size(now)
            );
        }
        Ok(())
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fills `buf` with the source's bytes at `offset`; bytes past the source's end are zero.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = (offset + buf.len() as u64).min(self.size);
        let valid = end.saturating_sub(offset) as usize;
        buf[valid..].fill(0);
        let mut pos = offset;
        self.for_each_data(offset, end, |data, data_end| {
            buf[(pos - offset) as usize..(data - offset) as usize].fill(0);
            self.read_exact(data, &mut buf[(data - offset) as usize..(data_end - offset) as usize])?;
            pos = data_end;
            Ok(())
        })?;
        buf[(pos - offset) as usize..valid].fill(0);
        Ok(())
    }

    /// Calls `f(data, data_end)` for each range of `[start, end)` (clipped to the source) that
    /// holds data, in order; the gaps between them are holes.
    fn for_each_data(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let end = end.min(self.size);
        let mut pos = start;
        while pos < end {
            let (data, data_end) = self.next_data(pos, end)?;
            if data >= data_end {
                break;
            }
            f(data, data_end)?;
            pos = data_end;
        }
        Ok(())
    }

    /// The next range `[data, data_end)` at or after `pos` that holds data and is not left out,
    /// clipped to `end`.
    fn next_data(&self, mut pos: u64, end: u64) -> Result<(u64, u64)> {
        loop {
            let (data, data_end) = self.next_file_data(pos, end)?;
            if data >= data_end {
                return Ok((data, data_end));
            }
            let i = self.unused.partition_point(|&(_, unused_end)| unused_end <= data);
            match self.unused.get(i) {
                Some(&(unused, _)) if unused > data => return Ok((data, data_end.min(unused))),
                Some(&(_, unused_end)) => {
                    pos = unused_end.min(end);
                    if pos >= end {
                        return Ok((end, end));
                    }
                }
                None => return Ok((data, data_end)),
            }
        }
    }

    /// The next range `[data, data_end)` at or after `pos` that holds data in the file, clipped
    /// to `end`. Block devices and file systems without SEEK_DATA report everything as data.
    fn next_file_data(&self, pos: u64, end: u64) -> Result<(u64, u64)> {
        if self.is_block_device {
            return Ok((pos, end));
        }
        use nix::errno::Errno;
        use nix::unistd::{lseek, Whence};
        // All other reads are positional: moving the file offset affects nothing.
        let fd = self.file.as_raw_fd();
        let data = match lseek(fd, pos as libc::off_t, Whence::SeekData) {
            Ok(data) => (data as u64).min(end),
            Err(Errno::ENXIO) => {
                self.check_size()?;
                return Ok((end, end));
            }
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok((pos, end)),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("{}: seeking data at offset {pos}", self.path.display()))
            }
        };
        let data_end = match lseek(fd, data as libc::off_t, Whence::SeekHole) {
            Ok(hole) => (hole as u64).clamp(data, end),
            Err(_) => end,
        };
        Ok((data, data_end.max(data).min(end)))
    }

    fn read_exact(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    self.check_size()?;
                    bail!(
                        "{}: the source ended at offset {at}, before its size {}; did it change during the backup?",
                        self.path.display(),
                        self.size
                    )
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("{}: read error at offset {at}", self.path.display())),
            }
        }
        self.bytes_read.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The source as the volume analysis reads it (partition tables, superblocks, allocation maps).
impl strata_format::volume::DiskRead for Source {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        self.read_into(offset, &mut buf[..n]).map_err(std::io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_truncated_after_open_fails_instead_of_reading_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let source = Source::open(&path).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(256 << 10).unwrap();
        let err = source.fills(128, 64, 4096).unwrap_err().to_string();
        assert!(err.contains("changed size during the backup (from 1 MiB to 256 KiB)"), "{err}");
        let mut buf = vec![0u8; 4096];
        assert!(source.read_into(768 << 10, &mut buf).is_err());
        assert!(source.check_size().is_err());
    }

    #[test]
    fn ranges_left_out_read_as_zeros_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let mut source = Source::open(&path).unwrap();
        source.leave_out(vec![(4096, 12288), (16384, 20000), (60 << 10, 64 << 10)]);
        let fills = source.fills(0, 16, 4096).unwrap();
        assert_eq!(&fills[..6], &[Fill::Data, Fill::Hole, Fill::Hole, Fill::Data, Fill::Mixed, Fill::Data]);
        assert_eq!(fills[15], Fill::Hole);
        let mut buf = vec![1u8; 64 << 10];
        source.read_into(0, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let unused = (4096..12288).contains(&i) || (16384..20000).contains(&i) || i >= 60 << 10;
            assert_eq!(b, if unused { 0 } else { 7 }, "byte {i}");
        }
        assert_eq!(source.bytes_read(), (64 << 10) - 8192 - 3616 - 4096);
    }

    #[test]
    fn holes_at_the_end_of_an_unchanged_source_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = std::fs::File::create(&path).unwrap();
        file.write_all_at(&[9u8; 4096], 0).unwrap();
        file.set_len(1 << 20).unwrap();
        let source = Source::open(&path).unwrap();
        let fills = source.fills(0, 256, 4096).unwrap();
        assert_eq!(fills[0], Fill::Data);
        assert!(fills[1..].iter().all(|f| *f == Fill::Hole));
        source.check_size().unwrap();
    }
}
