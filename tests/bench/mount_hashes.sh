#!/usr/bin/env bash
# What checking BLAKE3 hashes costs a read through the mount: `dd bs=1M` of latest/disk.img with
# hash checks and with `--no-verify-hashes`, alternated run by run in the same go, cold (page
# cache dropped, driver restarted) and cached (repository files in the page cache, driver
# restarted: the driver's own cost), for a full and for a 10-deep chain (patches). Prints the
# medians of the rates and of the driver's CPU time (user + system) per read, and their ratios.
#
#   bash tests/bench/mount_hashes.sh [--runs N] [WORKDIR]   (as root: drops caches)
set -euo pipefail
runs=5
if [ "${1:-}" = "--runs" ]; then runs=$2; shift 2; fi
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d /var/tmp/strata-hashes.XXXXXX)}
mkdir -p "$work"
size_mb=512; data_mb=300

(cd "$root" && cargo build --release -q)
strata="$root/target/release/strata"
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() { "$strata" umount "$mnt" >/dev/null 2>&1 || true; }
trap cleanup EXIT

now() { date +%s.%N; }
median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

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
for _ in sys.stdin: pass
' "$data_mb" "$files"
  truncate -s "${size_mb}M" "$img"
  mkfs.ext4 -q -F -b 4096 -d "$files" "$img"
  rm -rf "$files"
fi

make_chain() { # repo depth
  local repo=$1 depth=$2
  [ -d "$repo" ] && return
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

one_run() { # repo cold|cached flag... -> MB/s
  local repo=$1 mode=$2; shift 2
  "$strata" umount "$mnt" >/dev/null 2>&1 || true
  if [ "$mode" = cold ]; then drop_caches; else cat "$repo"/*.strata > /dev/null; fi
  "$strata" mount -q "$@" "$repo" "$mnt"
  local pid; pid=$(grep " $mnt " /proc/mounts | sed -n 's/^strata@\([0-9]*\).*/\1/p')
  local c0; c0=$(cpu "$pid")
  local s; s=$(now); dd if="$mnt/latest/disk.img" of=/dev/null bs=1M status=none; local e; e=$(now)
  local c1; c1=$(cpu "$pid")
  "$strata" umount "$mnt" >/dev/null
  python3 -c "print(f'{$size_mb*1.048576/($e-$s):.1f}/{($c1-$c0)/100:.2f}')"
}

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # driver user+system time, in ticks

echo "| chain depth | read | checked MB/s | unchecked MB/s | ratio | checked driver CPU s | unchecked driver CPU s | ratio | runs (MB/s/CPU s) |"
echo "|---|---|---|---|---|---|---|---|---|"
for depth in 1 10; do
  repo="$work/repo-$depth"
  make_chain "$repo" "$depth"
  for mode in cold cached; do
    on=(); off=()
    for ((r = 0; r < runs; r++)); do
      if ((r % 2)); then
        off+=("$(one_run "$repo" "$mode" --no-verify-hashes)"); on+=("$(one_run "$repo" "$mode")")
      else
        on+=("$(one_run "$repo" "$mode")"); off+=("$(one_run "$repo" "$mode" --no-verify-hashes)")
      fi
    done
    rate() { printf '%s\n' "$@" | cut -d/ -f1; }
    secs() { printf '%s\n' "$@" | cut -d/ -f2; }
    m_on=$(median $(rate "${on[@]}")); m_off=$(median $(rate "${off[@]}"))
    c_on=$(median $(secs "${on[@]}")); c_off=$(median $(secs "${off[@]}"))
    printf '| %s | %s | %.0f | %.0f | %.3f | %.2f | %.2f | %.3f | %s |\n' "$depth" "$mode" "$m_on" "$m_off" \
      "$(python3 -c "print($m_on/$m_off)")" "$c_on" "$c_off" "$(python3 -c "print($c_on/$c_off)")" \
      "checked: ${on[*]}; unchecked: ${off[*]}"
  done
done
