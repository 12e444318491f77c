"""Renders bench.py's results as the Markdown report: dataset, baselines, backups, mounts,
restores, the issue's targets as ratios measured in this run, and strata's own figures."""

import os
import statistics

MiB = 1 << 20
NAMES = {"strata": "strata", "qcow2": "qcow2+zstd", "borg": "borg", "restic": "restic"}


def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def paired(xs, refs):
    """Median of the run-by-run ratios xs[i] / refs[i]: each pair was measured seconds apart, so
    the machine's drift between runs cancels, where a ratio of two medians would keep it."""
    return med(x / ref for x, ref in zip(xs, refs))


def mib(n):
    return "%.1f" % (n / MiB)


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def walls(step_runs):
    return med(r["wall"] for r in step_runs)


def render(r):
    e = r["env"]
    s = r["scale"]
    size = s["image_mib"] * MiB
    tools = [t for t in NAMES if t in r.get("backup", {})]
    out = []
    w = out.append
    w("# strata against qcow2+zstd, borg and restic\n")
    w("Written by `%s` on %s (%d cores, kernel %s). strata at `%s`; %s; %s; %s; %s.\n" % (
        e["command"], e["date"], e["cores"], e["kernel"], e["strata"], e["qemu-img"], e["borg"], e["restic"], e["zstd"]))
    w("Every figure below comes from this one run. Times are wall-clock medians of %d runs unless a row "
      "says otherwise; rates are MB/s (10^6 bytes) of the whole %d MiB image; *ratio* columns divide "
      "strata's figure by the peer's from the same run. strata backs up with `--sector-by-sector` "
      "(every byte, as its whole-image peers do, so every copy compares equal to the source).\n"
      % (r["runs"], s["image_mib"]))

    # -- dataset
    w("## Dataset\n")
    w("A %d MiB sparse raw image with an ext4 file system holding ~%d MiB of files copied from this "
      "machine's /usr (a fixed, sorted selection) and a %d MiB database-like file, then five more "
      "versions made by deterministic changes. Every tool backs up `live/disk.img`, a hard link to each "
      "version in turn (so change detection by inode/mtime cannot skip reading it); the versions are in the "
      "page cache for every tool alike.\n" % (s["image_mib"], s["files_mib"], s["db_mib"]))
    rows = []
    for i, st in enumerate(r["steps"]):
        alloc = "%.0f" % r["allocated_mib"][i]
        if i == 0:
            rows.append([st["version"], st["what"], alloc, "", "", "", ""])
        else:
            rows.append([st["version"], st["what"], alloc, st["changed_4k"], mib(st["zstd_4k"]),
                         st["changed_64k"], mib(st["zstd_64k"])])
    w(table(["version", "change", "allocated MiB", "changed 4K blocks", "zstd -3 of them (MiB)",
             "changed 64K blocks", "zstd -3 of them (MiB)"], rows))
    w("\nThe last columns are the *ideal incrementals*: just the changed blocks, compressed as one "
      "zstd -3 stream.\n")

    # -- baselines
    if "baselines" in r:
        b = r["baselines"]
        z = med(x["wall"] for x in b["zstd"])
        w("## Physical baselines (version 1)\n")
        w(table(["what", "wall s", "MB/s", "note"], [
            ["`cat` cold (page cache dropped)", "%.2f" % med(b["cat_cold"]), "%.0f" % (size / 1e6 / med(b["cat_cold"])), ""],
            ["`cat` warm", "%.2f" % med(b["cat_warm"]), "%.0f" % (size / 1e6 / med(b["cat_warm"])), ""],
            ["`zstd -3 -T2`", "%.2f" % z, "%.0f" % (size / 1e6 / z), "%s MiB, one stream" % mib(b["zstd_bytes"])],
            ["`b3sum --num-threads 2`", "%.2f" % med(b["b3sum"]), "%.0f" % (size / 1e6 / med(b["b3sum"])), "BLAKE3 of the whole image"],
        ]))

    # -- backups
    if tools:
        w("\n## Backups\n")
        w("Wall seconds per step (median of %d chains, each from an empty repository; the tools take turns chain by chain):\n" % r["runs"])
        rows = []
        for i, st in enumerate(r["steps"]):
            rows.append([st["version"]] + ["%.2f" % walls(r["backup"][t]["steps"][i]) for t in tools]
                        + ["%.2f" % (walls(r["backup"]["strata"]["steps"][i]) / walls(r["backup"][t]["steps"][i]))
                           for t in tools if t != "strata" and "strata" in tools])
        inc = {t: sum(walls(x) for x in r["backup"][t]["steps"][1:]) for t in tools}
        rows.append(["v2..v6"] + ["%.2f" % inc[t] for t in tools]
                    + ["%.2f" % (inc["strata"] / inc[t]) for t in tools if t != "strata" and "strata" in tools])
        peers = [t for t in tools if t != "strata"]
        w(table(["step"] + [NAMES[t] for t in tools] + ["ratio vs " + NAMES[t] for t in peers if "strata" in tools], rows))
        w("\nBytes each step added to the repository (MiB), and the ideal incrementals:\n")
        rows = []
        for i, st in enumerate(r["steps"]):
            row = [st["version"]] + [mib(r["backup"][t]["stored"][i]) for t in tools]
            row += ["", ""] if i == 0 else [mib(st["zstd_64k"]), mib(st["zstd_4k"])]
            rows.append(row)
        tot = {t: sum(r["backup"][t]["stored"][1:]) for t in tools}
        rows.append(["v2..v6"] + [mib(tot[t]) for t in tools] + [
            mib(sum(st["zstd_64k"] for st in r["steps"][1:])), mib(sum(st["zstd_4k"] for st in r["steps"][1:]))])
        rows.append(["repository"] + [mib(r["backup"][t]["repo_bytes"]) for t in tools] + ["", ""])
        w(table(["step"] + [NAMES[t] for t in tools] + ["ideal 64K", "ideal 4K"], rows))
        w("\nCPU seconds and peak RSS (MiB) of the full and of the incrementals (medians; RSS of the "
          "backup process from wait4):\n")
        rows = []
        for t in tools:
            steps = r["backup"][t]["steps"]
            rows.append([NAMES[t], "%.2f" % med(x["cpu"] for x in steps[0]), "%.0f" % med(x["rss_mib"] for x in steps[0]),
                         "%.2f" % sum(med(x["cpu"] for x in st) for st in steps[1:]),
                         "%.0f" % max(med(x["rss_mib"] for x in st) for st in steps[1:])])
        w(table(["tool", "full CPU s", "full RSS", "incrementals CPU s", "incremental RSS (max)"], rows))

    # -- mounts
    if "mount" in r:
        w("\n## Mounts (newest version, v6)\n")
        w("Each run: unmount, drop the page cache, mount (time until the disk file is readable), "
          "`dd bs=1M` of the whole disk file (*cold*), the same again (*warm*), RSS of the serving "
          "process, unmount. `cmp` against v6.raw once. The tools take turns run by run; after "
          "strata's mount, `dd` of the raw v6.raw warm (the page-cache speed in the same go).\n")
        rows = []
        for t, m in r["mount"].items():
            rows.append([NAMES[t], "%.3f" % med(m["ready"]), "%.0f" % med(m["cold"]), "%.0f" % med(m["warm"]),
                         "%.0f" % med(m["rss"]), "yes" if m["cmp"] else "**NO**"])
        if "mount_raw_warm" in r:
            rows.append(["raw v6.raw (no mount)", "", "", "%.0f" % med(r["mount_raw_warm"]), "", ""])
        w(table(["tool", "ready s", "cold MB/s", "warm MB/s", "server RSS MiB", "cmp"], rows))

    if "restore" in r:
        w("\n## Restores (newest version, v6, to a file)\n")
        w("Page cache dropped before each run; the time includes `sync` of the restored file (strata "
          "restore fsyncs; the others are synced by the harness). restic 0.14 cannot restore sparse.\n")
        rows = []
        for t, m in r["restore"].items():
            rows.append([NAMES[t], "%.2f" % med(m["wall"]), "%.0f" % (size / 1e6 / med(m["wall"])),
                         "yes" if m["cmp"] else "**NO**"])
        w(table(["tool", "wall s", "MB/s", "cmp"], rows))

    w(targets(r))

    if "block_sizes" in r:
        w("\n## strata: block sizes\n")
        w("One chain v1..v6 per block size (one run each).\n")
        rows = []
        for bs, c in r["block_sizes"].items():
            full = c["steps"][0][0]
            incs = sum(x[0]["wall"] for x in c["steps"][1:])
            rows.append([bs, "%.2f" % full["wall"], "%.0f" % (size / 1e6 / full["wall"]), mib(c["stored"][0]),
                         "%.0f" % full["rss_mib"], "%.2f" % incs, mib(sum(c["stored"][1:]))])
        w(table(["block size", "full s", "full MB/s", "full MiB", "full RSS MiB", "v2..v6 s", "v2..v6 MiB"], rows))

    for key in ("depth", "depth_clustered"):
        if key not in r:
            continue
        d = r[key]
        clustered = d.get("pattern") == "clustered"
        w("\n## strata: chain depth, %s writes\n" % ("clustered" if clustered else "scattered"))
        w("A %d MiB ext4 image; one chain, an incremental after each round of 64 writes of 4 KiB %s, "
          "measured when it reaches each depth (the repository holds exactly that many versions). "
          "Mount: ready time, `dd` of latest/disk.img cold, with the repository files in the page cache "
          "and the driver just started (*cached*: the driver's own cost), and warm; driver RSS; restore of latest to "
          "/dev/null with the page cache dropped (*cold*) and right after (*cached*). At each depth the depth-1 "
          "repository (kept aside) is read again in the same runs, and the mount's cold and cached rates are "
          "divided by its run by run (the table gives the median of those ratios); so is a full backup of "
          "the disk as it is at that depth (depth 1 of the same bytes: the writes make the disk hold more, "
          "and less compressible, data than at depth 1, which a chain of any length pays too).\n" % (
              d["source_mib"], "inside one random 1 MiB region per version" if clustered
              else "scattered over the whole disk"))
        rows = []
        for depth, m in d["depths"].items():
            same_go = ["%.2f× / %.2f×" % (paired(m["cold"], m[ref + "_cold"]), paired(m["cached"], m[ref + "_cached"]))
                       if m.get(ref + "_cold") else "" for ref in ("base", "same")]
            rows.append([depth, "%.3f" % med(m["ready"]), "%.0f" % med(m["cold"]), "%.0f" % med(m.get("cached", [])),
                         *same_go,
                         "%.0f" % med(m["warm"]),
                         "%.0f" % med(m["rss"]), "%.0f" % med(m["restore_cold"]), "%.0f" % med(m["restore_cached"]),
                         "%.0f" % m["backup_rss"], mib(m["repo_bytes"]), "yes" if m.get("cmp") else "**NO**"])
        w(table(["depth", "mount ready s", "mount cold MB/s", "mount cached MB/s",
                 "cold / cached vs depth 1 (same go)", "cold / cached vs a full of the same disk (same go)",
                 "mount warm MB/s", "driver RSS MiB",
                 "restore cold MB/s", "restore cached MB/s", "backup RSS MiB (max so far)", "repo MiB", "cmp"], rows))

    if "backup" in r and "strata" in r["backup"] and "depth" in r:
        w("\n## strata: memory against source size\n")
        big = r["backup"]["strata"]["steps"]
        small = r["depth"]
        first = next(iter(small["depths"].values()))
        rows = [["%d MiB (depth chain)" % small["source_mib"], "%.0f" % first["backup_rss"], "%.0f" % med(first["rss"])],
                ["%d MiB (dataset)" % s["image_mib"], "%.0f" % max(med(x["rss_mib"] for x in st) for st in big),
                 "%.0f" % med(r["mount"]["strata"]["rss"]) if "mount" in r else ""]]
        w(table(["source", "backup peak RSS MiB", "mount driver RSS MiB (after a full read)"], rows))

    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
    if os.path.exists(notes) and not r.get("quick"):
        w("\n" + open(notes).read())
    w("\n_Total benchmark time: %.0f s._\n" % r.get("seconds", 0))
    return "\n".join(out)


def targets(r):
    """The issue's targets, each as measured in this run."""
    rows = []

    def add(what, value, ok):
        rows.append([what, value, "met" if ok else "**missed**"])

    b = r.get("backup", {})
    if "strata" in b:
        sw = lambda t, i: walls(b[t]["steps"][i])  # noqa: E731
        for peer in ("qcow2", "borg"):
            if peer in b:
                x = sw("strata", 0) / sw(peer, 0)
                add("full backup ≤ 0.5× %s's time" % NAMES[peer], "%.2f×" % x, x <= 0.5)
        if "baselines" in r:
            z = med(x["wall"] for x in r["baselines"]["zstd"])
            x = sw("strata", 0) / z
            add("full backup ≤ 1.3× `zstd -3 -T2`", "%.2f×" % x, x <= 1.3)
        peers = [t for t in b if t != "strata"]
        if peers:
            best = min(peers, key=lambda t: b[t]["stored"][0])
            x = b["strata"]["stored"][0] / b[best]["stored"][0]
            add("full stored ≤ 1.05× the best peer (%s)" % NAMES[best], "%.3f×" % x, x <= 1.05)
        if "qcow2" in b:
            x = sum(b["strata"]["stored"][1:]) / sum(b["qcow2"]["stored"][1:])
            add("incrementals stored ≤ qcow2+zstd's", "%.2f×" % x, x <= 1.0)
            worst = max(sw("strata", i) / sw("qcow2", i) for i in range(1, len(b["strata"]["steps"])))
            add("each incremental ≤ 0.5× qcow2+zstd's time (worst step)", "%.2f×" % worst, worst <= 0.5)
        ideal = sum(s.get("zstd_4k", 0) for s in r.get("steps", [])[1:])
        for peer in ("borg", "restic"):
            if peer in b:
                x = sum(b["strata"]["stored"][1:]) / sum(b[peer]["stored"][1:])
                add("incrementals stored far below %s's (≤ 0.5× in all)" % NAMES[peer], "%.2f×" % x, x <= 0.5)
                if ideal:
                    excess = (sum(b["strata"]["stored"][1:]) - ideal) / (sum(b[peer]["stored"][1:]) - ideal)
                    add("incrementals: bytes beyond the ideal (4K) ≤ 0.5× %s's" % NAMES[peer], "%.2f×" % excess,
                        excess <= 0.5)
    m = r.get("mount", {})
    if "strata" in m and "qcow2" in m:
        x = med(m["strata"]["cold"]) / med(m["qcow2"]["cold"])
        add("mount cold dd ≥ 1.5× qcow2 via qemu-storage-daemon", "%.2f×" % x, x >= 1.5)
        if "mount_raw_warm" in r:
            x = med(m["strata"]["warm"]) / med(r["mount_raw_warm"])
            add("mount warm reads at page-cache speed (vs `dd` warm of the raw image, same runs)", "%.2f×" % x,
                x >= 0.8)
        elif "baselines" in r:
            size = r["scale"]["image_mib"] * MiB
            cat = size / 1e6 / med(r["baselines"]["cat_warm"])
            x = med(m["strata"]["warm"]) / cat
            add("mount warm reads at page-cache speed (vs `cat` warm of the raw image)", "%.2f×" % x, x >= 0.8)
        if "borg" in m:
            x = med(m["strata"]["warm"]) / med(m["borg"]["warm"])
            add("mount warm reads like borg's (kernel page cache)", "%.2f×" % x, x >= 0.8)
        limit = 2 * med(m["qcow2"]["rss"]) + 128
        x = med(m["strata"]["rss"])
        add("driver RSS ≤ 2× qemu-storage-daemon's + cache (128 MiB)", "%.0f ≤ %.0f MiB" % (x, limit), x <= limit)
    rs = r.get("restore", {})
    if "strata" in rs and "qcow2" in rs:
        x = med(rs["qcow2"]["wall"]) / med(rs["strata"]["wall"])
        add("`strata restore` ≥ 1.5× `qemu-img convert` to raw", "%.2f×" % x, x >= 1.5)
    for key, writes in (("depth", "scattered"), ("depth_clustered", "clustered")):
        dd = r.get(key, {}).get("depths", {})
        if "1" in dd and "100" in dd:
            for how in ("cold", "cached"):
                # depth 1 measured again in the same runs as depth 100 when the run did (the
                # machine's speed drifts between the two points of one chain)
                base = dd["100"].get("base_" + how)
                if base:
                    x = paired(dd["100"][how], base)
                elif dd["1"].get(how):
                    x = med(dd["100"][how]) / med(dd["1"][how])
                else:
                    continue
                add("mount read at depth 100 ≥ 0.9× depth 1 (%s writes, %s)" % (writes, how), "%.2f×" % x, x >= 0.9)
                same = dd["100"].get("same_" + how)
                if same:
                    x = paired(dd["100"][how], same)
                    add("… the same, against a full of the disk at depth 100 (%s writes, %s; what the chain "
                        "itself costs)" % (writes, how), "%.2f×" % x, x >= 0.9)
    d = r.get("depth", {}).get("depths", {})
    deepest = max(d, key=int) if d else None
    if deepest:
        x = med(d[deepest]["ready"])
        add("mount ready < 1 s at depth %s" % deepest, "%.3f s" % x, x < 1.0)
    if not rows:
        return ""
    return "\n## Targets (from the issue), as measured in this run\n\n" + table(["target", "measured", ""], rows)
