"""The benchmark's dataset: a sparse raw disk image holding an ext4 file system, and five
later versions of it made by deterministic changes (an upgrade, scattered database writes,
three small upgrades). Also measures what each step changed: 4 KiB and 64 KiB blocks, and the
size of just those blocks compressed with `zstd -3` (the ideal incremental).

Everything here is a pure function of the sorted file list of this machine's /usr and fixed
seeds, so two runs on one machine build byte-for-byte the same files (ext4 metadata aside:
mount counts and times)."""

import os
import random
import shutil
import subprocess
import threading
from dataclasses import dataclass

MiB = 1 << 20
PAGE = 4096
UUID = "5b1ad7a0-0000-4000-8000-000000bac0b5"
# Bumped whenever the recipe changes, so that an older dataset in WORKDIR is rebuilt.
RECIPE = "recipe 2"


@dataclass
class Scale:
    image_mib: int
    files_mib: int
    db_mib: int
    upgrade_add_mib: int
    db_writes: int
    small_add_mib: int


FULL = Scale(image_mib=4096, files_mib=1536, db_mib=256, upgrade_add_mib=100, db_writes=2000, small_add_mib=8)
SMOKE = Scale(image_mib=64, files_mib=20, db_mib=4, upgrade_add_mib=2, db_writes=50, small_add_mib=1)
QUICK = Scale(image_mib=512, files_mib=160, db_mib=32, upgrade_add_mib=10, db_writes=250, small_add_mib=1)

STEPS = [
    ("v1", "full: ext4 with files from /usr and a database file"),
    ("v2", "upgrade: ~3% of files replaced by new content, ~{add} MiB added, ~1% deleted"),
    ("v3", "database: {writes} scattered 4 KiB in-place page writes"),
    ("v4", "small upgrade: ~1% of files replaced, ~{small} MiB added"),
    ("v5", "small upgrade: ~1% of files replaced, ~{small} MiB added"),
    ("v6", "small upgrade: ~1% of files replaced, ~{small} MiB added"),
]


def describe(scale):
    return [(v, text.format(add=scale.upgrade_add_mib, writes=scale.db_writes, small=scale.small_add_mib))
            for v, text in STEPS]


def usr_files():
    """Regular files of /usr between 4 KiB and 32 MiB, sorted by path."""
    found = []
    for top, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if os.path.isfile(path) and not os.path.islink(path) and 4096 <= st.st_size <= 32 * MiB:
                found.append((path, st.st_size))
    return found


WORDS = [("w%03d" % i).encode() for i in range(64)] + [
    b"customer", b"order", b"invoice", b"paid", b"pending", b"shipped", b"EUR", b"USD", b"Berlin", b"Paris",
    b"2026-11-26", b"NULL", b"true", b"false", b"0.00", b"19.99", b"admin", b"guest",
]


def db_page(rng, pageno, lsn):
    """One 4 KiB page of a database-like file: a header, row data of words and numbers, a
    little random payload (compresses about 3:1 with zstd, like real table pages)."""
    head = b"PG%06d%012d" % (pageno % 1000000, lsn)
    rows = b" ".join(rng.choices(WORDS, k=420))
    body = head + rng.randbytes(640) + rows
    return (body + b"\0" * PAGE)[:PAGE]


def run(cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


class LoopMount:
    """The image's ext4 mounted read-write on a loop device; unmounted (and the loop device
    detached, as mount -o loop does) when the block ends, whatever happens."""

    def __init__(self, image, mnt):
        self.image, self.mnt = image, mnt

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        run(["mount", "-o", "loop", self.image, self.mnt])
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["sync"])
        run(["umount", self.mnt])


def copy_files(files, dst_root, prefix):
    for path, _ in files:
        dst = os.path.join(dst_root, prefix, path.lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(path, dst)


def take(files, start, mib):
    out, total, i = [], 0, start
    while i < len(files) and total < mib * MiB:
        out.append(files[i])
        total += files[i][1]
        i += 1
    return out, i


def small_ext4(path, mib, files_dir):
    """A `mib` MiB raw image at `path` holding an ext4 file system filled to ~45% with the first
    files of /usr (the benchmark's small source for long chains)."""
    subprocess.run(["rm", "-rf", files_dir, path], check=True)
    chosen, _ = take(usr_files(), 0, mib * 45 // 100)
    copy_files(chosen, files_dir, "usr")
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", UUID, "-d", files_dir, path], check=True)
    shutil.rmtree(files_dir)


def rewrite(path, new_content):
    """Replace a file as a package upgrade does: new bytes (those of another /usr file, so that
    no tool has seen them before), written to a temporary name and renamed over the old one
    (so ext4 allocates new blocks)."""
    with open(new_content, "rb") as f:
        data = f.read()
    with open(path + ".dpkg-new", "wb") as f:
        f.write(data)
    os.rename(path + ".dpkg-new", path)


class Dataset:
    def __init__(self, work, scale):
        self.work, self.scale = work, scale
        self.dir = os.path.join(work, "dataset")
        self.versions = [os.path.join(self.dir, v + ".raw") for v, _ in STEPS]

    def ready(self):
        try:
            with open(os.path.join(self.dir, "done")) as f:
                return f.read().strip() == "%s %s" % (RECIPE, self.scale)
        except OSError:
            return False

    def build(self, log):
        s = self.scale
        os.makedirs(self.dir, exist_ok=True)
        mnt = os.path.join(self.work, "loop")
        files = usr_files()
        base, nxt = take(files, 0, s.files_mib - s.db_mib)
        if nxt >= len(files):
            raise SystemExit("bench: /usr holds too few files for this dataset")
        v1 = self.versions[0]
        if os.path.exists(v1):
            os.unlink(v1)
        with open(v1, "wb") as f:
            f.truncate(s.image_mib * MiB)
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", UUID, "-E", "hash_seed=" + UUID, v1])
        log("v1: copying %d files (%d MiB) and a %d MiB database" % (len(base), s.files_mib - s.db_mib, s.db_mib))
        rng = random.Random(1)
        with LoopMount(v1, mnt) as root:
            copy_files(base, root, "usr-copy")
            os.makedirs(os.path.join(root, "db"))
            with open(os.path.join(root, "db", "table.db"), "wb") as f:
                for p in range(s.db_mib * MiB // PAGE):
                    f.write(db_page(rng, p, 1))
        names = ["usr-copy" + p for p, _ in base]

        def step(n, fn):
            src, dst = self.versions[n - 1], self.versions[n]
            run(["cp", "--sparse=always", src, dst])
            with LoopMount(dst, mnt) as root:
                fn(root)

        def upgrade(root, n, rewrite_every, rewrite_phase, add_mib, delete_every):
            nonlocal nxt
            for i, name in enumerate(names):
                path = os.path.join(root, name)
                if name and i % rewrite_every == rewrite_phase and os.path.exists(path):
                    rewrite(path, files[nxt][0])
                    nxt += 1
                elif delete_every and name and i % delete_every == delete_every // 2 and os.path.exists(path):
                    os.unlink(path)
                    names[i] = ""
            added, nxt = take(files, nxt, add_mib)
            copy_files(added, root, "usr-v%d" % n)

        log("v2: upgrade")
        step(1, lambda root: upgrade(root, 2, 33, 0, s.upgrade_add_mib, 100))

        def db_writes(root):
            wr = random.Random(3)
            pages = s.db_mib * MiB // PAGE
            fd = os.open(os.path.join(root, "db", "table.db"), os.O_WRONLY)
            try:
                for lsn in range(s.db_writes):
                    p = wr.randrange(pages)
                    os.pwrite(fd, db_page(wr, p, 2 + lsn), p * PAGE)
                os.fsync(fd)
            finally:
                os.close(fd)

        log("v3: database writes")
        step(2, db_writes)
        for n in (4, 5, 6):
            log("v%d: small upgrade" % n)
            step(n - 1, lambda root, n=n: upgrade(root, n, 100, 17 * n % 100, s.small_add_mib, 0))
        stale = os.path.join(self.dir, "steps.json")  # measured again by the caller
        if os.path.exists(stale):
            os.unlink(stale)
        with open(os.path.join(self.dir, "done"), "w") as f:
            f.write("%s %s\n" % (RECIPE, self.scale))


def changed_blocks(a, b, block):
    """Offsets of the `block`-sized blocks that differ between files a and b."""
    out = []
    chunk = 16 * MiB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                break
            if x != y:
                for i in range(0, max(len(x), len(y)), block):
                    if x[i:i + block] != y[i:i + block]:
                        out.append(off + i)
            off += chunk
    return out


def zstd_of_blocks(path, offsets, block):
    """Size of the `block`-sized blocks of file `path` at `offsets`, compressed as one zstd -3
    stream."""
    z = subprocess.Popen(["zstd", "-q", "-3", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    size = [0]

    def count():
        while True:
            d = z.stdout.read(MiB)
            if not d:
                break
            size[0] += len(d)

    t = threading.Thread(target=count)
    t.start()
    with open(path, "rb") as f:
        for o in offsets:
            f.seek(o)
            z.stdin.write(f.read(block))
    z.stdin.close()
    t.join()
    z.wait()
    return size[0]


def ideal_incremental(a, b):
    """(changed 4K blocks, their zstd -3 size, changed 64K blocks, their zstd -3 size) for the
    step from version a to version b. The changed blocks are compressed as one stream."""
    result = []
    for block in (4096, 65536):
        offs = changed_blocks(a, b, block)
        result += [len(offs), zstd_of_blocks(b, offs, block)]
    return tuple(result)
