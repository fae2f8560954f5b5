#!/usr/bin/env bash
# NBD benchmark: `nbdcopy -C 1` of a 1 GiB ext4 disk image served by hexz (snapshot with
# --disk), by nbdkit (file plugin, raw image) and by qemu-nbd (zstd-compressed qcow2).
# Cold (servers restarted, page cache dropped) and warm; medians of RUNS interleaved runs,
# printed as ratios to nbdkit. Usage: bench/nbd.sh   (needs root for drop_caches and:
# libnbd-bin nbdkit qemu-utils e2fsprogs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out/nbd}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
cd "$ROOT"
for t in nbdcopy nbdkit qemu-nbd qemu-img mkfs.ext4 bc; do
  command -v $t >/dev/null || { echo "missing $t: apt-get install libnbd-bin nbdkit qemu-utils e2fsprogs bc" >&2; exit 2; }
done
cargo build --release -q -p hexz-host --bin hexz-host
HEXZ=${CARGO_TARGET_DIR:-$ROOT/target}/release/hexz-host

IMG=$OUT/disk.img
if [ ! -f "$IMG" ]; then
  # Realistic content: source trees, headers, docs and shared libraries, ~70 % full.
  CORPUS=$OUT/corpus
  rm -rf "$CORPUS"; mkdir -p "$CORPUS"
  [ -d "$HOME/.cargo/registry/src" ] && cp -a "$HOME/.cargo/registry/src" "$CORPUS/crates"
  cp -a /usr/lib/python3* /usr/include /usr/share/doc "$CORPUS/" 2>/dev/null || true
  # Shared libraries up to ~760 MiB in all.
  budget=$(( (760 << 20) - $(du -sb "$CORPUS" | cut -f1) ))
  mkdir -p "$CORPUS/lib"
  find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -name '*.so*' -printf '%s %p\n' | sort -k2 |
    while read -r sz f; do
      [ "$sz" -le "$budget" ] || continue
      cp -a "$f" "$CORPUS/lib/" && budget=$((budget - sz))
    done
  mkfs.ext4 -q -F -d "$CORPUS" "$IMG" 1G
  rm -rf "$CORPUS"
fi
SNAP=$OUT/disk.hxz QCOW=$OUT/disk.qcow2
[ -f "$SNAP" ] || "$HEXZ" pack --disk "$IMG" -o "$SNAP"
[ -f "$QCOW" ] || qemu-img convert -O qcow2 -c -o compression_type=zstd "$IMG" "$QCOW"
echo "image: $(du -m --apparent-size "$IMG" | cut -f1) MiB raw ($(du -m "$IMG" | cut -f1) MiB allocated)," \
  "hexz $(du -m "$SNAP" | cut -f1) MiB, qcow2+zstd $(du -m "$QCOW" | cut -f1) MiB"

# hexz with its default frame cache (sized to the stream's data, within a quarter of the
# available memory), and with the fixed 256 MiB it had before.
P_HEXZ=10909 P_KIT=10910 P_QEMU=10911 P_HEXZ256=10912
PIDS=()
start() {
  "$HEXZ" nbd "$SNAP" --listen 127.0.0.1:$P_HEXZ >/dev/null 2>&1 & PIDS+=($!)
  "$HEXZ" nbd "$SNAP" --listen 127.0.0.1:$P_HEXZ256 --cache-mib 256 >/dev/null 2>&1 & PIDS+=($!)
  nbdkit -f -r -p $P_KIT -i 127.0.0.1 file "$IMG" >/dev/null 2>&1 & PIDS+=($!)
  qemu-nbd -r -t -f qcow2 -b 127.0.0.1 -p $P_QEMU "$QCOW" >/dev/null 2>&1 & PIDS+=($!)
  for p in $P_HEXZ $P_HEXZ256 $P_KIT $P_QEMU; do
    for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$p >/dev/null 2>&1 && break; sleep 0.1; done
  done
}
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done; PIDS=(); }
trap stop EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
copy() { local t0 t1; t0=$(now); nbdcopy -C 1 nbd://127.0.0.1:$1 /dev/null; t1=$(now); echo "$t1 - $t0" | bc -l; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A T
for run in $(seq "$RUNS"); do
  for s in hexz hexz256 kit qemu; do
    eval port=\$P_$(echo $s | tr a-z A-Z)
    stop; drop; start
    T[cold_$s]+="$(copy "$port") "
    T[warm_$s]+="$(copy "$port") "
  done
  stop
done
printf '%-6s %-10s %10s %10s\n' mode server median_s vs_nbdkit
for mode in cold warm; do
  # shellcheck disable=SC2086
  base=$(median ${T[${mode}_kit]})
  for s in kit hexz hexz256 qemu; do
    # shellcheck disable=SC2086
    m=$(median ${T[${mode}_$s]})
    printf '%-6s %-10s %10.3f %9.2fx\n' $mode $s "$m" "$(echo "$m / $base" | bc -l)"
  done
done
