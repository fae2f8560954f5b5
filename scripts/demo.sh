#!/usr/bin/env bash
# The main job, as far as hexz goes today: pack the sample workspace into a snapshot,
# inspect it, verify it, read a file, and extract it back identical.
# (The microVM boot that runs a command in /workspace comes with the server and guest issues.)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p hexz-host
HEXZ=$ROOT/target/release/hexz-host
SRC=${1:-$ROOT/tests/data/sample-workspace}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== pack $SRC"
"$HEXZ" pack "$SRC" -o "$WORK/workspace.hxz"
echo "== info"
"$HEXZ" info "$WORK/workspace.hxz"
echo "== ls /"
"$HEXZ" ls "$WORK/workspace.hxz" /
echo "== cat README.md"
"$HEXZ" cat "$WORK/workspace.hxz" README.md
echo "== verify"
"$HEXZ" verify "$WORK/workspace.hxz"
echo "== extract and compare with the source"
"$HEXZ" extract "$WORK/workspace.hxz" "$WORK/out"
diff -r --no-dereference "$SRC" "$WORK/out"
echo "identical: every file, symlink and byte round-tripped"
