#!/usr/bin/env bash
# Mount and restore benchmark: sequential dd bs=1M through the FUSE mount (cold and warm page
# cache) against `strata restore` of the same version to /dev/null, at chain depths 1, 10 and
# 100, and the time until `strata mount` returns with 100 versions. Medians of 3 runs, ratios
# within this run. Writes the report to BENCH_REPORT (default: BENCHMARKS-mount.md).
#
#   bash tests/bench/mount.sh [--quick] [WORKDIR]      (as root: drops caches, loop mounts)
set -euo pipefail
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d /var/tmp/strata-bench.XXXXXX)}
mkdir -p "$work"
report=${BENCH_REPORT:-$root/BENCHMARKS-mount.md}
if [ "$quick" = 1 ]; then size_mb=256; data_mb=120; runs=3; else size_mb=2048; data_mb=1100; runs=3; fi

(cd "$root" && cargo build --release -q)
strata="$root/target/release/strata"
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() { "$strata" umount "$mnt" >/dev/null 2>&1 || true; }
trap cleanup EXIT

now() { date +%s.%N; }
median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# Dataset: a sparse raw image with an ext4 file system holding a fixed sorted selection of /usr.
img="$work/disk.img"
if [ ! -f "$img" ]; then
  files="$work/files"; mkdir -p "$files"
  { find /usr/lib /usr/share -type f -size +4k -size -20M 2>/dev/null || true; } | LC_ALL=C sort | \
    python3 -c '
import os, shutil, sys
limit = int(sys.argv[1]) << 20; dst = sys.argv[2]; total = 0
for i, line in enumerate(sys.stdin):
    src = line.rstrip("\n")
    try: n = os.path.getsize(src)
    except OSError: continue
    if total + n > limit: break
    try: shutil.copyfile(src, os.path.join(dst, "%06d" % i))
    except OSError: continue
    total += n
for _ in sys.stdin: pass  # drain, so that sort does not die of SIGPIPE
' "$data_mb" "$files"
  truncate -s "${size_mb}M" "$img"
  mkfs.ext4 -q -F -b 4096 -d "$files" "$img"
  rm -rf "$files"
fi

# one chain per depth: full + (depth-1) incrementals, each after 64 scattered 4 KiB writes
make_chain() { # repo depth
  local repo=$1 depth=$2
  rm -rf "$repo"
  cp --sparse=always "$img" "$work/src.img"
  "$strata" backup -q --sector-by-sector "$work/src.img" "$repo"
  for ((i = 2; i <= depth; i++)); do
    python3 -c '
import os, random, sys
r = random.Random(int(sys.argv[2])); f = os.open(sys.argv[1], os.O_WRONLY); size = os.fstat(f).st_size
for _ in range(64):
    os.pwrite(f, r.randbytes(4096), r.randrange(size // 4096) * 4096)
os.close(f)' "$work/src.img" "$i"
    "$strata" backup -q --sector-by-sector "$work/src.img" "$repo"
  done
}

restore_rate() { # repo cold|cached -> MB/s median
  local repo=$1 mode=$2 t=()
  for ((r = 0; r < runs; r++)); do
    if [ "$mode" = cold ]; then drop_caches; else cat "$repo"/*.strata > /dev/null; fi
    local s; s=$(now); "$strata" restore -q "$repo" latest /dev/null; local e; e=$(now)
    t+=("$(python3 -c "print($size_mb*1.048576/($e-$s))")")
  done
  median "${t[@]}"
}

dd_rate() { # file cold|warm -> MB/s median
  local file=$1 mode=$2 t=()
  for ((r = 0; r < runs; r++)); do
    if [ "$mode" != warm ]; then
      "$strata" umount "$mnt" >/dev/null
      if [ "$mode" = cold ]; then drop_caches; else cat "$cur_repo"/*.strata > /dev/null; fi
      "$strata" mount -q "$cur_repo" "$mnt"
    fi
    local s; s=$(now); dd if="$file" of=/dev/null bs=1M status=none; local e; e=$(now)
    t+=("$(python3 -c "print($size_mb*1.048576/($e-$s))")")
  done
  median "${t[@]}"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

rows=()
for depth in 1 10 100; do
  repo="$work/repo-$depth"
  make_chain "$repo" "$depth"
  cur_repo=$repo
  restore=$(restore_rate "$repo" cold)
  restore_c=$(restore_rate "$repo" cached)
  drop_caches
  s=$(now); "$strata" mount -q "$repo" "$mnt"; e=$(now)
  ready=$(python3 -c "print($e-$s)")
  pid=$(grep " $mnt " /proc/mounts | sed -n 's/^strata@\([0-9]*\).*/\1/p')
  file="$mnt/latest/disk.img"
  cold=$(dd_rate "$file" cold)
  cached=$(dd_rate "$file" cached)
  dd if="$file" of=/dev/null bs=1M status=none
  warm=$(dd_rate "$file" warm)
  pid=$(grep " $mnt " /proc/mounts | sed -n 's/^strata@\([0-9]*\).*/\1/p')
  rss=$(rss_kb "$pid")
  cmp "$file" "$work/src.img" && same=yes || same=NO
  "$strata" umount "$mnt" >/dev/null
  rows+=("| $depth | $(printf %.0f "$restore") | $(printf %.0f "$cold") | $(python3 -c "print(f'{$cold/$restore:.2f}')") | $(printf %.0f "$restore_c") | $(printf %.0f "$cached") | $(python3 -c "print(f'{$cached/$restore_c:.2f}')") | $(printf %.0f "$warm") | $(printf %.3f "$ready") | $((rss / 1024)) | $same |")
done

{
  echo "# Mount and restore benchmark"
  echo
  echo "Run by \`bash tests/bench/mount.sh$([ "$quick" = 1 ] && echo ' --quick')\` on $(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r)."
  echo "Dataset: a ${size_mb} MiB sparse raw image, ext4 holding ~${data_mb} MiB of files from /usr (fixed sorted"
  echo "selection); each incremental after 64 random 4 KiB writes. Block size 64 KiB, zstd level 3."
  echo "Rates in MB/s of the whole ${size_mb} MiB image, medians of $runs runs. *cold*: page cache dropped"
  echo "and driver restarted before each run; *cached*: repository files in the page cache, driver"
  echo "restarted (what the driver itself costs); *warm*: the same file read again through the mount"
  echo "(the kernel keeps the pages of a version). Mount reads are \`dd bs=1M\` of latest/disk.img;"
  echo "restores are \`strata restore REPO latest /dev/null\`."
  echo
  echo "| chain depth | restore cold | mount cold | ratio | restore cached | mount cached | ratio | mount warm | mount ready (s) | driver RSS (MiB) | cmp |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$report"
cat "$report"
