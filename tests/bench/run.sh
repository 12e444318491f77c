#!/usr/bin/env bash
# strata against qcow2+zstd, borg and restic: installs what is missing (Debian packages),
# builds strata in release mode, runs tests/bench/bench.py and writes the report.
#
#   bash tests/bench/run.sh [--quick] [WORKDIR]       as root; report: BENCHMARKS.md
#   (BENCH_REPORT=FILE to write elsewhere; BENCH_ARGS="--tools strata,qcow2 --skip depth" to narrow)
set -euo pipefail
quick=()
if [ "${1:-}" = "--quick" ]; then quick=(--quick); shift; fi
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/strata-bench${quick:+-quick}}
mkdir -p "$work"
if [ ${#quick[@]} -gt 0 ]; then default_report=$root/BENCHMARKS-quick.md; else default_report=$root/BENCHMARKS.md; fi
report=${BENCH_REPORT:-$default_report}

. "$root/tests/bench/packages.sh"
mapfile -t need < <(missing_packages qemu-img:qemu-utils qemu-storage-daemon:qemu-utils borg:borgbackup restic:restic \
  zstd:zstd b3sum:b3sum mkfs.ext4:e2fsprogs fusermount3:fuse3 python3:python3 cmp:diffutils /usr/bin/time:time)
# borg mount needs its FUSE binding
python3 -c 'import pyfuse3' 2> /dev/null || python3 -c 'import llfuse' 2> /dev/null || \
  /usr/bin/python3 -c 'import pyfuse3' 2> /dev/null || need+=(python3-pyfuse3)
install_packages bench "${need[@]}"

(cd "$root" && cargo build --release -q -p strata-writer)
exec python3 "$root/tests/bench/bench.py" "${quick[@]}" --work "$work" --strata "$root/target/release/strata" \
  --report "$report" ${BENCH_ARGS:-}
