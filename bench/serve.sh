#!/usr/bin/env bash
# Server benchmark (issue: VFS core + serve): request latency and throughput over a Unix
# socket at 1 and 16 in flight, next to a bare socket ping-pong on the same machine; the
# first 4 KiB write into a 1 GiB snapshot file; server RSS serving a 100k-file snapshot.
# Usage: bench/serve.sh   (OUT=<dir>, default bench/out)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}/serve
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -q -p hexz-host --bin hexz-host --example serve_bench
HEXZ=$ROOT/target/release/hexz-host
SB=$ROOT/target/release/examples/serve_bench
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
serve() { # snapshot socket [args...]
  local snap=$1 sock=$2; shift 2
  rm -f "$sock"
  "$HEXZ" serve "$snap" --listen "unix:$sock" "$@" >/dev/null 2>"$OUT/serve.log" &
  PIDS+=($!)
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  echo $!
}

# 1. Latency: a 64 MiB file in a small snapshot (its frames fit the cache: warm reads).
if [ ! -f "$OUT/lat.hxz" ]; then
  mkdir -p "$OUT/lat-src/d"
  head -c 64M /dev/urandom > "$OUT/lat-src/d/data.bin"
  "$HEXZ" pack "$OUT/lat-src" -o "$OUT/lat.hxz" >/dev/null
fi
"$SB" echo-server "$OUT/echo.sock" & PIDS+=($!)
sleep 0.3
P=$(serve "$OUT/lat.hxz" "$OUT/lat.sock")
{
  echo "### Protocol server over a Unix socket ($(date -u +%F))"
  echo
  "$SB" latency "$OUT/lat.sock" d/data.bin 20000
  "$SB" echo "$OUT/echo.sock"
} | tee "$OUT/latency.md"
kill "$P"

# 2. First 4 KiB write into a 1 GiB snapshot file.
if [ ! -f "$OUT/big.hxz" ]; then
  mkdir -p "$OUT/big-src"
  head -c 1G /dev/urandom > "$OUT/big-src/disk.img"
  "$HEXZ" pack "$OUT/big-src" -o "$OUT/big.hxz" >/dev/null
  rm -rf "$OUT/big-src"
fi
rm -rf "$OUT/ov-big"
P=$(serve "$OUT/big.hxz" "$OUT/big.sock" --overlay "$OUT/ov-big")
"$SB" cow "$OUT/big.sock" disk.img | tee "$OUT/cow.md"
echo "upper data allocated after it: $(du -sk "$OUT/ov-big/data" | cut -f1) KiB" | tee -a "$OUT/cow.md"
kill "$P"

# 3. RSS serving a 100k-file snapshot, after walking every entry with readdirplus.
if [ ! -f "$OUT/many.hxz" ]; then
  python3 - "$OUT/many-src" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    p = os.path.join(root, f"dir{d:03}")
    os.makedirs(p, exist_ok=True)
    for f in range(1000):
        with open(os.path.join(p, f"file{f:04}.txt"), "w") as fh:
            fh.write(f"file {d}/{f}\n")
PY
  "$HEXZ" pack "$OUT/many-src" -o "$OUT/many.hxz" >/dev/null
  rm -rf "$OUT/many-src"
fi
P=$(serve "$OUT/many.hxz" "$OUT/many.sock")
idle=$(awk '/VmRSS/{print $2}' /proc/$P/status)
"$SB" walk "$OUT/many.sock" | tee "$OUT/rss.md"
walked=$(awk '/VmRSS/{print $2}' /proc/$P/status)
echo "server RSS, 100k-file snapshot: $((idle / 1024)) MiB after open, $((walked / 1024)) MiB after walking every entry (frame cache limit 256 MiB, unused by metadata)" | tee -a "$OUT/rss.md"
kill "$P"
