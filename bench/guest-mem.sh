#!/usr/bin/env bash
# The guest daemon's memory and CPU inside a sandbox, per build of it: boots
# `hexz-host run SNAPSHOT --memory $MEM --cold` with each given guest-binary directory
# and, in the guest, reads the daemon's resident memory (VmRSS) once mounted and after a
# cold `find . -type f | xargs stat` of /workspace, its CPU ticks (100/s) at both points,
# the walk's time (from /proc/uptime) and the guest's AnonHugePages after the walk.
# Builds take turns, N boots each. docs/BENCHMARKS.md, "The codec on cbor4ii, and no huge
# pages for the daemon".
# Usage: bench/guest-mem.sh SNAPSHOT LABEL=GUEST_BIN_DIR ...    (MEM=1G, N=2)
#   e.g. bench/guest-mem.sh bench/out/vm/tree.hxz old=/tmp/old-guest new=target/x86_64-unknown-linux-musl/release
# Needs what `hexz-host run` needs (QEMU, vhost-device-vsock, the image); TCG is used.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HEXZ=${HEXZ:-$ROOT/target/release/hexz-host}
MEM=${MEM:-1G}
N=${N:-2}
SNAP=${1:?usage: bench/guest-mem.sh SNAPSHOT LABEL=GUEST_BIN_DIR ...}
shift
[ $# -gt 0 ] || { echo "guest-mem.sh: name at least one LABEL=GUEST_BIN_DIR" >&2; exit 2; }

# Printed by the guest, one "key value" per line.
PROBE='P=$(pidof hexz-guestfused)
rss() { awk "/VmRSS/ {print \$2}" /proc/$P/status; }
ticks() { cut -d" " -f14,15 /proc/$P/stat | awk "{print \$1 + \$2}"; }
echo "rss_mounted $(rss)"; echo "ticks_mounted $(ticks)"
S=$(cut -d" " -f1 /proc/uptime)
find . -type f | xargs stat > /dev/null
E=$(cut -d" " -f1 /proc/uptime)
echo "walk_s $(awk "BEGIN {print $E - $S}")"
echo "rss_walked $(rss)"; echo "ticks_walked $(ticks)"
echo "anon_huge $(awk "/AnonHugePages/ {print \$2}" /proc/meminfo)"
echo "thp $(cat /sys/kernel/mm/transparent_hugepage/enabled)"'

echo "| build | boot | THP setting | RSS mounted (kB) | RSS after walk (kB) | AnonHugePages (kB) | CPU ticks at mount | CPU ticks in walk | walk s |"
echo "|---|---|---|---|---|---|---|---|---|"
for i in $(seq "$N"); do
  for b in "$@"; do
    out=$("$HEXZ" run "$SNAP" --memory "$MEM" --cold --guest-bin-dir "${b#*=}" --accel tcg -q \
      --timeout 5m -- sh -c "$PROBE" 2>&1) || { echo "guest-mem.sh: run failed: $out" >&2; exit 1; }
    v() { printf '%s\n' "$out" | awk -v k="$1" '$1 == k {$1 = ""; sub(/^ /, ""); print; exit}'; }
    echo "| ${b%%=*} | $i | $(v thp) | $(v rss_mounted) | $(v rss_walked) | $(v anon_huge) |" \
      "$(v ticks_mounted) | $(( $(v ticks_walked) - $(v ticks_mounted) )) | $(v walk_s) |"
  done
done
