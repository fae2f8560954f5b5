#!/usr/bin/env bash
# The guest daemon's own CPU cost, on the host: a cold busybox `tar` (or, with WALK=stat,
# a `find . -type f | xargs stat`) of a snapshot through each given hexz-guestfused build
# (over a Unix socket to one `hexz-host serve`), each run with a fresh daemon and dropped
# page cache, builds interleaved. Reports per build the median of the daemon's CPU ticks
# (user + system, 100/s), the run's wall time, the daemon threads' voluntary context switches and
# the requests the server served, and, from one more run under `strace -c -f`, its mmap
# and munmap calls and FUSE replies (writev). docs/BENCHMARKS.md, "Where the guest's CPU
# goes".
# Usage: sudo bench/daemon-cpu.sh SNAPSHOT [LABEL=BIN ...]   (N=5 runs per build, WALK=tar)
#   default build: musl=target/x86_64-unknown-linux-musl/release/hexz-guestfused
# E.g. a build of an older commit beside this one:
#   bench/daemon-cpu.sh bench/out/vm/tree.hxz old=/tmp/old/hexz-guestfused new=target/x86_64-unknown-linux-musl/release/hexz-guestfused
# Needs root (FUSE, drop_caches), busybox and strace. Its figures are host figures: in a
# TCG guest the same work costs many times more.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-5}
WALK=${WALK:-tar}
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
RUST_LOG=hexz_host=info "$HEXZ" serve "$SNAP" --listen "unix:$WORK/sock" > "$WORK/serve.log" 2>&1 &
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
  case $WALK in
    stat) (cd "$WORK/mnt" && find . -type f | xargs stat) > /dev/null ;;
    *) (cd "$WORK/mnt" && busybox tar cf - . | busybox wc -c) > /dev/null ;;
  esac
}
ticks() { awk '{print $14 + $15}' "/proc/$GP/stat"; }
switches() { cat /proc/"$GP"/task/*/status | awk '/^voluntary_ctxt_switches/ {n += $2} END {print n}'; }
# The requests of the connection that closed last (one per mount).
served() {
  for _ in $(seq 20); do
    n=$(grep -c "connection closed" "$WORK/serve.log" || true)
    [ "$n" -ge "$1" ] && break
    sleep 0.1
  done
  grep "connection closed" "$WORK/serve.log" | tail -1 | sed 's/.*requests=\([0-9]*\).*/\1/'
}
CLOSED=0

# One unmeasured run: the server's frame cache then starts warm for every build alike.
mount_with "${BUILDS[0]#*=}"
cold_tar
unmount
CLOSED=$((CLOSED + 1))

: > "$WORK/runs"
for _ in $(seq "$N"); do
  for b in "${BUILDS[@]}"; do
    mount_with "${b#*=}"
    a=$(ticks)
    c=$(switches)
    s=$(date +%s.%N)
    cold_tar
    e=$(date +%s.%N)
    dt=$(( $(ticks) - a ))
    dc=$(( $(switches) - c ))
    unmount
    CLOSED=$((CLOSED + 1))
    echo "${b%%=*} $dt $(awk "BEGIN{print $e - $s}") $dc $(served $CLOSED)" >> "$WORK/runs"
  done
done

echo "workload: cold $WALK"
printf '| build | daemon CPU ticks, median of %s (range) | wall s, median | voluntary context switches, median | requests to the host, median | mmap | munmap | FUSE replies |\n' "$N"
echo "|---|---|---|---|---|---|---|---|"
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
  col() { awk -v l="$label" -v k="$1" '$1 == l {print $k}' "$WORK/runs" | sort -n | tr '\n' ' '; }
  echo "$(col 2)|$(col 3)|$(col 4)|$(col 5)" | awk -F'|' -v l="$label" -v mm="$(calls mmap)" -v mu="$(calls munmap)" -v wv="$(calls writev)" '{
    n = split($1, t, " "); split($2, w, " "); split($3, c, " "); split($4, r, " "); m = int((n + 1) / 2)
    printf "| %s | %d (%d–%d) | %.2f | %d | %d | %s | %s | %s |\n", l, t[m], t[1], t[n], w[m], c[m], r[m], mm, mu, wv
  }'
done
