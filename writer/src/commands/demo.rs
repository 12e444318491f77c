//! `strata demo [DIR]`: the whole job on a built-in sample. Makes a small real ext4 disk image
//! (mkfs.ext4 -d), changes files in it between backups (debugfs -w), makes full, incremental and
//! differential versions, verifies the repository, restores every version and compares each with
//! a copy of the disk taken at its backup (in every block ext4 uses; free blocks come back as zeros).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use strata_format::Kind;

use crate::commands::{Global, Outcome};
use strata_engine::backup::{backup, BackupRequest};
use strata_engine::progress::NoProgress;
use strata_engine::restore::restore;
use strata_engine::units::bytes;
use strata_engine::verify::{verify, VerifyOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Work folder (default: a new folder under the system's temporary folder).
    pub dir: Option<PathBuf>,
    /// Keep the work folder afterwards.
    #[arg(long)]
    pub keep: bool,
}

const DISK_SIZE: &str = "64M";

/// Deterministic pseudo-random generator for sample content (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const WORDS: [&str; 16] = [
    "block", "image", "chain", "delta", "full", "restore", "verify", "mount", "sector", "extent", "inode", "journal",
    "backup", "volume", "digest", "snapshot",
];

/// Text of `len` bytes: words, so that it compresses like real files do.
fn sample_text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = rng.next();
        out.extend_from_slice(WORDS[(r % 16) as usize].as_bytes());
        out.push(if r.is_multiple_of(11) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| {
        format!("cannot run {:?}; the demo needs e2fsprogs (apt-get install e2fsprogs)", cmd.get_program())
    })?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn tool(name: &str) -> Command {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Command::new(p);
        }
    }
    Command::new(name)
}

/// Applies debugfs commands to the image (writes files from `files`, removes others).
fn debugfs(image: &Path, work: &Path, commands: &str) -> Result<()> {
    let script = work.join("debugfs.cmds");
    std::fs::write(&script, commands)?;
    run_tool(tool("debugfs").arg("-w").arg("-f").arg(&script).arg(image))
}

/// Whether the restored image `restored` is the disk `disk` as a used-blocks backup keeps it:
/// byte-identical wherever the file system uses the disk, zero where it does not.
fn same_content(restored: &Path, disk: &Path) -> Result<bool> {
    let (x, mut y) = (std::fs::read(restored)?, std::fs::read(disk)?);
    let analysis = strata_format::volume::analyse(&y, y.len() as u64);
    for &(start, end) in analysis.unused() {
        y[start as usize..end as usize].fill(0);
    }
    Ok(x == y)
}

pub fn run(args: Args, global: &Global) -> Result<Outcome> {
    let work = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("strata-demo-{}", std::process::id())),
    };
    if work.exists() && work.read_dir()?.next().is_some() {
        bail!("{}: the demo folder must be new or empty", work.display());
    }
    std::fs::create_dir_all(&work)?;
    let result = demo(&work, global);
    if args.keep || result.is_err() {
        eprintln!("strata: demo files kept in {} (repository: {}/repo)", work.display(), work.display());
    } else {
        std::fs::remove_dir_all(&work).ok();
        if !global.quiet {
            println!("demo: done (run `strata demo --keep DIR` to keep the disk, repository and restores)");
        }
    }
    result
}

fn demo(work: &Path, global: &Global) -> Result<Outcome> {
    let say = |s: String| {
        if !global.quiet {
            println!("{s}");
        }
    };
    let files = work.join("files");
    let states = work.join("states");
    let restored = work.join("restored");
    let repo = work.join("repo");
    for d in [&files, &states, &restored] {
        std::fs::create_dir_all(d)?;
    }
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    for i in 0..40 {
        let len = 4096 + (rng.next() % 400_000) as usize;
        std::fs::write(files.join(format!("doc{i:02}.txt")), sample_text(&mut rng, len))?;
    }
    let disk = work.join("disk.img");
    say(format!("demo: making a {DISK_SIZE} ext4 disk image with 40 files in {}", disk.display()));
    run_tool(
        tool("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", "strata-demo", "-d"])
            .arg(&files)
            .arg(&disk)
            .arg(DISK_SIZE),
    )?;

    // (what to back up as, debugfs commands applied before the backup)
    let steps: Vec<(Option<Kind>, &str, String)> = vec![
        (None, "first backup", String::new()),
        (None, "report added", "write {F}/new.txt /report.txt\nrm /doc03.txt\n".into()),
        (None, "two more files", "write {F}/new.txt /notes.txt\nwrite {F}/doc10.txt /copy10.txt\n".into()),
        (Some(Kind::Differential), "a file replaced", "rm /doc20.txt\nwrite {F}/new.txt /doc20.txt\n".into()),
        (
            None,
            "a new folder",
            "mkdir /archive\nwrite {F}/doc01.txt /archive/a.txt\nwrite {F}/doc02.txt /archive/b.txt\n".into(),
        ),
        (Some(Kind::Differential), "report redone", "rm /report.txt\nwrite {F}/doc30.txt /report.txt\n".into()),
    ];
    let mut versions = Vec::new();
    for (step, (kind, what, cmds)) in steps.iter().enumerate() {
        if !cmds.is_empty() {
            let len = 20_000 + (rng.next() % 200_000) as usize;
            std::fs::write(files.join("new.txt"), sample_text(&mut rng, len))?;
            debugfs(&disk, work, &cmds.replace("{F}", &files.display().to_string()))?;
        }
        let req = BackupRequest {
            source: Some(disk.clone()),
            repo: repo.clone(),
            storage: None,
            kind: *kind,
            block_size: None,
            level: Some(3),
            label: what.to_string(),
            sector_by_sector: false,
        };
        let s = backup(&req, &NoProgress)?;
        std::fs::copy(&disk, states.join(format!("v{}.img", s.id)))?;
        say(format!(
            "step {}: {what:<15} -> version {} {:<12} {:>5}/{} blocks changed, stored {}",
            step + 1,
            s.id,
            s.kind,
            s.changed_blocks,
            s.total_blocks,
            bytes(s.stored_bytes)
        ));
        versions.push(s.id);
    }

    let report = verify(&repo, &VerifyOptions { versions: &[], quick: false }, &NoProgress)?;
    say(format!(
        "verify: {} images, {} versions: {}",
        report.images.len(),
        report.versions.len(),
        if report.ok { "all sound, every digest verified" } else { "DAMAGE FOUND" }
    ));
    if !report.ok {
        bail!("verify found damage in a repository the demo just wrote");
    }

    let mut all_ok = true;
    let mut identical = Vec::new();
    for &id in &versions {
        let target = restored.join(format!("v{id}.img"));
        restore(&repo, &id.to_string(), &target, false, &NoProgress)?;
        let same = same_content(&target, &states.join(format!("v{id}.img")))?;
        all_ok &= same;
        identical.push(same);
    }
    if !global.quiet {
        let rows = super::list::rows(&repo)?;
        println!();
        super::list::print_table(&rows);
        println!();
        for (id, same) in versions.iter().zip(&identical) {
            println!(
                "restore version {id}: {}",
                if *same {
                    "byte-identical to the disk at its backup in every block ext4 uses"
                } else {
                    "DIFFERS from the disk at its backup"
                }
            );
        }
    }
    if !all_ok {
        bail!("a restored version differs from the disk it was backed up from");
    }
    if let Some(&newest) = versions.last() {
        show_mount(work, &repo, &states, newest, global)?;
    }
    Ok(Outcome::Success)
}

/// Whether `strata mount` can work here: /dev/fuse, and root or fusermount3.
fn fuse_usable() -> Result<(), &'static str> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse (modprobe fuse)");
    }
    let root = nix::unistd::geteuid().is_root();
    let fusermount = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("fusermount3").exists()));
    match root || fusermount {
        true => Ok(()),
        false => Err("fusermount3 is missing (apt-get install fuse3)"),
    }
}

/// Unmounts the demo's mount when the demo ends, whichever way.
struct DemoMount<'a> {
    exe: &'a Path,
    dir: &'a Path,
}

impl Drop for DemoMount<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.exe).arg("-q").arg("umount").arg(self.dir).status();
    }
}

/// Mounts the repository, lists its versions and the files of the newest, reads one file back
/// from the mounted disk.img (debugfs reads the image; no loop device, no root), compares it
/// with the same file in the disk as it was at that backup, and unmounts.
fn show_mount(work: &Path, repo: &Path, states: &Path, id: u64, global: &Global) -> Result<()> {
    let say = |s: String| {
        if !global.quiet {
            println!("{s}");
        }
    };
    if let Err(why) = fuse_usable() {
        say(format!("mount: skipped: {why}; with FUSE the demo mounts every version read-only"));
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding the strata binary to mount with")?;
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let out = Command::new(&exe).arg("-q").arg("mount").arg(repo).arg(&mnt).output()?;
    if !out.status.success() {
        say(format!("mount: skipped: {}", String::from_utf8_lossy(&out.stderr).trim()));
        return Ok(());
    }
    let _mounted = DemoMount { exe: &exe, dir: &mnt };
    let mut shown: Vec<String> =
        std::fs::read_dir(&mnt)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    shown.sort_by_key(|n| n.parse::<u64>().unwrap_or(u64::MAX));
    say(String::new());
    say(format!("$ strata mount {} {}", repo.display(), mnt.display()));
    say(format!("$ ls {}\n{}", mnt.display(), shown.join("  ")));
    let disk = mnt.join(id.to_string()).join("disk.img");
    let listing = debugfs_read(&disk, "ls -p /")?;
    let listing = String::from_utf8_lossy(&listing).into_owned();
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('/').nth(5).filter(|n| !n.is_empty() && *n != "." && *n != ".."))
        .collect();
    say(format!(
        "$ debugfs -R 'ls /' {}   # the files of version {id}, read through the mount\n{} entries: {} ...",
        disk.display(),
        names.len(),
        names.iter().take(6).copied().collect::<Vec<_>>().join("  ")
    ));
    let file = "/report.txt";
    let through_mount = debugfs_read(&disk, &format!("cat {file}"))?;
    let at_backup = debugfs_read(&states.join(format!("v{id}.img")), &format!("cat {file}"))?;
    if through_mount != at_backup || through_mount.is_empty() {
        bail!("{file} read through the mount of version {id} differs from the file at that backup");
    }
    say(format!(
        "$ debugfs -R 'cat {file}' {}\n{} read back, identical to {file} at backup {id}",
        disk.display(),
        bytes(through_mount.len() as u64)
    ));
    say(format!("$ strata umount {}", mnt.display()));
    Ok(())
}

/// Runs one read-only debugfs request on an image and returns what it printed.
fn debugfs_read(image: &Path, request: &str) -> Result<Vec<u8>> {
    let out = tool("debugfs").arg("-R").arg(request).arg(image).output().context("running debugfs")?;
    if !out.status.success() {
        bail!("debugfs -R {request:?} {}: {}", image.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
