//! Helpers shared by the parsers' tests: tools that must exist under CI, running them,
//! deterministic content, a borrowed image as a disk.

use std::process::Command;

/// Whether every tool is installed; a missing one fails the test under CI=true.
pub(crate) fn have_tools(tools: &[&str]) -> bool {
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} missing");
            eprintln!("skipped: {tool} missing");
            return false;
        }
    }
    true
}

pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).env("MTOOLS_SKIP_CHECK", "1").output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic numbers (xorshift); the seed must not be 0.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Deterministic bytes that differ from file to file.
pub(crate) fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).bytes(len)
}

/// A borrowed image as a disk (a bare slice cannot stand behind `dyn DiskRead`).
pub(crate) struct Bytes<'a>(pub &'a [u8]);

impl crate::volume::DiskRead for Bytes<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read_at(offset, buf)
    }
}
