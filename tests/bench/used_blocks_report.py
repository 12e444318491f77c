"""Renders used_blocks.py's results as the "Used blocks against partclone" section of a Markdown
report, and puts that section into the report in place of the one there before (or at its end).
Other sections of the file are left as they are."""

import os

from report import med, mib, paired, table

TITLE = "## Used blocks against partclone"
NAMES = {"ext4": "ext4", "xfs": "XFS", "ntfs": "NTFS", "disk": "GPT disk (ext4 + NTFS + unknown)"}
# strata's v1→v2 of the main benchmark (BENCHMARKS.md, run of 645453b) against its ideal 4K.
TODAY = (203.2, 199.9)


def walls(runs):
    return [x["cost"]["wall"] for x in runs]


def cpus(runs):
    return [x["cost"]["cpu"] for x in runs]


def stored_table(images):
    rows = []
    for i in images:
        s, p = med(x["stored"] for x in i["strata"]), med(x["stored"] for x in i["partclone"])
        rows.append([NAMES[i["name"]], mib(i["size"]), mib(i["used_bytes"]), mib(i["sector_by_sector"]["stored"]),
                     mib(s), mib(p), "%.3f×" % (s / p)])
    return table(["source", "size MiB", "used MiB, raw (partclone's map)", "strata sector by sector",
                  "strata used blocks", "partclone+zstd", "strata / partclone+zstd"], rows)


def time_table(images):
    rows = []
    for i in images:
        s, p, p0 = i["strata"], i["partclone"], i["partclone_f0"]
        rows.append([NAMES[i["name"]], "%.2f" % med(walls(s)), "%.2f" % med(cpus(s)),
                     "%.2f" % med(walls(p0)), "%.2f" % med(cpus(p0)), "%.2f×" % paired(walls(s), walls(p0)),
                     "%.2f" % med(walls(p)), "%.2f×" % paired(walls(s), walls(p)),
                     mib(s[-1]["json"]["bytes_read"])])
    return table(["source", "strata wall s", "strata CPU s", "partclone+zstd `-f 0` wall s", "its CPU s",
                  "strata / it (run by run)", "partclone+zstd as is, wall s", "strata / it",
                  "strata bytes read MiB"], rows)


def incremental_table(images):
    rows = []
    for i in images:
        s, d = med(x["stored"] for x in i["incremental"]), i["ideal"]
        sector = i["sector_by_sector_incremental"]["stored"]
        rows.append([NAMES[i["name"]], d["pages"], mib(d["zstd_4k"]), mib(d["zstd_64k"]), mib(s),
                     "%.3f×" % (s / d["zstd_4k"]), "%s (%.3f×)" % (mib(sector), sector / d["zstd_4k"]),
                     "%.2f" % med(walls(i["incremental"])), "%.2f" % med(cpus(i["incremental"]))])
    return table(["source", "changed 4K pages", "ideal 4K MiB", "ideal 64K MiB", "strata MiB", "strata / ideal 4K",
                  "strata sector by sector MiB (/ ideal 4K)", "strata wall s", "strata CPU s"], rows)


def framing_rows(name, what, f, strata, ref):
    cell = lambda n: "%s (%.3f×)" % (mib(n), n / ref)  # noqa: E731
    return [name, what, cell(f["stream"]), cell(strata), cell(f["disk_1m"])] + [
        cell(f["data_%dm" % n]) for n in (1, 2, 4)]


def framing_table(images):
    rows = []
    for i in images:
        full = med(x["json"]["stored_bytes"] for x in i["strata"])
        inc = med(x["json"]["stored_bytes"] for x in i["incremental"])
        rows.append(framing_rows(NAMES[i["name"]], "full: used pages", i["framings"], full, i["framings"]["stream"]))
        rows.append(framing_rows(NAMES[i["name"]], "incremental: changed pages", i["ideal"]["framings"], inc,
                                 i["ideal"]["zstd_4k"]))
    return table(["source", "pages", "one zstd -3 stream", "strata (its image's data)", "a frame per 1 MiB of disk",
                  "frames of 1 MiB of data", "of 2 MiB", "of 4 MiB"], rows)


def regions_table(images):
    rows = []
    for i in images:
        for g in i["strata"][-1]["json"]["regions"]:
            where = "whole" if g["partition"] is None else "partition %s" % g["partition"]
            rows.append([NAMES[i["name"]], where, mib(g["start"]), mib(g["bytes"]), g["file_system"] or "",
                         g["blocks"], mib(g["unused_bytes"]), g["reason"] or ""])
    return table(["source", "region", "start MiB", "MiB", "file system", "blocks", "unused MiB", "why kept whole"],
                 rows)


def checks(images):
    lines = []
    for i in images:
        for v, found in i["check"].items():
            parts = []
            for c in found:
                if "bytes_equal" in c:
                    parts.append("%s %s" % (c["fs"], "equal" if c["bytes_equal"] else "**differ**"))
                else:
                    parts.append("%s: fsck %s, %d files %s" % (
                        c["fs"], "clean" if c["fsck_clean"] else "**not clean** (%s)" % " ".join(c["fsck"]),
                        c["files"], "identical" if c["files_equal"] else "**differ**"))
            lines.append("- %s %s: %s" % (NAMES[i["name"]], v, "; ".join(parts)))
    return "\n".join(lines) + "\n"


def targets(images):
    rows = []
    for i in images:
        n = NAMES[i["name"]]
        s = med(x["stored"] for x in i["strata"]) / med(x["stored"] for x in i["partclone"])
        t = paired(walls(i["strata"]), walls(i["partclone_f0"]))
        inc = med(x["stored"] for x in i["incremental"]) / i["ideal"]["zstd_4k"]
        rows += [[n, "full stored ≤ 1.02× partclone+zstd", "%.3f×" % s, verdict(s <= 1.02)],
                 [n, "full time ≤ 0.7× partclone+zstd (`-f 0`)", "%.2f×" % t, verdict(t <= 0.7)],
                 [n, "incremental ≤ %.3f× the ideal 4K (today's, main benchmark)" % (TODAY[0] / TODAY[1]),
                  "%.3f×" % inc, verdict(inc <= TODAY[0] / TODAY[1])]]
    return table(["source", "target", "measured", ""], rows)


def verdict(ok):
    return "met" if ok else "**missed**"


def render(r):
    v = r["versions"]
    images = r["images"]
    out = [TITLE, "",
           "Written by `bash tests/bench/used_blocks.sh%s` on %s (%d cores, kernel %s). strata at `%s`; %s; %s; %s; "
           "%s; %s." % (" --quick" if r["quick"] else "", r["date"], v["cores"], v["kernel"], r["commit"],
                        v["partclone"], v["zstd"], v["e2fsprogs"], v["xfsprogs"], v["ntfs-3g"]), "",
           "Run it with `bash tests/bench/used_blocks.sh [--quick] [WORKDIR]` as root (it installs partclone "
           "and the mkfs tools if missing, builds strata, keeps the images in WORKDIR, default "
           "/var/tmp/strata-fsbench, and rewrites only this section; `--quick`: 512 MiB images, one run, "
           "BENCHMARKS-quick.md). `tests/bench/run.sh` keeps this section when it rewrites the file.", "",
           "Sources: %d MiB raw images, each file system aged: 3/4 of its size written in files copied from "
           "this machine's /usr (a fixed, sorted selection), synced, 6 of every 7 deleted, then 300/2048 of its "
           "size of new files written; for the incremental a second version with every 33rd remaining file "
           "rewritten with new bytes, every 100th deleted and 1/40 of its size of new files added. ext4, XFS "
           "and NTFS each fill a whole image; the disk is GPT with an ext4 and an NTFS partition, aged the same "
           "way, and a small partition of an unknown type (half of it /usr bytes, a MiB of them rewritten in "
           "the second version). ext4 and XFS are written through the kernel, NTFS through ntfs-3g; all are "
           "unmounted cleanly." % r["fs_mib"], "",
           "Each run drops the page cache before every backup (every tool reads cold), and strata, "
           "partclone+zstd as is and partclone+zstd with `-f 0` take turns run by run (the order rotated "
           "every run): %d run%s per source; figures are "
           "medians, time ratios the median of the run-by-run ratios. strata: `strata backup --json SRC REPO` "
           "into an empty repository (stored: the repository's size), then `--incremental` of the second "
           "version into it. partclone+zstd: `partclone.<fs> -c -s IMG -o - | zstd -3 -T2 > FILE`; for the "
           "disk, as Clonezilla saves one (partclone has no disk mode), one after the other: each file system "
           "with `partclone.<fs> -c` from a loop device of its partition (`losetup -o START --sizelimit SIZE`), "
           "the unknown partition with `partclone.dd`, and the bytes outside the partitions (the GPT, its "
           "backup, the gaps) with `dd`, each through its own `zstd -3 -T2`; stored is the sum. partclone "
           "has no incremental." % (
               r["runs"], "s" if r["runs"] != 1 else ""), "",
           "### Full backups: stored", "", stored_table(images),
           "*Used* is what partclone maps as used (`partclone.<fs> -D`), plus everything outside the file "
           "systems for the disk: the least a file-system-aware copy keeps. *Sector by sector* is strata's "
           "`--sector-by-sector` full of the same image (one run): the figure before used blocks.", "",
           "### Full backups: time", "", time_table(images),
           "partclone's progress thread sleeps its refresh interval (2 s by default) between updates and "
           "the copy waits for it before it exits, so every call as is ends on a 2 s tick (a 512 MiB ext4: "
           "0.48 s with `-f 0`, 2.0 s without); `-f 0` (no sleep) measures its work, and is the figure the "
           "target is held to. Its stored bytes are the same either way.", "",
           "### Incrementals (second version)", "", incremental_table(images),
           "The ideal incremental counts the 4 KiB pages the second version's file systems use (partclone's "
           "map; for the disk also everything outside them) whose bytes differ from the first version's, the "
           "first version read with its unused pages as zeros (as a used-blocks copy holds it), compressed as "
           "one `zstd -3` stream; *ideal 64K*: the 64 KiB blocks holding those pages, their unused pages as "
           "zeros. Pages that the second version no longer uses are not counted. On the main benchmark's "
           "dataset strata stores its v1→v2 in %.1f MiB against an ideal 4K of %.1f (%.3f×): *today's*. "
           "*Sector by sector*: the same two versions backed up with `--sector-by-sector` (one run), what "
           "strata stores for them without the used-blocks mode." % (
               TODAY[0], TODAY[1], TODAY[0] / TODAY[1]), "",
           "### What the frames cost", "",
           "The same pages (the used pages of the first version; the changed pages of the incremental) "
           "compressed with `zstd -3` in different framings, against strata's stored data (`stored_bytes` of "
           "its `--json`: the image without its index); ratios to the one stream (for the full, what "
           "partclone+zstd stores; for the incremental, the ideal 4K).", "", framing_table(images),
           "### What strata found (the full's `--json` regions)", "", regions_table(images),
           "### Restores checked", "",
           "Both versions of each source restored with `strata restore` from the last run's repository, then "
           "checked read-only (`e2fsck -fn`, `xfs_repair -n`, `ntfsfix -n`) and mounted read-only beside the "
           "source to compare every file's SHA-256:", "", checks(images),
           "### Targets (issue 16), as measured in this run", "", targets(images)]
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "used_blocks_notes.md")
    if os.path.exists(notes) and not r["quick"]:
        out += [open(notes).read()]
    out += ["_Total time of this benchmark: %.0f s._" % r["seconds"], ""]
    return "\n".join(out)


def section(text):
    """(start, end) of the section in a report's text, or None."""
    start = text.find(TITLE + "\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + len(TITLE))
    return start, len(text) if end < 0 else end + 1


def keep(old_path, text):
    """`text` (a freshly rendered report) with this section carried over from the report at
    old_path, when that holds one: bench.py rewrites the whole file."""
    try:
        old = open(old_path).read()
    except OSError:
        return text
    where = section(old)
    return text if where is None else text.rstrip("\n") + "\n\n" + old[where[0]:where[1]]


def write(path, r):
    text = open(path).read() if os.path.exists(path) else ""
    where = section(text)
    new = render(r)
    if where is None:
        text = (text.rstrip("\n") + "\n\n" if text else "") + new
    else:
        text = text[:where[0]] + new + text[where[1]:]
    with open(path, "w") as f:
        f.write(text)
