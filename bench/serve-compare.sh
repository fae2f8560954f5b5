#!/usr/bin/env bash
# Two hexz-host builds side by side on the same snapshot, driven by the same serve_bench
# client, in interleaved rounds, next to a bare socket ping-pong: does a change cost
# latency on the fast path?  Usage: bench/serve-compare.sh OLD_HEXZ_HOST [NEW_HEXZ_HOST]
# (build the old one from a worktree at the commit to compare, e.g.
#  git worktree add /tmp/old 619292d && (cd /tmp/old && cargo build --release -p hexz-host)).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD=${1:?usage: bench/serve-compare.sh OLD_HEXZ_HOST [NEW_HEXZ_HOST]}
cd "$ROOT"
cargo build --release -q -p hexz-host --bin hexz-host --example serve_bench
NEW=${2:-$ROOT/target/release/hexz-host}
SB=$ROOT/target/release/examples/serve_bench
OUT=${OUT:-$ROOT/bench/out}/serve-compare
mkdir -p "$OUT/src/d"
[ -f "$OUT/lat.hxz" ] || { head -c 64M /dev/urandom > "$OUT/src/d/data.bin"; "$NEW" pack "$OUT/src" -o "$OUT/lat.hxz" >/dev/null; }
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
rm -f "$OUT"/{old,new,echo}.sock
"$OLD" serve "$OUT/lat.hxz" --listen "unix:$OUT/old.sock" >/dev/null 2>&1 & PIDS+=($!)
"$NEW" serve "$OUT/lat.hxz" --listen "unix:$OUT/new.sock" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [ -S "$OUT/old.sock" ] && [ -S "$OUT/new.sock" ] && break; sleep 0.05; done
for round in 1 2 3; do
  # The echo server serves one connection: one per round.
  rm -f "$OUT/echo.sock"; "$SB" echo-server "$OUT/echo.sock" & PIDS+=($!)
  for _ in $(seq 100); do [ -S "$OUT/echo.sock" ] && break; sleep 0.05; done
  echo "--- round $round: old"; "$SB" latency "$OUT/old.sock" d/data.bin 20000 | grep -E '\| (lookup|read 4 KiB) \| 1 \|'
  echo "--- round $round: new"; "$SB" latency "$OUT/new.sock" d/data.bin 20000 | grep -E '\| (lookup|read 4 KiB) \| 1 \|'
  echo "--- round $round: floor"; "$SB" echo "$OUT/echo.sock" | tail -1
done
