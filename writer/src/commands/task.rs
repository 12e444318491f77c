//! `strata init REPO` and `strata config REPO`: create a backup task, show or change it. The
//! options are shared: a value of 0 for a count turns that rule off.

use std::path::PathBuf;

use anyhow::{bail, Result};
use strata_format::Repository;

use crate::commands::{Global, Outcome};
use strata_engine::config::{Retention, Scheme, TaskConfig};

#[derive(clap::Args, Debug, Default)]
pub struct KeepOptions {
    /// Keep the N newest versions (0: this rule off).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest version of each of the last N days that have backups (0: this rule off).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest version of each of the last N weeks, Monday to Sunday UTC, that have
    /// backups (0: this rule off).
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest version of each of the last N calendar months (UTC) that have backups (0:
    /// this rule off).
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
}

fn set(slot: &mut Option<u32>, v: Option<u32>) {
    if let Some(n) = v {
        *slot = (n > 0).then_some(n);
    }
}

impl KeepOptions {
    pub fn any(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
    }

    pub fn apply(&self, r: &mut Retention) {
        set(&mut r.keep_last, self.keep_last);
        set(&mut r.keep_daily, self.keep_daily);
        set(&mut r.keep_weekly, self.keep_weekly);
        set(&mut r.keep_monthly, self.keep_monthly);
    }
}

#[derive(clap::Args, Debug, Default)]
pub struct TaskOptions {
    /// The block device or raw image `strata backup REPO` backs up.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Compression, zstd:LEVEL with LEVEL 1-19.
    #[arg(long, value_name = "zstd:LEVEL", value_parser = super::compression_arg)]
    pub compression: Option<String>,
    /// What a `strata backup` without --full/--incremental/--differential makes.
    #[arg(long, value_parser = scheme_parser())]
    pub scheme: Option<Scheme>,
    /// incremental/differential: every N-th backup is a full (0: off).
    #[arg(long, value_name = "N")]
    pub full_every: Option<u32>,
    /// incremental/differential: a full when the last full is N days old (0: off).
    #[arg(long, value_name = "N")]
    pub full_every_days: Option<u32>,
    /// incremental-forever: keep chains at most N images long by merging the oldest incremental
    /// into the full (0: off).
    #[arg(long, value_name = "N")]
    pub max_chain: Option<u32>,
    /// Back up every byte (true), or only the blocks the file systems use (false, the default).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub sector_by_sector: Option<bool>,
    #[command(flatten)]
    pub keep: KeepOptions,
}

/// `--scheme`: one of the engine's schemes, each with its description in `--help`.
fn scheme_parser() -> impl clap::builder::TypedValueParser<Value = Scheme> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let names = Scheme::ALL.map(|s| PossibleValue::new(s.as_str()).help(s.description()));
    PossibleValuesParser::new(names).map(|name| Scheme::from_name(&name).expect("one of the possible values"))
}

impl TaskOptions {
    fn any(&self) -> bool {
        self.source.is_some()
            || self.compression.is_some()
            || self.scheme.is_some()
            || self.full_every.is_some()
            || self.full_every_days.is_some()
            || self.max_chain.is_some()
            || self.sector_by_sector.is_some()
            || self.keep.any()
    }

    fn apply(&self, c: &mut TaskConfig) {
        if let Some(s) = &self.source {
            c.source = Some(strata_engine::source_identity::stable_name(s));
        }
        if let Some(comp) = &self.compression {
            c.compression = comp.clone();
        }
        if let Some(s) = self.scheme {
            c.scheme = s;
            if s != Scheme::IncrementalForever && self.max_chain.is_none() {
                c.max_chain = None;
            }
        }
        set(&mut c.full_every, self.full_every);
        set(&mut c.full_every_days, self.full_every_days);
        set(&mut c.max_chain, self.max_chain);
        if let Some(every) = self.sector_by_sector {
            c.sector_by_sector = every;
        }
        self.keep.apply(&mut c.retention);
    }
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// The repository folder to create (missing or empty).
    pub repo: PathBuf,
    /// Block size (power of two, 4K to 4M; fixed for the repository's life).
    #[arg(long, default_value = "64K", value_name = "SIZE", value_parser = super::block_size_arg)]
    pub block_size: u32,
    #[command(flatten)]
    pub task: TaskOptions,
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// The repository folder.
    pub repo: PathBuf,
    #[command(flatten)]
    pub task: TaskOptions,
    /// Print the configuration as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn init(args: InitArgs, global: &Global) -> Result<Outcome> {
    let block_size = args.block_size;
    if args.repo.exists() && args.repo.read_dir().map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{}: not an empty folder; `strata init` creates a new repository", args.repo.display());
    }
    let mut config = TaskConfig::default();
    args.task.apply(&mut config);
    config.validate()?;
    let repo = Repository::create(&args.repo, block_size)?;
    config.save(&repo)?;
    if !global.quiet {
        println!(
            "created repository {} (block size {}, scheme {})",
            args.repo.display(),
            block_size,
            config.scheme.as_str()
        );
    }
    Ok(Outcome::Success)
}

pub fn config(args: ConfigArgs, global: &Global) -> Result<Outcome> {
    let mut repo = Repository::open(&args.repo)?;
    let mut config = TaskConfig::load(&repo)?;
    if args.task.any() {
        let _lock = repo.lock()?;
        args.task.apply(&mut config);
        config.save(&repo)?;
        if !global.quiet && !args.json {
            println!("updated {}", repo.path().join(strata_engine::config::CONFIG_FILE).display());
        }
    }
    if args.json {
        super::print_json(&config)?;
    } else if !global.quiet {
        print!("{}", config.to_toml());
    }
    Ok(Outcome::Success)
}
