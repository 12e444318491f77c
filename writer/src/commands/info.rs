//! `strata info REPO VERSION`: one version in detail, with its chain.

use anyhow::Result;
use strata_format::digest::hex;
use strata_format::header::hex_id;

use strata_format::frame_cache::FrameCache;
use strata_format::header::BlockSelection;
use strata_format::volume::{analyse, DiskRead};
use strata_format::{Repository, VersionReader};

use strata_engine::backup::RegionSummary;

use crate::commands::{Global, Outcome};
use strata_engine::units::{bytes, rfc3339};

pub use super::VersionArgs as Args;

#[derive(serde::Serialize)]
struct Info {
    id: u64,
    kind: &'static str,
    /// Why this kind (as `list` shows it).
    rule: &'static str,
    parent: Option<u64>,
    full: u64,
    chain: Vec<u64>,
    created: String,
    label: String,
    source: String,
    /// The id the source's content carried (`null`: not recorded, a version older than 0.4).
    source_id: Option<String>,
    source_size: u64,
    block_size: u32,
    block_count: u64,
    present_blocks: u64,
    changed_blocks: u64,
    stored_bytes: u64,
    compression_level: i32,
    file: String,
    repo_id: String,
    image_id: String,
    source_digest: String,
    restorable: bool,
    problem: Option<String>,
    /// `used` (only the blocks the file systems use) or `every` (sector by sector).
    blocks: &'static str,
    unused_bytes: u64,
    /// For a used-blocks version: its regions and what was found in each, read from the
    /// version's own content (its partition table and file systems).
    regions: Vec<RegionSummary>,
}

/// A version read as a disk, for the volume analysis.
struct VersionDisk<'a> {
    reader: &'a VersionReader,
    frames: FrameCache,
}

impl DiskRead for VersionDisk<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read_at(offset, buf, &self.frames).map_err(std::io::Error::other)
    }
}

/// What a used-blocks version holds, region by region (none for a version that is not
/// restorable or was read sector by sector).
fn regions(state: &strata_format::RepoState, id: u64, selection: BlockSelection) -> Vec<RegionSummary> {
    if selection == BlockSelection::Every {
        return Vec::new();
    }
    let Ok(reader) = state.open_version(id) else { return Vec::new() };
    let disk = VersionDisk { reader: &reader, frames: FrameCache::new(0, reader.block_size(), false) };
    analyse(&disk, reader.source_size()).regions.iter().map(RegionSummary::from_region).collect()
}

pub fn run(args: Args, _global: &Global) -> Result<Outcome> {
    let repo = Repository::open(&args.repo)?;
    let mut state = repo.scan()?;
    state.check_indexes();
    let id = state.resolve_name(&args.version)?;
    let status = state.status(id);
    let Some(image) = status.image.clone() else {
        anyhow::bail!(
            "{}: version {id} cannot be read: {}",
            status.path.display(),
            status.problem.map(|p| p.to_string()).unwrap_or_default()
        );
    };
    let h = &image.header;
    let info = Info {
        id,
        kind: h.kind.as_str(),
        rule: h.rule.as_str(),
        parent: h.parent.map(|p| p.version),
        full: h.full.version,
        chain: status.chain.clone(),
        created: rfc3339(h.created_secs, h.created_nanos),
        label: h.label.clone(),
        source: h.source.clone(),
        source_id: h.source_id.map(|id| id.to_string()),
        source_size: h.source_size,
        block_size: h.block_size,
        block_count: h.block_count(),
        present_blocks: image.footer.present_blocks,
        changed_blocks: image.footer.entry_count,
        stored_bytes: image.footer.stored_bytes,
        compression_level: h.compression_level,
        file: status.path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        repo_id: hex_id(&h.repo_id),
        image_id: hex_id(&h.image_id),
        source_digest: hex(&image.footer.source_digest),
        restorable: status.restorable(),
        problem: status.problem.as_ref().map(|p| p.to_string()),
        blocks: h.selection.name(),
        unused_bytes: h.selection.unused_bytes(),
        regions: if status.restorable() { regions(&state, id, h.selection) } else { Vec::new() },
    };
    if args.json {
        super::print_json(&info)?;
        return Ok(Outcome::Success);
    }
    let chain: Vec<String> = info.chain.iter().map(u64::to_string).collect();
    println!("version        {}", info.id);
    println!("kind           {}", info.kind);
    println!("rule           {}", info.rule);
    println!("parent         {}", info.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()));
    println!("full           {}", info.full);
    println!("chain          {}", chain.join(" <- "));
    println!("created        {}", info.created);
    println!("label          {}", info.label);
    println!("source         {}", info.source);
    println!("source id      {}", info.source_id.as_deref().unwrap_or("not recorded"));
    println!("source size    {} ({} bytes)", bytes(info.source_size), info.source_size);
    println!("block size     {}", bytes(u64::from(info.block_size)));
    println!(
        "blocks         {} total, {} not zero, {} changed in this image",
        info.block_count, info.present_blocks, info.changed_blocks
    );
    println!("stored         {} (zstd level {})", bytes(info.stored_bytes), info.compression_level);
    match info.blocks {
        "used" => println!(
            "read           the blocks the file systems use; {} unused left out (zeros)",
            bytes(info.unused_bytes)
        ),
        _ => println!("read           every byte (sector by sector)"),
    }
    for r in &info.regions {
        let what = match &r.reason {
            Some(why) => format!("kept whole: {why}"),
            None => format!("used blocks, {} unused left out", bytes(r.unused_bytes)),
        };
        println!("  {:<28} {:>9}  {what}", r.name(), bytes(r.bytes));
    }
    println!("file           {}", info.file);
    println!("image id       {}", info.image_id);
    println!("repository id  {}", info.repo_id);
    println!("source digest  blake3:{}", info.source_digest);
    match &info.problem {
        None => println!("restorable     yes"),
        Some(p) => println!("restorable     NO: {p}"),
    }
    Ok(Outcome::Success)
}
