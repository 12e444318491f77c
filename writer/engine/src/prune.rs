//! Retention: which versions to keep (the N newest; the newest of each of the last N days,
//! weeks, months with backups), and how to drop the others without breaking a kept one. A kept
//! version whose chain goes through a version that is not kept is merged into a full (merge
//! forward). The unkept versions that no kept version needs are deleted first, so that a full
//! disk gets the space the merges need; then the merges run; then the rest of the unkept
//! versions go. Each deletion pass goes newest first, so that a crash never leaves a version
//! whose parent was deleted before it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Result};
use strata_format::{RepoLock, RepoState, Repository};

use crate::config::Retention;
use crate::merge::merge_version;
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Keep,
    /// Kept, and rewritten as a full first so that its chain needs no unkept version.
    Merge,
    Delete,
    /// Not restorable: neither counted nor deleted (verify says why).
    Leave,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub id: u64,
    pub action: Action,
    pub why: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub decisions: Vec<Decision>,
    /// Bytes the repository's images took less afterwards (deleted files, minus what merges
    /// added); for a dry run, what they would take less: the images to delete, minus what the
    /// merges would add (each merge counted on the images as they are now).
    pub freed_bytes: i64,
    /// Of that, what the merges add (a merged full is larger than the delta it replaces).
    pub merge_bytes: i64,
}

const DAY: i64 = 86_400;

/// Days since 1970-01-01 as (year, month, day).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Which versions the policy keeps, with the rules that keep each (restorable versions only,
/// given as (id, created seconds)).
pub fn select(versions: &[(u64, i64)], policy: &Retention) -> BTreeMap<u64, Vec<String>> {
    let mut newest_first: Vec<(u64, i64)> = versions.to_vec();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut keep: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    if let Some(n) = policy.keep_last {
        for (id, _) in newest_first.iter().take(n as usize) {
            keep.entry(*id).or_default().push("last".into());
        }
    }
    type Bucket = fn(i64) -> (i64, String);
    let buckets: [(Option<u32>, &str, Bucket); 3] = [
        (policy.keep_daily, "daily", |t| {
            let (y, m, d) = civil(t.div_euclid(DAY));
            (t.div_euclid(DAY), format!("{y:04}-{m:02}-{d:02}"))
        }),
        (policy.keep_weekly, "weekly", |t| {
            // weeks Monday to Sunday: 1970-01-01 was a Thursday
            let week = (t.div_euclid(DAY) + 3).div_euclid(7);
            let (y, m, d) = civil(week * 7 - 3);
            (week, format!("week of {y:04}-{m:02}-{d:02}"))
        }),
        (policy.keep_monthly, "monthly", |t| {
            let (y, m, _) = civil(t.div_euclid(DAY));
            (y * 12 + i64::from(m), format!("{y:04}-{m:02}"))
        }),
    ];
    for (count, name, bucket) in buckets {
        let Some(n) = count else { continue };
        let mut seen = BTreeSet::new();
        for &(id, t) in &newest_first {
            let (key, label) = bucket(t);
            if seen.len() >= n as usize {
                break;
            }
            if seen.insert(key) {
                keep.entry(id).or_default().push(format!("{name} {label}"));
            }
        }
    }
    keep
}

fn file_size(state: &RepoState, id: u64) -> u64 {
    if state.images.contains_key(&id) {
        state.repo.image_bytes(id)
    } else {
        0
    }
}

/// Decides keep/merge/delete/leave for every version.
pub fn plan_prune(state: &RepoState, policy: &Retention) -> Vec<Decision> {
    let statuses = state.statuses();
    let restorable: Vec<(u64, i64)> = statuses
        .iter()
        .filter(|s| s.restorable())
        .filter_map(|s| s.image.as_ref().map(|i| (s.id, i.header.created_secs)))
        .collect();
    let keep = select(&restorable, policy);
    // Merge forward, oldest kept first: a kept version whose chain (as shortened by earlier
    // merges) still needs an unkept version becomes a full.
    let mut fulls: BTreeSet<u64> = BTreeSet::new();
    let mut merge: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (&id, _) in keep.iter() {
        let chain = &statuses.iter().find(|s| s.id == id).expect("kept versions have a status").chain;
        let start = chain.iter().rposition(|v| fulls.contains(v)).unwrap_or(0);
        let needs: Vec<u64> = chain[start..].iter().copied().filter(|v| !keep.contains_key(v)).collect();
        if !needs.is_empty() {
            fulls.insert(id);
            merge.insert(id, needs);
        }
    }
    statuses
        .iter()
        .map(|s| {
            let bytes = file_size(state, s.id);
            let (action, why) = if let Some(problem) = &s.problem {
                (Action::Leave, format!("not restorable: {problem}"))
            } else if let Some(needs) = merge.get(&s.id) {
                let list: Vec<String> = needs.iter().map(u64::to_string).collect();
                (
                    Action::Merge,
                    format!("{}; merged into a full so it no longer needs {}", keep[&s.id].join(", "), list.join(", ")),
                )
            } else if let Some(rules) = keep.get(&s.id) {
                (Action::Keep, rules.join(", "))
            } else {
                (Action::Delete, "no retention rule keeps it".to_string())
            };
            Decision { id: s.id, action, why, bytes }
        })
        .collect()
}

fn images_bytes(repo: &Repository) -> Result<u64> {
    let state = repo.scan()?;
    Ok(state.images.keys().map(|&id| file_size(&state, id)).sum())
}

/// Applies a prune plan (or only reports it, with `dry_run`). Needs the repository lock.
pub fn prune_locked(
    repo: &Repository,
    lock: &RepoLock,
    policy: &Retention,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    if policy.is_empty() {
        bail!("no retention rule: give at least one of --keep-last/--keep-daily/--keep-weekly/--keep-monthly, or set [retention] in strata.toml");
    }
    let mut state = repo.scan()?;
    state.check_indexes();
    let decisions = plan_prune(&state, policy);
    let restorable = decisions.iter().filter(|d| d.action != Action::Leave).count();
    let kept = decisions.iter().filter(|d| matches!(d.action, Action::Keep | Action::Merge)).count();
    if restorable > 0 && kept == 0 {
        bail!("{}: the retention rules keep no version; refusing to delete them all", repo.path().display());
    }
    if dry_run {
        let deleted: i64 = decisions.iter().filter(|d| d.action == Action::Delete).map(|d| d.bytes as i64).sum();
        let mut merge_bytes = 0i64;
        for d in decisions.iter().filter(|d| d.action == Action::Merge) {
            merge_bytes += crate::merge::merged_size(&state, d.id)? as i64 - d.bytes as i64;
        }
        return Ok(PruneReport { dry_run, decisions, freed_bytes: deleted - merge_bytes, merge_bytes });
    }
    let before = images_bytes(repo)?;
    let before_merges: i64 = decisions.iter().filter(|d| d.action == Action::Merge).map(|d| d.bytes as i64).sum();
    let needed: BTreeSet<u64> = state
        .statuses()
        .iter()
        .filter(|s| decisions.iter().any(|d| d.id == s.id && matches!(d.action, Action::Keep | Action::Merge)))
        .flat_map(|s| s.chain.clone())
        .collect();
    let unneeded = |d: &&Decision| d.action == Action::Delete && !needed.contains(&d.id);
    delete_newest_first(repo, lock, decisions.iter().filter(unneeded))?;
    for d in decisions.iter().filter(|d| d.action == Action::Merge) {
        merge_version(&state, lock, d.id, progress).map_err(|e| {
            let freed = before.saturating_sub(images_bytes(repo).unwrap_or(before));
            e.context(format!(
                "merging version {} into a full, so that the versions it needs can go (the versions no kept \
                 version needs were deleted first, freeing {}; a rule that also keeps its full needs no merge)",
                d.id,
                crate::units::bytes(freed)
            ))
        })?;
        state = repo.scan()?;
        state.check_indexes();
    }
    delete_newest_first(repo, lock, decisions.iter().filter(|d| d.action == Action::Delete && needed.contains(&d.id)))?;
    let after = images_bytes(repo)?;
    let state = repo.scan()?;
    let merged: i64 =
        decisions.iter().filter(|d| d.action == Action::Merge).map(|d| file_size(&state, d.id) as i64).sum();
    Ok(PruneReport {
        dry_run,
        decisions,
        freed_bytes: before as i64 - after as i64,
        merge_bytes: merged - before_merges,
    })
}

/// Deletes the images of `decisions` (in id order), newest first, then syncs the folder.
fn delete_newest_first<'d>(
    repo: &Repository,
    lock: &RepoLock,
    decisions: impl DoubleEndedIterator<Item = &'d Decision>,
) -> Result<()> {
    let mut deleted = false;
    for d in decisions.rev() {
        strata_format::fault::point("prune.before_delete");
        repo.remove_image(lock, d.id)?;
        log::info!("deleted version {} ({})", d.id, repo.image_path(d.id).display());
        deleted = true;
    }
    if deleted {
        repo.sync()?;
    }
    Ok(())
}

pub fn prune(repo_path: &Path, policy: &Retention, dry_run: bool, progress: &dyn Progress) -> Result<PruneReport> {
    let mut repo = Repository::open(repo_path)?;
    let lock = repo.lock()?;
    prune_locked(&repo, &lock, policy, dry_run, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_the_calendar() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(20_782), (2026, 11, 25));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn retention_keeps_the_newest_of_each_bucket() {
        let day = |d: i64, h: i64| 20_782 * DAY + d * DAY + h * 3600; // from 2026-11-25 (Wed)
                                                                      // two backups a day for 10 days: ids 1..=20
        let versions: Vec<(u64, i64)> = (0..20).map(|i| (i as u64 + 1, day(i / 2, 8 + 8 * (i % 2)))).collect();
        let last = select(&versions, &Retention { keep_last: Some(3), ..Default::default() });
        assert_eq!(last.keys().copied().collect::<Vec<_>>(), [18, 19, 20]);
        let daily = select(&versions, &Retention { keep_daily: Some(3), ..Default::default() });
        assert_eq!(daily.keys().copied().collect::<Vec<_>>(), [16, 18, 20]);
        let weekly = select(&versions, &Retention { keep_weekly: Some(5), ..Default::default() });
        // weeks: Mon 11-23..Sun 11-29 holds days 0-4 (ids 1-10), then 11-30..12-06 (ids 11-20)
        assert_eq!(weekly.keys().copied().collect::<Vec<_>>(), [10, 20]);
        let monthly = select(&versions, &Retention { keep_monthly: Some(1), ..Default::default() });
        assert_eq!(monthly.keys().copied().collect::<Vec<_>>(), [20]);
    }
}
