//! Model-based test of the engine: random writes to a plain `Vec<u8>` disk interleaved with
//! random full, incremental, differential and default backups, merges and prunes; every
//! surviving version must read back (through the version reader and through `restore`) equal to
//! the model at its backup, and `verify` must find the repository sound. Small writes make
//! patches (patches over patches, over zeroed blocks, under merges). `STRATA_MODEL_SEEDS=N` runs
//! more seeds.

use std::path::Path;

use strata_format::frame_cache::FrameCache;
use strata_format::{Kind, Repository};

use crate::backup::{backup, BackupRequest};
use crate::config::Retention;
use crate::merge::merge_version;
use crate::progress::NoProgress;
use crate::prune::prune_locked;
use crate::restore::restore;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mutate(rng: &mut Rng, disk: &mut [u8]) {
    for _ in 0..1 + rng.below(6) {
        // a few bytes (a part of a 4 KiB block is 256), or up to three blocks
        let longest = if rng.below(2) == 0 { 300 } else { 3 * 4096 };
        let len = 1 + rng.below(longest) as usize;
        let at = rng.below(disk.len() as u64) as usize;
        let end = (at + len).min(disk.len());
        match rng.below(3) {
            0 => disk[at..end].fill(0),
            1 => disk[at..end].fill(rng.below(256) as u8),
            _ => {
                for x in &mut disk[at..end] {
                    *x = rng.next() as u8;
                }
            }
        }
    }
}

/// Runs one seed; returns how many patch entries the surviving versions' images hold.
fn run_model(seed: u64, dir: &Path) -> usize {
    let mut rng = Rng(seed);
    let size = 4096 * (8 + rng.below(40)) + rng.below(4096);
    let mut disk = vec![0u8; size as usize];
    mutate(&mut rng, &mut disk);
    let source = dir.join("disk.img");
    let repo = dir.join("repo");
    let mut models: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    for step in 0..14 {
        if step > 0 {
            mutate(&mut rng, &mut disk);
        }
        match (step, rng.below(6)) {
            (s, 4) if s > 2 => {
                // merge a random delta into a full
                let mut repo_ = Repository::open(&repo).unwrap();
                let lock = repo_.lock().unwrap();
                let state = repo_.scan().unwrap();
                let deltas: Vec<u64> = state
                    .ids()
                    .filter(|&id| state.images[&id].image.as_ref().is_ok_and(|i| i.header.kind != Kind::Full))
                    .collect();
                if let Some(&id) = deltas.get(rng.below(deltas.len().max(1) as u64) as usize) {
                    merge_version(&state, &lock, id, &NoProgress).unwrap();
                }
                continue;
            }
            (s, 5) if s > 3 => {
                let mut repo_ = Repository::open(&repo).unwrap();
                let lock = repo_.lock().unwrap();
                let policy = Retention { keep_last: Some(1 + rng.below(4) as u32), ..Default::default() };
                let report = prune_locked(&repo_, &lock, &policy, false, &NoProgress).unwrap();
                for d in report.decisions {
                    if d.action == crate::prune::Action::Delete {
                        models.remove(&d.id);
                    }
                }
                continue;
            }
            _ => {}
        }
        std::fs::write(&source, &disk).unwrap();
        let kind = [None, Some(Kind::Full), Some(Kind::Incremental), Some(Kind::Differential)][rng.below(4) as usize];
        let req = BackupRequest {
            source: Some(source.clone()),
            repo: repo.clone(),
            storage: None,
            kind,
            block_size: Some(4096),
            level: Some(1),
            label: format!("step {step}"),
            sector_by_sector: false,
        };
        let s = backup(&req, &NoProgress).unwrap();
        if step == 0 {
            assert_eq!(s.kind, "full", "seed {seed}");
        } else if let Some(k) = kind {
            assert_eq!(s.kind, k.as_str(), "seed {seed} step {step}");
        }
        models.insert(s.id, disk.clone());
    }
    let state = Repository::open(&repo).unwrap().scan().unwrap();
    let listed: Vec<u64> = state.ids().collect();
    assert_eq!(listed, models.keys().copied().collect::<Vec<_>>(), "seed {seed}: versions differ from the model's");
    for (id, model) in &models {
        let reader = state.open_version(*id).unwrap();
        let mut buf = vec![0u8; model.len()];
        reader.read_at(0, &mut buf, &FrameCache::new(0, reader.block_size(), false)).unwrap();
        assert!(buf == *model, "seed {seed}: version {id} differs from the model");
        assert_eq!(reader.digest_from_index().unwrap(), reader.top().footer.source_digest);
        let target = dir.join(format!("restored-{id}"));
        restore(&repo, &id.to_string(), &target, false, &NoProgress).unwrap();
        assert!(std::fs::read(&target).unwrap() == *model, "seed {seed}: restore of version {id} differs");
    }
    let report =
        crate::verify::verify(&repo, &crate::verify::VerifyOptions { versions: &[], quick: false }, &NoProgress)
            .unwrap();
    assert!(report.ok, "seed {seed}: verify finds problems: {:?}", report.images);
    let images = state.images.values().filter_map(|slot| slot.image.as_ref().ok());
    images.map(|image| image.stream_entries().filter(|e| e.as_ref().unwrap().encoding.is_patch()).count()).sum()
}

#[test]
fn every_surviving_version_reads_back_equal_to_the_model() {
    let seeds: u64 = std::env::var("STRATA_MODEL_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let mut patches = 0;
    for seed in 1..=seeds {
        let dir = tempfile::tempdir().unwrap();
        patches += run_model(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), dir.path());
    }
    assert!(patches > 20, "the model made only {patches} patches: it no longer exercises them");
}
