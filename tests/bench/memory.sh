#!/bin/bash
# Peak memory of backup, verify, restore and the mount on a sparse source with scattered data
# (issue 17's targets: backup, restore and verify at most 128 MiB; the mount at most its cache
# plus 64 MiB with 8 versions opened; the mount ready in under 1 s).
#
#   bash tests/bench/memory.sh [SIZE_BYTES] [BLOCK_SIZE] [WORKDIR]
#
# Defaults: a 2 TiB source, 64 KiB blocks, /var/tmp/strata-memory. The source gets 16384
# scattered writes of one 64 KiB run each (1 GiB of data), then 7 more versions (incremental,
# differential, then incrementals), each after 500 scattered 4 KiB writes. Prints each
# command's wall time and peak RSS (GNU time), the mount's time to ready and its peak RSS after
# 2000 random 64 KiB reads from each of the 8 versions. Needs root or /dev/fuse for the mount.
set -euo pipefail
SIZE=${1:-$((2 << 40))}
BS=${2:-65536}
WORK=${3:-/var/tmp/strata-memory}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release -q -p strata-writer --manifest-path "$ROOT/Cargo.toml"
S="$ROOT/target/release/strata"
mkdir -p "$WORK" && cd "$WORK"
rm -rf repo src.img out.img mnt && mkdir mnt
MP=
cleanup() {
    if [ -n "$MP" ]; then fusermount -u mnt 2>/dev/null || umount mnt 2>/dev/null || true; wait "$MP" 2>/dev/null || true; fi
    rm -f src.img out.img
}
trap cleanup EXIT
scatter() { # scatter COUNT LENGTH SEED
    python3 - "$SIZE" "$1" "$2" "$3" <<'PY'
import os, random, sys
size, count, length, seed = map(int, sys.argv[1:5])
r = random.Random(seed)
fd = os.open("src.img", os.O_CREAT | os.O_RDWR, 0o644)
if os.fstat(fd).st_size != size:
    os.ftruncate(fd, size)
for _ in range(count):
    os.pwrite(fd, os.urandom(length), r.randrange(size // 65536) * 65536)
os.close(fd)
PY
}
measure() { /usr/bin/time -f "%e s, peak %M KiB" "$@" 2>&1 >/dev/null | tail -1; }
echo "source $SIZE bytes, blocks of $BS bytes ($(uname -r), $(nproc) cores)"
scatter 16384 65536 7
echo "full:         $(measure "$S" backup --full --sector-by-sector --block-size "$BS" src.img repo)"
seed=8
for kind in incremental differential incremental incremental incremental incremental incremental; do
    scatter 500 4096 $seed
    seed=$((seed + 1))
    echo "$(printf '%-13s' "$kind:") $(measure "$S" backup --$kind --sector-by-sector src.img repo)"
done
echo "verify:       $(measure "$S" verify repo)"
echo "restore 8:    $(measure "$S" restore repo 8 out.img)"
rm -f out.img
t0=$(date +%s.%N)
"$S" mount -f repo mnt 2>/dev/null & MP=$!
for _ in $(seq 1 1000); do [ -e mnt/8/disk.img ] && break; sleep 0.01; done
t1=$(date +%s.%N)
echo "mount ready:  $(echo "$t1 - $t0" | bc) s"
python3 - "$SIZE" <<'PY'
import os, random, sys
size = int(sys.argv[1]); r = random.Random(7)
offsets = [r.randrange(size // 65536) * 65536 for _ in range(2000)]
for v in range(1, 9):
    fd = os.open(f"mnt/{v}/disk.img", os.O_RDONLY)
    for off in offsets:
        os.pread(fd, 65536, off)
    os.close(fd)
PY
echo "mount, after 2000 random reads of each of 8 versions: peak $(awk '/VmHWM/ {print $2}' /proc/$MP/status) KiB (cache 128 MiB)"
