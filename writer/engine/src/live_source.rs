//! Whether a backup source is in use read-write: mounted read-write (itself, one of its
//! partitions, or a device stacked on them), or active as swap. A used-blocks backup reads a
//! file system's allocation map first and its blocks after; on a live file system the map is
//! stale by then and blocks written meanwhile would be missed, so such a source is refused.
//!
//! A block device is matched by device number through sysfs (`/sys/dev/block/M:m`, its
//! partitions and `holders`); a regular file through the loop devices backed by it and the
//! mounts that name it as their source (FUSE file systems such as fuse2fs or ntfs-3g).

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use strata_format::mounts::{mounts, unescape};

/// A device number as sysfs and mountinfo write it, `major:minor`.
type DevNo = String;

fn devno(rdev: u64) -> DevNo {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// The sysfs folder of a block device, e.g. `/sys/devices/.../sdb`.
fn sysfs_dir(dev: &str) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/dev/block/{dev}")).ok()
}

/// `dev`, its partitions, and every device stacked on any of them (holders), recursively.
fn related_devices(dev: &str, into: &mut BTreeSet<DevNo>) {
    if into.len() > 4096 || !into.insert(dev.to_string()) {
        return;
    }
    let Some(dir) = sysfs_dir(dev) else { return };
    let mut children: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        children.extend(entries.flatten().map(|e| e.path()).filter(|p| p.join("partition").exists()));
    }
    if let Ok(entries) = std::fs::read_dir(dir.join("holders")) {
        children.extend(entries.flatten().map(|e| e.path()));
    }
    for child in children {
        if let Ok(text) = std::fs::read_to_string(child.join("dev")) {
            related_devices(text.trim(), into);
        }
    }
}

/// The loop devices whose backing file is `file` (same device and inode).
fn loop_devices_backed_by(file: &std::fs::Metadata) -> Vec<DevNo> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return found };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(backing) = std::fs::read_to_string(dir.join("loop/backing_file")) else { continue };
        let backing = backing.trim_end_matches('\n').trim_end_matches(" (deleted)");
        let same = std::fs::metadata(backing).is_ok_and(|m| m.dev() == file.dev() && m.ino() == file.ino());
        if same {
            if let Ok(dev) = std::fs::read_to_string(dir.join("dev")) {
                found.push(dev.trim().to_string());
            }
        }
    }
    found
}

/// Why `path` (opened as `meta`) must not be backed up by its used blocks now, if it must not:
/// what is mounted read-write or swapped on, and where.
pub fn in_use_read_write(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    let mut devices = BTreeSet::new();
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if meta.file_type().is_block_device() {
        related_devices(&devno(meta.rdev()), &mut devices);
    } else {
        for dev in loop_devices_backed_by(meta) {
            related_devices(&dev, &mut devices);
        }
    }
    let names_source = |source: &str| {
        if !source.starts_with('/') {
            return false;
        }
        match std::fs::metadata(source) {
            Ok(m) if m.file_type().is_block_device() => devices.contains(&devno(m.rdev())),
            Ok(m) => m.dev() == meta.dev() && m.ino() == meta.ino() && !meta.file_type().is_block_device(),
            Err(_) => Path::new(source) == canonical,
        }
    };
    for m in mounts() {
        if m.super_rw && (devices.contains(&m.devno) || names_source(&m.source)) {
            return Some(format!("{} is mounted read-write on {}", m.source, m.mount_point));
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for line in swaps.lines().skip(1) {
        if let Some(name) = line.split_whitespace().next().map(unescape) {
            if names_source(&name) {
                return Some(format!("{name} is in use as swap"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_nothing_uses_is_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        assert_eq!(in_use_read_write(&path, &std::fs::metadata(&path).unwrap()), None);
    }
}
