//! Model-based test of the engine: random writes to a plain `Vec<u8>` disk interleaved with
//! random full, incremental, differential and default backups; every version must read back
//! (through the version reader and through `restore`) equal to the model at its backup.

use std::path::Path;

use strata_format::{Kind, ReadScratch, Repository};

use crate::backup::{backup, BackupRequest};
use crate::progress::NoProgress;
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
        let len = 1 + rng.below(3 * 4096) as usize;
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

fn run_model(seed: u64, dir: &Path) {
    let mut rng = Rng(seed);
    let size = 4096 * (8 + rng.below(40)) + rng.below(4096);
    let mut disk = vec![0u8; size as usize];
    mutate(&mut rng, &mut disk);
    let source = dir.join("disk.img");
    let repo = dir.join("repo");
    let mut models: Vec<(u64, Vec<u8>, &'static str)> = Vec::new();
    for step in 0..12 {
        if step > 0 {
            mutate(&mut rng, &mut disk);
        }
        std::fs::write(&source, &disk).unwrap();
        let kind = [None, Some(Kind::Full), Some(Kind::Incremental), Some(Kind::Differential)][rng.below(4) as usize];
        let req = BackupRequest {
            source: Some(source.clone()),
            repo: repo.clone(),
            kind,
            block_size: Some(4096),
            level: Some(1),
            label: format!("step {step}"),
        };
        let s = backup(&req, &NoProgress).unwrap();
        let expected_kind = match (step, kind) {
            (0, _) | (_, Some(Kind::Full)) => "full",
            (_, Some(Kind::Differential)) => "differential",
            _ => "incremental",
        };
        assert_eq!(s.kind, expected_kind, "seed {seed} step {step}");
        models.push((s.id, disk.clone(), s.kind));
    }
    let state = Repository::open(&repo).unwrap().scan().unwrap();
    for (id, model, kind) in &models {
        let reader = state.open_version(*id).unwrap();
        let mut buf = vec![0u8; model.len()];
        reader.read_at(0, &mut buf, &mut ReadScratch::new()).unwrap();
        assert!(buf == *model, "seed {seed}: version {id} ({kind}) differs from the model");
        assert_eq!(reader.digest_from_index().unwrap(), reader.top().footer.source_digest);
        let target = dir.join(format!("restored-{id}"));
        restore(&repo, &id.to_string(), &target, false, &NoProgress).unwrap();
        assert!(std::fs::read(&target).unwrap() == *model, "seed {seed}: restore of version {id} differs");
    }
}

#[test]
fn every_version_reads_back_equal_to_the_model() {
    for seed in 1..=12u64 {
        let dir = tempfile::tempdir().unwrap();
        run_model(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), dir.path());
    }
}
