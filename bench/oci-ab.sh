#!/bin/bash
# A/B of a cold sequential lazy read between two hexz-host binaries (e.g. two commits):
# `hexz-host cat oci://…/bench/ws:v1 assets/blob.bin > /dev/null` with an empty host
# cache and the page cache dropped, N interleaved runs each. Prints the median wall time
# and user+sys CPU per binary; with PERF=1 also one `perf record -a` run per binary and
# each process's (thread name's) share of all samples.
# Uses the workspace and registry storage that bench/oci.sh left in WORKDIR (run it first).
# Usage (root): bench/oci-ab.sh WORKDIR OLD_HEXZ NEW_HEXZ      N=5, PERF=0 by default.
set -eu
. "$(dirname "$0")/oci-lib.sh"
W=$(realpath "$1"); A=$(realpath "$2"); B=$(realpath "$3"); N=${N:-5}
cd "$W"
[ -e reg/config.yml ] || { echo "no registry in $W: run bench/oci.sh $W first" >&2; exit 1; }
registry_up reg reg/ab.log
trap 'kill $RPID 2>/dev/null' EXIT
REF=oci://127.0.0.1:$PORT/bench/ws:v1
export HEXZ_OCI_PREFETCH=0
med() { printf "%s\n" "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
one() { # $1 binary -> "wall cpu"
  export HEXZ_CACHE_DIR=$W/ab-cache; rm -rf "$HEXZ_CACHE_DIR"
  "$1" ls "$REF" / > /dev/null    # the index blob, cached: only the frames remain cold
  sync; echo 3 > /proc/sys/vm/drop_caches
  /usr/bin/time -f "%e %U %S" -o "$W/ab.time" "$1" cat "$REF" assets/blob.bin > /dev/null
  awk '{print $1, $2 + $3}' "$W/ab.time"
}
declare -A WALL CPU
for i in $(seq "$N"); do
  for v in A B; do
    bin=$A; [ $v = B ] && bin=$B
    read -r w c < <(one "$bin"); WALL[$v]+=" $w"; CPU[$v]+=" $c"
  done
done
for v in A B; do
  bin=$A; [ $v = B ] && bin=$B
  echo "$v $bin: wall $(med ${WALL[$v]}) s, user+sys $(med ${CPU[$v]}) s (medians of $N)"
done
if [ "${PERF:-0}" = 1 ]; then
  for v in A B; do
    bin=$A; [ $v = B ] && bin=$B
    export HEXZ_CACHE_DIR=$W/ab-cache; rm -rf "$HEXZ_CACHE_DIR"; "$bin" ls "$REF" / > /dev/null
    perf record -q -a -o "$W/ab.perf" "$bin" cat "$REF" assets/blob.bin > /dev/null 2>&1
    echo "$v: share of all samples by thread"
    perf report -i "$W/ab.perf" --no-children --sort comm --stdio 2>/dev/null | grep '%' | head -6
  done
fi
