//! Read-ahead of a delta image's data for a reader that goes through it in order. A version's
//! read takes frames from every image of its chain, and from a delta only the blocks that
//! changed: small reads spread over the file with gaps between them, which the kernel takes
//! for random ones and reads one at a time, each a wait on a cold disk (a disk that serves a
//! few hundred reads a second read a 100-deep chain at a fifth of the speed of its full). When
//! a delta's frames are read at rising offsets, the kernel is asked (`POSIX_FADV_WILLNEED`) for
//! the bytes ahead of the last read, one request per half window: next to nothing when they are
//! cached. The window is the part of the image that holds about the next `DISK_AHEAD` bytes of
//! the disk, so that the images of a long chain are read a little at a time as the reader goes,
//! not all at its start. Reads that jump around an image ask for nothing, and so do the reads
//! of an image that no version opened here reads an eighth of (a delta deep in a long chain,
//! whose blocks later versions replaced): reading ahead there would read mostly bytes nobody
//! wants. A full is read in order from end to end, and the kernel's own read-ahead serves it
//! better (in larger requests) than this would. Before its first read, any image can be
//! *primed*: the kernel is asked for the one frame the reader will want first from it (all of
//! it, for a read-ahead image that fits in one window) (`VersionReader::prime_from`), so that
//! the images of a chain are not each first read with a wait on the disk when the reader
//! reaches them.

use crate::storage::Blob;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

/// How far ahead on the disk the images are read.
pub const DISK_AHEAD: u64 = 16 << 20;
/// Bounds of the window in an image's bytes.
const MIN_WINDOW: u64 = 256 << 10;
const MAX_WINDOW: u64 = 2 << 20;
/// How far behind the furthest read so far a read still counts as going forward (threads
/// decoding side by side finish their reads a little out of order), and how far ahead of it
/// (a delta's reader skips the frames that later versions replaced).
const SLACK_BEHIND: u64 = 256 << 10;
const SLACK_AHEAD: u64 = 1 << 20;

/// The share of an image's entries (in thousandths) that a version must read for its reads to
/// be read ahead.
const MIN_LIVE_PERMILLE: u32 = 125;

#[derive(Debug)]
pub struct ReadAhead {
    data_start: u64,
    window: u64,
    state: Mutex<State>,
    /// The largest share of the image's entries, in thousandths, that a version opened by this
    /// process reads.
    live_permille: AtomicU32,
    /// Whether the kernel was asked for the frame a reader wants first, or the image was read.
    primed: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// Where the reads of this image have reached.
    reached: u64,
    /// Where the range already asked for ends.
    asked_to: u64,
}

impl ReadAhead {
    /// For an image whose `data_len` bytes of data, from `data_start`, hold blocks of a disk of
    /// `disk_len` bytes.
    pub fn new(data_start: u64, data_len: u64, disk_len: u64) -> ReadAhead {
        let window = u128::from(data_len) * u128::from(DISK_AHEAD) / u128::from(disk_len.max(1));
        ReadAhead {
            data_start,
            window: u64::try_from(window).unwrap_or(MAX_WINDOW).clamp(MIN_WINDOW, MAX_WINDOW),
            state: Mutex::new(State { reached: data_start, asked_to: data_start }),
            live_permille: AtomicU32::new(0),
            primed: AtomicBool::new(false),
        }
    }

    /// Whether `prime` would ask for nothing.
    pub fn primed(&self) -> bool {
        self.primed.load(Ordering::Relaxed)
    }

    /// Asks the kernel for the `len` bytes at `at` (the frame a reader will want first from
    /// this image), unless the image was primed or read before. An image whose reads are read
    /// ahead and whose whole data (up to `limit`) fits in one window is asked for whole from
    /// there: one request, where its reads would ask for the frame and then the window after it
    /// when they get there, each a wait on a cold disk (a 100-deep chain of writes clustered
    /// per version, ~230 KiB deltas: 438 -> 520 MB/s read through the mount with the reader
    /// throttled to 300 requests/s, `slowdisk.py`). Larger images, whose share of the next
    /// stretch of the disk is a small part of them, still get only the frame.
    pub fn prime(&self, file: &dyn Blob, at: u64, len: u64, limit: u64) {
        if self.primed.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut end = at + len;
        if self.enabled() && limit - self.data_start <= self.window {
            let mut s = self.state.lock().unwrap();
            end = end.max(limit);
            if s.asked_to < end {
                s.asked_to = end;
                s.reached = s.reached.max(at);
            }
        }
        file.will_need(at, end - at);
    }

    /// Notes that a version reads `live` of the image's `entries` entries.
    pub fn note_live(&self, live: u64, entries: u64) {
        let permille = u32::try_from(live.saturating_mul(1000) / entries.max(1)).unwrap_or(1000);
        self.live_permille.fetch_max(permille, Ordering::Relaxed);
    }

    /// Whether reads are read ahead (given where they go).
    pub fn enabled(&self) -> bool {
        self.live_permille.load(Ordering::Relaxed) >= MIN_LIVE_PERMILLE
    }

    /// Notes a read of `len` bytes at `at`, and asks the kernel for the bytes after it up to
    /// `limit` (the end of the data) when the reads are going forward, the image is read densely
    /// enough, and the range asked for ends within half a window of this read.
    pub fn note(&self, file: &dyn Blob, at: u64, len: u64, limit: u64) {
        if !self.primed() {
            self.primed.store(true, Ordering::Relaxed);
        }
        if !self.enabled() {
            return;
        }
        let end = at + len;
        let (from, to) = {
            let mut s = self.state.lock().unwrap();
            let forward = at + SLACK_BEHIND >= s.reached && at <= s.reached + SLACK_AHEAD.max(self.window);
            s.reached = if forward { s.reached.max(end) } else { end };
            if !forward || end + self.window / 2 <= s.asked_to {
                return;
            }
            let from = s.asked_to.max(end);
            s.asked_to = (end + self.window).min(limit).max(from);
            (from, s.asked_to)
        };
        if to > from {
            file.will_need(from, to - from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the advice goes to: the tests look at what was asked for, not at what was read.
    #[derive(Debug)]
    struct NoFile;

    impl Blob for NoFile {
        fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<usize> {
            Ok(0)
        }

        fn len(&self) -> std::io::Result<u64> {
            Ok(0)
        }
    }

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// Where the range asked for ends after each of `reads`, for an image with `data_len`
    /// bytes of a 256 MiB disk of which a version reads `live` thousandths.
    fn asked_live(data_len: u64, live: u64, reads: &[(u64, u64)]) -> Vec<u64> {
        let file = NoFile;
        let ra = ReadAhead::new(100, data_len, 256 * MIB);
        ra.note_live(live, 1000);
        reads
            .iter()
            .map(|&(at, len)| {
                ra.note(&file, at, len, 100 + data_len);
                ra.state.lock().unwrap().asked_to
            })
            .collect()
    }

    fn asked(data_len: u64, reads: &[(u64, u64)]) -> Vec<u64> {
        asked_live(data_len, 1000, reads)
    }

    /// `count` reads of `len` bytes, one every `every` bytes from the start of the data.
    fn every(count: u64, len: u64, every: u64) -> Vec<(u64, u64)> {
        (0..count).map(|i| (100 + i * every, len)).collect()
    }

    #[test]
    fn the_window_is_the_part_of_the_image_for_the_next_bytes_of_the_disk() {
        assert_eq!(ReadAhead::new(100, 64 * MIB, 256 * MIB).window, MAX_WINDOW);
        assert_eq!(ReadAhead::new(100, 16 * MIB, 256 * MIB).window, MIB);
        assert_eq!(ReadAhead::new(100, 100 * KIB, 256 * MIB).window, MIN_WINDOW);
        assert_eq!(ReadAhead::new(100, 100 * KIB, 0).window, MAX_WINDOW);
    }

    #[test]
    fn forward_reads_ask_a_window_ahead_once_per_half_window() {
        // a 16 MiB image: a 1 MiB window; 64 KiB frames back to back
        let got = asked(16 * MIB, &every(12, 64 * KIB, 64 * KIB));
        assert_eq!(got[0], 100 + 64 * KIB + MIB);
        assert!(got[1..9].iter().all(|&a| a == got[0]), "{got:?}");
        assert_eq!(got[9], 100 + 640 * KIB + MIB, "half the window used: the next half asked");
    }

    #[test]
    fn an_image_that_no_version_reads_an_eighth_of_asks_nothing() {
        let reads = every(50, 4 * KIB, 4 * KIB);
        assert!(asked_live(16 * MIB, 124, &reads).iter().all(|&a| a == 100));
        assert!(asked_live(16 * MIB, 125, &reads).iter().all(|&a| a > 100));
        // the largest share any version reads counts
        let ra = ReadAhead::new(100, 16 * MIB, 256 * MIB);
        ra.note_live(1, 2);
        ra.note_live(1, 100);
        assert_eq!(ra.live_permille.load(Ordering::Relaxed), 500);
    }

    #[test]
    fn reads_a_little_out_of_order_still_go_forward() {
        let a_little =
            asked(16 * MIB, &[(100, 4 * KIB), (700 * KIB, 4 * KIB), (600 * KIB, 4 * KIB), (1300 * KIB, 4 * KIB)]);
        assert_eq!(a_little[3], 1304 * KIB + MIB);
        let far_back =
            asked(16 * MIB, &[(100, 4 * KIB), (700 * KIB, 4 * KIB), (100 * KIB, 4 * KIB), (1300 * KIB, 4 * KIB)]);
        assert_eq!(far_back[3], far_back[2], "a read far back starts over: the next jumps");
    }

    #[test]
    fn jumps_ask_nothing() {
        let got = asked(100 * MIB, &[(50 * MIB, 4096), (10 * MIB, 4096), (30 * MIB, 4096)]);
        assert_eq!(got, vec![100, 100, 100]);
    }

    /// What priming an image of `data_len` bytes (of which a version reads `live` thousandths)
    /// at its frame `at..at + len` leaves asked for.
    fn primed(data_len: u64, live: u64, at: u64, len: u64) -> u64 {
        let file = NoFile;
        let ra = ReadAhead::new(100, data_len, 256 * MIB);
        ra.note_live(live, 1000);
        ra.prime(&file, at, len, 100 + data_len);
        let asked_to = ra.state.lock().unwrap().asked_to;
        ra.prime(&file, 100, data_len, 100 + data_len);
        assert_eq!(ra.state.lock().unwrap().asked_to, asked_to, "an image is primed once");
        asked_to
    }

    #[test]
    fn a_small_image_that_is_read_ahead_is_primed_whole() {
        // 200 KiB of data, within one window (256 KiB): asked for whole from the first frame
        assert_eq!(primed(200 * KIB, 1000, 100 + 50 * KIB, 20 * KIB), 100 + 200 * KIB);
        // and the reader's first read there goes on from it rather than asking again
        let file = NoFile;
        let ra = ReadAhead::new(100, 200 * KIB, 256 * MIB);
        ra.note_live(1000, 1000);
        ra.prime(&file, 100 + 50 * KIB, 20 * KIB, 100 + 200 * KIB);
        ra.note(&file, 100 + 50 * KIB, 20 * KIB, 100 + 200 * KIB);
        assert_eq!(ra.state.lock().unwrap().reached, 100 + 70 * KIB);
        // larger than a window, or not read ahead: only the frame is asked for (nothing noted)
        assert_eq!(primed(400 * KIB, 1000, 100, 20 * KIB), 100);
        assert_eq!(primed(200 * KIB, 100, 100, 20 * KIB), 100);
    }

    #[test]
    fn the_range_asked_for_stops_at_the_end_of_the_data() {
        let got = asked(20 * KIB, &[(100, 4 * KIB)]);
        assert_eq!(got, vec![100 + 20 * KIB]);
    }
}
