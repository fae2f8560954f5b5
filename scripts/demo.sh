#!/usr/bin/env bash
# The main job: pack the sample workspace into a snapshot, boot a microVM whose
# /workspace is that snapshot plus a copy-on-write overlay, run a command there that
# lists /workspace, reads a file and writes one; then show the write in the overlay and
# commit the overlay into a new snapshot. A first run installs QEMU and friends and
# builds everything: a few minutes. Later runs take seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SRC=${1:-$ROOT/tests/data/sample-workspace}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "install what the sandbox needs (first run only: QEMU, busybox, vhost-device-vsock, musl target)"
bash scripts/install-deps.sh

step "build hexz-host and the static guest binaries (first run: a few minutes)"
cargo build --release -q -p hexz-host --bin hexz-host
cargo build --release -q -p hexz-guestfused --target x86_64-unknown-linux-musl
HEXZ=$ROOT/target/release/hexz-host

step "the guest image: Debian's cloud kernel + an initramfs with hexz-init (cached after the first run)"
"$HEXZ" image build

step "pack $SRC"
"$HEXZ" pack "$SRC" -o "$WORK/workspace.hxz"

step "run a command in a microVM with /workspace = snapshot + overlay"
"$HEXZ" run "$WORK/workspace.hxz" --overlay "$WORK/overlay" -- sh -c '
  echo "--- ls -la /workspace"; ls -la /workspace
  echo "--- cat README.md"; cat README.md
  echo "built in a sandbox at $(date -u +%FT%TZ)" > RESULT.txt
  echo "--- wrote RESULT.txt"'

step "what the job changed (from the overlay's records)"
"$HEXZ" diff "$WORK/workspace.hxz" --overlay "$WORK/overlay"

step "commit the overlay into a new snapshot on the first"
"$HEXZ" commit "$WORK/workspace.hxz" --overlay "$WORK/overlay" -o "$WORK/workspace-2.hxz"
"$HEXZ" cat "$WORK/workspace-2.hxz" RESULT.txt
"$HEXZ" diff "$WORK/workspace.hxz" "$WORK/workspace-2.hxz"
echo
echo "done: the command ran in a microVM on the snapshot; its write is in the new snapshot"
