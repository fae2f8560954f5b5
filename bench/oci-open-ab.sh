#!/bin/bash
# A/B of a first open of a tag between two hexz-host binaries: `hexz-host ls
# oci://…/bench/ws:v1 /` with nothing in the host cache and every page cache dropped
# (the registry's storage and the binaries included), N interleaved runs each, beside
# the local open of the same snapshot (`ls ws.hxz /`, page cache dropped). Prints the
# medians in ms and each binary's ratio to the local open.
# Uses the workspace and registry storage that bench/oci.sh left in WORKDIR (run it first).
# Usage (root): bench/oci-open-ab.sh WORKDIR OLD_HEXZ NEW_HEXZ      N=15 by default.
set -eu
. "$(dirname "$0")/oci-lib.sh"
W=$(realpath "$1"); A=$(realpath "$2"); B=$(realpath "$3"); N=${N:-15}
cd "$W"
[ -e reg/config.yml ] || { echo "no registry in $W: run bench/oci.sh $W first" >&2; exit 1; }
registry_up reg reg/open-ab.log
trap 'kill $RPID 2>/dev/null' EXIT
REF=oci://127.0.0.1:$PORT/bench/ws:v1
export HEXZ_CACHE_DIR=$W/open-ab-cache HEXZ_OCI_PREFETCH=0
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
ms() { local s; s=$(date +%s%N); "$@" > /dev/null; echo $(( ($(date +%s%N) - s) / 1000 )); }
med() { printf "%s\n" "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
L=(); OA=(); OB=()
for _ in $(seq "$N"); do
  drop; L+=("$(ms "$B" ls ws.hxz /)")
  rm -rf "$HEXZ_CACHE_DIR"; drop; OA+=("$(ms "$A" ls "$REF" /)")
  rm -rf "$HEXZ_CACHE_DIR"; drop; OB+=("$(ms "$B" ls "$REF" /)")
done
l=$(med "${L[@]}"); a=$(med "${OA[@]}"); b=$(med "${OB[@]}")
echo "local open $(echo "scale=1; $l / 1000" | bc) ms (medians of $N, every page cache dropped)"
echo "A $A: $(echo "scale=1; $a / 1000" | bc) ms, $(echo "scale=2; $a / $l" | bc)x local"
echo "B $B: $(echo "scale=1; $b / 1000" | bc) ms, $(echo "scale=2; $b / $l" | bc)x local"
