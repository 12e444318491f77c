//! Merge: rewrite a version as a full built from its chain (a synthetic full), without reading
//! the source. Stored blocks and whole groups are copied as they are (crc32c checked); only a
//! group that the version uses in part, and a patched block (laid over its base), are decoded
//! and stored block by block. So it costs one read and one write of the version's data and
//! memory as for reading it. The new image keeps the version's id, image id, time and digest,
//! and replaces the old one by an atomic rename, so every version depending on it stays
//! restorable and byte-identical whatever the moment of a crash (SPEC.md §4.1).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use strata_format::block::compress_into;
use strata_format::frame_cache::FrameCache;
use strata_format::layout;
use strata_format::{
    Encoding, Finish, ImageFile, ImageHeader, ImageRef, ImageWriter, IndexEntry, Kind, RepoLock, RepoState, Rule,
    VersionReader,
};

use crate::progress::Progress;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub id: u64,
    /// Versions the old chain of `id` went through, full first (now no longer needed by it).
    pub old_chain: Vec<u64>,
    pub blocks: u64,
    pub old_bytes: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

/// Rewrites version `id` as a full. Needs the repository lock.
pub fn merge_version(state: &RepoState, _lock: &RepoLock, id: u64, progress: &dyn Progress) -> Result<MergeSummary> {
    let started = Instant::now();
    let repo = &state.repo;
    let chain = state
        .chain(id)
        .map_err(|why| anyhow::anyhow!("{}: version {id} cannot be merged: {why}", repo.path().display()))?;
    let top = chain[chain.len() - 1].clone();
    if top.header.kind == Kind::Full {
        bail!("{}: version {id} is already a full", repo.path().display());
    }
    let old_chain: Vec<u64> = chain.iter().map(|i| i.header.version).collect();
    let old_bytes = repo.image_bytes(id);
    let reader = strata_format::VersionReader::from_chain(chain)?;
    let digest = reader.digest_from_index()?;
    if digest != top.footer.source_digest {
        bail!("{}: version {id}'s chain does not add up to its digest; run `strata verify`", top.path().display());
    }
    let header = ImageHeader {
        kind: Kind::Full,
        rule: Rule::Merged,
        parent: None,
        full: ImageRef { version: id, image_id: top.header.image_id },
        ..top.header.clone()
    };
    let mut writer = repo.create_image(id, header)?;
    let mut copier = Copier::new(top.header.compression_level, reader.block_size());
    copy_version(
        &reader,
        &mut Ordered { writer: &mut writer, waiting: Default::default() },
        &mut copier,
        progress,
        id,
    )?;
    let blocks = writer.entry_count();
    writer
        .finish_replacing(Finish { present_blocks: top.footer.present_blocks, source_digest: top.footer.source_digest })
        .with_context(|| format!("publishing the merged version {id}"))?;
    let new_bytes = repo.image_bytes(id);
    log::info!("merged version {id} into a full ({blocks} blocks)");
    Ok(MergeSummary { id, old_chain, blocks, old_bytes, new_bytes, seconds: started.elapsed().as_secs_f64() })
}

/// Writes the blocks of version `id` (read through `reader`) into `sink` as a full: stored
/// blocks and whole groups as they are, the rest decoded and stored anew.
fn copy_version(
    reader: &VersionReader,
    sink: &mut dyn FullSink,
    copier: &mut Copier,
    progress: &dyn Progress,
    id: u64,
) -> Result<()> {
    progress.begin("merge", reader.source_size());
    let mut block = 0;
    while block < reader.block_count() {
        crate::interrupt::check()
            .with_context(|| format!("merge of version {id} stopped: version {id} is as it was"))?;
        if copier.copied.remove(&block) {
            progress.advance(u64::from(reader.block_size()));
            block += 1;
            continue;
        }
        let next = match reader.entry(block)? {
            Some((image, entry)) if entry.encoding == Encoding::ZstdGroup => {
                copier.copy_group(reader, sink, block, image, entry)?
            }
            Some((_, entry)) if entry.encoding.is_patch() => {
                reader.read_block(block, &copier.frames, &mut copier.block)?;
                copier.store_decoded(sink, block, entry.hash)?;
                block + 1
            }
            Some((image, entry)) => {
                debug_assert!(entry.encoding != Encoding::Zero);
                image.read_stored(&entry, &mut copier.stored)?;
                sink.block(block, entry.encoding, &copier.stored, entry.hash)?;
                block + 1
            }
            None => reader.next_stored(block).unwrap_or(reader.block_count()),
        };
        progress.advance((next - block) * u64::from(reader.block_size()));
        block = next;
    }
    sink.finish()?;
    progress.end();
    Ok(())
}

/// Where a merge puts the blocks of the full it makes: the new image, or a count of the bytes
/// it would take (`merged_size`). Blocks come in increasing order; a group may hold blocks
/// that come later (it is given at its first block).
trait FullSink {
    fn block(&mut self, block: u64, encoding: Encoding, bytes: &[u8], hash: [u8; 32]) -> Result<()>;
    fn group(&mut self, blocks: &[(u64, [u8; 32])], frame: &[u8]) -> Result<()>;
    /// After the last block.
    fn finish(&mut self) -> Result<()>;
}

/// The new image: a group's frame is written at once, its entries go in the index when the
/// merge reaches a block past each (the index is in block order).
struct Ordered<'w> {
    writer: &'w mut ImageWriter,
    waiting: std::collections::BTreeMap<u64, IndexEntry>,
}

impl Ordered<'_> {
    /// Puts the waiting entries of blocks before `block` in the index.
    fn push_before(&mut self, block: u64) -> Result<()> {
        while let Some(entry) = self.waiting.first_entry().filter(|e| *e.key() < block) {
            self.writer.push(entry.remove())?;
        }
        Ok(())
    }
}

impl FullSink for Ordered<'_> {
    fn block(&mut self, block: u64, encoding: Encoding, bytes: &[u8], hash: [u8; 32]) -> Result<()> {
        self.push_before(block)?;
        self.writer.append_block(block, encoding, bytes, hash)?;
        Ok(())
    }

    fn group(&mut self, blocks: &[(u64, [u8; 32])], frame: &[u8]) -> Result<()> {
        self.push_before(blocks[0].0)?;
        for entry in self.writer.write_group(blocks, frame)? {
            self.waiting.insert(entry.block, entry);
        }
        self.push_before(blocks[0].0 + 1)
    }

    fn finish(&mut self) -> Result<()> {
        self.push_before(u64::MAX)
    }
}

/// Counts what a merge would write.
#[derive(Default)]
struct Measure {
    data: u64,
    entries: u64,
}

impl FullSink for Measure {
    fn block(&mut self, _block: u64, _encoding: Encoding, bytes: &[u8], _hash: [u8; 32]) -> Result<()> {
        self.data += bytes.len() as u64;
        self.entries += 1;
        Ok(())
    }

    fn group(&mut self, blocks: &[(u64, [u8; 32])], frame: &[u8]) -> Result<()> {
        self.data += frame.len() as u64;
        self.entries += blocks.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The size of the image `merge_version` would write for version `id` (exactly: the same copy,
/// counted instead of written), so that `prune --dry-run` can say what its merges cost. Reads
/// the version's data as a merge does.
pub fn merged_size(state: &RepoState, id: u64) -> Result<u64> {
    let chain = state
        .chain(id)
        .map_err(|why| anyhow::anyhow!("{}: version {id} cannot be merged: {why}", state.repo.path().display()))?;
    let level = chain[chain.len() - 1].header.compression_level;
    let reader = VersionReader::from_chain(chain)?;
    let mut measure = Measure::default();
    let mut copier = Copier::new(level, reader.block_size());
    copy_version(&reader, &mut measure, &mut copier, &crate::progress::NoProgress, id)?;
    let fixed = (layout::HEADER_SIZE + layout::FOOTER_SIZE) as u64;
    Ok(fixed + measure.data + measure.entries * layout::INDEX_ENTRY_SIZE as u64)
}

/// Buffers for copying stored bytes, and for re-encoding the blocks of a group used in part.
struct Copier {
    stored: Vec<u8>,
    block: Vec<u8>,
    frame: Vec<u8>,
    /// Frames of the groups used in part and of patched blocks' bases, decoded once for the
    /// blocks that share them (which other frames' blocks come between).
    frames: FrameCache,
    /// Blocks of groups copied whole, not reached yet.
    copied: std::collections::BTreeSet<u64>,
    /// The last group found used in part (image serial, data offset): its blocks are stored alone.
    partial: Option<(u64, u64)>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl Copier {
    fn new(level: i32, block_size: u32) -> Copier {
        Copier {
            stored: Vec::new(),
            block: vec![0; block_size as usize],
            frame: Vec::new(),
            frames: FrameCache::new(0, block_size, false),
            copied: Default::default(),
            partial: None,
            compressor: zstd::bulk::Compressor::new(level).expect("zstd compressor"),
        }
    }

    /// Copies block `block` of `reader`, which is in the group of `entry` (in `image`); returns
    /// the block after it. The frame is copied whole when the version uses every block of the
    /// group, in order (looked for over the span a group may cover; the blocks found are
    /// skipped when the merge reaches them); otherwise the block is decoded and stored alone.
    fn copy_group(
        &mut self,
        reader: &VersionReader,
        sink: &mut dyn FullSink,
        block: u64,
        image: &ImageFile,
        entry: IndexEntry,
    ) -> Result<u64> {
        let frame = (image.serial(), entry.data_offset);
        if self.partial != Some(frame) {
            let n = usize::from(entry.group_len);
            let span = (crate::pack::GROUP_MAX_SPAN / u64::from(reader.block_size())).max(n as u64);
            let end = block.saturating_add(span).min(reader.block_count());
            let mut members = vec![(block, entry)];
            let mut at = block + 1;
            while members.len() < n {
                let Some(b) = reader.next_stored(at).filter(|&b| b < end) else { break };
                if let Some((other, e)) = reader.entry(b)? {
                    if std::ptr::eq(other, image) && e.same_frame(&entry) {
                        members.push((b, e));
                    }
                }
                at = b + 1;
            }
            let whole = members.len() == n
                && members.iter().enumerate().all(|(slot, (_, e))| usize::from(e.group_slot) == slot);
            if whole {
                image.read_stored(&entry, &mut self.stored)?;
                let blocks: Vec<(u64, [u8; 32])> = members.iter().map(|(b, e)| (*b, e.hash)).collect();
                sink.group(&blocks, &self.stored)?;
                self.copied.extend(members[1..].iter().map(|(b, _)| *b));
                return Ok(block + 1);
            }
            self.partial = Some(frame);
        }
        reader.read_block(block, &self.frames, &mut self.block)?;
        self.store_decoded(sink, block, entry.hash)?;
        Ok(block + 1)
    }

    /// Stores the decoded block in `self.block` as block `b` on its own.
    fn store_decoded(&mut self, sink: &mut dyn FullSink, b: u64, hash: [u8; 32]) -> Result<()> {
        match compress_into(&mut self.compressor, &self.block, &mut self.frame) {
            Encoding::Zstd => sink.block(b, Encoding::Zstd, &self.frame, hash)?,
            _ => sink.block(b, Encoding::Raw, &self.block, hash)?,
        };
        Ok(())
    }
}
