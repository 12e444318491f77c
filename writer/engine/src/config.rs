//! The backup task's configuration, `REPO/strata.toml`: the source, compression, scheme and
//! retention. Human-editable TOML; strata rewrites it (durably) only through `init`/`config` or
//! when a first `strata backup SOURCE REPO` records the source. Reading images never needs it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use strata_format::Repository;

pub const CONFIG_FILE: &str = "strata.toml";

/// What a `strata backup` without --full/--incremental/--differential makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    #[default]
    Incremental,
    Differential,
    IncrementalForever,
}

impl Scheme {
    pub const ALL: [Scheme; 3] = [Scheme::Incremental, Scheme::Differential, Scheme::IncrementalForever];

    /// The name in strata.toml and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Incremental => "incremental",
            Scheme::Differential => "differential",
            Scheme::IncrementalForever => "incremental-forever",
        }
    }

    /// What the scheme does, in one sentence.
    pub fn description(self) -> &'static str {
        match self {
            Scheme::Incremental => "A full, then incrementals; a new full every N backups or D days",
            Scheme::Differential => "A full, then differentials; a new full every N backups or D days",
            Scheme::IncrementalForever => {
                "One full, then only incrementals; the chain is kept at most K long by merging"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub source: Option<PathBuf>,
    #[serde(default = "default_compression")]
    pub compression: String,
    #[serde(default)]
    pub scheme: Scheme,
    pub full_every: Option<u32>,
    pub full_every_days: Option<u32>,
    pub max_chain: Option<u32>,
    #[serde(default)]
    pub retention: Retention,
    /// Back up every byte of the source instead of only the blocks its file systems use.
    #[serde(default)]
    pub sector_by_sector: bool,
}

fn default_compression() -> String {
    "zstd:3".into()
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            source: None,
            compression: default_compression(),
            scheme: Scheme::default(),
            full_every: None,
            full_every_days: None,
            max_chain: None,
            retention: Retention::default(),
            sector_by_sector: false,
        }
    }
}

/// Parses `zstd:N` (N from 1 to 19) into the level.
pub fn compression_level(spec: &str) -> Result<i32> {
    let level = spec.strip_prefix("zstd:").and_then(|l| l.parse::<i32>().ok());
    match level {
        Some(l) if (1..=19).contains(&l) => Ok(l),
        _ => bail!("compression {spec:?}: expected zstd:LEVEL with LEVEL from 1 to 19 (e.g. zstd:3)"),
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn opt_line(key: &str, v: Option<u32>, help: &str) -> String {
    match v {
        Some(n) => format!("{key} = {n}            # {help}\n"),
        None => format!("# {key} = N          # {help} (off: left out or 0)\n"),
    }
}

impl TaskConfig {
    /// Reads a count of 0 as "this rule off", the one meaning 0 has on the command line and in
    /// strata.toml alike.
    fn normalize(&mut self) {
        let r = &mut self.retention;
        for slot in [
            &mut self.full_every,
            &mut self.full_every_days,
            &mut self.max_chain,
            &mut r.keep_last,
            &mut r.keep_daily,
            &mut r.keep_weekly,
            &mut r.keep_monthly,
        ] {
            if *slot == Some(0) {
                *slot = None;
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        compression_level(&self.compression)?;
        let r = &self.retention;
        for (name, v) in [
            ("full_every", self.full_every),
            ("full_every_days", self.full_every_days),
            ("max_chain", self.max_chain),
            ("retention.keep_last", r.keep_last),
            ("retention.keep_daily", r.keep_daily),
            ("retention.keep_weekly", r.keep_weekly),
            ("retention.keep_monthly", r.keep_monthly),
        ] {
            debug_assert!(v != Some(0), "{name} = 0 is read as off by `normalize`");
        }
        if self.max_chain.is_some() && self.scheme != Scheme::IncrementalForever {
            bail!("max_chain applies to the incremental-forever scheme only");
        }
        if self.max_chain == Some(1) {
            bail!("max_chain must be at least 2 (a full and one incremental)");
        }
        Ok(())
    }

    /// The documented TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        let mut t =
            String::from("# strata backup task. Edit freely; `strata config REPO` shows what strata reads.\n\n");
        match &self.source {
            Some(s) => t += &format!("source = {}\n", toml_string(&s.to_string_lossy())),
            None => t += "# source = \"/dev/sdb1\"   # block device or raw image backed up by `strata backup REPO`\n",
        }
        t += &format!("compression = {}   # zstd:LEVEL, LEVEL 1-19\n", toml_string(&self.compression));
        t += &format!(
            "sector_by_sector = {}   # true: every byte; false: only the blocks the file systems use\n\n",
            self.sector_by_sector
        );
        t += "# incremental | differential | incremental-forever\n";
        t += &format!("scheme = {}\n", toml_string(self.scheme.as_str()));
        t += &opt_line("full_every", self.full_every, "incremental/differential: every N-th backup is a full");
        t += &opt_line(
            "full_every_days",
            self.full_every_days,
            "incremental/differential: a full when the last full is N days old",
        );
        t += &opt_line(
            "max_chain",
            self.max_chain,
            "incremental-forever: chains at most N images long, merging the oldest incremental into the full",
        );
        t += "\n# Run after every backup when any is set (see `strata prune`).\n[retention]\n";
        let r = &self.retention;
        t += &opt_line("keep_last", r.keep_last, "the N newest versions");
        t += &opt_line("keep_daily", r.keep_daily, "the newest version of each of the last N days with backups");
        t += &opt_line(
            "keep_weekly",
            r.keep_weekly,
            "... of each of the last N weeks, Monday to Sunday UTC, with backups",
        );
        t += &opt_line("keep_monthly", r.keep_monthly, "... of each of the last N calendar months (UTC) with backups");
        t
    }

    /// The repository's configuration, or the defaults when it has no strata.toml.
    pub fn load(repo: &Repository) -> Result<TaskConfig> {
        let path = repo.storage().locate(CONFIG_FILE);
        let Some(text) = repo.read_file(CONFIG_FILE, CONFIG_MAX)? else { return Ok(TaskConfig::default()) };
        let mut config: TaskConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " ")))?;
        config.normalize();
        config.validate().with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    /// Writes the configuration into the repository, atomically and durably.
    pub fn save(&self, repo: &Repository) -> Result<()> {
        let mut config = self.clone();
        config.normalize();
        config.validate()?;
        repo.put_file(CONFIG_FILE, config.to_toml().as_bytes())?;
        Ok(())
    }
}

/// Longest strata.toml read (a hand-edited one is a few KiB).
const CONFIG_MAX: u64 = 1 << 20;

/// "Now" in seconds since the epoch: `STRATA_NOW` (seconds, or an RFC 3339 time) when set, so
/// that tests and dry runs can drive the day-based rules; else the clock.
pub fn now() -> Result<(i64, u32)> {
    if let Ok(v) = std::env::var("STRATA_NOW") {
        if let Ok(secs) = v.parse::<i64>() {
            if !(0..=253_402_300_799).contains(&secs) {
                anyhow::bail!("STRATA_NOW={v:?}: outside 1970 to 9999");
            }
            return Ok((secs, 0));
        }
        let t = humantime::parse_rfc3339_weak(&v).map_err(|e| anyhow::anyhow!("STRATA_NOW={v:?}: {e}"))?;
        let d =
            t.duration_since(std::time::UNIX_EPOCH).map_err(|_| anyhow::anyhow!("STRATA_NOW={v:?}: before 1970"))?;
        return Ok((d.as_secs() as i64, d.subsec_nanos()));
    }
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Ok((d.as_secs() as i64, d.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_config_reads_back_identical() {
        let c = TaskConfig {
            source: Some("/dev/sd\"x".into()),
            compression: "zstd:7".into(),
            scheme: Scheme::IncrementalForever,
            full_every: None,
            full_every_days: Some(30),
            max_chain: Some(14),
            retention: Retention { keep_last: Some(3), keep_daily: None, keep_weekly: Some(4), keep_monthly: None },
            sector_by_sector: true,
        };
        let back: TaskConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let d: TaskConfig = toml::from_str(&TaskConfig::default().to_toml()).unwrap();
        assert_eq!(d, TaskConfig::default());
    }

    #[test]
    fn zero_turns_a_rule_off_in_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::create(dir.path(), 4096).unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "full_every = 0\n[retention]\nkeep_last = 0\nkeep_daily = 2\n")
            .unwrap();
        let c = TaskConfig::load(&repo).unwrap();
        assert_eq!(c.full_every, None);
        assert_eq!(c.retention, Retention { keep_daily: Some(2), ..Retention::default() });
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(compression_level("zstd:0").is_err());
        assert!(compression_level("lz4:1").is_err());
        let c = TaskConfig { max_chain: Some(3), ..TaskConfig::default() };
        assert!(c.validate().is_err(), "max_chain needs incremental-forever");
        assert!(toml::from_str::<TaskConfig>("scheme = \"weekly\"").is_err());
        assert!(toml::from_str::<TaskConfig>("colour = 1").is_err());
    }
}
