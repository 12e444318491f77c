//! Verify's check of patches' content. A patch's hash is that of its base's block with the
//! patch's parts laid over, and the base lies in another image, so the check waits until every
//! image has been read: patches are collected while their images are checked, then checked
//! sorted by base frame. Each base frame (often a 1 MiB group that many versions patch) is then
//! decoded once for all the patches over it, not once per patch, and the patches' own frames
//! (patch groups, which hold the patches of a stretch of the disk) come from a frame cache: the
//! check costs about one read of what the repository stores, however many versions patch the
//! same blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rayon::prelude::*;
use strata_format::block::hash_block;
use strata_format::frame_cache::FrameCache;
use strata_format::{FormatError, ImageFile, IndexEntry, ReadScratch, RepoState};

/// What the cache of patch frames holds at most.
const PATCH_FRAMES_BUDGET: u64 = 256 << 20;

/// Patches waiting for their check: (version id of their image, entry).
#[derive(Default)]
pub struct PatchChecks {
    pending: Vec<(u64, IndexEntry)>,
}

/// One patch and its base (`None`: a zero block).
struct Check {
    image: Arc<ImageFile>,
    entry: IndexEntry,
    base: Option<(Arc<ImageFile>, IndexEntry)>,
}

impl Check {
    /// Which frame the base lies in (`None` first: zero bases).
    fn base_frame(&self) -> Option<(u64, u64)> {
        self.base.as_ref().map(|(image, entry)| (image.serial(), entry.data_offset))
    }

    /// Which frame the patch's parts lie in.
    fn patch_frame(&self) -> (u64, u64) {
        (self.image.serial(), self.entry.data_offset)
    }
}

impl PatchChecks {
    pub fn add(&mut self, version: u64, entry: IndexEntry) {
        self.pending.push((version, entry));
    }

    /// Checks the content hash of every collected patch; returns, per version id, the patches
    /// whose content does not match. A patch whose image's chain cannot be opened, or whose
    /// base cannot be read, is left out: that is reported as the version's or the base image's
    /// own problem.
    pub fn run(self, state: &RepoState) -> BTreeMap<u64, Vec<FormatError>> {
        let mut by_version: BTreeMap<u64, Vec<IndexEntry>> = BTreeMap::new();
        for (version, entry) in self.pending {
            by_version.entry(version).or_default().push(entry);
        }
        let mut checks = Vec::new();
        for (id, entries) in by_version {
            let Ok(reader) = state.open_version(id) else { continue };
            let layers: HashMap<u64, &Arc<ImageFile>> = reader.layers().iter().map(|l| (l.serial(), l)).collect();
            let image = reader.layers()[reader.layers().len() - 1].clone();
            for entry in entries {
                let Ok(base) = reader.patch_base(entry.block) else { continue };
                let base = base.map(|(base_image, base)| (layers[&base_image.serial()].clone(), base));
                checks.push(Check { image: image.clone(), entry, base });
            }
        }
        checks.sort_by_key(|c| (c.base_frame(), c.patch_frame()));
        let runs: Vec<&[Check]> = checks.chunk_by(|a, b| a.base_frame() == b.base_frame()).collect();
        let Some(first) = checks.first() else { return BTreeMap::new() };
        let patch_frames = FrameCache::new(PATCH_FRAMES_BUDGET, first.image.header.block_size, false);
        let bad: Vec<(u64, FormatError)> = runs
            .par_iter()
            .map_init(
                || (ReadScratch::new(), Vec::new(), Vec::new()),
                |(scratch, frame, block), run| check_run(run, &patch_frames, scratch, frame, block),
            )
            .flatten()
            .collect();
        let mut found: BTreeMap<u64, Vec<FormatError>> = BTreeMap::new();
        for (version, e) in bad {
            found.entry(version).or_default().push(e);
        }
        found
    }
}

/// Checks patches that share one base frame, decoding it once.
fn check_run(
    run: &[Check],
    patch_frames: &FrameCache,
    scratch: &mut ReadScratch,
    frame: &mut Vec<u8>,
    block: &mut Vec<u8>,
) -> Vec<(u64, FormatError)> {
    if let Some((image, base)) = &run[0].base {
        frame.resize(image.frame_len(base), 0);
        if image.decode_frame(base, scratch, frame).is_err() {
            return Vec::new(); // the base's image reports its damage
        }
    }
    let mut bad = Vec::new();
    for check in run {
        let bs = check.image.header.block_size as usize;
        block.resize(bs, 0);
        match &check.base {
            Some((_, base)) => {
                let at = usize::from(base.group_slot) * bs;
                block.copy_from_slice(&frame[at..at + bs]);
            }
            None => block.fill(0),
        }
        // A patch frame that does not decode, or lacks the patch's parts, was reported with its
        // image's blocks.
        let laid =
            patch_frames.frame(&check.image, &check.entry).and_then(|f| check.image.lay_patch(&check.entry, &f, block));
        if laid.is_ok() && hash_block(block) != check.entry.hash {
            let loc = check.image.loc().block(check.entry.block).at(check.entry.data_offset);
            bad.push((check.image.header.version, FormatError::HashMismatch { loc, block: check.entry.block }));
        }
    }
    bad
}
