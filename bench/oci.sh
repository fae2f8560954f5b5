#!/bin/bash
# Lazy opening of a snapshot from an OCI registry (docker-registry on loopback) against a
# local file and against a full `pull`, on a ~1 GiB workspace (a git clone of this repo,
# a copy of /usr/lib/x86_64-linux-gnu as an ignored vendor/ directory, and 256 MiB of
# incompressible assets/blob.bin). Prints, as medians of N rounds:
#   open       `hexz-host ls SNAP /`: local file, oci:// with the index cached, oci:// cold
#              (page cache dropped before each), and both again with the page cache warm
#   first      time to the first byte of README.md through `hexz-host mount`: local file,
#              oci:// lazily (cold chunk cache), and `pull` + mount of the pulled file
#   job        `git status` + reading 6 files through a lazy oci:// mount (cold cache):
#              bytes fetched from the registry (hexz's count and the registry's log)
#              as a share of the snapshot
#   seq        reading assets/blob.bin (incompressible) through `hexz-host cat`: local
#              file (page cache dropped), oci:// with the registry's storage cold and
#              warm, and curl downloading the data blob under the same two conditions
# Usage (root): bench/oci.sh [WORKDIR]     N=5 by default; needs docker-registry, git, curl.
set -eu
. "$(dirname "$0")/oci-lib.sh"
W=${1:-/tmp/hexz-bench-oci}; N=${N:-5}
H=${HEXZ_HOST:-$(dirname "$0")/../target/release/hexz-host}; H=$(realpath "$H")
REPO_SRC=$(realpath "$(dirname "$0")/..")
mkdir -p "$W"; cd "$W"
export HEXZ_OCI_PREFETCH=0
now() { date +%s.%N; }
med() { printf "%s\n" "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

if [ ! -e ws.hxz ]; then
  rm -rf ws; git clone -q "$REPO_SRC" ws
  mkdir -p ws/vendor ws/assets
  cp -a /usr/lib/x86_64-linux-gnu ws/vendor/lib
  head -c $((256 << 20)) /dev/urandom > ws/assets/blob.bin
  printf 'vendor/\nassets/\n' >> ws/.git/info/exclude
  git -C ws status --porcelain > /dev/null   # refresh the index's stat data
  "$H" pack ws -o ws.hxz
fi
SIZE=$(stat -c %s ws.hxz)

# The registry: loopback, filesystem storage, request log at info level (a fresh port
# each run, the storage kept).
rm -f reg/config.yml
registry_up reg
trap 'kill $RPID 2>/dev/null; umount mnt 2>/dev/null || true' EXIT
REF=127.0.0.1:$PORT/bench/ws:v1
"$H" push ws.hxz "$REF" > push.out; cat push.out
DATA=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://127.0.0.1:$PORT/v2/bench/ws/manifests/v1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][1]["digest"])')
fresh() { rm -rf cache; export HEXZ_CACHE_DIR=$W/cache; }
t() { local s=$(now); "$@" > /dev/null 2>&1; local e=$(now); echo "$e - $s" | bc; }

# open
# By tag (the registry is asked which manifest the tag names, every time) and by the
# digest `push` printed (a pinned reference: the cached manifest, no request).
PINNED=$(grep -o 'oci://[^ ]*' push.out | head -1)
L=(); C=(); K=(); P=()
for i in $(seq "$N"); do
  drop; L+=($(t "$H" ls ws.hxz /))
  fresh; drop; K+=($(t "$H" ls "oci://$REF" /))
  drop; C+=($(t "$H" ls "oci://$REF" /))
  drop; P+=($(t "$H" ls "$PINNED" /))
done
echo "open   local $(med "${L[@]}") s; oci:// index cached $(med "${C[@]}") s (by digest $(med "${P[@]}") s); oci:// cold $(med "${K[@]}") s  (page cache dropped before each)"
L=(); C=(); P=()
for i in $(seq $((N * 4))); do L+=($(t "$H" ls ws.hxz /)); C+=($(t "$H" ls "oci://$REF" /)); P+=($(t "$H" ls "$PINNED" /)); done
echo "open   local $(med "${L[@]}") s; oci:// index cached $(med "${C[@]}") s (by digest $(med "${P[@]}") s)  (page cache warm, the registry's included)"

# first byte through a mount
mkdir -p mnt
first() { # $1 snapshot
  local s=$(now)
  "$H" mount "$1" mnt --daemon --log "$W/m.log" --pid-file "$W/m.pid" > /dev/null
  head -c1 mnt/README.md > /dev/null
  local e=$(now); umount mnt; while [ -e m.pid ]; do sleep 0.05; done
  echo "$e - $s" | bc
}
L=(); Z=(); P=()
for i in $(seq "$N"); do
  drop; L+=($(first ws.hxz))
  fresh; drop; Z+=($(first "oci://$REF"))
  fresh; rm -f pulled.hxz; drop
  s=$(now); "$H" pull "$REF" -o pulled.hxz > /dev/null; e=$(now)
  P+=($(echo "$(echo "$e - $s" | bc) + $(first pulled.hxz)" | bc))
done
echo "first  local $(med "${L[@]}") s; oci:// lazy $(med "${Z[@]}") s; pull + mount $(med "${P[@]}") s"

# read-mostly job: bytes fetched
J=(); R=(); T=()
for i in $(seq "$N"); do
  fresh; drop
  : > reg/log.mark; LOGSTART=$(stat -c %s reg/log)
  s=$(now)
  RUST_LOG=hexz_host=info "$H" mount "oci://$REF" mnt --daemon --log "$W/j.log" --pid-file "$W/m.pid" > /dev/null
  (cd mnt && git status --porcelain > /dev/null && cat README.md Cargo.toml host/src/lib.rs \
     host/src/main.rs docs/FORMAT.md protocol/src/lib.rs > /dev/null)
  e=$(now); T+=($(echo "$e - $s" | bc))
  umount mnt; while [ -e m.pid ]; do sleep 0.05; done
  J+=($(grep -o 'fetched [0-9]* bytes' j.log | awk '{s+=$2} END {print s+0}'))
  # The registry's own count: bytes written for blob GETs since the mark.
  R+=($(tail -c +$((LOGSTART + 1)) reg/log | grep 'blobs/sha256' | grep -o 'http.response.written=[0-9]*' \
        | cut -d= -f2 | awk '{s+=$1} END {print s+0}'))
  rm -f j.log
done
JB=$(med "${J[@]}"); RB=$(med "${R[@]}")
echo "job    git status + 6 files: $(med "${T[@]}") s; fetched $JB bytes (registry log: $RB bytes incl. the index blob) of $SIZE = $(echo "scale=2; 100 * $RB / $SIZE" | bc) %"

# sequential read. "cold": the registry's storage and this host's page cache dropped
# before each of the lazy read and the curl download; "warm": the registry's files in
# the page cache for both (this host's registry cache still empty for the lazy read).
BLOB=$(stat -c %s ws/assets/blob.bin)
DS=$(stat -c %s reg/data/docker/registry/v2/blobs/sha256/${DATA:7:2}/${DATA:7}/data)
ticks() { awk '{print $14 + $15}' /proc/$RPID/stat; }
L=(); Z=(); D=(); F=(); ZW=(); DW=(); RZ=(); RD=()
for i in $(seq "$N"); do
  drop; L+=($(t "$H" cat ws.hxz assets/blob.bin))
  fresh; "$H" ls "oci://$REF" / > /dev/null; drop
  a=$(ticks); Z+=($(t "$H" cat "oci://$REF" assets/blob.bin)); RZ+=($(( $(ticks) - a )))
  drop; a=$(ticks); D+=($(t curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/bench/ws/blobs/$DATA")); RD+=($(( $(ticks) - a )))
  drop; F+=($(t curl -sf -o "$W/blob.copy" "http://127.0.0.1:$PORT/v2/bench/ws/blobs/$DATA")); rm -f "$W/blob.copy"
  fresh; "$H" ls "oci://$REF" / > /dev/null; ZW+=($(t "$H" cat "oci://$REF" assets/blob.bin))
  DW+=($(t curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/bench/ws/blobs/$DATA"))
done
l=$(med "${L[@]}"); z=$(med "${Z[@]}"); d=$(med "${D[@]}"); f=$(med "${F[@]}"); zw=$(med "${ZW[@]}"); dw=$(med "${DW[@]}")
mib() { echo "$1 / $2 / 1048576" | bc; }
echo "seq    blob.bin $BLOB bytes: local $l s ($(mib $BLOB $l) MiB/s); oci:// cold $z s ($(mib $BLOB $z) MiB/s), warm registry $zw s ($(mib $BLOB $zw) MiB/s)"
echo "       curl of the data blob ($DS bytes) cold: to /dev/null $d s ($(mib $DS $d) MiB/s), to a file $f s ($(mib $DS $f) MiB/s); warm registry: to /dev/null $dw s ($(mib $DS $dw) MiB/s)"
echo "       registry CPU (1/100 s) per run: lazy read $(med "${RZ[@]}"), curl $(med "${RD[@]}")"
echo "       lazy/raw download: cold $(echo "scale=2; ($BLOB / $z) / ($DS / $d)" | bc) (/dev/null), $(echo "scale=2; ($BLOB / $z) / ($DS / $f)" | bc) (file); warm registry $(echo "scale=2; ($BLOB / $zw) / ($DS / $dw)" | bc)"
