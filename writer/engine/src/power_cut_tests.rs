//! Power cuts under the engines: a scenario of backups (full, incremental, differential), a
//! merge and a prune runs on a repository whose disk (`storage::lossy`) loses what was not
//! synced. The power goes at each sync of the scenario in turn; the disk comes back with a
//! random share of the unsynced writes and name changes (several seeds per point). Then every
//! version an engine had reported done must be there and read back bit-identical, the one in
//! flight must be there whole or not at all, `verify` must find the repository sound, and the
//! next backup must work. An engine that reports success after the power went (a sync error
//! swallowed) fails the test too. `STRATA_POWER_CUT_SEEDS=N` runs more seeds per point.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use strata_format::frame_cache::FrameCache;
use strata_format::storage::lossy::LossyDisk;
use strata_format::storage::{Folder, Storage};
use strata_format::{Kind, Repository};

use crate::backup::{backup, BackupRequest};
use crate::config::Retention;
use crate::merge::merge_version;
use crate::progress::NoProgress;
use crate::prune::{plan_prune, prune_locked, Action};
use crate::verify::{verify_repository, VerifyOptions};

const REPO: &str = "/lossy/repo";
const BLOCK: usize = 4096;

/// One step of the scenario.
#[derive(Debug, Clone, Copy)]
enum Step {
    Backup(Option<Kind>),
    /// Merges the newest delta into a full.
    Merge,
    Prune(u32),
}

const SCENARIO: [Step; 14] = [
    Step::Backup(None),
    Step::Backup(Some(Kind::Incremental)),
    Step::Backup(Some(Kind::Differential)),
    Step::Backup(Some(Kind::Incremental)),
    Step::Merge,
    Step::Backup(Some(Kind::Incremental)),
    Step::Prune(2),
    Step::Backup(Some(Kind::Incremental)),
    Step::Backup(Some(Kind::Full)),
    Step::Backup(Some(Kind::Differential)),
    Step::Backup(Some(Kind::Incremental)),
    Step::Merge,
    Step::Prune(3),
    Step::Backup(Some(Kind::Incremental)),
];

/// The source at step `step`: the same bytes in every run, a few blocks changed per step
/// (some of them to zero, some by a few bytes, which makes patches).
fn source_at(step: usize) -> Vec<u8> {
    let mut disk = vec![0u8; 48 * BLOCK + 1000];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for b in disk[..40 * BLOCK].iter_mut() {
        *b = next() as u8;
    }
    for s in 1..=step {
        for _ in 0..3 {
            let at = (next() % disk.len() as u64) as usize;
            let len = if next() % 2 == 0 { 100 } else { 2 * BLOCK };
            let end = (at + len).min(disk.len());
            let fill = if s % 3 == 0 { 0 } else { s as u8 };
            disk[at..end].fill(fill);
        }
    }
    disk
}

/// What the versions must hold: for each version id, its source bytes.
type Models = BTreeMap<u64, Vec<u8>>;

/// What the step that was cut off may have left: versions that may be there (with their
/// content) and versions that may be gone.
#[derive(Default)]
struct InFlight {
    may_appear: Models,
    may_vanish: Vec<u64>,
}

fn storage_on(disk: &LossyDisk) -> Arc<dyn Storage> {
    Arc::new(Folder::on(Arc::new(disk.clone()), Path::new(REPO)))
}

/// Runs one step. Returns what it may leave (worked out before it starts, so that it is known
/// whether or not the power goes during it) and how it ended.
fn run_step(step: Step, i: usize, disk: &LossyDisk, source: &Path, models: &Models) -> (InFlight, anyhow::Result<()>) {
    let storage = storage_on(disk);
    let mut flight = InFlight::default();
    let result = (|| -> anyhow::Result<()> {
        match step {
            Step::Backup(kind) => {
                let bytes = source_at(i);
                std::fs::write(source, &bytes)?;
                // The test's repository has no damaged or stray image to skip: the next id.
                let next = Repository::open_in(storage.clone()).map_or(1, |r| r.last_version + 1);
                flight.may_appear.insert(next, bytes);
                let req = BackupRequest {
                    source: Some(source.to_path_buf()),
                    repo: REPO.into(),
                    storage: Some(storage),
                    kind,
                    block_size: Some(BLOCK as u32),
                    level: Some(1),
                    label: format!("step {i}"),
                    sector_by_sector: true,
                };
                let summary = backup(&req, &NoProgress)?;
                assert_eq!(summary.id, next, "step {i}: the version id");
            }
            Step::Merge => {
                let mut repo = Repository::open_in(storage)?;
                let lock = repo.lock()?;
                let state = repo.scan()?;
                let newest_delta = state
                    .ids()
                    .rev()
                    .find(|id| state.images[id].image.as_ref().is_ok_and(|i| i.header.kind != Kind::Full))
                    .expect("the scenario has a delta to merge");
                merge_version(&state, &lock, newest_delta, &NoProgress)?;
            }
            Step::Prune(keep_last) => {
                let mut repo = Repository::open_in(storage)?;
                let lock = repo.lock()?;
                let policy = Retention { keep_last: Some(keep_last), ..Default::default() };
                let planned = plan_prune(&repo.scan()?, &policy);
                flight.may_vanish = planned.iter().filter(|d| d.action == Action::Delete).map(|d| d.id).collect();
                let report = prune_locked(&repo, &lock, &policy, false, &NoProgress)?;
                let deleted: Vec<u64> =
                    report.decisions.iter().filter(|d| d.action == Action::Delete).map(|d| d.id).collect();
                assert_eq!(deleted, flight.may_vanish, "step {i}: prune deleted what it planned");
            }
        }
        Ok(())
    })();
    debug_assert!(flight.may_appear.keys().all(|id| !models.contains_key(id) || step_rewrites(step)));
    (flight, result)
}

/// Whether `step` rewrites versions that exist (which then read the same).
fn step_rewrites(step: Step) -> bool {
    matches!(step, Step::Merge | Step::Prune(_))
}

/// Runs the scenario until a step fails; returns the models of the versions reported done and
/// what the failed step may have left (`None`: every step succeeded).
fn run_scenario(disk: &LossyDisk, source: &Path) -> (Models, Option<InFlight>) {
    let mut models = Models::new();
    for (i, &step) in SCENARIO.iter().enumerate() {
        let (flight, result) = run_step(step, i, disk, source, &models);
        if let Err(e) = result {
            assert!(disk.power_was_cut(), "step {i} ({step:?}) failed without a power cut: {e:#}");
            return (models, Some(flight));
        }
        assert!(!disk.power_was_cut(), "step {i} ({step:?}) reported success after the power was cut");
        models.extend(flight.may_appear);
        for id in flight.may_vanish {
            models.remove(&id);
        }
    }
    (models, None)
}

/// Checks the repository on `disk` after the power came back.
fn check(disk: &LossyDisk, models: &Models, flight: &InFlight, what: &str) {
    let storage = storage_on(disk);
    let repo = match Repository::open_in(storage) {
        Ok(repo) => repo,
        Err(e) => {
            assert!(models.is_empty(), "{what}: the repository does not open after a power cut: {e}");
            return;
        }
    };
    let state = repo.scan().unwrap();
    let present: Vec<u64> = state.ids().collect();
    for &id in models.keys() {
        if !present.contains(&id) {
            assert!(flight.may_vanish.contains(&id), "{what}: version {id}, reported done, is gone");
        }
    }
    for id in present {
        let model = models.get(&id).or_else(|| flight.may_appear.get(&id));
        let model = model.unwrap_or_else(|| panic!("{what}: version {id} appeared from nowhere"));
        let reader = state.open_version(id).unwrap_or_else(|e| panic!("{what}: version {id} cannot be read: {e}"));
        let mut buf = vec![0u8; model.len()];
        reader
            .read_at(0, &mut buf, &FrameCache::new(0, reader.block_size(), false))
            .unwrap_or_else(|e| panic!("{what}: version {id}: {e}"));
        assert!(buf == *model, "{what}: version {id} reads back different bytes");
        assert_eq!(reader.digest_from_index().unwrap(), reader.top().footer.source_digest, "{what}: version {id}");
    }
    let report = verify_repository(&repo, &VerifyOptions { versions: &[], quick: false }, &NoProgress).unwrap();
    assert!(report.ok, "{what}: verify finds problems after the power cut");
}

/// After the check: the next backup on the recovered disk works and reads back.
fn back_up_again(disk: &LossyDisk, source: &Path, what: &str) {
    let bytes = source_at(SCENARIO.len());
    std::fs::write(source, &bytes).unwrap();
    let req = BackupRequest {
        source: Some(source.to_path_buf()),
        repo: REPO.into(),
        storage: Some(storage_on(disk)),
        kind: None,
        block_size: Some(BLOCK as u32),
        level: Some(1),
        label: "after the power cut".into(),
        sector_by_sector: true,
    };
    let summary = backup(&req, &NoProgress).unwrap_or_else(|e| panic!("{what}: the next backup fails: {e:#}"));
    let state = Repository::open_in(storage_on(disk)).unwrap().scan().unwrap();
    let mut buf = vec![0u8; bytes.len()];
    let reader = state.open_version(summary.id).unwrap();
    reader.read_at(0, &mut buf, &FrameCache::new(0, reader.block_size(), false)).unwrap();
    assert!(buf == bytes, "{what}: the backup after the power cut reads back different bytes");
}

#[test]
fn every_version_reported_done_survives_a_power_cut_at_every_sync() {
    let seeds: u64 = std::env::var("STRATA_POWER_CUT_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("disk.img");

    let clean = LossyDisk::with_folder(Path::new(REPO));
    let (models, failed) = run_scenario(&clean, &source);
    assert!(failed.is_none());
    let backups = SCENARIO.iter().filter(|s| matches!(s, Step::Backup(_))).count();
    assert!(models.len() < backups, "the scenario's prunes delete versions: {:?} are left", models.keys());
    let syncs = clean.syncs();
    assert!(syncs >= 50, "the scenario syncs {syncs} times: fewer points than the 50 asked for");

    for n in 1..=syncs {
        let disk = LossyDisk::with_folder(Path::new(REPO));
        disk.cut_power_at(Some(n));
        let (models, flight) = run_scenario(&disk, &source);
        let flight = flight.unwrap_or_else(|| panic!("the scenario ran to its end with the power cut at sync {n}"));
        for seed in 0..seeds {
            let what = format!("power cut at sync {n} of {syncs}, seed {seed}");
            let back = disk.after_power_cut(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n);
            check(&back, &models, &flight, &what);
            back_up_again(&back, &source, &what);
        }
    }
}
