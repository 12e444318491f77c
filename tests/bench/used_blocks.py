#!/usr/bin/env python3
"""strata's used-blocks backups against partclone (Clonezilla's engine, `partclone.<fs> -c`
piped to `zstd -3 -T2`) on aged ext4, XFS and NTFS file systems and on a GPT disk with an ext4,
an NTFS and an unknown partition, in the same runs: stored bytes and time of the full, and
strata's incremental against the ideal one. Writes its section of BENCHMARKS.md.

Run through tests/bench/used_blocks.sh, which installs partclone and builds strata; as root (it
drops the page cache, attaches loop devices and mounts the images)."""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset import UUID, MiB, changed_blocks, copy_files, rewrite, run, take, usr_files, zstd_of_blocks  # noqa: E402
from tools import drop_caches, link_live, measure, pids_with_arg, tree_bytes, wait_for  # noqa: E402

# Bumped whenever the recipe changes, so that older images in WORKDIR are rebuilt.
RECIPE = "fsbench 2"
PAGE = 4096
FUSERMOUNT = shutil.which("fusermount3") or "fusermount"
# GPT type GUIDs of the disk's partitions; the third is one no tool recognizes.
LINUX, BASIC_DATA, UNKNOWN = ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
                              "8DA63339-0007-60C0-C436-083AC8230908")


@dataclass
class Part:
    """A partition of the disk: its file system (None: unknown) and size."""
    fs: str
    mib: int


@dataclass
class Image:
    name: str
    fs: str          # the file system of a bare image, or "disk"
    mib: int
    parts: tuple = ()


def images(fs_mib):
    """The four sources, scaled to `fs_mib` MiB each (2048 in the full run): the disk splits that
    into an ext4 and an NTFS partition and a small unknown one."""
    unknown = max(4, fs_mib // 64)
    half = (fs_mib - unknown - 4) // 2
    disk = (Part("ext4", half), Part("ntfs", half), Part(None, unknown))
    return [Image("ext4", "ext4", fs_mib), Image("xfs", "xfs", fs_mib), Image("ntfs", "ntfs", fs_mib),
            Image("disk", "disk", fs_mib, disk)]


def log(msg):
    print("used_blocks: " + msg, file=sys.stderr, flush=True)


def sh(cmd):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


# -- loop devices and mounts ---------------------------------------------------------------
class Loop:
    """`size` bytes of `image` from `start` (None: all of it) attached to a loop device, detached
    when the block ends, whatever happens."""

    def __init__(self, image, start=0, size=None, read_only=False):
        span = ["-o", str(start), "--sizelimit", str(size)] if size else []
        self.cmd = ["losetup", "--show", "-f", *span] + ["-r"] * read_only + [image]

    def __enter__(self):
        self.dev = sh(self.cmd).strip()
        return self.dev

    def __exit__(self, *exc):
        run(["losetup", "-d", self.dev])


class Mount:
    """File system `fs` of device `dev` mounted at `mnt` (NTFS through ntfs-3g), unmounted cleanly
    when the block ends: synced, and for ntfs-3g the server gone before the device is let go."""

    def __init__(self, fs, dev, mnt, read_only=False):
        self.fs, self.dev, self.mnt, self.read_only = fs, dev, mnt, read_only

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        ro = ["-o", "ro"] if self.read_only else []
        run(["ntfs-3g", *ro, self.dev, self.mnt] if self.fs == "ntfs" else ["mount", *ro, self.dev, self.mnt])
        return self.mnt

    def __exit__(self, *exc):
        run(["sync", "-f", self.mnt])
        if self.fs == "ntfs":
            run([FUSERMOUNT, "-u", self.mnt])
            wait_for(lambda: not pids_with_arg(self.mnt), 60, "ntfs-3g to exit")
        else:
            run(["umount", self.mnt])


def mkfs(fs, dev):
    run({"ext4": ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", UUID, "-E", "hash_seed=" + UUID, dev],
         "xfs": ["mkfs.xfs", "-q", "-f", "-m", "uuid=" + UUID, dev],
         "ntfs": ["mkntfs", "-q", "-Q", "-F", "-L", "fsbench", dev]}[fs])


def loops(stack, img, path, read_only=False):
    """A loop device for each partition of a disk image (this kernel reads no partition table:
    `losetup -P` finds none), or one for a bare file system; detached when `stack` closes."""
    spans = partitions(path) if img.fs == "disk" else [(0, None)]
    return [stack.enter_context(Loop(path, start, size, read_only)) for start, size in spans]


def fs_devices(img, devs):
    """(file system, device) of each recognized file system, from the devices of `loops`."""
    kinds = [p.fs for p in img.parts] if img.fs == "disk" else [img.fs]
    return [(fs, dev) for fs, dev in zip(kinds, devs) if fs]


# -- building the aged images ----------------------------------------------------------------
def regular_files(root):
    out = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(top, f) for f in sorted(files) if os.path.isfile(os.path.join(top, f))]
    return out


def age(root, files, first, mib):
    """Write 3/4 of the file system's size in files (from files[first] on), sync, delete 6 of
    every 7, then write a seventh more of new files (2048 MiB: 1536 written, 300 new). Returns
    the next unused file."""
    old, nxt = take(files, first, mib * 3 // 4)
    copy_files(old, root, "old")
    run(["sync", "-f", root])  # the deleted files' blocks must have reached the disk
    for i, (path, _) in enumerate(old):
        if i % 7:
            os.unlink(os.path.join(root, "old", path.lstrip("/")))
    new, nxt = take(files, nxt, mib * 300 // 2048)
    copy_files(new, root, "new")
    return nxt


def change(root, files, nxt, mib):
    """The second version: every 33rd file rewritten with new bytes (from files[nxt] on), every
    100th deleted, and a fortieth of the file system's size in new files added. Returns the next
    unused file."""
    for i, path in enumerate(regular_files(root)):
        if i % 33 == 0:
            rewrite(path, files[nxt][0])
            nxt += 1
        elif i % 100 == 50:
            os.unlink(path)
    added, nxt = take(files, nxt, mib // 40)
    copy_files(added, root, "v2")
    return nxt


def write_at(path, offset, files, nbytes):
    """Bytes of /usr files, back to back, written at `offset` of `path` (the unknown partition)."""
    with open(path, "r+b") as out:
        out.seek(offset)
        left = nbytes
        for src, _ in files:
            with open(src, "rb") as f:
                data = f.read(left)
            out.write(data)
            left -= len(data)
            if not left:
                break


def partition_table(img):
    lines = ["label: gpt", "label-id: %s" % UUID.upper(), "first-lba: 2048"]
    start = MiB
    for i, p in enumerate(img.parts):
        start += MiB * (i == len(img.parts) - 1)  # a 1 MiB gap before the last partition
        kind = {"ext4": LINUX, "ntfs": BASIC_DATA, None: UNKNOWN}[p.fs]
        lines.append("start=%d, size=%d, type=%s, uuid=%s" % (start // 512, p.mib * MiB // 512, kind,
                                                             UUID[:-2].upper() + "%02d" % (i + 1)))
        start += p.mib * MiB
    return "\n".join(lines) + "\n"


def partitions(path):
    """(start, size) in bytes of each partition of the disk image at `path`."""
    table = json.loads(sh(["sfdisk", "--json", path]))["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]


def fs_sizes(img):
    """The size in MiB of each recognized file system of the image."""
    return [p.mib for p in img.parts if p.fs] or [img.mib]


def build_v1(img, path, files, mnt):
    """The aged first version; returns the next file of /usr it did not use. The file systems of
    a disk hold different files (no copy can find one partition's files in another's)."""
    with open(path, "wb") as f:
        f.truncate(img.mib * MiB)
    if img.fs == "disk":
        subprocess.run(["sfdisk", "-q", path], input=partition_table(img), text=True, check=True)
    nxt = 0
    with contextlib.ExitStack() as stack:
        for (fs, fdev), mib in zip(fs_devices(img, loops(stack, img, path)), fs_sizes(img)):
            mkfs(fs, fdev)
            with Mount(fs, fdev, mnt) as root:
                nxt = age(root, files, nxt, mib)
    if img.fs == "disk":
        start, size = partitions(path)[-1]
        write_at(path, start, files[nxt:], size // 2)
        nxt = take(files, nxt, size // 2 // MiB)[1]
    return nxt


def build_v2(img, v1, v2, files, nxt, mnt):
    run(["cp", "--sparse=always", v1, v2])
    with contextlib.ExitStack() as stack:
        for (fs, fdev), mib in zip(fs_devices(img, loops(stack, img, v2)), fs_sizes(img)):
            with Mount(fs, fdev, mnt) as root:
                nxt = change(root, files, nxt, mib)
    if img.fs == "disk":
        start, _ = partitions(v2)[-1]
        write_at(v2, start, files[nxt:], MiB)  # a MiB of the unknown partition rewritten


class Sources:
    """The aged images, v1 and v2 of each, built once per recipe and scale in `dir`."""

    def __init__(self, work, fs_mib):
        self.dir = os.path.join(work, "images")
        self.mnt = os.path.join(work, "mnt")
        self.fs_mib = fs_mib
        self.images = images(fs_mib)

    def path(self, img, v):
        return os.path.join(self.dir, "%s-v%d.img" % (img.name, v))

    def stamp(self):
        return "%s %d MiB" % (RECIPE, self.fs_mib)

    def ready(self):
        try:
            with open(os.path.join(self.dir, "done")) as f:
                return f.read().strip() == self.stamp()
        except OSError:
            return False

    def build(self):
        subprocess.run(["rm", "-rf", self.dir], check=True)
        os.makedirs(self.dir)
        files = usr_files()
        for img in self.images:
            t0 = time.monotonic()
            nxt = build_v1(img, self.path(img, 1), files, self.mnt)
            build_v2(img, self.path(img, 1), self.path(img, 2), files, nxt, self.mnt)
            log("built %s v1 and v2 in %.0f s" % (img.name, time.monotonic() - t0))
        with open(os.path.join(self.dir, "done"), "w") as f:
            f.write(self.stamp() + "\n")


# -- what the file systems use (partclone's map) ---------------------------------------------
def domain_ranges(fs, dev, offset, work):
    """(start, length) of the bytes file system `fs` on `dev` uses, as partclone maps them
    (`-D`: a ddrescue domain log), shifted by `offset`."""
    out = os.path.join(work, "domain.log")
    run(["partclone." + fs, "-q", "-D", "-s", dev, "-O", out, "-L", os.path.join(work, "partclone.log"),
         "--offset_domain=%d" % offset], stderr=subprocess.DEVNULL)
    ranges = []
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "+" and not line.startswith("#"):
                ranges.append((int(parts[0], 16), int(parts[1], 16)))
    os.unlink(out)
    return ranges


def used_ranges(img, path, work):
    """The bytes of the image a file-system-aware copy must keep: what partclone maps as used in
    each file system, and everything outside them (tables, gaps, the unknown partition)."""
    if img.fs != "disk":
        return domain_ranges(img.fs, path, 0, work)
    ranges, pos = [], 0
    with contextlib.ExitStack() as stack:
        for dev, (start, size), p in zip(loops(stack, img, path, True), partitions(path), img.parts):
            if p.fs:
                ranges += [(pos, start - pos)] + domain_ranges(p.fs, dev, start, work)
                pos = start + size
    return ranges + [(pos, os.path.getsize(path) - pos)]


def page_map(ranges, size):
    """One byte per 4 KiB page of the image: 1 where a used range touches it."""
    used = bytearray(size // PAGE)
    for start, length in ranges:
        first, end = start // PAGE, -(-(start + length) // PAGE)
        used[first:end] = b"\1" * (end - first)
    return used


def masked(path, used, out):
    """A sparse copy of the image at `path` holding only its used pages: the disk as a used-blocks
    copy holds it."""
    with open(path, "rb") as src, open(out, "wb") as dst:
        dst.truncate(os.path.getsize(path))
        page = 0
        while page < len(used):
            if not used[page]:
                page += 1
                continue
            end = page
            while end < len(used) and used[end] and end - page < 256:
                end += 1
            src.seek(page * PAGE)
            dst.seek(page * PAGE)
            dst.write(src.read((end - page) * PAGE))
            page = end


def zstd_frames(path, pages, frame_of):
    """Size of the 4 KiB pages of `path` at `pages` (offsets, in order) compressed with zstd -3,
    a frame of their own wherever frame_of(index, offset) changes."""
    total, frame, buf = 0, None, []

    def flush():
        return len(subprocess.run(["zstd", "-q", "-3", "-c"], input=b"".join(buf), stdout=subprocess.PIPE,
                                  check=True).stdout) if buf else 0

    with open(path, "rb") as f:
        for i, o in enumerate(pages):
            if frame_of(i, o) != frame:
                total += flush()
                frame, buf = frame_of(i, o), []
            f.seek(o)
            buf.append(f.read(PAGE))
    return total + flush()


def framings(path, pages):
    """What framing costs: the pages as one zstd -3 stream (what partclone+zstd stores), as one
    frame per 1 MiB of the disk (strata's groups end on 1 MiB boundaries of the disk), and as
    frames of 1, 2 and 4 MiB of their data, whatever span of the disk that is."""
    r = {"stream": zstd_frames(path, pages, lambda i, o: 0),
         "disk_1m": zstd_frames(path, pages, lambda i, o: o // MiB)}
    for n in (1, 2, 4):
        r["data_%dm" % n] = zstd_frames(path, pages, lambda i, o: i * PAGE // (n * MiB))
    return r


def ideal(m1, m2, used2):
    """The ideal incremental between two masked versions: the 4 KiB pages used in the second
    that differ from the first's, and the 64 KiB blocks holding them (unused pages as zeros),
    each set compressed as one zstd -3 stream; and the framings of those pages."""
    pages = [o for o in changed_blocks(m1, m2, PAGE) if used2[o // PAGE]]
    blocks = sorted({o - o % 65536 for o in pages})
    return {"pages": len(pages), "zstd_4k": zstd_of_blocks(m2, pages, PAGE),
            "blocks_64k": len(blocks), "zstd_64k": zstd_of_blocks(m2, blocks, 65536),
            "framings": framings(m2, pages)}


# -- the tools -------------------------------------------------------------------------------
class Strata:
    def __init__(self, binary, work):
        self.binary, self.work = binary, work
        self.live = os.path.join(work, "live", "disk.img")
        os.makedirs(os.path.dirname(self.live), exist_ok=True)

    def backup(self, version, repo, *flags):
        """Cold: the page cache dropped first. The cost, strata's --json summary, and what the
        repository grew by."""
        link_live(self.live, version)  # an incremental of the same source
        before = tree_bytes(repo)
        drop_caches()
        out = os.path.join(self.work, "summary.json")
        with open(out, "w") as f:
            cost = measure([self.binary, "backup", "--json", *flags, self.live, repo], stdout=f)
        with open(out) as f:
            summary = json.load(f)
        return {"cost": cost.__dict__, "stored": tree_bytes(repo) - before, "json": summary}

    def restore(self, repo, version, out):
        run([self.binary, "restore", "-q", "--force", repo, str(version), out])


def partclone_script(img, path, devs, out, flags):
    """The shell commands that save the image as Clonezilla does: each file system with
    `partclone.<fs> -c`, unknown partitions with partclone.dd, and (a disk) the bytes outside
    the partitions (tables, gaps) with dd, each piped to `zstd -3 -T2`, one after the other.
    `flags` go to every partclone."""
    pipe = " | zstd -q -3 -T2 > %s/%s.zst"
    log = " -L %s/partclone.log%s" % (out, flags)
    if img.fs != "disk":
        return "partclone.%s -q -c -s %s -o -%s" % (img.fs, path, log) + pipe % (out, img.fs)
    cmds, pos = [], 0
    for i, ((start, size), p, pdev) in enumerate(zip(partitions(path), img.parts, devs)):
        cmds.append("dd if=%s iflag=skip_bytes,count_bytes skip=%d count=%d bs=1M status=none"
                    % (path, pos, start - pos) + pipe % (out, "gap%d" % i))
        cmds.append(("partclone.%s -q -c -s %s -o -%s" % (p.fs, pdev, log) if p.fs else
                     "partclone.dd -q -s %s -o -%s" % (pdev, log)) + pipe % (out, "p%d" % (i + 1)))
        pos = start + size
    cmds.append("dd if=%s iflag=skip_bytes skip=%d bs=1M status=none" % (path, pos) + pipe % (out, "tail"))
    return "\n".join(cmds)


def partclone_full(script, out):
    subprocess.run(["rm", "-rf", out], check=True)
    os.makedirs(out)
    drop_caches()
    cost = measure(["bash", "-c", "set -euo pipefail\n" + script])
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".zst")}
    return {"cost": cost.__dict__, "stored": sum(sizes.values()), "parts": sizes}


# -- checking a restore ----------------------------------------------------------------------
def file_hashes(root):
    """{path: SHA-256} of every regular file under root."""
    out = {}
    for path in regular_files(root):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        out[os.path.relpath(path, root)] = h.hexdigest()
    return out


def fsck(fs, dev):
    """The file system checker's verdict, read only: (clean, last lines of its output)."""
    cmd = {"ext4": ["e2fsck", "-fn", dev], "xfs": ["xfs_repair", "-n", dev], "ntfs": ["ntfsfix", "-n", dev]}[fs]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode == 0, p.stdout.strip().splitlines()[-1:]


def tree_of(fs, dev, mnt):
    with Mount(fs, dev, mnt, read_only=True) as root:
        return file_hashes(root)


def same_bytes(a, b, ranges):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, length in ranges:
            for off in range(start, start + length, 16 * MiB):
                n = min(16 * MiB, start + length - off)
                fa.seek(off)
                fb.seek(off)
                if fa.read(n) != fb.read(n):
                    return False
    return True


def check(img, source, restored, mnt):
    """fsck of each file system of the restored image, its files' hashes against the source's,
    and (a disk) the bytes outside the file systems compared."""
    out = []
    with contextlib.ExitStack() as stack:
        sdevs, rdevs = loops(stack, img, source, True), loops(stack, img, restored, True)
        for (fs, s), (_, r) in zip(fs_devices(img, sdevs), fs_devices(img, rdevs)):
            clean, last = fsck(fs, r)
            want, got = tree_of(fs, s, mnt), tree_of(fs, r, mnt)
            out.append({"fs": fs, "fsck_clean": clean, "fsck": last, "files": len(want), "files_equal": want == got})
    if img.fs == "disk":
        ranges, pos = [], 0
        for (start, size), p in zip(partitions(source), img.parts):
            ranges.append((pos, start - pos) if p.fs else (pos, start + size - pos))
            pos = start + size
        ranges.append((pos, os.path.getsize(source) - pos))
        out.append({"fs": "outside the file systems", "bytes_equal": same_bytes(source, restored, ranges)})
    return out


# -- one image -------------------------------------------------------------------------------
def bench_image(img, src, strata, runs, work):
    v1, v2 = src.path(img, 1), src.path(img, 2)
    repo, out = os.path.join(work, "repo"), os.path.join(work, "partclone-out")
    r = {"name": img.name, "size": os.path.getsize(v1), "strata": [], "incremental": [], "partclone": [],
         "partclone_f0": []}
    log("%s: what the file systems use (partclone -D)" % img.name)
    used1, used2 = (page_map(used_ranges(img, v, work), r["size"]) for v in (v1, v2))
    r["used_bytes"] = used1.count(1) * PAGE
    m1, m2 = os.path.join(work, "masked-v1"), os.path.join(work, "masked-v2")
    masked(v1, used1, m1)
    masked(v2, used2, m2)
    log("%s: the ideal incremental and the framings" % img.name)
    r["framings"] = framings(m1, [p * PAGE for p, u in enumerate(used1) if u])
    r["ideal"] = ideal(m1, m2, used2)
    os.unlink(m1)
    os.unlink(m2)
    with contextlib.ExitStack() as stack:
        devs = loops(stack, img, v1, True)
        # partclone's progress thread sleeps its refresh interval (2 s) between looks and the
        # copy waits for it at the end: every call ends on a tick. `-f 0` takes that out.
        scripts = {"partclone": partclone_script(img, v1, devs, out, ""),
                   "partclone_f0": partclone_script(img, v1, devs, out, " -f 0")}

        def strata_turn():
            subprocess.run(["rm", "-rf", repo], check=True)
            r["strata"].append(strata.backup(v1, repo))
            r["incremental"].append(strata.backup(v2, repo, "--incremental"))

        turns = [strata_turn] + [lambda k=k: r[k].append(partclone_full(scripts[k], out)) for k in scripts]
        for i in range(runs):
            for turn in turns[i % 3:] + turns[:i % 3]:
                turn()
            log("%s run %d: strata %.2f s %.1f MiB, partclone+zstd %.2f s (-f 0: %.2f s) %.1f MiB" % (
                img.name, i + 1, r["strata"][-1]["cost"]["wall"], r["strata"][-1]["stored"] / MiB,
                r["partclone"][-1]["cost"]["wall"], r["partclone_f0"][-1]["cost"]["wall"],
                r["partclone"][-1]["stored"] / MiB))
    r["partclone_parts"] = r["partclone"][-1]["parts"]
    restored = os.path.join(work, "restored.img")
    r["check"] = {}
    for v, path in ((1, v1), (2, v2)):
        strata.restore(repo, v, restored)
        r["check"]["v%d" % v] = check(img, path, restored, src.mnt)
        os.unlink(restored)
    subprocess.run(["rm", "-rf", repo, out], check=True)
    r["sector_by_sector"] = strata.backup(v1, repo, "--sector-by-sector")
    r["sector_by_sector_incremental"] = strata.backup(v2, repo, "--sector-by-sector", "--incremental")
    subprocess.run(["rm", "-rf", repo], check=True)
    return r


def versions():
    def first_line(cmd):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return p.stdout.strip().splitlines()[0]
    return {"partclone": first_line(["partclone.ext4", "-v"]), "zstd": first_line(["zstd", "-V"]),
            "e2fsprogs": first_line(["mke2fs", "-V"]), "xfsprogs": first_line(["mkfs.xfs", "-V"]),
            "ntfs-3g": first_line(["ntfs-3g", "--version"]), "kernel": os.uname().release,
            "cores": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/var/tmp/strata-fsbench", help="images and repositories (kept: images)")
    ap.add_argument("--strata", required=True, help="the strata binary")
    ap.add_argument("--quick", action="store_true", help="512 MiB images, one run")
    ap.add_argument("--runs", type=int, help="runs per image (default 3, --quick 1)")
    ap.add_argument("--only", help="comma-separated images to run (ext4,xfs,ntfs,disk)")
    ap.add_argument("--report", required=True, help="Markdown file whose section this writes")
    ap.add_argument("--results", help="also keep the raw figures in this JSON file")
    args = ap.parse_args()
    t0 = time.monotonic()
    work = os.path.join(os.path.abspath(args.work), "quick" if args.quick else "full")
    os.makedirs(work, exist_ok=True)
    src = Sources(work, 512 if args.quick else 2048)
    if src.ready():
        log("reusing the images in " + src.dir)
    else:
        log("building the images in " + src.dir)
        src.build()
    strata = Strata(os.path.abspath(args.strata), work)
    runs = args.runs or (1 if args.quick else 3)
    chosen = [i for i in src.images if not args.only or i.name in args.only.split(",")]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    r = {"date": datetime.date.today().isoformat(), "runs": runs, "quick": args.quick, "fs_mib": src.fs_mib,
         "commit": sh(["git", "-C", root, "log", "-1", "--format=%h %s"]).strip(), "versions": versions(),
         "images": [bench_image(img, src, strata, runs, work) for img in chosen]}
    r["seconds"] = time.monotonic() - t0
    if args.results:
        with open(args.results, "w") as f:
            json.dump(r, f, indent=1)
    import used_blocks_report
    used_blocks_report.write(args.report, r)
    log("section written to %s (%.0f s)" % (args.report, r["seconds"]))


if __name__ == "__main__":
    main()
