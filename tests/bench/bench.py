#!/usr/bin/env python3
"""strata against qcow2+zstd (qemu-img, qemu-storage-daemon), borg and restic on one dataset in
one run: backups of six versions, mounts, restores, physical baselines, and strata's own
figures at chain depths 1..1000 and block sizes 16K/64K/1M. Writes a Markdown report.

Run through tests/bench/run.sh, which installs the peers and builds strata; as root (it drops
the page cache and loop-mounts the dataset)."""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402
from tools import Borg, Qcow2, Restic, Strata, drop_caches, link_live, measure, rss_mib, tree_bytes  # noqa: E402

MiB = 1 << 20
# A page read a second time is still on the kernel's inactive list and costs more than on the
# third read (measured: 6.5 then 12.5 GB/s for a raw file, 2.8-7.5 then 9-11 GB/s through a
# mount): warm figures are the median of this many passes after the cold one, for the raw file
# and every mount alike, so that this one slow pass cannot decide the median.
WARM_PASSES = 5
# Runs per depth of the depth chains (see `depth_chain`), when a run takes the usual three or more.
DEPTH_RUNS = 9


def new_chain_result(versions):
    """Per step the cost of each run, the bytes each step added and the repository's size (of
    the last run)."""
    return {"steps": [[] for _ in range(versions)], "stored": [], "repo_bytes": 0}


def log(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def mbps(nbytes, seconds):
    return nbytes / 1e6 / seconds


def same(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.scale = dataset.SMOKE if args.smoke else dataset.QUICK if args.quick else dataset.FULL
        self.runs = args.runs
        self.data = dataset.Dataset(self.work, self.scale)
        self.live = os.path.join(self.work, "live", "disk.img")
        os.makedirs(os.path.dirname(self.live), exist_ok=True)
        self.size = self.scale.image_mib * MiB
        self.r = {"scale": self.scale.__dict__, "runs": self.runs, "quick": args.quick or args.smoke}
        self.tools = [Strata(self.work, self.live, args.strata), Qcow2(self.work, self.live),
                      Borg(self.work, self.live), Restic(self.work, self.live)]
        self.tools = [t for t in self.tools if t.name in args.tools]

    # -- dataset -------------------------------------------------------------------------
    def prepare(self):
        if self.data.ready():
            log("dataset: reusing " + self.data.dir)
        else:
            log("dataset: building in " + self.data.dir)
            self.data.build(log)
        stats_file = os.path.join(self.data.dir, "steps.json")
        if os.path.exists(stats_file):
            steps = json.load(open(stats_file))
        else:
            steps = []
            for i, (v, text) in enumerate(dataset.describe(self.scale)):
                if i == 0:
                    steps.append({"version": v, "what": text})
                    continue
                log("dataset: measuring what %s changed" % v)
                c4, z4, c64, z64 = dataset.ideal_incremental(self.data.versions[i - 1], self.data.versions[i])
                steps.append({"version": v, "what": text, "changed_4k": c4, "zstd_4k": z4,
                              "changed_64k": c64, "zstd_64k": z64})
            json.dump(steps, open(stats_file, "w"))
        self.r["steps"] = steps
        self.r["allocated_mib"] = [os.stat(v).st_blocks * 512 / MiB for v in self.data.versions]

    def warm_sources(self):
        for v in self.data.versions:
            subprocess.run(["cat", v], stdout=subprocess.DEVNULL, check=True)

    # -- physical baselines on v1 ----------------------------------------------------------
    def baselines(self):
        v1 = self.data.versions[0]
        out = os.path.join(self.work, "v1.zst")
        b = {"cat_cold": [], "cat_warm": [], "zstd": [], "b3sum": []}
        for _ in range(self.runs):
            drop_caches()
            b["cat_cold"].append(measure(["cat", v1]).wall)
            b["cat_warm"].append(med([measure(["cat", v1]).wall for _ in range(WARM_PASSES)]))
            b["zstd"].append(measure(["zstd", "-q", "-f", "-3", "-T2", v1, "-o", out]).__dict__)
            b["b3sum"].append(measure(["b3sum", "--num-threads", "2", v1]).wall)
        b["zstd_bytes"] = os.path.getsize(out)
        os.unlink(out)
        self.r["baselines"] = b
        log("baselines: cat warm %.2f s, zstd -3 -T2 %.2f s" % (med(b["cat_warm"]), med(x["wall"] for x in b["zstd"])))

    # -- backups ---------------------------------------------------------------------------
    def chain(self, tool, runs):
        """Back up v1..v6 with `tool`, `runs` times from an empty repository; every step's
        cost per run and the bytes each step added (last run)."""
        res = new_chain_result(len(self.data.versions))
        for run in range(runs):
            self.chain_run(tool, run, res)
        return res

    def chain_run(self, tool, run, res):
        """One chain v1..v6 from an empty repository, added to `res`."""
        tool.unmount()
        tool.reset()
        stored = []
        for i, v in enumerate(self.data.versions):
            link_live(self.live, v)
            before = tool.stored()
            cost = tool.backup()
            res["steps"][i].append(cost.__dict__)
            stored.append(tool.stored() - before)
        res["stored"], res["repo_bytes"] = stored, tool.stored()
        log("%s: chain run %d: full %.2f s, incrementals %.2f s, %.0f MiB" % (
            tool.name, run + 1, res["steps"][0][-1]["wall"], sum(s[-1]["wall"] for s in res["steps"][1:]),
            sum(stored) / MiB))

    def backups(self):
        """Every tool's chains, the tools taking turns run by run, so that a ratio between two
        tools compares runs minutes apart, not the first and the last quarter of the phase
        (this VM's speed drifts by a third over an hour)."""
        self.warm_sources()
        res = {t.name: new_chain_result(len(self.data.versions)) for t in self.tools}
        for run in range(self.runs):
            for tool in self.tools:
                self.chain_run(tool, run, res[tool.name])
        self.r["backup"] = res

    # -- mounts ----------------------------------------------------------------------------
    def mounts(self):
        """Each run mounts every tool in turn (see `backups`); after strata's, `dd` of the raw
        newest version warm, the page-cache speed its warm reads are held to, in the same go."""
        newest = self.data.versions[-1]
        res = {t.name: {"ready": [], "cold": [], "warm": [], "rss": [], "cmp": None} for t in self.tools}
        raw_warm = []
        for run in range(self.runs):
            for tool in self.tools:
                m = res[tool.name]
                tool.unmount()
                drop_caches()
                path, pid, ready = tool.mount()
                try:
                    m["ready"].append(ready)
                    m["cold"].append(mbps(self.size, measure(["dd", "if=" + path, "of=/dev/null", "bs=1M"]).wall))
                    m["warm"].append(self.warm_rate(path, self.size))
                    m["rss"].append(rss_mib(pid))
                    if run == 0:
                        m["cmp"] = same(path, newest)
                finally:
                    tool.unmount()
                if tool.name == "strata":
                    subprocess.run(["cat", newest], stdout=subprocess.DEVNULL, check=True)
                    raw_warm.append(self.warm_rate(newest, self.size))
        for tool in self.tools:
            m = res[tool.name]
            log("%s: mount cold %.0f MB/s, warm %.0f MB/s, ready %.3f s, RSS %.0f MiB, cmp %s" % (
                tool.name, med(m["cold"]), med(m["warm"]), med(m["ready"]), med(m["rss"]), m["cmp"]))
        self.r["mount"] = res
        if raw_warm:
            self.r["mount_raw_warm"] = raw_warm
            log("raw newest version: warm %.0f MB/s" % med(raw_warm))

    def warm_rate(self, path, size):
        return med([mbps(size, measure(["dd", "if=" + path, "of=/dev/null", "bs=1M"]).wall)
                    for _ in range(WARM_PASSES)])

    # -- restores --------------------------------------------------------------------------
    def restores(self):
        """Every tool restores in turn, run by run (see `backups`)."""
        newest = self.data.versions[-1]
        res = {t.name: {"wall": [], "cmp": None} for t in self.tools}
        for run in range(self.runs):
            for tool in self.tools:
                m = res[tool.name]
                out = os.path.join(self.work, "restore-" + tool.name)
                subprocess.run(["rm", "-rf", out], check=True)
                drop_caches()
                cost, path = tool.restore(out)
                cost = cost + measure(["sync", path])
                m["wall"].append(cost.wall)
                if run == 0:
                    m["cmp"] = same(path, newest)
                subprocess.run(["rm", "-rf", out], check=True)
        for tool in self.tools:
            m = res[tool.name]
            log("%s: restore %.2f s (%.0f MB/s), cmp %s" % (tool.name, med(m["wall"]),
                                                             mbps(self.size, med(m["wall"])), m["cmp"]))
        self.r["restore"] = res

    # -- strata alone ----------------------------------------------------------------------
    def block_sizes(self):
        res = {}
        for bs in ("4K", "16K", "64K", "1M"):
            tool = Strata(self.work, self.live, self.args.strata, block_size=bs)
            res[bs] = self.chain(tool, 1)
            subprocess.run(["rm", "-rf", tool.repo], check=True)
        self.r["block_sizes"] = res

    def depth(self):
        """Chains of incrementals on a small source, each version after 64 writes of 4 KiB,
        measured as the chain reaches each depth: once with the writes scattered over the whole
        disk (by depth 100 most blocks come from one of 99 images, one lone frame each: chain
        depth and fragmentation together), once with each version's writes inside one 1 MiB
        region (the same chain depth, the layout of a file system's writes)."""
        self.r["depth"] = self.depth_chain("scattered")
        self.r["depth_clustered"] = self.depth_chain("clustered")

    def depth_chain(self, pattern):
        depths = [1, 10] if self.args.smoke else [1, 10, 100] if self.args.quick else [1, 10, 100, 1000]
        small_mib = 16 if self.args.smoke else 64 if self.args.quick else 256
        src = os.path.join(self.work, "depth-src.img")
        files_dir = os.path.join(self.work, "depth-files")
        dataset.small_ext4(src, small_mib, files_dir)
        tool = Strata(self.work, src, self.args.strata)
        tool.name = "strata-depth"
        tool.repo = os.path.join(self.work, "repo-depth")
        tool.mnt = os.path.join(self.work, "mnt-depth")
        tool.reset()
        rng = random.Random(7)
        size = small_mib * MiB
        res = {"source_mib": small_mib, "pattern": pattern, "depths": {}}
        base_repo = tool.repo + "-at-depth-1"
        same_repo = tool.repo + "-full-of-same-disk"
        backup_rss = []
        for d in range(1, depths[-1] + 1):
            if d > 1:
                fd = os.open(src, os.O_WRONLY)
                region = rng.randrange(size // MiB) * MiB if pattern == "clustered" else 0
                for _ in range(64):
                    if pattern == "scattered":
                        at = rng.randrange(size // 4096) * 4096
                    else:
                        at = region + rng.randrange(MiB // 4096) * 4096
                    os.pwrite(fd, rng.randbytes(4096), at)
                os.close(fd)
            backup_rss.append(tool.backup().rss_mib)
            if d == 1:
                subprocess.run(["rm", "-rf", base_repo], check=True)
                subprocess.run(["cp", "-a", tool.repo, base_repo], check=True)
            if d not in depths:
                continue
            m = {"ready": [], "cold": [], "cached": [], "warm": [], "rss": [], "restore_cold": [], "restore_cached": [],
                 "base_cold": [], "base_cached": [], "same_cold": [], "same_cached": []}
            if d > 1:
                # the disk as it is now, backed up as a full: depth 1 of the same bytes, so that
                # what the chain costs is told apart from what the bytes written cost
                subprocess.run(["rm", "-rf", same_repo], check=True)
                subprocess.run([self.args.strata, "backup", "-q", "--sector-by-sector", src, same_repo], check=True)
            # more runs than the rule: single readings of one 256 MiB disk swing by ±20% here (and
            # now and then to a third), and these readings are what the depth ratios compare
            for run in range(max(self.runs, DEPTH_RUNS) if self.runs >= 3 else self.runs):
                if d > 1:
                    # depth 1 again, in the same go: the ratio the targets read
                    cold, cached = self.depth_dd(tool, base_repo, size)
                    m["base_cold"].append(cold)
                    m["base_cached"].append(cached)
                    cold, cached = self.depth_dd(tool, same_repo, size)
                    m["same_cold"].append(cold)
                    m["same_cached"].append(cached)
                drop_caches()
                path, pid, ready = tool.mount()
                try:
                    m["ready"].append(ready)
                    m["cold"].append(mbps(size, measure(["dd", "if=" + path, "of=/dev/null", "bs=1M"]).wall))
                    m["warm"].append(self.warm_rate(path, size))
                    m["rss"].append(rss_mib(pid))
                    if run == 0:
                        m["cmp"] = same(path, src)
                finally:
                    tool.unmount()
                # repository files in the page cache, driver restarted: what the chain costs the
                # driver, without the disk's seeks
                subprocess.run(["cat"] + [os.path.join(tool.repo, f) for f in os.listdir(tool.repo)],
                               stdout=subprocess.DEVNULL, check=True)
                path, pid, _ = tool.mount()
                try:
                    m["cached"].append(mbps(size, measure(["dd", "if=" + path, "of=/dev/null", "bs=1M"]).wall))
                finally:
                    tool.unmount()
                drop_caches()
                restore = [self.args.strata, "restore", "-q", tool.repo, "latest", "/dev/null"]
                m["restore_cold"].append(mbps(size, measure(restore).wall))
                m["restore_cached"].append(mbps(size, measure(restore).wall))
            m["backup_rss"] = max(backup_rss)
            m["repo_bytes"] = tree_bytes(tool.repo)
            log("depth %d (%s): mount cold %.0f MB/s, restore cold %.0f MB/s, ready %.3f s, RSS %.0f MiB" % (
                d, pattern, med(m["cold"]), med(m["restore_cold"]), med(m["ready"]), med(m["rss"])))
            res["depths"][str(d)] = m
        subprocess.run(["rm", "-rf", tool.repo, base_repo, same_repo, src], check=True)
        return res

    def depth_dd(self, tool, repo, size):
        """`dd` MB/s of latest/disk.img of `repo`: cold, then with the repository cached."""
        saved, tool.repo = tool.repo, repo
        rates = []
        try:
            for cached in (False, True):
                if cached:
                    subprocess.run(["cat"] + [os.path.join(repo, f) for f in os.listdir(repo)],
                                   stdout=subprocess.DEVNULL, check=True)
                else:
                    drop_caches()
                path, _, _ = tool.mount()
                try:
                    rates.append(mbps(size, measure(["dd", "if=" + path, "of=/dev/null", "bs=1M"]).wall))
                finally:
                    tool.unmount()
        finally:
            tool.repo = saved
        return rates

    def run(self):
        t0 = time.monotonic()
        self.prepare()
        phases = [("baselines", self.baselines), ("backups", self.backups), ("mounts", self.mounts),
                  ("restores", self.restores), ("block_sizes", self.block_sizes), ("depth", self.depth)]
        for name, fn in phases:
            if name in self.args.skip:
                continue
            log("phase: " + name)
            fn()
        for tool in self.tools:
            tool.unmount()
        self.r["seconds"] = time.monotonic() - t0
        return self.r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small dataset (a few minutes)")
    ap.add_argument("--smoke", action="store_true", help="a tiny dataset: checks the harness itself (CI)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measured row (median reported)")
    ap.add_argument("--work", required=True, help="work folder (dataset, repositories, mounts)")
    ap.add_argument("--strata", required=True, help="the strata binary")
    ap.add_argument("--report", required=True, help="Markdown report to write")
    ap.add_argument("--tools", default="strata,qcow2,borg,restic")
    ap.add_argument("--skip", default="", help="phases to skip, comma separated")
    args = ap.parse_args()
    args.tools = args.tools.split(",")
    args.skip = args.skip.split(",")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it drops the page cache and loop-mounts the dataset)")
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        for tool in bench.tools:
            try:
                tool.unmount()
            except Exception as e:  # keep unmounting the others
                log("unmount %s: %s" % (tool.name, e))
    results["env"] = environment(args)
    with open(os.path.join(bench.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    import report
    import used_blocks_report

    text = used_blocks_report.keep(args.report, report.render(results))  # used_blocks.py's section
    with open(args.report, "w") as f:
        f.write(text)
    log("report written to " + args.report)


def environment(args):
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "not found"

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "kernel": os.uname().release,
        "cores": os.cpu_count(),
        "strata": first_line(["git", "-C", root, "log", "-1", "--format=%h %s"])[:80],
        "qemu-img": first_line(["qemu-img", "--version"]),
        "borg": first_line(["borg", "--version"]),
        "restic": first_line(["restic", "version"]),
        "zstd": first_line(["zstd", "--version"]),
        "b3sum": first_line(["b3sum", "--version"]),
        "command": "bash tests/bench/run.sh" + (" --quick" if args.quick else ""),
    }


if __name__ == "__main__":
    main()
