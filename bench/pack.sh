#!/usr/bin/env bash
# Snapshot format benchmark (issue: foundation): pack time and size, extract time, and
# random 4 KiB reads, hexz side by side with tar|zstd and squashfs on the same tree.
# Usage: bench/pack.sh            (RUNS=3 by default; CORPUS=<dir> to choose the tree)
# Needs root (drop_caches, loop mount) and: squashfs-tools zstd squashfuse fuse3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}
RUNS=${RUNS:-3}
READS=${READS:-2000}
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -q -p hexz-host --bin hexz-host --example randread
HEXZ=$ROOT/target/release/hexz-host
RANDREAD=$ROOT/target/release/examples/randread
for t in mksquashfs unsquashfs zstd squashfuse squashfuse_ll fusermount3; do
  command -v $t >/dev/null || { echo "missing $t: apt-get install squashfs-tools zstd squashfuse fuse3" >&2; exit 2; }
done

CORPUS=${CORPUS:-$OUT/corpus}
if [ ! -d "$CORPUS" ]; then
  # Rust crate sources + a Python stdlib, like the tree in shared/TARGETS.md.
  mkdir -p "$CORPUS"
  [ -d "$HOME/.cargo/registry/src" ] && cp -a "$HOME/.cargo/registry/src" "$CORPUS/crates"
  for py in "$HOME"/.pyenv/versions/*/lib/python3.*; do [ -d "$py" ] && cp -a "$py" "$CORPUS/python" && break; done
  [ -d "$CORPUS/python" ] || cp -a /usr/lib/python3* "$CORPUS/python"
fi
FILES=$(find "$CORPUS" -type f | wc -l)
BYTES=$(du -sb "$CORPUS" | cut -f1)
echo "corpus: $CORPUS, $FILES files, $((BYTES / 1048576)) MiB"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# median of RUNS timings of a command (warm source cache: every tool reads the same cached tree)
timeit() {
  local ts=() t0 t1
  for _ in $(seq "$RUNS"); do
    eval "$PREP" >/dev/null 2>&1 || true
    t0=$(now); eval "$1" >/dev/null 2>&1; t1=$(now)
    ts+=("$(echo "$t1 - $t0" | bc -l)")
  done
  printf '%s\n' "${ts[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p" | xargs printf '%.2f\n'
}
cat "$CORPUS" >/dev/null 2>&1 || true; tar cf - -C "$CORPUS" . >/dev/null

PREP="rm -f $OUT/h.hxz"
T_HEXZ=$(timeit "$HEXZ pack $CORPUS -o $OUT/h.hxz")
PREP="rm -f $OUT/lz.hxz"
T_HEXZ_LZ4=$(timeit "$HEXZ pack $CORPUS -o $OUT/lz.hxz --compression lz4")
PREP="rm -f $OUT/t.tar.zst"
T_TAR=$(timeit "tar cf - -C $CORPUS . | zstd -3 -T0 -q -o $OUT/t.tar.zst")
PREP="rm -f $OUT/s3.sqfs"
T_SQ3=$(timeit "mksquashfs $CORPUS $OUT/s3.sqfs -comp zstd -Xcompression-level 3 -noappend -quiet")
S_HEXZ=$(stat -c %s "$OUT/h.hxz"); S_LZ4=$(stat -c %s "$OUT/lz.hxz")
S_TAR=$(stat -c %s "$OUT/t.tar.zst"); S_SQ3=$(stat -c %s "$OUT/s3.sqfs")

PREP="rm -rf $OUT/x; sync"
X_HEXZ=$(timeit "$HEXZ extract $OUT/h.hxz $OUT/x")
X_SQ=$(timeit "unsquashfs -q -d $OUT/x $OUT/s3.sqfs")
X_TAR=$(timeit "mkdir -p $OUT/x && zstd -dc $OUT/t.tar.zst | tar xf - -C $OUT/x")
rm -rf "$OUT/x"; PREP=true

# Random 4 KiB reads: the same (file, offset) list for every reader.
(cd "$CORPUS" && find . -type f -size +0 -printf '%P\t%s\n') | shuf -n "$READS" --random-source=<(yes) \
  | awk -F'\t' 'BEGIN{srand(7)} {o=int(rand()*$2/4096)*4096; print $1 "\t" o}' > "$OUT/reads.tsv"
MNT=$OUT/mnt; mkdir -p "$MNT"
rr() { drop; "$RANDREAD" "$@" "$OUT/reads.tsv"; }
R_HEXZ=$(rr snapshot "$OUT/h.hxz")
mount -t squashfs -o loop,ro "$OUT/s3.sqfs" "$MNT"; R_KSQ=$(rr dir "$MNT"); umount "$MNT"
squashfuse "$OUT/s3.sqfs" "$MNT"; R_SQF=$(rr dir "$MNT"); fusermount3 -u "$MNT"
squashfuse_ll "$OUT/s3.sqfs" "$MNT"; R_SQLL=$(rr dir "$MNT"); fusermount3 -u "$MNT"
ops() { echo "$1" | awk -v p="$2" '$1==p{print $2}'; }

ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
mb() { printf '%.1f' "$(echo "$1 / 1048576" | bc -l)"; }
{
echo "### Snapshot format: $FILES files, $((BYTES / 1048576)) MiB (median of $RUNS, $(date -u +%F))"
echo
echo "| what | hexz | peer | ratio hexz/peer |"
echo "|---|---|---|---|"
echo "| pack time vs \`mksquashfs -comp zstd -Xcompression-level 3\` | $T_HEXZ s | $T_SQ3 s | $(ratio $T_HEXZ $T_SQ3) |"
echo "| pack time vs \`tar \| zstd -3 -T0\` | $T_HEXZ s | $T_TAR s | $(ratio $T_HEXZ $T_TAR) |"
echo "| pack time, hexz lz4 vs mksquashfs zstd-3 | $T_HEXZ_LZ4 s | $T_SQ3 s | $(ratio $T_HEXZ_LZ4 $T_SQ3) |"
echo "| size vs mksquashfs zstd-3 | $(mb $S_HEXZ) MiB | $(mb $S_SQ3) MiB | $(ratio $S_HEXZ $S_SQ3) |"
echo "| size vs tar \| zstd -3 | $(mb $S_HEXZ) MiB | $(mb $S_TAR) MiB | $(ratio $S_HEXZ $S_TAR) |"
echo "| size, hexz lz4 vs mksquashfs zstd-3 | $(mb $S_LZ4) MiB | $(mb $S_SQ3) MiB | $(ratio $S_LZ4 $S_SQ3) |"
echo "| extract time vs \`unsquashfs\` | $X_HEXZ s | $X_SQ s | $(ratio $X_HEXZ $X_SQ) |"
echo "| extract time vs \`zstd -d \| tar x\` | $X_HEXZ s | $X_TAR s | $(ratio $X_HEXZ $X_TAR) |"
for pass in cold warm; do
  H=$(ops "$R_HEXZ" $pass)
  echo "| $READS random 4 KiB reads, $pass: hexz library vs kernel squashfs (ops/s) | $H | $(ops "$R_KSQ" $pass) | $(ratio $(ops "$R_KSQ" $pass) $H) (time) |"
  echo "| ... vs squashfuse (ops/s) | $H | $(ops "$R_SQF" $pass) | $(ratio $(ops "$R_SQF" $pass) $H) (time) |"
  echo "| ... vs squashfuse_ll (ops/s) | $H | $(ops "$R_SQLL" $pass) | $(ratio $(ops "$R_SQLL" $pass) $H) (time) |"
done
echo "| open snapshot ($FILES files) | $(echo "$R_HEXZ" | awk '$1=="open"{print $2" ms"}') | | |"
} | tee "$OUT/pack-results.md"
