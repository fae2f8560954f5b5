#!/usr/bin/env bash
# Runs every cargo-fuzz target of the project for FUZZ_SECONDS each (default 60):
# the protocol decoder (protocol/fuzz: decode) and, in host/fuzz, the snapshot
# header/index parser through `Snapshot::open` on a file (snapshot_open) and in memory
# (index_decode), and the overlay journal through `Overlay::open`/`Vfs` on a file
# (journal_replay) and one record in memory (record_decode). Before fuzzing, each
# host target replays its past crashes (host/fuzz/regressions/<target>/); seeds are
# written first from real snapshots and overlays (host/fuzz/src/mkseeds.rs). Needs a nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz --locked`). Exits non-zero on any crash; the
# crashing input is left in <crate>/fuzz/artifacts/<target>/.
#   FUZZ_SECONDS=600 bench/fuzz.sh            # longer run
#   FUZZ_TARGETS="snapshot_open" bench/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-decode snapshot_open journal_replay index_decode record_decode}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "skip fuzz: no nightly toolchain"; exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet || { echo "skip fuzz: cargo-fuzz did not install"; exit 0; }
fi
for t in $targets; do
  case "$t" in
    decode) dir=protocol ;;
    *) dir=host ;;
  esac
  if [ "$dir" = host ] && [ ! -d host/fuzz/corpus/"$t" ]; then
    (cd host/fuzz && cargo +nightly run --release -q --bin mkseeds)
  fi
  mkdir -p "$dir/fuzz/corpus/$t"
  if [ -d "$dir/fuzz/regressions/$t" ]; then
    echo "== replay past crashes of $t"
    (cd "$dir" && cargo +nightly fuzz run "$t" "fuzz/regressions/$t" -- -runs=0 -rss_limit_mb=1024 -malloc_limit_mb=1024)
  fi
  echo "== fuzz $t for ${secs}s"
  # -rss_limit_mb bounds memory: an input that makes a parser allocate past it is a
  # crash. -timeout: no input may take more than 10 s.
  (cd "$dir" && cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=10 \
      -print_final_stats=1 2>&1 | tee "/tmp/hexz-fuzz-$t.log" | grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==|SUMMARY|Done)" || true)
  if grep -qE "^(==[0-9]+== ?ERROR|SUMMARY|.*deadly signal|.*panicked)" "/tmp/hexz-fuzz-$t.log"; then
    echo "fuzz $t: CRASH (see /tmp/hexz-fuzz-$t.log and $dir/fuzz/artifacts/$t/)"; exit 1
  fi
  grep -E "stat::number_of_executed_units" "/tmp/hexz-fuzz-$t.log" | sed "s/^/$t: /" || true
done
