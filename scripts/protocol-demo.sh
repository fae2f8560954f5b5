#!/usr/bin/env bash
# The main job, as far as hexz goes today: pack the sample workspace into a snapshot,
# serve it with a copy-on-write overlay, change it through the hexz protocol, commit
# the overlay into a new snapshot on top of the first, and check both.
# The same job inside a real microVM is scripts/demo.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p hexz-host --bin hexz-host --example demo_client
HEXZ=$ROOT/target/release/hexz-host
CLIENT=$ROOT/target/release/examples/demo_client
SRC=${1:-$ROOT/tests/data/sample-workspace}
WORK=$(mktemp -d)
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT

echo "== pack $SRC"
"$HEXZ" pack "$SRC" -o "$WORK/workspace.hxz"
"$HEXZ" info "$WORK/workspace.hxz"
"$HEXZ" verify "$WORK/workspace.hxz"

echo "== serve it with an overlay, change it through the protocol"
"$HEXZ" serve "$WORK/workspace.hxz" --overlay "$WORK/overlay" --listen "unix:$WORK/hexz.sock" &
SERVER=$!
for _ in $(seq 100); do [ -S "$WORK/hexz.sock" ] && break; sleep 0.05; done
"$CLIENT" "$WORK/hexz.sock" put RESULT.txt "built in a sandbox at $(date -u +%FT%TZ)"
"$CLIENT" "$WORK/hexz.sock" ls
kill "$SERVER"; wait "$SERVER" || true; SERVER=

echo "== commit the overlay into a new snapshot on the first"
"$HEXZ" commit "$WORK/workspace.hxz" --overlay "$WORK/overlay" -o "$WORK/workspace-2.hxz"
"$HEXZ" info "$WORK/workspace-2.hxz"
"$HEXZ" cat "$WORK/workspace-2.hxz" RESULT.txt; echo

echo "== extract both and compare with the source"
"$HEXZ" extract "$WORK/workspace.hxz" "$WORK/out1" >/dev/null
diff -r --no-dereference "$SRC" "$WORK/out1"
"$HEXZ" extract "$WORK/workspace-2.hxz" "$WORK/out2" >/dev/null
diff -r --no-dereference --exclude RESULT.txt "$SRC" "$WORK/out2"
test -f "$WORK/out2/RESULT.txt"
echo "identical: the first snapshot round-trips the workspace; the second adds exactly RESULT.txt"
