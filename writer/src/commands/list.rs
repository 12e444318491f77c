//! `strata list REPO`: one row per version with its health.

use std::path::{Path, PathBuf};

use anyhow::Result;
use strata_format::Repository;

use crate::commands::{Global, Outcome};
use strata_engine::units::{bytes, rfc3339};

#[derive(clap::Args)]
pub struct Args {
    /// The repository folder.
    pub repo: PathBuf,
    /// Print the versions as a JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub id: u64,
    /// "full", "incremental", "differential", or "unknown" when the header is unreadable.
    pub kind: String,
    /// Why it is that kind: the scheme rule or what was asked (see `strata_format::Rule`).
    pub rule: Option<String>,
    pub parent: Option<u64>,
    pub created: Option<String>,
    pub label: String,
    pub source_size: Option<u64>,
    pub block_size: u32,
    pub changed_blocks: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// `used` (only the blocks the file systems use), `every` (sector by sector, or a version
    /// older than 0.5), `null` when the header is unreadable.
    pub blocks: Option<&'static str>,
    /// Bytes the file systems did not use, left out (zeros in the version).
    pub unused_bytes: Option<u64>,
    pub file: String,
    pub restorable: bool,
    pub problem: Option<String>,
}

/// The rows of `strata list` (indexes are read and checked; block data is not).
pub fn rows(repo_path: &Path) -> Result<Vec<Row>> {
    let repo = Repository::open(repo_path)?;
    let mut state = repo.scan()?;
    state.check_indexes();
    Ok(state
        .statuses()
        .into_iter()
        .map(|s| {
            let file = s.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let h = s.image.as_ref().map(|i| &i.header);
            Row {
                id: s.id,
                kind: h.map(|h| h.kind.as_str().to_string()).unwrap_or_else(|| "unknown".into()),
                rule: h.map(|h| h.rule.as_str().to_string()),
                parent: h.and_then(|h| h.parent.map(|p| p.version)),
                created: h.map(|h| rfc3339(h.created_secs, h.created_nanos)),
                label: h.map(|h| h.label.clone()).unwrap_or_default(),
                source_size: h.map(|h| h.source_size),
                block_size: repo.block_size,
                changed_blocks: s.image.as_ref().map(|i| i.footer.entry_count),
                stored_bytes: s.image.as_ref().map(|i| i.footer.stored_bytes),
                blocks: h.map(|h| h.selection.name()),
                unused_bytes: h.map(|h| h.selection.unused_bytes()),
                file,
                restorable: s.restorable(),
                problem: s.problem.map(|p| p.to_string()),
            }
        })
        .collect())
}

/// The UNUSED column: the bytes left out of a used-blocks version, "all" when every byte was
/// read (sector by sector).
fn unused_cell(r: &Row) -> String {
    match (r.blocks, r.unused_bytes) {
        (Some("used"), Some(n)) => bytes(n),
        (Some(_), _) => "all read".into(),
        _ => "-".into(),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// "full", "incr of 3", "diff of 1": the kind and what it is a delta of, in one narrow column.
fn kind_cell(r: &Row) -> String {
    let short = match r.kind.as_str() {
        "incremental" => "incr",
        "differential" => "diff",
        other => other,
    };
    match r.parent {
        Some(p) => format!("{short} of {p}"),
        None => short.to_string(),
    }
}

/// `2026-12-02 19:12` (UTC; `--json` has the full RFC 3339 time).
fn created_cell(r: &Row) -> String {
    match &r.created {
        Some(t) if t.len() >= 16 && !t.starts_with('@') => t[..16].replace('T', " "),
        Some(t) => t.clone(),
        None => "-".into(),
    }
}

/// The table `list` and the demo print, each column as wide as its widest cell, so that it
/// fits a terminal of 80 to 100 columns; the label or the problem comes last.
pub fn print_table(rows: &[Row]) {
    let header = ["ID", "KIND", "RULE", "CREATED (UTC)", "SIZE", "UNUSED", "STORED", "OK"];
    let right = [true, false, false, false, true, true, true, false];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                kind_cell(r),
                r.rule.clone().unwrap_or_else(|| "-".into()),
                created_cell(r),
                opt(r.source_size.map(bytes)),
                unused_cell(r),
                opt(r.stored_bytes.map(bytes)),
                if r.restorable { "yes" } else { "NO" }.to_string(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| cells.iter().map(|row| row[c].chars().count()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let line = |values: &[&str], last: &str| {
        let mut out = String::new();
        for (c, v) in values.iter().enumerate() {
            let w = widths[c];
            out += &if right[c] { format!("{v:>w$}  ") } else { format!("{v:<w$}  ") };
        }
        out += last;
        println!("{}", out.trim_end());
    };
    line(&header, "LABEL / PROBLEM");
    for (r, row) in rows.iter().zip(&cells) {
        let last = r.problem.as_deref().unwrap_or(&r.label);
        line(&row.iter().map(String::as_str).collect::<Vec<_>>(), last);
    }
}

pub fn run(args: Args, _global: &Global) -> Result<Outcome> {
    let rows = rows(&args.repo)?;
    if args.json {
        super::print_json(&rows)?;
    } else if rows.is_empty() {
        println!("no versions in {}", args.repo.display());
    } else {
        print_table(&rows);
    }
    Ok(Outcome::Success)
}
