#!/usr/bin/env bash
# Guest daemon benchmark: the tree mounted by hexz-guestfused (over a Unix socket to
# hexz-host serve) vs the same tree on a local directory, side by side in one run:
# tar, find|stat, git status, a 1 GiB sequential read, 4 KiB random reads.
# Usage: sudo bench/guest.sh   (RUNS=3; needs root for FUSE and drop_caches)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}/guest
RUNS=${RUNS:-3}
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -q -p hexz-host --bin hexz-host --example randread
cargo build --release -q -p hexz-guestfused
HEXZ=$ROOT/target/release/hexz-host
GUEST=$ROOT/target/release/hexz-guestfused
RANDREAD=$ROOT/target/release/examples/randread

TREE=$OUT/tree
if [ ! -d "$TREE/.git" ]; then
  rm -rf "$TREE"
  CORPUS=${CORPUS:-$ROOT/bench/out/corpus}
  [ -d "$CORPUS" ] || { echo "run bench/pack.sh first (it builds bench/out/corpus) or set CORPUS" >&2; exit 2; }
  cp -a "$CORPUS" "$TREE"
  git -C "$TREE" init -q
  git -C "$TREE" add -A
  # No background auto-gc: it would move objects while the tree is being packed.
  git -C "$TREE" -c gc.auto=0 -c user.email=b@hexz -c user.name=bench commit -qm tree
  git -C "$TREE" gc -q
fi
if [ ! -f "$OUT/big/1g.bin" ]; then
  mkdir -p "$OUT/big"
  head -c 1G /dev/urandom > "$OUT/big/1g.bin"
fi
[ -f "$OUT/tree.hxz" ] || "$HEXZ" pack "$TREE" -o "$OUT/tree.hxz" >/dev/null
[ -f "$OUT/big.hxz" ] || "$HEXZ" pack "$OUT/big" -o "$OUT/big.hxz" >/dev/null

PIDS=(); MNTS=()
cleanup() {
  for m in "${MNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_snap() { # snapshot name -> mountpoint
  local snap=$1 name=$2 sock=$OUT/$2.sock mnt=$OUT/mnt-$2
  mkdir -p "$mnt"; rm -f "$sock"
  "$HEXZ" serve "$snap" --listen "unix:$sock" >/dev/null 2>"$OUT/$name-serve.log" & PIDS+=($!)
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  "$GUEST" "$mnt" --connect "unix:$sock" >/dev/null 2>"$OUT/$name-guest.log" & PIDS+=($!)
  for _ in $(seq 200); do grep -q " $mnt fuse" /proc/mounts && break; sleep 0.05; done
  MNTS+=("$mnt")
}
mount_snap "$OUT/tree.hxz" tree
mount_snap "$OUT/big.hxz" big
MT=$OUT/mnt-tree; MB=$OUT/mnt-big

now() { date +%s.%N; }
# median of RUNS, after one warm-up run; $1 = directory, $2 = command run inside it
timeit() {
  local ts=() t0 t1
  (cd "$1" && eval "$2") >/dev/null 2>&1
  for _ in $(seq "$RUNS"); do
    t0=$(now); (cd "$1" && eval "$2") >/dev/null 2>&1; t1=$(now)
    ts+=("$(echo "$t1 - $t0" | bc -l)")
  done
  printf '%s\n' "${ts[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"
}
row() { # what local mount
  printf '| %s | %.3f s | %.3f s | %.2f |\n' "$1" "$2" "$3" "$(echo "$3 / $2" | bc -l)"
}
(cd "$TREE" && find . -type f -size +0 -not -path './.git/*' -printf '%P\t%s\n') | shuf -n 2000 --random-source=<(yes) \
  | awk -F'\t' 'BEGIN{srand(11)} {o=int(rand()*$2/4096)*4096; print $1 "\t" o}' > "$OUT/reads.tsv"
ops() { echo "$1" | awk -v p="$2" '$1==p{print $4}'; }

{
echo "### Guest mount vs local directory, warm ($(date -u +%F), $(find "$TREE" -type f | wc -l) files)"
echo
echo "| workload | local dir | hexz-guestfused mount | ratio mount/local |"
echo "|---|---|---|---|"
row 'tar cf - . \| wc -c' "$(timeit "$TREE" 'tar cf - . | wc -c')" "$(timeit "$MT" 'tar cf - . | wc -c')"
row 'find . -type f \| xargs stat' "$(timeit "$TREE" 'find . -type f -print0 | xargs -0 stat')" "$(timeit "$MT" 'find . -type f -print0 | xargs -0 stat')"
row 'git status' "$(timeit "$TREE" 'git status --porcelain')" "$(timeit "$MT" 'git status --porcelain')"
row '1 GiB sequential read (dd bs=1M)' "$(timeit "$OUT/big" 'dd if=1g.bin of=/dev/null bs=1M')" "$(timeit "$MB" 'dd if=1g.bin of=/dev/null bs=1M')"
L=$("$RANDREAD" dir "$TREE" "$OUT/reads.tsv"); M=$("$RANDREAD" dir "$MT" "$OUT/reads.tsv")
row '2000 × open + 4 KiB pread, random files (warm pass)' "$(ops "$L" warm)" "$(ops "$M" warm)"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); dd if="$OUT/big/1g.bin" of=/dev/null bs=1M 2>/dev/null; t1=$(now); LC=$(echo "$t1 - $t0" | bc -l)
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); dd if="$MB/1g.bin" of=/dev/null bs=1M 2>/dev/null; t1=$(now); MC=$(echo "$t1 - $t0" | bc -l)
row '1 GiB sequential read, cold (first read after dropping caches)' "$LC" "$MC"
} | tee "$OUT/guest-results.md"
