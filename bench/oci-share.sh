#!/bin/bash
# A new version packed from scratch, opened on a host that has the previous one cached:
# bytes the registry sends for reading the whole new version (hexz-host extract), with
# chunk sharing across snapshots on and off (HEXZ_OCI_SHARE=0), and the time it takes.
# v1 is bench/oci.sh's workspace (a git clone of this repo, /usr/lib/x86_64-linux-gnu as
# vendor/, 256 MiB of random assets/blob.bin); v2 is the same tree with the repository
# checked out 20 commits earlier, 16 vendor libraries replaced by other files, and 8 MiB
# of new random bytes. Each packed on its own (`pack`, not `commit`): their frames
# differ, most chunks do not.
# Usage (root): bench/oci-share.sh [WORKDIR]   (after bench/oci.sh WORKDIR: uses its ws and ws.hxz)
# PERF=1 also records each extract with perf (WORKDIR/share-1.perf, share-0.perf).
set -eu
. "$(dirname "$0")/oci-lib.sh"
W=${1:-/tmp/hexz-bench-oci}
H=${HEXZ_HOST:-$(dirname "$0")/../target/release/hexz-host}; H=$(realpath "$H")
mkdir -p "$W"; cd "$W"
export HEXZ_OCI_PREFETCH=0
now() { date +%s.%N; }
[ -e ws.hxz ] || { echo "no workspace in $W: run bench/oci.sh $W first" >&2; exit 1; }
if [ ! -e ws2.hxz ]; then
  rm -rf ws2; cp -a ws ws2
  git -C ws2 checkout -q HEAD~20 2>/dev/null || true
  ls ws2/vendor/lib/*.so* 2>/dev/null | head -16 | while read -r f; do head -c 300000 /dev/urandom > "$f"; done
  head -c $((8 << 20)) /dev/urandom > ws2/assets/new.bin
  "$H" pack ws2 -o ws2.hxz
fi
registry_up share-reg
trap 'kill $RPID 2>/dev/null' EXIT
"$H" push ws.hxz "127.0.0.1:$PORT/bench/ws:v1" > /dev/null
"$H" push ws2.hxz "127.0.0.1:$PORT/bench/ws:v2" > /dev/null
Z2=$(( $(stat -c %s ws2.hxz) ))
# Bytes the registry sent for blob GETs since the mark (its access log has them).
sent() { tail -n +"$1" share-reg/log | grep -o 'http.response.written=[0-9]*' | cut -d= -f2 | paste -sd+ - | bc; }
rm -rf share-cache x1; export HEXZ_CACHE_DIR=$W/share-cache
"$H" extract "oci://127.0.0.1:$PORT/bench/ws:v1" x1 > /dev/null
cp -a share-cache share-cache-plain
for mode in 1 0; do
  if [ $mode = 0 ]; then export HEXZ_CACHE_DIR=$W/share-cache-plain; fi
  rm -rf x2; sync; echo 3 > /proc/sys/vm/drop_caches
  MARK=$(( $(wc -l < share-reg/log) + 1 ))
  s=$(now); HEXZ_OCI_SHARE=$mode ${PERF:+perf record -q -o $W/share-$mode.perf --} "$H" extract "oci://127.0.0.1:$PORT/bench/ws:v2" x2 > /dev/null; e=$(now)
  B=$(sent "$MARK")
  diff -r --no-dereference ws2 x2 -x .git > /dev/null || { echo "v2 extracted differs"; exit 1; }
  printf "share=%s  v2 read whole: %s bytes from the registry of %s (%.1f %%), %.2f s\n" \
    "$mode" "$B" "$Z2" "$(echo "100 * $B / $Z2" | bc -l)" "$(echo "$e - $s" | bc)"
done
rm -rf x1 x2 share-cache share-cache-plain
