"""Reading long chains from a slow disk: cold reads of a strata chain (through the mount and by
`strata restore`) and the time to open it (`strata list`, mount ready), with the reading
process in a block-I/O cgroup throttled to a few hundred requests a second (an HDD, a NAS), and
unthrottled. One or two strata binaries, alternating in the same go, so that a change can be
measured against the binary before it.

    python3 tests/bench/slowdisk.py [--strata BIN] [--baseline BIN] [--work DIR] [--iops 300] [--clustered]

Needs root and the cgroup v1 `blkio` or v2 `io` controller. Prints a Markdown table (medians)."""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402
from tools import MiB, drop_caches  # noqa: E402


def disk_of(path):
    """major:minor of the whole disk holding `path` (throttling applies to disks, not partitions)."""
    dev = os.stat(path).st_dev
    node = "/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev))
    if os.path.exists(os.path.join(node, "partition")):
        node = os.path.join(os.path.realpath(node), "..")
    with open(os.path.join(node, "dev")) as f:
        return f.read().strip()


class Throttle:
    """A cgroup whose processes may read `iops` requests and `bps` bytes a second from `disk`."""

    def __init__(self, disk, iops, bps):
        v1 = "/sys/fs/cgroup/blkio"
        if os.path.isdir(v1):
            self.path = os.path.join(v1, "strata-slowdisk")
            os.makedirs(self.path, exist_ok=True)
            self.write("blkio.throttle.read_iops_device", "%s %d" % (disk, iops))
            self.write("blkio.throttle.read_bps_device", "%s %d" % (disk, bps))
        else:
            root = "/sys/fs/cgroup"
            self.write_at(os.path.join(root, "cgroup.subtree_control"), "+io")
            self.path = os.path.join(root, "strata-slowdisk")
            os.makedirs(self.path, exist_ok=True)
            self.write("io.max", "%s riops=%d rbps=%d" % (disk, iops, bps))

    def write(self, name, value):
        self.write_at(os.path.join(self.path, name), value)

    @staticmethod
    def write_at(path, value):
        with open(path, "w") as f:
            f.write(value)

    def wrap(self, cmd):
        """`cmd` run inside the cgroup."""
        return ["sh", "-c", 'echo $$ > "%s/cgroup.procs" && exec "$@"' % self.path, "sh", *cmd]

    def remove(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def build_chain(work, strata, depth, mib, clustered):
    """A chain of `depth` versions of a `mib` MiB ext4 image, 64 writes of 4 KiB apart, scattered
    over the whole disk or (`clustered`) inside one random 1 MiB region per version."""
    src, files, repo = (os.path.join(work, n) for n in ("slow-src.img", "slow-files", "slow-repo"))
    subprocess.run(["rm", "-rf", repo], check=True)
    dataset.small_ext4(src, mib, files)
    rng = random.Random(7)
    for d in range(1, depth + 1):
        if d > 1:
            fd = os.open(src, os.O_WRONLY)
            region = rng.randrange(mib) * MiB
            for _ in range(64):
                at = region + rng.randrange(MiB // 4096) * 4096 if clustered else rng.randrange(mib * MiB // 4096) * 4096
                os.pwrite(fd, rng.randbytes(4096), at)
            os.close(fd)
        subprocess.run([strata, "backup", "-q", src, repo], check=True)
    os.unlink(src)
    return repo


def timed(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def opening(strata, repo, mnt, wrap, _size):
    """Cold: seconds to list the repository and to mount it."""
    out = {}
    drop_caches()
    out["list"] = timed(wrap([strata, "list", repo]))
    drop_caches()
    out["ready"] = timed(wrap([strata, "mount", "-q", repo, mnt]))
    subprocess.run([strata, "umount", mnt], check=True, stdout=subprocess.DEVNULL)
    return out


def reading(strata, repo, mnt, wrap, size):
    """Cold: MB/s of `dd` through the mount right after mounting (as the benchmark reads it: the
    indexes the mount read are cached) and of a restore."""
    out = {}
    drop_caches()
    subprocess.run(wrap([strata, "mount", "-q", repo, mnt]), check=True, stdout=subprocess.DEVNULL)
    try:
        disk = os.path.join(mnt, "latest", "disk.img")
        out["mount"] = size / 1e6 / timed(["dd", "if=" + disk, "of=/dev/null", "bs=1M"])
    finally:
        subprocess.run([strata, "umount", mnt], check=True, stdout=subprocess.DEVNULL)
    drop_caches()
    out["restore"] = size / 1e6 / timed(wrap([strata, "restore", "-q", repo, "latest", "/dev/null"]))
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strata", default=os.path.join(root, "target/release/strata"))
    ap.add_argument("--baseline", help="a second strata binary, measured in the same go")
    ap.add_argument("--work", default="/var/tmp/strata-slowdisk")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--iops", type=int, default=300)
    ap.add_argument("--mbps", type=int, default=150)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--clustered", action="store_true", help="each version's writes inside one 1 MiB region")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    mnt = os.path.join(args.work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    repo = build_chain(args.work, args.strata, args.depth, args.mib, args.clustered)
    throttle = Throttle(disk_of(repo), args.iops, args.mbps * 1000 * 1000)
    binaries = [("this", args.strata)] + ([("baseline", args.baseline)] if args.baseline else [])
    disks = [("throttled", throttle.wrap), ("unthrottled", lambda cmd: cmd)]
    results = {}
    try:
        # Opening is measured apart from reading: the disk requests that a read asked for ahead
        # and did not wait for are still queued in the throttled group when it ends.
        for run in range(args.runs):
            for measure in (opening, reading):
                for disk, wrap in disks:
                    # each binary first in every other run
                    for name, binary in binaries if run % 2 == 0 else binaries[::-1]:
                        got = measure(binary, repo, mnt, wrap, args.mib * MiB)
                        for key, value in got.items():
                            results.setdefault((disk, name, key), []).append(value)
    finally:
        throttle.remove()
    print("Depth-%d chain of a %d MiB disk (64 writes of 4 KiB per version, %s), cold page cache; "
          "throttled: %d requests/s, %d MB/s; medians of %d.\n" % (
              args.depth, args.mib, "in one 1 MiB region" if args.clustered else "scattered", args.iops, args.mbps,
              args.runs))
    print("| disk | binary | list s | mount ready s | mount dd MB/s | restore MB/s |")
    print("|---|---|---|---|---|---|")
    for disk, _ in disks:
        for name, _ in binaries:
            m = {k: statistics.median(results[(disk, name, k)]) for k in ("list", "ready", "mount", "restore")}
            print("| %s | %s | %.2f | %.2f | %.0f | %.0f |" % (disk, name, m["list"], m["ready"], m["mount"], m["restore"]))
    shutil.rmtree(repo)


if __name__ == "__main__":
    main()
