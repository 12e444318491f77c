//! One image file. Reading: open and validate header, footer and layout against the real file
//! length, stream or pick index entries, read stored blocks. Writing: append blocks to a
//! new file of the repository's storage, then finish (index, footer) and publish it (durably and
//! atomically: `storage`). An unpublished image is removed when the writer is dropped.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::block::{self, DecodeError};
use crate::error::{FormatError, Loc, Result};
use crate::fault;
use crate::footer::ImageFooter;
use crate::header::ImageHeader;
use crate::index::{Encoding, EntryLimits, IndexEntry};
use crate::layout::{FOOTER_SIZE, HEADER_SIZE, INDEX_ENTRY_SIZE};
use crate::le::get_u32;
use crate::read_ahead::ReadAhead;
use crate::storage::{Blob, Folder, Replace, Storage, Upload};

/// A finished image opened for reading. Safe to share between threads (all reads are by range).
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: Arc<dyn Blob>,
    pub header: ImageHeader,
    pub footer: ImageFooter,
    limits: EntryLimits,
    /// Unique among the images this process opened: keys decoded groups in `ReadScratch`
    /// (a merged image keeps its image id but not its layout).
    serial: u64,
    read_ahead: ReadAhead,
}

/// Bytes at the end of an image read with its footer when it is opened.
const TAIL_AHEAD: u64 = 64 << 10;

static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ImageFile {
    /// Opens the image file at `path` (see `open_in`).
    pub fn open(path: &Path) -> Result<ImageFile> {
        let (folder, name) = folder_and_name(path)?;
        ImageFile::open_in(&folder, &name)
    }

    /// Opens the image `name` of `storage` and validates its header, its footer and that the
    /// index lies exactly between the data and the footer. Does not read the index (see
    /// `check_index`).
    pub fn open_in(storage: &dyn Storage, name: &str) -> Result<ImageFile> {
        let path = storage.locate(name);
        let loc = Loc::file(&path);
        let file = storage.open(name).map_err(|e| FormatError::io(loc.clone(), "open", e))?;
        let file_len = file.len().map_err(|e| FormatError::io(loc.clone(), "stat", e))?;
        if file_len < (HEADER_SIZE + FOOTER_SIZE) as u64 {
            let mut magic = [0u8; 8];
            let n = file.read_at(&mut magic, 0).unwrap_or(0);
            if n == 8 && magic != crate::layout::IMAGE_MAGIC {
                return Err(FormatError::NotAnImage { loc: loc.at(0) });
            }
            return Err(FormatError::Incomplete {
                loc,
                detail: format!("{file_len} bytes, shorter than a header and a footer"),
            });
        }
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, 0).map_err(|e| FormatError::io(loc.clone(), "read header", e))?;
        let header = ImageHeader::decode(&hb, &loc)?;
        let loc = loc.version(header.version);
        let footer_at = file_len - FOOTER_SIZE as u64;
        // The index lies right before the footer: one disk request for both, when the index is
        // small (a delta's usually is).
        let tail = file_len.min(TAIL_AHEAD);
        file.will_need(file_len - tail, tail);
        let mut fb = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut fb, footer_at)
            .map_err(|e| FormatError::io(loc.clone().at(footer_at), "read footer", e))?;
        let footer = ImageFooter::decode(&fb, &loc, footer_at)?;
        let corrupt = |detail: String| FormatError::Corrupt { loc: loc.clone().at(footer_at), what: "footer", detail };
        if footer.image_id != header.image_id {
            return Err(corrupt("the footer belongs to another image".into()));
        }
        let block_count = header.block_count();
        if footer.entry_count > block_count {
            return Err(corrupt(format!("{} index entries for {block_count} blocks", footer.entry_count)));
        }
        if footer.present_blocks > block_count {
            return Err(corrupt(format!("{} present blocks of {block_count}", footer.present_blocks)));
        }
        let index_len = footer.entry_count * INDEX_ENTRY_SIZE as u64;
        if footer.index_offset < HEADER_SIZE as u64 || footer.index_offset.checked_add(index_len) != Some(footer_at) {
            return Err(corrupt(format!(
                "index at {} with {} entries does not end at the footer ({footer_at})",
                footer.index_offset, footer.entry_count
            )));
        }
        let format = get_u32(&hb, crate::layout::header::FORMAT_VERSION);
        let limits = EntryLimits {
            block_count,
            block_size: header.block_size,
            data_start: HEADER_SIZE as u64,
            data_end: footer.index_offset,
            max_stored: block::max_stored_len(header.block_size),
            zero_entries: header.kind != crate::header::Kind::Full,
            groups: format >= 2,
            group_max_bytes: u64::from(if format >= 4 {
                crate::layout::GROUP_MAX_BYTES
            } else {
                crate::layout::GROUP_MAX_BYTES_FORMAT_2
            }),
            patches: format >= 3,
            patch_groups: format >= 4,
        };
        let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data_len = footer.index_offset - HEADER_SIZE as u64;
        let read_ahead = ReadAhead::new(HEADER_SIZE as u64, data_len, header.source_size);
        Ok(ImageFile { path, file, header, footer, limits, serial, read_ahead })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file and version, for error messages.
    pub fn loc(&self) -> Loc {
        Loc::file(&self.path).version(self.header.version)
    }

    pub fn entry_count(&self) -> u64 {
        self.footer.entry_count
    }

    fn entry_offset(&self, index: u64) -> u64 {
        self.footer.index_offset + index * INDEX_ENTRY_SIZE as u64
    }

    /// Reads `count` entries starting at entry number `first` (each verified on its own crc).
    pub fn read_entries(&self, first: u64, count: usize, out: &mut Vec<IndexEntry>) -> Result<()> {
        out.clear();
        let count = count.min(self.entry_count().saturating_sub(first) as usize);
        let mut raw = vec![0u8; count * INDEX_ENTRY_SIZE];
        let at = self.entry_offset(first);
        self.file.read_exact_at(&mut raw, at).map_err(|e| FormatError::io(self.loc().at(at), "read index", e))?;
        for (i, chunk) in raw.chunks_exact(INDEX_ENTRY_SIZE).enumerate() {
            let off = at + (i * INDEX_ENTRY_SIZE) as u64;
            out.push(IndexEntry::decode(chunk, &self.loc(), off, &self.limits)?);
        }
        Ok(())
    }

    /// Reads entry number `index` and checks that it describes `block`.
    pub fn read_entry(&self, index: u64, block: u64) -> Result<IndexEntry> {
        if index >= self.entry_count() {
            return Err(FormatError::Corrupt {
                loc: self.loc(),
                what: "index",
                detail: format!("entry {index} of {} requested", self.entry_count()),
            });
        }
        let mut raw = [0u8; INDEX_ENTRY_SIZE];
        let at = self.entry_offset(index);
        self.file.read_exact_at(&mut raw, at).map_err(|e| FormatError::io(self.loc().at(at), "read index", e))?;
        let entry = IndexEntry::decode(&raw, &self.loc(), at, &self.limits)?;
        if entry.block != block {
            return Err(FormatError::Corrupt {
                loc: self.loc().at(at),
                what: "index entry",
                detail: format!("entry {index} describes block {}, expected block {block}", entry.block),
            });
        }
        Ok(entry)
    }

    /// Asks the kernel to read the index (its first 4 MiB; the kernel's own read-ahead takes
    /// over from there) now, without waiting: a reader that opens a long chain streams one index
    /// after the other, and each would otherwise wait on the disk in turn.
    pub fn read_index_ahead(&self) {
        let len = (self.entry_count() * INDEX_ENTRY_SIZE as u64).min(4 << 20);
        self.file.will_need(self.footer.index_offset, len);
    }

    /// Notes that a version opened by this process reads `live` of this image's entries: the
    /// reads of a delta are read ahead only when some version reads a good share of them, those
    /// of a full never (see `read_ahead`).
    pub fn note_live_entries(&self, live: u64) {
        if self.header.kind == crate::header::Kind::Full {
            return;
        }
        self.read_ahead.note_live(live, self.entry_count());
    }

    /// Asks the kernel for the stored bytes of `entry` (or for the whole data of a small image
    /// that is read ahead) unless this image was read or primed before (see `read_ahead`).
    pub fn prime(&self, entry: &IndexEntry) {
        self.read_ahead.prime(&*self.file, entry.data_offset, u64::from(entry.stored_len), self.footer.index_offset);
    }

    /// Whether `prime` would ask for nothing.
    pub fn primed(&self) -> bool {
        self.read_ahead.primed()
    }

    #[cfg(test)]
    pub(crate) fn reads_ahead(&self) -> bool {
        self.read_ahead.enabled()
    }

    /// Streams every entry in order, checking each entry, their strict block order and, at the
    /// end, the index crc32c recorded in the footer. Memory: one 64 KiB window.
    pub fn stream_entries(&self) -> IndexStream<'_> {
        IndexStream { image: self, next: 0, window: Vec::new(), pos: 0, crc: 0, last_block: None, done: false }
    }

    /// Reads the whole index once and checks it (see `stream_entries`).
    pub fn check_index(&self) -> Result<()> {
        for entry in self.stream_entries() {
            entry?;
        }
        Ok(())
    }

    /// Reads the stored bytes of `entry` into `stored` as they are on disk, checking the crc32c
    /// (for copying a block into another image without decoding it).
    pub fn read_stored(&self, entry: &IndexEntry, stored: &mut Vec<u8>) -> Result<()> {
        self.read_stored_unchecked(entry, stored)?;
        let actual = crc32c::crc32c(stored);
        if !crate::layout::checksum_matches(entry.data_crc, actual) {
            return Err(FormatError::Checksum {
                loc: self.loc().block(entry.block).at(entry.data_offset),
                what: "block data",
                expected: entry.data_crc,
                actual,
            });
        }
        Ok(())
    }

    /// Reads the stored bytes of `entry` and decodes them into `out` (one block), checking the
    /// crc32c. A block of a group is copied out of the decoded group, which `scratch` keeps for
    /// the next read (sequential readers decode each group once). A patch is not a whole block:
    /// read it through its version (`VersionReader::read_block`), which finds its base.
    pub fn read_block(&self, entry: &IndexEntry, scratch: &mut ReadScratch, out: &mut [u8]) -> Result<()> {
        match entry.encoding {
            Encoding::Patch | Encoding::PatchGroup => Err(FormatError::Invalid(format!(
                "{}: block {} is a patch; it is read through its version",
                self.path.display(),
                entry.block
            ))),
            Encoding::Zero => {
                out.fill(0);
                Ok(())
            }
            Encoding::ZstdGroup => {
                let bs = self.header.block_size as usize;
                let group = self.decode_shared(entry, scratch)?;
                let at = entry.group_slot as usize * bs;
                out.copy_from_slice(&group[at..at + bs]);
                Ok(())
            }
            Encoding::Raw | Encoding::Zstd => {
                let ReadScratch { decompressor, stored, .. } = scratch;
                self.read_stored_unchecked(entry, stored)?;
                block::decode_into(decompressor, entry.encoding, stored, entry.data_crc, out)
                    .map_err(|e| self.decode_error(entry, e))
            }
        }
    }

    /// The decoded frame of a group or a patch group that `entry` belongs to, from `scratch`
    /// when it holds it already.
    fn decode_shared<'s>(&self, entry: &IndexEntry, scratch: &'s mut ReadScratch) -> Result<&'s [u8]> {
        debug_assert!(matches!(entry.encoding, Encoding::ZstdGroup | Encoding::PatchGroup));
        let key = (self.serial, entry.frame_name());
        if scratch.group_key != Some(key) {
            scratch.group_key = None;
            let mut group = std::mem::take(&mut scratch.group);
            scratch.group = self.decode_frame_with(entry, scratch, |len| {
                group.resize(len, 0);
                group
            })?;
            scratch.group_key = Some(key);
        }
        Ok(&scratch.group)
    }

    /// Names this opened image among those the process opened; with a data offset it names
    /// one stored frame, for readers that keep decoded frames (an image id does not: a merged
    /// image keeps its id but not its layout).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Bytes the frame of `entry` decodes to: its whole group, one block, or a patch's parts. Not
    /// for a patch group, whose length its frame declares (see `decode_frame_with`).
    pub fn frame_len(&self, entry: &IndexEntry) -> usize {
        debug_assert!(entry.encoding != Encoding::PatchGroup, "a patch group's length is in its frame");
        if entry.encoding == Encoding::Patch {
            return self.patch_len(entry);
        }
        usize::from(entry.group_len.max(1)) * self.header.block_size as usize
    }

    /// Bytes of parts the patch `entry` stores.
    pub(crate) fn patch_len(&self, entry: &IndexEntry) -> usize {
        entry.patch_mask.count_ones() as usize * IndexEntry::patch_part_len(self.header.block_size)
    }

    /// The parts of the patch `entry` in its decoded frame: all of it for a patch of its own, its
    /// slot's for a patch in a patch group (checked against the group's table).
    pub fn patch_parts<'f>(&self, entry: &IndexEntry, frame: &'f [u8]) -> Result<&'f [u8]> {
        let len = self.patch_len(entry);
        let found = match entry.encoding {
            Encoding::Patch if frame.len() == len => Ok(0..len),
            Encoding::Patch => Err(format!("{} bytes of parts, not {len}", frame.len())),
            _ => crate::patch_group::slot_parts(frame, usize::from(entry.group_slot), len),
        };
        found.map(|r| &frame[r]).map_err(|detail| FormatError::Corrupt {
            loc: self.loc().block(entry.block).at(entry.data_offset),
            what: "patch",
            detail: format!("block {}: {detail}", entry.block),
        })
    }

    /// Overwrites the parts of `block` (holding the patch's base) that the patch `entry` stores,
    /// from its decoded frame `frame`; returns the bytes of parts laid.
    pub fn lay_patch(&self, entry: &IndexEntry, frame: &[u8], block: &mut [u8]) -> Result<usize> {
        let parts = self.patch_parts(entry, frame)?;
        let part = IndexEntry::patch_part_len(self.header.block_size);
        let stored = (0..crate::layout::PATCH_PARTS as usize).filter(|i| entry.patch_mask & (1 << i) != 0);
        for (from, to) in parts.chunks_exact(part).zip(stored) {
            block[to * part..(to + 1) * part].copy_from_slice(from);
        }
        Ok(parts.len())
    }

    /// Checks that the frame of the patch `entry` decodes and holds its parts (a patch group is
    /// kept in `scratch` for the next patches of the group).
    pub fn check_patch_frame(&self, entry: &IndexEntry, scratch: &mut ReadScratch) -> Result<()> {
        if entry.encoding == Encoding::PatchGroup {
            let frame = self.decode_shared(entry, scratch)?;
            return self.patch_parts(entry, frame).map(|_| ());
        }
        let mut parts = std::mem::take(&mut scratch.patch);
        parts.resize(self.frame_len(entry), 0);
        let decoded = self.decode_frame(entry, scratch, &mut parts);
        scratch.patch = parts;
        decoded
    }

    /// Decodes the frame `entry` points at into `out` (`frame_len` bytes: the whole group for
    /// a block of a group, a patch's parts, else the one block), checking the crc32c.
    pub fn decode_frame(&self, entry: &IndexEntry, scratch: &mut ReadScratch, out: &mut [u8]) -> Result<()> {
        if entry.encoding == Encoding::Zero {
            out.fill(0);
            return Ok(());
        }
        let ReadScratch { decompressor, stored, .. } = scratch;
        self.read_stored_unchecked(entry, stored)?;
        block::decode_into(decompressor, entry.encoding, stored, entry.data_crc, out)
            .map_err(|e| self.decode_error(entry, e))
    }

    /// Decodes the frame `entry` points at into the buffer `buffer(len)` gives for the `len`
    /// bytes it decodes to, checking the crc32c: `frame_len` bytes, or for a patch group the
    /// content size its zstd frame declares (at most `GROUP_MAX_BYTES`; a frame that declares
    /// none, or more, is corrupt).
    pub fn decode_frame_with(
        &self,
        entry: &IndexEntry,
        scratch: &mut ReadScratch,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        if entry.encoding != Encoding::PatchGroup {
            let mut out = buffer(self.frame_len(entry));
            self.decode_frame(entry, scratch, &mut out)?;
            return Ok(out);
        }
        let ReadScratch { decompressor, stored, .. } = scratch;
        self.read_stored_unchecked(entry, stored)?;
        let declared = zstd::zstd_safe::get_frame_content_size(stored).ok().flatten();
        let len = match declared {
            Some(n) if (1..=self.limits.group_max_bytes).contains(&n) => n as usize,
            _ => {
                let actual = crc32c::crc32c(stored);
                let error = if crate::layout::checksum_matches(entry.data_crc, actual) {
                    DecodeError::Decompress(format!("a patch group's frame declares {declared:?} bytes"))
                } else {
                    DecodeError::Crc { expected: entry.data_crc, actual }
                };
                return Err(self.decode_error(entry, error));
            }
        };
        let mut out = buffer(len);
        block::decode_into(decompressor, entry.encoding, stored, entry.data_crc, &mut out)
            .map_err(|e| self.decode_error(entry, e))?;
        Ok(out)
    }

    /// Checks `actual`, the BLAKE3 hash of the block `entry` names as it was read (for a patch:
    /// laid over its base), against the content hash the entry records.
    pub(crate) fn check_hash(&self, entry: &IndexEntry, actual: &[u8; 32]) -> Result<()> {
        if *actual == entry.hash {
            return Ok(());
        }
        Err(FormatError::HashMismatch { loc: self.loc().block(entry.block).at(entry.data_offset), block: entry.block })
    }

    fn read_stored_unchecked(&self, entry: &IndexEntry, stored: &mut Vec<u8>) -> Result<()> {
        stored.resize(entry.stored_len as usize, 0);
        self.read_ahead.note(&*self.file, entry.data_offset, stored.len() as u64, self.footer.index_offset);
        self.file
            .read_exact_at(stored, entry.data_offset)
            .map_err(|e| FormatError::io(self.loc().block(entry.block).at(entry.data_offset), "read block", e))
    }

    fn decode_error(&self, entry: &IndexEntry, e: DecodeError) -> FormatError {
        let loc = self.loc().block(entry.block).at(entry.data_offset);
        match e {
            DecodeError::Crc { expected, actual } => {
                FormatError::Checksum { loc, what: "block data", expected, actual }
            }
            DecodeError::Decompress(detail) => {
                FormatError::Corrupt { loc, what: "block data", detail: format!("block {}: {detail}", entry.block) }
            }
        }
    }
}

/// Reusable per-thread buffers for reading blocks.
pub struct ReadScratch {
    pub(crate) decompressor: zstd::bulk::Decompressor<'static>,
    pub(crate) stored: Vec<u8>,
    /// The last group decoded and which one it is: (image serial, `IndexEntry::frame_name`).
    pub(crate) group: Vec<u8>,
    pub(crate) group_key: Option<(u64, (u64, u64, u32))>,
    /// The decoded parts of the last patch read.
    pub(crate) patch: Vec<u8>,
}

impl ReadScratch {
    pub fn new() -> ReadScratch {
        ReadScratch {
            decompressor: zstd::bulk::Decompressor::new().expect("zstd decompressor allocation"),
            stored: Vec::new(),
            group: Vec::new(),
            group_key: None,
            patch: Vec::new(),
        }
    }
}

impl Default for ReadScratch {
    fn default() -> Self {
        ReadScratch::new()
    }
}

/// Sequential reader over an image's index; see `ImageFile::stream_entries`.
pub struct IndexStream<'a> {
    image: &'a ImageFile,
    next: u64,
    window: Vec<IndexEntry>,
    pos: usize,
    crc: u32,
    last_block: Option<u64>,
    done: bool,
}

const STREAM_WINDOW: usize = 1024;

impl IndexStream<'_> {
    fn refill(&mut self) -> Result<()> {
        let image = self.image;
        let count = STREAM_WINDOW.min((image.entry_count() - self.next) as usize);
        let mut raw = vec![0u8; count * INDEX_ENTRY_SIZE];
        let at = image.entry_offset(self.next);
        image.file.read_exact_at(&mut raw, at).map_err(|e| FormatError::io(image.loc().at(at), "read index", e))?;
        self.crc = crc32c::crc32c_append(self.crc, &raw);
        self.window.clear();
        for (i, chunk) in raw.chunks_exact(INDEX_ENTRY_SIZE).enumerate() {
            let off = at + (i * INDEX_ENTRY_SIZE) as u64;
            let entry = IndexEntry::decode(chunk, &image.loc(), off, &image.limits)?;
            if self.last_block.is_some_and(|last| entry.block <= last) {
                return Err(FormatError::Corrupt {
                    loc: image.loc().at(off),
                    what: "index",
                    detail: format!("block {} listed after block {}", entry.block, self.last_block.unwrap_or(0)),
                });
            }
            self.last_block = Some(entry.block);
            self.window.push(entry);
        }
        self.next += count as u64;
        self.pos = 0;
        Ok(())
    }
}

impl Iterator for IndexStream<'_> {
    type Item = Result<IndexEntry>;

    fn next(&mut self) -> Option<Result<IndexEntry>> {
        if self.done {
            return None;
        }
        if self.pos == self.window.len() {
            if self.next == self.image.entry_count() {
                self.done = true;
                let expected = self.image.footer.index_crc;
                if !crate::layout::checksum_matches(expected, self.crc) {
                    return Some(Err(FormatError::Checksum {
                        loc: self.image.loc().at(self.image.footer.index_offset),
                        what: "index",
                        expected,
                        actual: self.crc,
                    }));
                }
                return None;
            }
            if let Err(e) = self.refill() {
                self.done = true;
                return Some(Err(e));
            }
        }
        let entry = self.window[self.pos];
        self.pos += 1;
        Some(Ok(entry))
    }
}

/// The folder holding `path` and the file's name in it.
fn folder_and_name(path: &Path) -> Result<(Folder, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FormatError::Invalid(format!("{}: not a file name for an image", path.display())))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((Folder::new(dir), name.to_string()))
}

/// An upload as a `Write` for the writer's buffer.
struct UploadSink(Box<dyn Upload>);

impl Write for UploadSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes one new image, invisible until `finish` publishes it.
pub struct ImageWriter {
    temp_path: PathBuf,
    data: BufWriter<UploadSink>,
    index: Option<BufWriter<File>>,
    header: ImageHeader,
    offset: u64,
    entry_count: u64,
    index_crc: u32,
    stored_bytes: u64,
    last_block: Option<u64>,
}

/// What `ImageWriter::finish` records beyond the blocks themselves.
#[derive(Debug, Clone, Copy)]
pub struct Finish {
    pub present_blocks: u64,
    pub source_digest: [u8; 32],
}

const WRITE_BUFFER: usize = 4 << 20;
impl ImageWriter {
    /// Starts the image file at `final_path` (see `create_in`).
    pub fn create(final_path: &Path, header: ImageHeader) -> Result<ImageWriter> {
        let (folder, name) = folder_and_name(final_path)?;
        ImageWriter::create_in(&folder, &name, header)
    }

    /// Starts a new file of `storage` holding `header`; `finish` publishes it as `name`.
    pub fn create_in(storage: &dyn Storage, name: &str, header: ImageHeader) -> Result<ImageWriter> {
        let upload = storage.create(name)?;
        let spill = storage.scratch()?;
        let mut writer = ImageWriter {
            temp_path: upload.temp_path().to_path_buf(),
            data: BufWriter::with_capacity(WRITE_BUFFER, UploadSink(upload)),
            index: Some(BufWriter::with_capacity(1 << 20, spill)),
            header,
            offset: 0,
            entry_count: 0,
            index_crc: 0,
            stored_bytes: 0,
            last_block: None,
        };
        let hb = writer.header.encode();
        writer.write_data(&hb)?;
        Ok(writer)
    }

    /// Where the image is being written until it is published.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    fn loc(&self) -> Loc {
        Loc::file(&self.temp_path).version(self.header.version)
    }

    fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        let at = self.offset;
        self.data.write_all(bytes).map_err(|e| FormatError::io(self.loc().at(at), "write", e))?;
        self.offset += bytes.len() as u64;
        fault::step(fault::Step::Write);
        Ok(())
    }

    /// The block size of the image being written.
    pub fn block_size(&self) -> u32 {
        self.header.block_size
    }

    /// Puts `entry` in the index. Entries go in strictly increasing block order; the stored
    /// bytes they name may have been written at any time before (`write_block`, `write_group`,
    /// `write_patch`), so that a writer may hold entries back while a frame is still open.
    pub fn push(&mut self, entry: IndexEntry) -> Result<IndexEntry> {
        assert!(self.last_block.is_none_or(|l| entry.block > l), "blocks must be appended in increasing order");
        assert!(entry.block < self.header.block_count(), "block beyond the source");
        assert!(entry.encoding == Encoding::Zero || entry.data_offset + u64::from(entry.stored_len) <= self.offset);
        self.last_block = Some(entry.block);
        let raw = entry.encode();
        self.index_crc = crc32c::crc32c_append(self.index_crc, &raw);
        let loc = self.loc();
        let index = self.index.as_mut().expect("index spill present until finish");
        index.write_all(&raw).map_err(|e| FormatError::io(loc, "write index spill", e))?;
        self.entry_count += 1;
        fault::counted("image.block", self.entry_count);
        Ok(entry)
    }

    /// Appends a stored block (`bytes` as returned by compression, or the raw block) and puts
    /// its entry in the index; returns it.
    pub fn append_block(&mut self, block: u64, encoding: Encoding, bytes: &[u8], hash: [u8; 32]) -> Result<IndexEntry> {
        let entry = self.write_block(block, encoding, bytes, hash)?;
        self.push(entry)
    }

    /// Writes a stored block (`bytes` as returned by compression, or the raw block); returns
    /// the entry naming it, for `push`.
    pub fn write_block(&mut self, block: u64, encoding: Encoding, bytes: &[u8], hash: [u8; 32]) -> Result<IndexEntry> {
        assert!(matches!(encoding, Encoding::Raw | Encoding::Zstd) && !bytes.is_empty());
        self.write_stored(block, encoding, bytes, hash)
    }

    /// Writes stored bytes to the data region; returns the entry naming them (no group, no
    /// patch mask).
    fn write_stored(&mut self, block: u64, encoding: Encoding, bytes: &[u8], hash: [u8; 32]) -> Result<IndexEntry> {
        let data_offset = self.offset;
        self.write_data(bytes)?;
        self.stored_bytes += bytes.len() as u64;
        Ok(IndexEntry {
            block,
            data_offset,
            stored_len: bytes.len() as u32,
            encoding,
            data_crc: crc32c::crc32c(bytes),
            hash,
            group_len: 0,
            group_slot: 0,
            patch_mask: 0,
        })
    }

    /// Appends a patch of `block` (content hash `hash`, the whole block's): `frame` is one
    /// zstd frame of the parts `mask` names, in order.
    pub fn append_patch(&mut self, block: u64, mask: u16, frame: &[u8], hash: [u8; 32]) -> Result<IndexEntry> {
        let entry = self.write_patch(block, mask, frame, hash)?;
        self.push(entry)
    }

    /// Writes a patch (see `append_patch`); returns its entry, for `push`.
    pub fn write_patch(&mut self, block: u64, mask: u16, frame: &[u8], hash: [u8; 32]) -> Result<IndexEntry> {
        assert!(mask != 0 && !frame.is_empty() && self.header.kind != crate::header::Kind::Full);
        let entry = self.write_stored(block, Encoding::Patch, frame, hash)?;
        Ok(IndexEntry { patch_mask: mask, ..entry })
    }

    /// Writes a patch group: `frame` is one zstd frame of the parts of the patches `patches`
    /// (block, mask, content hash; ascending blocks), laid out as `patch_group` builds them,
    /// decoding to at most `layout::GROUP_MAX_BYTES`. Returns their entries, for `push`.
    pub fn write_patch_group(&mut self, patches: &[(u64, u16, [u8; 32])], frame: &[u8]) -> Result<Vec<IndexEntry>> {
        let n = patches.len();
        assert!((1..=crate::patch_group::PATCH_GROUP_MAX_PATCHES).contains(&n) && !frame.is_empty());
        assert!(
            frame.len() <= crate::layout::GROUP_MAX_BYTES as usize && self.header.kind != crate::header::Kind::Full
        );
        assert!(patches.windows(2).all(|w| w[0].0 < w[1].0), "a patch group's blocks ascend");
        assert!(patches.iter().all(|p| p.1 != 0));
        let first = self.write_stored(patches[0].0, Encoding::PatchGroup, frame, patches[0].2)?;
        Ok(patches
            .iter()
            .enumerate()
            .map(|(slot, &(block, patch_mask, hash))| IndexEntry {
                block,
                hash,
                patch_mask,
                group_slot: slot as u8,
                ..first
            })
            .collect())
    }

    /// Appends a group: `frame` is one zstd frame of the blocks `blocks` (numbers and hashes,
    /// ascending, not necessarily adjacent), each `block_size` long, in that order, decoding
    /// to at most `layout::GROUP_MAX_BYTES`. Pushes their entries to `entries`.
    pub fn append_group(
        &mut self,
        blocks: &[(u64, [u8; 32])],
        frame: &[u8],
        entries: &mut Vec<IndexEntry>,
    ) -> Result<()> {
        for entry in self.write_group(blocks, frame)? {
            entries.push(self.push(entry)?);
        }
        Ok(())
    }

    /// Writes a group (see `append_group`); returns its entries, for `push`.
    pub fn write_group(&mut self, blocks: &[(u64, [u8; 32])], frame: &[u8]) -> Result<Vec<IndexEntry>> {
        let n = blocks.len();
        assert!((2..=crate::layout::GROUP_MAX_BLOCKS as usize).contains(&n) && !frame.is_empty());
        assert!(n as u64 * u64::from(self.header.block_size) <= u64::from(crate::layout::GROUP_MAX_BYTES));
        assert!(blocks.windows(2).all(|w| w[0].0 < w[1].0), "a group's blocks ascend");
        let first = self.write_stored(blocks[0].0, Encoding::ZstdGroup, frame, blocks[0].1)?;
        Ok(blocks
            .iter()
            .enumerate()
            .map(|(slot, &(block, hash))| IndexEntry {
                block,
                hash,
                group_len: n as u8,
                group_slot: slot as u8,
                ..first
            })
            .collect())
    }

    /// Appends `block`, whose content (hash `hash`) this image already stores as `like`
    /// describes (deduplication within an image): the new entry points at the same bytes.
    pub fn append_ref(&mut self, block: u64, hash: [u8; 32], like: &IndexEntry) -> Result<IndexEntry> {
        let entry = Self::ref_entry(block, hash, like);
        self.push(entry)
    }

    /// The entry of `block` pointing at the stored bytes `like` names (see `append_ref`).
    pub fn ref_entry(block: u64, hash: [u8; 32], like: &IndexEntry) -> IndexEntry {
        // A patch means something only at its own block (its base is that block's).
        assert!(like.encoding != Encoding::Zero && !like.encoding.is_patch());
        assert!(like.hash == hash);
        IndexEntry { block, hash, ..*like }
    }

    /// Records that `block` is zero in this version although it was not in the parent.
    pub fn append_zero(&mut self, block: u64, zero_hash: [u8; 32]) -> Result<IndexEntry> {
        self.push(Self::zero_entry(block, zero_hash))
    }

    /// The entry saying that `block` is zero (see `append_zero`).
    pub fn zero_entry(block: u64, zero_hash: [u8; 32]) -> IndexEntry {
        IndexEntry {
            block,
            data_offset: 0,
            stored_len: 0,
            encoding: Encoding::Zero,
            data_crc: 0,
            hash: zero_hash,
            group_len: 0,
            group_slot: 0,
            patch_mask: 0,
        }
    }

    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    pub fn entry_count(&self) -> u64 {
        self.entry_count
    }

    /// Appends the index and the footer, then publishes the image (`Upload::publish`): the
    /// version exists, durably, once this returns.
    pub fn finish(self, finish: Finish) -> Result<PathBuf> {
        self.publish(finish, Replace::Never, || Ok(()))
    }

    /// As `finish`, but the image takes the place of the file of the same name: a merge publishes
    /// the full of version N over version N's delta in one rename, so that N never goes missing.
    pub fn finish_replacing(self, finish: Finish) -> Result<PathBuf> {
        self.publish(finish, Replace::Yes, || Ok(()))
    }

    /// As `finish`, running `before_rename` once the file is durable and before it is renamed
    /// into place (a backup records the version id there, so that the id is never handed out
    /// again whatever happens next).
    pub fn finish_with(self, finish: Finish, before_rename: impl FnOnce() -> Result<()>) -> Result<PathBuf> {
        self.publish(finish, Replace::Never, before_rename)
    }

    fn publish(
        mut self,
        finish: Finish,
        replace: Replace,
        before_rename: impl FnOnce() -> Result<()>,
    ) -> Result<PathBuf> {
        let index_offset = self.offset;
        let mut spill = (self.index.take().expect("finish runs once"))
            .into_inner()
            .map_err(|e| FormatError::io(self.loc(), "flush index spill", e.into_error()))?;
        spill.seek(SeekFrom::Start(0)).map_err(|e| FormatError::io(self.loc(), "rewind index spill", e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = spill.read(&mut buf).map_err(|e| FormatError::io(self.loc(), "read index spill", e))?;
            if n == 0 {
                break;
            }
            self.write_data(&buf[..n])?;
        }
        let footer = ImageFooter {
            image_id: self.header.image_id,
            index_offset,
            entry_count: self.entry_count,
            index_crc: self.index_crc,
            stored_bytes: self.stored_bytes,
            present_blocks: finish.present_blocks,
            source_digest: finish.source_digest,
        };
        self.write_data(&footer.encode())?;
        let loc = self.loc();
        let UploadSink(upload) = self.data.into_inner().map_err(|e| FormatError::io(loc, "write", e.into_error()))?;
        upload.publish(replace, Box::new(before_rename))
    }
}
