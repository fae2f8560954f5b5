#!/usr/bin/env bash
# The guest daemon's own CPU cost, on the host: a cold busybox `tar` of a snapshot through
# each given hexz-guestfused build (over a Unix socket to one `hexz-host serve`), each run
# with a fresh daemon and dropped page cache, builds interleaved. Reports per build the
# median of the daemon's CPU ticks (user + system, 100/s) and the run's wall time, and,
# from one more run under `strace -c -f`, its mmap and munmap calls and FUSE replies
# (writev). docs/BENCHMARKS.md, "Where the guest's CPU goes".
# Usage: sudo bench/daemon-cpu.sh SNAPSHOT [LABEL=BIN ...]   (N=5 runs per build)
#   default build: musl=target/x86_64-unknown-linux-musl/release/hexz-guestfused
# E.g. a build of an older commit beside this one:
#   bench/daemon-cpu.sh bench/out/vm/tree.hxz old=/tmp/old/hexz-guestfused new=target/x86_64-unknown-linux-musl/release/hexz-guestfused
# Needs root (FUSE, drop_caches), busybox and strace. Its figures are host figures: in a
# TCG guest the same work costs many times more.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-5}
SNAP=${1:?usage: bench/daemon-cpu.sh SNAPSHOT [LABEL=BIN ...]}
shift
BUILDS=("$@")
[ ${#BUILDS[@]} -gt 0 ] || BUILDS=("musl=$ROOT/target/x86_64-unknown-linux-musl/release/hexz-guestfused")
HEXZ=${HEXZ:-$ROOT/target/release/hexz-host}
for t in busybox strace "$HEXZ"; do
  command -v "$t" > /dev/null || { echo "daemon-cpu.sh: $t not found" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/hexz-daemon-cpu.XXXXXX)
SERVE=
GP=
cleanup() {
  [ -n "$GP" ] && kill "$GP" 2> /dev/null
  grep -q " $WORK/mnt " /proc/mounts && umount "$WORK/mnt"
  [ -n "$SERVE" ] && kill "$SERVE" 2> /dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$WORK/mnt"
"$HEXZ" serve "$SNAP" --listen "unix:$WORK/sock" > "$WORK/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 50); do [ -S "$WORK/sock" ] && break; sleep 0.1; done

mount_with() { # BIN: mounts $WORK/mnt with a fresh daemon, its pid in GP
  "$1" "$WORK/mnt" --connect "unix:$WORK/sock" > "$WORK/daemon.log" 2>&1 &
  GP=$!
  for _ in $(seq 100); do grep -q " $WORK/mnt " /proc/mounts && return; sleep 0.05; done
  echo "daemon-cpu.sh: $1 did not mount" >&2
  exit 1
}
unmount() {
  umount "$WORK/mnt"
  wait "$GP" 2> /dev/null || true
  GP=
}
cold_tar() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  (cd "$WORK/mnt" && busybox tar cf - . | busybox wc -c) > /dev/null
}
ticks() { awk '{print $14 + $15}' "/proc/$GP/stat"; }

# One unmeasured run: the server's frame cache then starts warm for every build alike.
mount_with "${BUILDS[0]#*=}"
cold_tar
unmount

: > "$WORK/runs"
for _ in $(seq "$N"); do
  for b in "${BUILDS[@]}"; do
    mount_with "${b#*=}"
    a=$(ticks)
    s=$(date +%s.%N)
    cold_tar
    e=$(date +%s.%N)
    echo "${b%%=*} $(( $(ticks) - a )) $(awk "BEGIN{print $e - $s}")" >> "$WORK/runs"
    unmount
  done
done

printf '| build | daemon CPU ticks, median of %s (range) | wall s, median | mmap | munmap | FUSE replies |\n' "$N"
echo "|---|---|---|---|---|---|"
for b in "${BUILDS[@]}"; do
  label=${b%%=*}
  mount_with "${b#*=}"
  strace -c -f -e trace=mmap,munmap,writev -p "$GP" -o "$WORK/strace" 2> /dev/null &
  st=$!
  sleep 1
  cold_tar
  kill -INT "$st"
  wait "$st" 2> /dev/null || true
  unmount
  calls() { awk -v s="$1" '$NF == s {n = $4} END {print n + 0}' "$WORK/strace"; }
  t=$(awk -v l="$label" '$1 == l {print $2}' "$WORK/runs" | sort -n | tr '\n' ' ')
  w=$(awk -v l="$label" '$1 == l {print $3}' "$WORK/runs" | sort -n | tr '\n' ' ')
  echo "$t|$w" | awk -F'|' -v l="$label" -v mm="$(calls mmap)" -v mu="$(calls munmap)" -v wv="$(calls writev)" '{
    n = split($1, t, " "); split($2, w, " "); m = int((n + 1) / 2)
    printf "| %s | %d (%d–%d) | %.2f | %s | %s | %s |\n", l, t[m], t[1], t[n], w[m], mm, mu, wv
  }'
done
