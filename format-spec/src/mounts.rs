//! The mounts of this process's namespace, from `/proc/self/mountinfo`: what restore checks
//! before writing a device, what a used-blocks backup checks before reading one, and what the
//! mount and umount commands look for at a mount point.

use std::path::Path;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted file system.
    pub devno: String,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    /// Whether the file system itself (not just this mount) is read-write.
    pub super_rw: bool,
}

/// Every mount of this process's namespace, oldest first.
pub fn mounts() -> Vec<MountInfo> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// What is mounted exactly at `path` (the newest mount there).
pub fn mount_info(path: &Path) -> Option<MountInfo> {
    let want = path.to_string_lossy();
    mounts().into_iter().rev().find(|m| m.mount_point == want)
}

/// The mount point of the file system on device `devno` (`major:minor`), if it is mounted.
pub fn mount_point_of(devno: &str) -> Option<String> {
    mounts().into_iter().find(|m| m.devno == devno).map(|m| m.mount_point)
}

fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let head: Vec<&str> = head.split(' ').collect();
            let tail: Vec<&str> = tail.split(' ').collect();
            Some(MountInfo {
                devno: head.get(2)?.to_string(),
                mount_point: unescape(head.get(4)?),
                fstype: tail.first()?.to_string(),
                source: unescape(tail.get(1)?),
                super_rw: tail.get(2)?.split(',').any(|o| o == "rw"),
            })
        })
        .collect()
}

/// mountinfo and /proc/swaps escape spaces and the like as `\NNN` (octal).
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_device_mountpoint_type_source_and_rw() {
        let text = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    37 35 7:1 / /media ro - xfs /dev/loop1 ro\n";
        let lines = parse(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].devno, "98:0");
        assert_eq!(lines[0].mount_point, "/mnt/my disk");
        assert_eq!((lines[0].fstype.as_str(), lines[0].source.as_str()), ("ext3", "/dev/root"));
        assert!(lines[0].super_rw);
        assert!(!lines[1].super_rw);
    }

    #[test]
    fn this_process_sees_its_root_mount() {
        assert!(mounts().iter().any(|m| m.mount_point == "/"));
    }
}
