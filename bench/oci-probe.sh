#!/bin/bash
# What the registry itself costs the lazy path, measured with curl against the storage
# bench/oci.sh left in WORKDIR (page cache dropped before each, R rounds):
#   cold open  GET of the manifest, then of the index blob (the first names the second)
#   ranges     the first 256 MiB of the data blob as one request, as 8 MiB ranges two
#              at a time (the lazy reader's pattern; one curl process per range), and
#              as 32 MiB ranges two at a time
# Usage (root): bench/oci-probe.sh WORKDIR     R=2 by default.
set -eu
. "$(dirname "$0")/oci-lib.sh"
W=$(realpath "$1"); R=${R:-2}
cd "$W"
[ -e reg/config.yml ] || { echo "no registry in $W: run bench/oci.sh $W first" >&2; exit 1; }
registry_up reg reg/probe.log
trap 'kill $RPID 2>/dev/null' EXIT
B=http://127.0.0.1:$PORT/v2/bench/ws
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'
LAYERS=$(curl -sf -H "$ACCEPT" "$B/manifests/v1" | python3 -c 'import json,sys; l=json.load(sys.stdin)["layers"]; print(l[0]["digest"], l[0]["size"], l[1]["digest"])')
read -r INDEX ISIZE DATA <<< "$LAYERS"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
T=$((256 << 20))
for r in $(seq "$R"); do
  drop
  m=$(curl -s -o /dev/null -w '%{time_total}' -H "$ACCEPT" "$B/manifests/v1")
  i=$(curl -s -o /dev/null -w '%{time_total}' -r "0-$((ISIZE - 1))" "$B/blobs/$INDEX")
  echo "cold open: manifest $m s, index blob ($ISIZE bytes) $i s"
  drop; s=$(now); curl -s -o /dev/null -r "0-$((T - 1))" "$B/blobs/$DATA"; e=$(now)
  echo "256 MiB as one request: $(echo "$e - $s" | bc) s"
  for MB in 8 32; do
    drop; s=$(now)
    seq 0 $((T / (MB << 20) - 1)) | xargs -P2 -I{} sh -c \
      "curl -s -o /dev/null -r \$(({} * $MB * 1048576))-\$(({} * $MB * 1048576 + $MB * 1048576 - 1)) $B/blobs/$DATA"
    e=$(now); echo "256 MiB as ${MB} MiB ranges, two at a time: $(echo "$e - $s" | bc) s"
  done
done
