//! `strata verify REPO [VERSION...]`: check images and versions; exit 1 on any damage.

use std::path::PathBuf;

use anyhow::Result;

use crate::commands::{Global, Outcome};
use strata_engine::verify::{verify, VerifyOptions};

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// Versions to check (ids or `latest`), with the images they need; all when none given.
    #[arg(value_parser = super::version_arg)]
    pub versions: Vec<String>,
    /// Check headers, indexes and digests only, without reading block data.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Bad blocks listed per damaged image; the JSON report has them all.
const PROBLEMS_SHOWN: usize = 10;

/// A version's problem with the damage already printed under its image cut to "(above)", so
/// that one bad block is shown once, not once per version that needs it.
fn without_printed(problem: &str, printed: &[&String]) -> String {
    printed.iter().fold(problem.to_string(), |p, detail| p.replace(&format!(": {detail}"), " (above)"))
}

/// Consecutive versions with the same line, as (ids, damaged, line).
fn grouped(lines: impl Iterator<Item = (u64, bool, String)>) -> Vec<(Vec<u64>, bool, String)> {
    let mut groups: Vec<(Vec<u64>, bool, String)> = Vec::new();
    for (id, damaged, line) in lines {
        match groups.last_mut() {
            Some((ids, _, last)) if *last == line => ids.push(id),
            _ => groups.push((vec![id], damaged, line)),
        }
    }
    groups
}

/// `version 3`, `versions 2-5`, `versions 2, 4, 7-9`.
fn versions_label(ids: &[u64]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        runs.push(if j > i { format!("{}-{}", ids[i], ids[j]) } else { ids[i].to_string() });
        i = j + 1;
    }
    match ids.len() {
        1 => format!("version {}", ids[0]),
        _ => format!("versions {}", runs.join(", ")),
    }
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let progress = crate::progress_display::for_terminal(global.quiet || args.json);
    let opts = VerifyOptions { versions: &args.versions, quick: args.quick };
    let report = verify(&args.repo, &opts, progress.as_ref())?;
    if args.json {
        super::print_json(&report)?;
    } else {
        for img in &report.images {
            if img.sound {
                if global.quiet {
                } else if args.quick {
                    println!("ok       {} (version {}): header, index and footer checked", img.file, img.version);
                } else {
                    println!("ok       {} (version {}): {} blocks checked", img.file, img.version, img.blocks_checked);
                }
            } else {
                let plural = if img.bad_blocks == 1 { "" } else { "s" };
                println!("DAMAGED  {} (version {}): {} bad block{plural}", img.file, img.version, img.bad_blocks);
                for p in img.problems.iter().take(PROBLEMS_SHOWN) {
                    println!("         {p}");
                }
                if img.problems.len() > PROBLEMS_SHOWN {
                    println!("         ... and {} more (`--json` lists them all)", img.problems.len() - PROBLEMS_SHOWN);
                }
            }
        }
        let printed: Vec<&String> = report.images.iter().flat_map(|i| i.problems.iter().take(PROBLEMS_SHOWN)).collect();
        let lines = report.versions.iter().map(|v| {
            let line = match &v.problem {
                None if args.quick => "restorable, digest verified from the index".to_string(),
                None => "restorable, digest verified".to_string(),
                Some(p) => format!("NOT restorable: {}", without_printed(p, &printed)),
            };
            (v.id, v.problem.is_some(), line)
        });
        for (ids, damaged, line) in grouped(lines) {
            if damaged || !global.quiet {
                println!("{}: {line}", versions_label(&ids));
            }
        }
        if !global.quiet {
            println!("{}", if report.ok { "verify: everything checked is sound" } else { "verify: damage found" });
            if args.quick {
                println!(
                    "verify: quick: no block data was read (crc32c, decompression and hashes of the data unchecked)"
                );
            }
        }
    }
    Ok(if report.ok { Outcome::Success } else { Outcome::Failure })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_grouped_into_runs() {
        assert_eq!(versions_label(&[3]), "version 3");
        assert_eq!(versions_label(&[2, 3, 4, 5]), "versions 2-5");
        assert_eq!(versions_label(&[2, 4, 7, 8, 9]), "versions 2, 4, 7-9");
        let lines = [(1, true, "a"), (2, true, "b"), (3, true, "b"), (4, false, "c")];
        let groups = grouped(lines.iter().map(|(i, d, l)| (*i, *d, l.to_string())));
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[1].0, [2, 3]);
    }
}
