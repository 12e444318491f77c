"""The tools under test, each behind the same four verbs: back up the live source as the next
version, mount the newest version (returning the file that holds the disk), unmount, and
restore the newest version to a file. Also the measuring helpers: wall and CPU seconds and
peak RSS of a command (from wait4), RSS of a serving process (from /proc)."""

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

MiB = 1 << 20


@dataclass
class Cost:
    wall: float = 0.0
    cpu: float = 0.0
    rss_mib: float = 0.0

    def __add__(self, other):
        return Cost(self.wall + other.wall, self.cpu + other.cpu, max(self.rss_mib, other.rss_mib))


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def measure(cmd, cwd=None, env=None, stdout=subprocess.DEVNULL):
    """Run cmd to completion; its wall and CPU seconds and peak RSS. Fails loudly.

    CPU and RSS come from GNU time, which forks the command from its own small process: a child
    forked straight from this (large) Python process would report Python's RSS as its peak."""
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-") as out:
        t0 = time.monotonic()
        p = subprocess.run(["/usr/bin/time", "-q", "-f", "%U %S %M", "-o", out.name, *map(str, cmd)],
                           cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(map(str, cmd)), p.returncode, p.stderr.decode()[-2000:]))
        user, system, rss_kib = out.read().split()[-3:]
    return Cost(wall, float(user) + float(system), int(rss_kib) / 1024)


def link_live(live, version):
    """Make `live` a hard link to `version`: one source path for every version in turn."""
    if os.path.lexists(live):
        os.unlink(live)
    os.link(version, live)


def tree_bytes(path):
    total = 0
    for top, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(top, f)).st_size
            except OSError:
                pass
    return total


def rss_mib(pid):
    """Resident set of a running process (all threads), MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def find_file(root, name):
    """The first file called `name` under root (where a tool put the backed-up image)."""
    for top, dirs, files in os.walk(root):
        dirs.sort()
        if name in files:
            return os.path.join(top, name)
    return None


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.005)
    raise RuntimeError("timed out waiting for " + what)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def is_mounted(path):
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def pids_with_arg(arg):
    """PIDs of processes whose command line holds `arg` (the serving process of a mount)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/cmdline" % d, "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                pass
    return out


class Tool:
    name = ""
    title = ""

    def __init__(self, work, live):
        self.work, self.live = work, live
        self.repo = os.path.join(work, "repo-" + self.name)
        self.mnt = os.path.join(work, "mnt-" + self.name)
        self.count = 0

    def reset(self):
        subprocess.run(["rm", "-rf", self.repo], check=True)
        self.count = 0
        self.init()

    def init(self):
        pass

    def environ(self, **settings):
        """This process's environment with the tool's settings added."""
        return {**os.environ, **settings}

    def stored(self):
        return tree_bytes(self.repo)

    def backup(self):
        self.count += 1
        return self.backup_cmd(self.count)

    def unmount(self):
        pass


class Strata(Tool):
    name = "strata"
    title = "strata"

    def __init__(self, work, live, binary, block_size=None):
        self.binary, self.block_size = binary, block_size
        if block_size:
            self.name = "strata-" + block_size
        super().__init__(work, live)

    def backup_cmd(self, n):
        extra = ["--block-size", self.block_size] if self.block_size and n == 1 else []
        # Every byte, like the whole-image peers here (and every copy compares equal to the
        # source); used-blocks mode is measured against partclone on its own.
        return measure([self.binary, "backup", "-q", "--sector-by-sector", *extra, self.live, self.repo])

    def mount(self):
        os.makedirs(self.mnt, exist_ok=True)
        cost = measure([self.binary, "mount", "-q", self.repo, self.mnt])
        pid = self.server_pid()
        return os.path.join(self.mnt, "latest", "disk.img"), pid, cost.wall

    def server_pid(self):
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == os.path.abspath(self.mnt):
                    src = parts[parts.index("-") + 2]
                    return int(src.split("@")[1])
        raise RuntimeError("strata mount not found")

    def unmount(self):
        if is_mounted(self.mnt):
            subprocess.run([self.binary, "umount", self.mnt], check=True, stdout=subprocess.DEVNULL)

    def restore(self, out):
        return measure([self.binary, "restore", "-q", self.repo, "latest", out]), out


class Qcow2(Tool):
    name = "qcow2"
    title = "qcow2+zstd (qemu-img)"

    def image(self, n):
        return os.path.join(self.repo, "v%d.qcow2" % n)

    def init(self):
        os.makedirs(self.repo)

    def backup_cmd(self, n):
        if n == 1:
            return measure(["qemu-img", "convert", "-O", "qcow2", "-o", "compression_type=zstd", "-c",
                            self.live, self.image(1)])
        # An overlay on the live source, then a safe rebase onto the previous image: qemu-img
        # compares the two and writes (compressed) only the clusters that differ.
        c = measure(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd",
                     "-b", os.path.abspath(self.live), "-F", "raw", self.image(n)])
        return c + measure(["qemu-img", "rebase", "-c", "-b", self.image(n - 1), "-F", "qcow2", self.image(n)])

    def mount(self):
        self.target = os.path.join(self.work, "qsd-export")
        open(self.target, "w").close()
        pidfile = os.path.join(self.work, "qsd.pid")
        cost = measure(["qemu-storage-daemon", "--daemonize", "--pidfile", pidfile,
                        "--blockdev", "driver=file,node-name=f0,filename=%s,read-only=on" % self.image(self.count),
                        "--blockdev", "driver=qcow2,node-name=q0,file=f0,read-only=on",
                        "--export", "type=fuse,id=e0,node-name=q0,mountpoint=%s,writable=off" % self.target])
        with open(pidfile) as f:
            self.pid = int(f.read())
        return self.target, self.pid, cost.wall

    def unmount(self):
        pid = getattr(self, "pid", None)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not pid_alive(pid), 30, "qemu-storage-daemon to stop")
        self.pid = None

    def restore(self, out):
        return measure(["qemu-img", "convert", "-O", "raw", self.image(self.count), out]), out


class Borg(Tool):
    name = "borg"
    title = "borg 1.2 (zstd,3)"

    def env(self):
        return self.environ(BORG_REPO=self.repo, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=os.path.join(self.work, "borg-home"))

    def init(self):
        subprocess.run(["rm", "-rf", os.path.join(self.work, "borg-home")], check=True)
        measure(["borg", "init", "-e", "none"], env=self.env())

    def backup_cmd(self, n):
        return measure(["borg", "create", "--compression", "zstd,3", "::v%d" % n,
                        os.path.relpath(self.live, self.work)], cwd=self.work, env=self.env())

    def mount(self):
        os.makedirs(self.mnt, exist_ok=True)
        t0 = time.monotonic()
        measure(["borg", "mount", "::v%d" % self.count, self.mnt], env=self.env())
        path = os.path.join(self.mnt, os.path.relpath(self.live, self.work))
        wait_for(lambda: os.path.exists(path), 60, "borg mount")
        ready = time.monotonic() - t0
        pids = [p for p in pids_with_arg(self.mnt) if p != os.getpid()]
        return path, pids[0], ready

    def unmount(self):
        if is_mounted(self.mnt):
            subprocess.run(["borg", "umount", self.mnt], check=True, env=self.env())
            wait_for(lambda: not pids_with_arg(self.mnt), 30, "borg mount to stop")

    def restore(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        c = measure(["borg", "extract", "--sparse", "::v%d" % self.count], cwd=out_dir, env=self.env())
        return c, find_file(out_dir, "disk.img")


class Restic(Tool):
    name = "restic"
    title = "restic 0.14 (compression auto)"

    def env(self):
        return self.environ(RESTIC_REPOSITORY=self.repo, RESTIC_PASSWORD="bench",
                            RESTIC_CACHE_DIR=os.path.join(self.work, "restic-cache"))

    def init(self):
        subprocess.run(["rm", "-rf", os.path.join(self.work, "restic-cache")], check=True)
        measure(["restic", "init", "--repository-version", "2"], env=self.env())

    def backup_cmd(self, n):
        return measure(["restic", "backup", "-q", "--host", "bench", os.path.relpath(self.live, self.work)],
                       cwd=self.work, env=self.env())

    def mount(self):
        os.makedirs(self.mnt, exist_ok=True)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(["restic", "mount", self.mnt], env=self.env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        latest = os.path.join(self.mnt, "snapshots", "latest")
        found = []
        wait_for(lambda: found.append(find_file(latest, "disk.img")) or found[-1], 60, "restic mount")
        return found[-1], self.proc.pid, time.monotonic() - t0

    def unmount(self):
        proc = getattr(self, "proc", None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        self.proc = None

    def restore(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        c = measure(["restic", "restore", "latest", "--target", out_dir], env=self.env())
        return c, find_file(out_dir, "disk.img")
