#!/bin/bash
# The host mount (`hexz-host mount`) and squashfuse_ll vs the same tree on local disk:
# `tar cf - . | wc -c` and `find . -type f | xargs stat`, cold (fresh mount + drop_caches
# before each run) and warm; the three are interleaved so load noise hits all alike.
# Usage (root): bench/host_mount.sh TREE [WORKDIR]   needs squashfuse_ll, mksquashfs, bc.
set -eu
TREE=$(realpath "$1"); W=${2:-/tmp/hexz-bench-mount}; N=${N:-5}
H=${HEXZ_HOST:-$(dirname "$0")/../target/release/hexz-host}; H=$(realpath "$H")
mkdir -p "$W/mnt" "$W/sqmnt"; cd "$W"
[ -e tree.hxz ] || "$H" pack "$TREE" -o tree.hxz
[ -e tree.sqfs ] || mksquashfs "$TREE" tree.sqfs -comp zstd -noappend -quiet
t() { local s=$(date +%s.%N); bash -c "$1" >/dev/null 2>&1; local e=$(date +%s.%N); echo "$e - $s" | bc; }
med() { printf "%s\n" "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
hexz_up() { "$H" mount tree.hxz mnt --daemon --log "$W/m.log" --pid-file "$W/m.pid" >/dev/null; }
hexz_down() { umount mnt; while [ -e m.pid ]; do sleep 0.05; done; }
for op in 'tar cf - . | wc -c' 'find . -type f | xargs stat'; do
  L=(); M=(); S=()
  for i in $(seq "$N"); do
    drop; L+=($(t "cd $TREE && $op"))
    hexz_up; drop; M+=($(t "cd mnt && $op")); hexz_down
    squashfuse_ll tree.sqfs sqmnt; drop; S+=($(t "cd sqmnt && $op")); fusermount3 -u sqmnt
  done
  echo "cold  $op: local $(med "${L[@]}") hexz $(med "${M[@]}") squashfuse_ll $(med "${S[@]}")"
  hexz_up; squashfuse_ll tree.sqfs sqmnt
  for d in "$TREE" mnt sqmnt; do bash -c "cd $d && $op" >/dev/null 2>&1; done
  L=(); M=(); S=()
  for i in $(seq "$N"); do
    L+=($(t "cd $TREE && $op")); M+=($(t "cd mnt && $op")); S+=($(t "cd sqmnt && $op"))
  done
  hexz_down; fusermount3 -u sqmnt
  echo "warm  $op: local $(med "${L[@]}") hexz $(med "${M[@]}") squashfuse_ll $(med "${S[@]}")"
done
