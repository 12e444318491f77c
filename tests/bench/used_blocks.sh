#!/usr/bin/env bash
# strata's used-blocks backups against partclone+zstd on aged ext4, XFS, NTFS and a GPT disk:
# installs what is missing (Debian packages), builds strata in release mode, runs
# tests/bench/used_blocks.py and writes its section of the report.
#
#   bash tests/bench/used_blocks.sh [--quick] [WORKDIR]     as root; report: BENCHMARKS.md
#   (--quick: 512 MiB images, one run, BENCHMARKS-quick.md; BENCH_REPORT=FILE to write elsewhere;
#   BENCH_ARGS="--only ext4,disk --runs 5" to narrow)
set -euo pipefail
quick=()
if [ "${1:-}" = "--quick" ]; then quick=(--quick); shift; fi
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/strata-fsbench}
mkdir -p "$work"
if [ ${#quick[@]} -gt 0 ]; then
  report=${BENCH_REPORT:-$root/BENCHMARKS-quick.md}; results=()
else
  report=${BENCH_REPORT:-$root/BENCHMARKS.md}; results=(--results "$root/tests/bench/used-blocks-results.json")
fi

. "$root/tests/bench/packages.sh"
mapfile -t need < <(missing_packages partclone.ext4:partclone zstd:zstd mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkntfs:ntfs-3g \
  ntfs-3g:ntfs-3g sfdisk:fdisk fusermount3:fuse3 python3:python3 /usr/bin/time:time)
install_packages used_blocks "${need[@]}"

(cd "$root" && cargo build --release -q -p strata-writer)
exec python3 "$root/tests/bench/used_blocks.py" "${quick[@]}" --work "$work" --strata "$root/target/release/strata" \
  --report "$report" "${results[@]}" ${BENCH_ARGS:-}
