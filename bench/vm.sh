#!/usr/bin/env bash
# Sandbox benchmark (docs/BENCHMARKS.md, "Sandboxes"): under the same guest kernel and in
# the same boot, /workspace (hexz) vs virtio-9p vs virtiofs on the same tree; start-up
# of `hexz-host run` vs a bare boot; host memory of 8 parallel runs vs one; server
# requests per workload. See bench/README-vm.md.
#
# Usage: bench/vm.sh [shares] [requests] [startup] [memory] [report]   (default: all)
# Env: ROUNDS=3 (rounds of the share comparison), BOOTS=10 (start-up runs per side),
#      PAR=8 (parallel runs for memory), MEMCMD (what each of them runs first,
#      default `tar cf - . | wc -c`), OUT=bench/out (results go to $OUT/vm),
#      REQ_WORKLOADS="tar stat git create make" (the requests section's workloads),
#      CARGO_TARGET_DIR (where the release builds are), NO_BUILD=1 (skip cargo build).
# Needs root (drop_caches, virtio-9p of a root-owned tree), QEMU, vhost-device-vsock,
# virtiofsd (Rust, on PATH; else QEMU's C one in /usr/lib/qemu), strace, cpio, gcc, make,
# git, and Debian's generic kernel package (downloaded once with apt-get download).
# Bench hook: HEXZ_QEMU_EXTRA_ARGS (host/src/vm/qemu.rs) adds the 9p/virtiofs devices.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}/vm
ROUNDS=${ROUNDS:-3}
BOOTS=${BOOTS:-10}
PAR=${PAR:-8}
MEMCMD=${MEMCMD:-tar cf - . | wc -c}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
HEXZ=$TARGET/release/hexz-host
GUESTBIN=${GUESTBIN:-$TARGET/x86_64-unknown-linux-musl/release}
SECTIONS=${*:-shares requests startup memory report}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "vm.sh: $*" >&2; }

# ---------------------------------------------------------------- cleanup
PIDS=()
TMPS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for t in "${TMPS[@]}"; do rm -rf "$t"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${NO_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p hexz-host --bin hexz-host &&
    cargo build --release -q -p hexz-guestfused --target x86_64-unknown-linux-musl)
fi
KHZ=$(awk -F: '/cpu MHz/{printf "%d", $2 * 1000; exit}' /proc/cpuinfo)

# ---------------------------------------------------------------- the tree
# ~6k files / ~60-90 MB of crate sources, plus repo/ (a packed git repository of a few
# hundred files) and cproj/ (20 C files and a Makefile).
TREE=$OUT/tree
make_tree() {
  [ -f "$TREE/.complete" ] && return
  log "building the tree in $TREE"
  rm -rf "$TREE"
  mkdir -p "$TREE/src" "$TREE/repo" "$TREE/cproj"
  local reg files=0 bytes=0 n s
  reg=$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)
  for c in "$reg"*/; do
    n=$(find "$c" -type f | wc -l)
    s=$(du -sb "$c" | cut -f1)
    [ "$n" -gt 1500 ] && continue
    [ $((bytes + s)) -gt $((90 << 20)) ] && continue
    cp -a "$c" "$TREE/src/"
    files=$((files + n))
    bytes=$((bytes + s))
    [ "$files" -ge 5600 ] && break
  done
  # The repository: the last crates of the registry (not in src/), ~400 files.
  files=0
  for c in $(ls -d "$reg"*/ | tac); do
    n=$(find "$c" -type f | wc -l)
    [ "$n" -gt 200 ] && continue
    cp -a "$c" "$TREE/repo/"
    files=$((files + n))
    [ "$files" -ge 400 ] && break
  done
  git -C "$TREE/repo" init -q
  git -C "$TREE/repo" add -A
  git -C "$TREE/repo" -c user.email=b@hexz -c user.name=bench commit -qm tree
  git -C "$TREE/repo" gc -q --aggressive
  # The C project.
  cat > "$TREE/cproj/common.h" << 'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
unsigned long work(int which, unsigned long seed);
EOF
  local i
  for i in $(seq -w 1 20); do
    cat > "$TREE/cproj/m$i.c" << EOF
#include "common.h"
static unsigned long mix$i(unsigned long x) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x; }
struct rec$i { char name[32]; unsigned long v; };
static int cmp$i(const void *a, const void *b) {
  const struct rec$i *x = a, *y = b;
  return x->v < y->v ? -1 : x->v > y->v;
}
unsigned long f$i(unsigned long seed) {
  struct rec$i r[64];
  for (int k = 0; k < 64; k++) { seed = mix$i(seed + k); snprintf(r[k].name, sizeof r[k].name, "r%d-%lu", k, seed % 1000); r[k].v = seed; }
  qsort(r, 64, sizeof r[0], cmp$i);
  return r[0].v ^ strlen(r[63].name);
}
EOF
  done
  {
    echo '#include "common.h"'
    for i in $(seq -w 1 20); do echo "unsigned long f$i(unsigned long);"; done
    echo 'unsigned long work(int which, unsigned long seed) { switch (which) {'
    for i in $(seq -w 1 20); do echo "  case ${i#0}: return f$i(seed);"; done
    echo '  default: return seed; } }'
    echo 'int main(void) { unsigned long s = 1; for (int i = 1; i <= 20; i++) s = work(i, s); printf("%lu\n", s); return 0; }'
  } > "$TREE/cproj/main.c"
  cat > "$TREE/cproj/Makefile" << 'EOF'
CC = gcc
CFLAGS = -O1
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard *.c)))
prog: $(OBJS)
	$(CC) -o $@ $(OBJS)
%.o: %.c common.h
	$(CC) $(CFLAGS) -c $< -o $@
clean:
	rm -f $(OBJS) prog
EOF
  touch "$TREE/.complete"
}

# ---------------------------------------------------------------- images
KDIR=$OUT/kernel-generic
BENCH_KERNEL=
BENCH_INITRD=$OUT/bench-initrd.cpio
BASE_KERNEL=
BASE_INITRD=

fetch_generic_kernel() {
  if [ ! -f "$KDIR/.complete" ]; then
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    log "downloading $pkg (apt-get download)"
    rm -rf "$KDIR"
    mkdir -p "$KDIR/deb"
    (cd "$KDIR/deb" && apt-get download -q "$pkg" > /dev/null 2>&1)
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/tree"
    rm -rf "$KDIR/deb"
    touch "$KDIR/.complete"
  fi
  BENCH_KERNEL=$(ls "$KDIR"/tree/boot/vmlinuz-*)
}

# Files a host command opens or executes (successfully), from strace.
traced_files() { # LOGFILE
  sed -n -E 's/^(openat\(AT_FDCWD, |execve\(|newfstatat\(AT_FDCWD, |access\(|faccessat2?\(AT_FDCWD, |readlink\(|stat\(|lstat\()"([^"]+)".* = ([0-9]+).*$/\2/p' "$1" |
    grep -E '^/(usr|lib|lib64|etc/ld\.so)' | sort -u
}

# The bench initramfs: the cached hexz image's initramfs (hexz-init, hexz-guestfused,
# busybox) with a second cpio appended (the kernel unpacks both; later entries win): the
# generic kernel's modules (the same list plus 9p and virtiofs), and the host's gcc,
# make, git and coreutils date with the libraries they load, as strace saw them.
build_images() {
  local paths
  paths=$("$HEXZ" image build --guest-bin-dir "$GUESTBIN" 2> /dev/null) ||
    paths=$("$HEXZ" image build --guest-bin-dir "$GUESTBIN")
  BASE_KERNEL=$(echo "$paths" | grep -m1 vmlinuz | awk '{print $NF}')
  BASE_INITRD=$(echo "$paths" | grep -m1 initrd | awk '{print $NF}')
  [ -f "$BASE_KERNEL" ] && [ -f "$BASE_INITRD" ] || {
    log "cannot parse 'image build' output: $paths"
    exit 1
  }
  fetch_generic_kernel
  if [ -f "$BENCH_INITRD" ] && [ "$BENCH_INITRD" -nt "$BASE_INITRD" ]; then return; fi
  log "building the bench initramfs"
  local stage trace
  stage=$(mktemp -d "$OUT/stage.XXXXXX")
  TMPS+=("$stage")
  trace=$(mktemp -d "$OUT/trace.XXXXXX")
  TMPS+=("$trace")
  cp -a "$TREE/cproj" "$trace/cproj"
  cp -a "$TREE/repo" "$trace/repo"
  # -ff: one log per process, so no call is split into "unfinished ... resumed".
  (cd "$trace/cproj" && strace -ff -qq -o "$trace/make" make -s -j2 > /dev/null)
  cat "$trace"/make.* > "$trace/make.log"
  (cd "$trace/repo" && strace -ff -qq -o "$trace/git" git -c safe.directory='*' status --porcelain > /dev/null)
  cat "$trace"/git.* > "$trace/git.log"
  strace -ff -qq -o "$trace/date" date +%s.%N > /dev/null
  cat "$trace"/date.* > "$trace/date.log"
  local applets p
  applets=" $(busybox --list | tr '\n' ' ') "
  {
    traced_files "$trace/make.log"
    traced_files "$trace/git.log"
  } | sort -u | while read -r p; do
    # Never shadow busybox's applets (/bin/sh must stay busybox, not dash).
    case "$p" in */bin/* | */sbin/*) case "$applets" in *" ${p##*/} "*) continue ;; esac ;; esac
    if [ -d "$p" ]; then
      mkdir -p "$stage$p"
    elif [ -e "$p" ]; then
      mkdir -p "$stage$(dirname "$p")"
      cp -L "$p" "$stage$p"
    fi
  done
  mkdir -p "$stage/opt/bench"
  cp -L /bin/date "$stage/opt/bench/date"
  for p in $(traced_files "$trace/date.log" | grep -v '^/usr/bin/date$'); do
    [ -f "$p" ] && mkdir -p "$stage$(dirname "$p")" && cp -L "$p" "$stage$p"
  done
  # Modules of the generic kernel, in load order.
  mkdir -p "$stage/lib/modules"
  : > "$stage/lib/modules/hexz.order"
  local m f
  for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport fuse \
    netfs fscache 9pnet 9pnet_virtio 9p virtiofs; do
    f=$(find "$KDIR/tree/lib/modules" -name "$m.ko" | head -1)
    [ -n "$f" ] || { log "module $m.ko missing in $KDIR"; exit 1; }
    cp "$f" "$stage/lib/modules/$m.ko"
    echo "/lib/modules/$m.ko" >> "$stage/lib/modules/hexz.order"
  done
  (cd "$stage" && find . -mindepth 1 | sed 's|^\./||' | sort | cpio -o -H newc -R 0:0 --quiet) > "$OUT/extra.cpio"
  cat "$BASE_INITRD" "$OUT/extra.cpio" > "$BENCH_INITRD.tmp"
  mv "$BENCH_INITRD.tmp" "$BENCH_INITRD"
  log "bench initramfs: $(du -h "$BENCH_INITRD" | cut -f1) (base $(du -h "$BASE_INITRD" | cut -f1))"
}

SNAP=$OUT/tree.hxz
pack_snapshot() {
  [ -f "$SNAP" ] && [ "$SNAP" -nt "$TREE/.complete" ] && return
  log "packing $SNAP"
  "$HEXZ" pack "$TREE" -o "$SNAP" > /dev/null
}

virtiofsd_start() { # SOCKET DIR LOGFILE -> pid in VFSD_PID
  if command -v virtiofsd > /dev/null; then
    virtiofsd --socket-path="$1" --shared-dir="$2" --cache always --sandbox none > "$3" 2>&1 &
  else
    /usr/lib/qemu/virtiofsd --socket-path="$1" -o source="$2" -o cache=always -o sandbox=chroot > "$3" 2>&1 &
  fi
  VFSD_PID=$!
  PIDS+=("$VFSD_PID")
  for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done
  log "virtiofsd did not create $1"
  cat "$3" >&2
  exit 1
}

# ---------------------------------------------------------------- 1. shares
section_shares() {
  log "shares: one boot, $ROUNDS rounds (this takes a while under TCG)"
  local shared run
  run=$(mktemp -d "$OUT/run.XXXXXX")
  TMPS+=("$run")
  shared=$OUT/tree-shared
  rm -rf "$shared"
  cp -a "$TREE" "$shared"
  virtiofsd_start "$run/vfs.sock" "$shared" "$OUT/virtiofsd.log"
  # libvhost-user (QEMU's C virtiofsd) refuses legacy virtio, microvm's mmio default.
  local extra="-global virtio-mmio.force-legacy=false"
  extra+=" -fsdev local,id=fs0,path=$shared,security_model=none"
  extra+=" -device virtio-9p-device,fsdev=fs0,mount_tag=ws"
  extra+=" -chardev socket,id=vfs,path=$run/vfs.sock -device vhost-user-fs-device,chardev=vfs,tag=vfs"
  local rc=0 envs=(-e "ROUNDS=$ROUNDS")
  [ -n "${WORKLOADS:-}" ] && envs+=(-e "WORKLOADS=$WORKLOADS")
  [ -n "${SHARES:-}" ] && envs+=(-e "SHARES=$SHARES")
  HEXZ_QEMU_EXTRA_ARGS=$extra RUST_LOG=info "$HEXZ" run "$SNAP" --kernel "$BENCH_KERNEL" \
    --initrd "$BENCH_INITRD" --memory 2G --cpus 2 --accel tcg --timeout 3h -q \
    --console-log "$OUT/shares-console.log" "${envs[@]}" \
    -- sh -c "$(cat "$ROOT/bench/vm-guest.sh")" < /dev/null > "$OUT/shares.txt" 2> "$OUT/shares-host.log" || rc=$?
  kill "$VFSD_PID" 2> /dev/null || true
  grep -E '^(I|ERR)' "$OUT/shares.txt" >&2 || true
  [ $rc = 0 ] || { log "the shares run failed ($rc): see $OUT/shares-host.log, $OUT/shares-console.log"; tail -20 "$OUT/shares-host.log" >&2; }
  rm -rf "$shared"
}

# ---------------------------------------------------------------- 4. requests
# One fresh boot per workload on /workspace (RUST_LOG=info: the server logs requests=N
# when the connection closes); cold = (workload once) - (boot only), warm = (twice) - (once).
section_requests() {
  log "requests: one boot per workload and repetition"
  : > "$OUT/requests.txt"
  local w reps body n
  for w in none ${REQ_WORKLOADS:-tar stat git create make}; do
    for reps in 1 2; do
      [ $w = none ] && [ $reps = 2 ] && continue
      body=$(sed -n '/^w_tar()/,/^clean_make()/p' "$ROOT/bench/vm-guest.sh")
      local cmd="export PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp GIT_CONFIG_NOSYSTEM=1; git config --global safe.directory '*' 2>/dev/null; $body"
      if [ $w != none ]; then
        local i
        for i in $(seq $reps); do
          [ $w = make ] && [ "$i" = 2 ] && cmd+="; clean_make /workspace"
          cmd+="; (w_$w /workspace) > /dev/null 2>&1"
        done
      fi
      RUST_LOG=info "$HEXZ" run "$SNAP" --kernel "$BENCH_KERNEL" --initrd "$BENCH_INITRD" \
        --memory 1G --accel tcg --timeout 30m -q -- sh -c "$cmd" < /dev/null > /dev/null 2> "$OUT/req-$w-$reps.log" || true
      n=$(grep -o 'requests=[0-9]*' "$OUT/req-$w-$reps.log" | awk -F= '{s += $2} END {print s + 0}')
      echo "$w $reps $n" >> "$OUT/requests.txt"
      log "requests $w x$reps: $n"
    done
  done
}

# ---------------------------------------------------------------- 2. start-up
# Wall time from the start of the command to its first line of output.
first_line_time() { # CMD... ; prints seconds
  local s e
  s=$(date +%s.%N)
  "$@" < /dev/null 2> /dev/null | {
    while IFS= read -r line; do
      case $line in *-ok*) date +%s.%N; break ;; esac
    done
    cat > /dev/null
  } > "$OUT/.fl"
  e=$(head -1 "$OUT/.fl")
  if [ -n "$e" ]; then awk "BEGIN{printf \"%.3f\", $e - $s}"; else echo nan; fi
}

section_startup() {
  log "start-up: $BOOTS runs each, alternating"
  local bare
  bare=$(mktemp -d "$OUT/bare.XXXXXX")
  TMPS+=("$bare")
  mkdir -p "$bare/root/bin" "$bare/root/dev" "$bare/root/proc"
  cp /bin/busybox "$bare/root/bin/busybox"
  ln -s busybox "$bare/root/bin/sh"
  printf '#!/bin/sh\n/bin/busybox echo bare-ok\n/bin/busybox poweroff -f\n' > "$bare/root/init"
  chmod +x "$bare/root/init"
  (cd "$bare/root" && mknod dev/console c 5 1 2> /dev/null || true)
  (cd "$bare/root" && find . -mindepth 1 | sed 's|^\./||' | cpio -o -H newc -R 0:0 --quiet) > "$bare/initrd.cpio"
  : > "$OUT/startup.txt"
  local i t
  for i in $(seq "$BOOTS"); do
    # bare: the plain command line; bare-same: plus what hexz adds to it for speed
    # (cryptomgr.notests), so hexz − bare-same is what hexz itself costs.
    for side in $([ $((i % 2)) = 1 ] && echo "hexz bare bare-same" || echo "bare-same bare hexz"); do
      if [ $side = hexz ]; then
        t=$(first_line_time "$HEXZ" run "$SNAP" --guest-bin-dir "$GUESTBIN" --accel tcg -q --timeout 5m -- echo run-ok)
      else
        local fast=""
        [ $side = bare-same ] && fast=" cryptomgr.notests"
        t=$(first_line_time qemu-system-x86_64 -accel tcg -cpu max -m 512M -smp 1 -M microvm \
          -kernel "$BASE_KERNEL" -initrd "$bare/initrd.cpio" \
          -append "console=ttyS0 panic=-1 quiet reboot=t$fast tsc_early_khz=$KHZ" \
          -no-reboot -no-user-config -display none -monitor none -serial stdio)
      fi
      [ "$t" = nan ] && { log "start-up run ($side) printed no marker"; continue; }
      echo "$side $t" >> "$OUT/startup.txt"
    done
  done
  # One more run with every start-up step timed, on the host and in the guest.
  HEXZ_TRACE=1 "$HEXZ" run "$SNAP" --guest-bin-dir "$GUESTBIN" --accel tcg -q --timeout 5m \
    --console-log "$OUT/startup-console.txt" -- echo run-ok > /dev/null 2> "$OUT/startup-trace.txt" || true
  grep '^hexz-init: [0-9]' "$OUT/startup-console.txt" >> "$OUT/startup-trace.txt" || true
}

# ---------------------------------------------------------------- 3. memory
# Sum of RSS and PSS over each run's hexz-host and its children (QEMU,
# vhost-device-vsock), sampled once every run has printed its tar size.
mem_sample() { # PID... -> "rss_kib pss_kib host_rss qemu_rss backend_rss"
  local all=() p c
  for p in "$@"; do
    all+=("$p")
    for c in $(pgrep -P "$p" || true); do all+=("$c"); done
  done
  for p in "${all[@]}"; do
    local comm rss pss
    comm=$(cat "/proc/$p/comm" 2> /dev/null) || continue
    rss=$(awk '/^VmRSS/{print $2}' "/proc/$p/status" 2> /dev/null)
    pss=$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2> /dev/null)
    echo "$comm ${rss:-0} ${pss:-0}"
  done | awk '{rss += $2; pss += $3; if ($1 ~ /^hexz/) h += $2; else if ($1 ~ /^qemu/) q += $2; else b += $2}
    END {printf "%d %d %d %d %d\n", rss, pss, h, q, b}'
}

mem_runs() { # N -> prints a sample line
  local n=$1 pids=() i dir
  dir=$(mktemp -d "$OUT/mem.XXXXXX")
  TMPS+=("$dir")
  for i in $(seq "$n"); do
    "$HEXZ" run "$SNAP" --guest-bin-dir "$GUESTBIN" --accel tcg -q --timeout 30m -- sh -c "$MEMCMD; echo tar-done; sleep 600" \
      > "$dir/out.$i" 2> "$dir/err.$i" &
    pids+=($!)
    PIDS+=($!)
  done
  local deadline=$((SECONDS + 1800))
  while [ $SECONDS -lt $deadline ]; do
    local done_n
    done_n=$(cat "$dir"/out.* 2> /dev/null | grep -c tar-done || true)
    [ "$done_n" -ge "$n" ] && break
    local alive=0
    for i in "${pids[@]}"; do kill -0 "$i" 2> /dev/null && alive=$((alive + 1)); done
    [ "$alive" = 0 ] && break
    sleep 2
  done
  sleep 3
  mem_sample "${pids[@]}"
  for i in "${pids[@]}"; do kill "$i" 2> /dev/null || true; done
  for i in "${pids[@]}"; do wait "$i" 2> /dev/null || true; done
}

section_memory() {
  log "memory: 1 run, then $PAR in parallel"
  : > "$OUT/memory.txt"
  echo "$MEMCMD" > "$OUT/memory-cmd.txt"
  printf '1 ' >> "$OUT/memory.txt"
  mem_runs 1 >> "$OUT/memory.txt"
  printf '%s ' "$PAR" >> "$OUT/memory.txt"
  mem_runs "$PAR" >> "$OUT/memory.txt"
  cat "$OUT/memory.txt" >&2
}

# ---------------------------------------------------------------- report
section_report() {
  python3 - "$OUT" "$ROUNDS" << 'EOF'
import os, statistics, sys
out, rounds = sys.argv[1], sys.argv[2]
def med(v): return statistics.median(v) if v else None
def f(x, d=2): return "–" if x is None else f"{x:.{d}f}"
def ratio(a, b): return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"
import glob
files = sorted(glob.glob(os.path.join(out, "shares*.txt")))
if files:
    # shares*.txt: shares.txt, plus e.g. shares-make.txt from a WORKLOADS=make run.
    # A measurement right after an ERR line for it (the command failed) is dropped.
    data, failed, cpu = {}, set(), {}
    dirs = {"/workspace": "hexz", "/p9": "9p", "/vfs": "virtiofs"}
    for p in files:
        for line in open(p):
            w = line.split()
            if len(w) >= 4 and w[0] == "ERR":
                failed.add((dirs.get(w[1], w[1]), w[2], w[3].rstrip(":")))
            elif len(w) == 5 and w[0] == "R":
                key = (w[1], w[2], w[3])
                if key in failed:
                    failed.discard(key)
                    continue
                data.setdefault((w[2], w[3], w[1]), []).append(float(w[4]))
            elif len(w) == 9 and w[0] == "C":
                # busy, idle, daemon, tools (the workload's user + system)
                busy, idle, daemon, user, system = map(float, w[4:])
                cpu.setdefault((w[2], w[3], w[1]), []).append((busy, idle, daemon, user + system))
    names = {"tar": "`tar cf - . \\| wc -c`", "stat": "`find . -type f \\| xargs stat`",
             "git": "`git status` (packed repo)", "create": "create 300 files + `rm -rf`",
             "make": "`make -j2` (21 C files)"}
    print(f"### /workspace vs virtio-9p vs virtiofs, same VM and boot (seconds, median of the rounds, order rotated)\n")
    print("| workload | cache | hexz | 9p | virtiofs | hexz/9p | hexz/virtiofs | n |")
    print("|---|---|---|---|---|---|---|---|")
    for w in ["tar", "stat", "git", "create", "make"]:
        for ph in ["first", "cold", "warm"]:
            if not any((w, ph, s) in data for s in ["hexz", "9p", "virtiofs"]):
                continue
            h, n, v = (med(data.get((w, ph, s), [])) for s in ["hexz", "9p", "virtiofs"])
            cnt = len(data.get((w, ph, "hexz"), []))
            label = {"first": "first in mount", "cold": "guest-cold", "warm": "warm"}[ph]
            print(f"| {names[w]} | {label} | {f(h)} | {f(n)} | {f(v)} | {ratio(h, n)} | {ratio(h, v)} | {cnt} |")
    print()
    if cpu:
        # C lines (bench/vm-guest.sh): the guest's 2 vCPUs' busy and idle seconds during
        # the workload, the hexz daemon's own CPU seconds, and the workload's processes'.
        print("### Where the guest's CPU time went (seconds, median of the rounds)\n")
        print("busy = both vCPUs' busy time (≤ 2 × wall), idle = their idle time (waiting for a host, "
              "or nothing to run), daemon = hexz-guestfused's own share of busy (user + system), "
              "tools = the workload's own processes (user + system).\n")
        print("| workload | cache | hexz busy | hexz idle | hexz daemon | hexz tools | 9p busy | 9p idle | 9p tools "
              "| virtiofs busy | virtiofs idle | virtiofs tools |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for w in ["tar", "stat", "git", "create", "make"]:
            for ph in ["first", "cold", "warm"]:
                if not any((w, ph, s) in cpu for s in ["hexz", "9p", "virtiofs"]):
                    continue
                def col(s, i):
                    return f(med([c[i] for c in cpu.get((w, ph, s), [])]))
                label = {"first": "first in mount", "cold": "guest-cold", "warm": "warm"}[ph]
                print(f"| {names[w]} | {label} | {col('hexz', 0)} | {col('hexz', 1)} | {col('hexz', 2)} | {col('hexz', 3)} "
                      f"| {col('9p', 0)} | {col('9p', 1)} | {col('9p', 3)} "
                      f"| {col('virtiofs', 0)} | {col('virtiofs', 1)} | {col('virtiofs', 3)} |")
        print()
p = os.path.join(out, "requests.txt")
if os.path.exists(p):
    r = {}
    for line in open(p):
        w, reps, n = line.split()
        r[(w, int(reps))] = int(n)
    base = r.get(("none", 1))
    print("### Requests to the hexz server per workload (/workspace, one boot each)\n")
    print(f"Boot + mount + exit alone: {base} requests.\n")
    print("| workload | cold (first run after boot) | warm (second run) |")
    print("|---|---|---|")
    for w in ["tar", "stat", "git", "create", "make"]:
        one, two = r.get((w, 1)), r.get((w, 2))
        c = None if one is None or base is None else one - base
        wa = None if one is None or two is None else two - one
        print(f"| {w} | {c} | {wa} |")
    print()
p = os.path.join(out, "startup.txt")
if os.path.exists(p):
    s = {}
    for line in open(p):
        side, t = line.split()
        s.setdefault(side, []).append(float(t))
    h, b = med(s.get("hexz", [])), med(s.get("bare", []))
    print(f"### Start-up: wall time to the first line of output (median of {len(s.get('hexz', []))})\n")
    print("| what | median s | min s | max s |")
    print("|---|---|---|---|")
    for side, label in [("hexz", "`hexz-host run SNAP -- echo` (cloud kernel, cached image)"),
                        ("bare", "bare microVM, same kernel, busybox init printing one line"),
                        ("bare-same", "the same bare microVM with hexz's kernel command line (`cryptomgr.notests`)")]:
        v = s.get(side, [])
        if v:
            print(f"| {label} | {f(med(v))} | {f(min(v))} | {f(max(v))} |")
    if h is not None and b is not None:
        print(f"\nhexz − bare = {h - b:.2f} s ({ratio(h, b)}).")
    bs = med(s.get("bare-same", []))
    if h is not None and bs is not None:
        print(f"hexz − bare-same = {h - bs:.2f} s (what hexz itself adds).\n")
p = os.path.join(out, "memory.txt")
if os.path.exists(p):
    rows = [list(map(int, l.split())) for l in open(p) if l.strip()]
    cmdf = os.path.join(out, "memory-cmd.txt")
    cmd = open(cmdf).read().strip() if os.path.exists(cmdf) else "tar cf - . | wc -c"
    print(f"### Host memory: N parallel `run`s on one snapshot (each: `{cmd}`, then sleep)\n")
    print("| runs | RSS total MiB | PSS total MiB | hexz-host RSS | qemu RSS | vhost-device-vsock RSS | PSS per run MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, rss, pss, h, q, b in rows:
        print(f"| {n} | {rss/1024:.0f} | {pss/1024:.0f} | {h/1024:.0f} | {q/1024:.0f} | {b/1024:.0f} | {pss/1024/n:.0f} |")
    if len(rows) == 2:
        print(f"\n{rows[1][0]} runs / 1 run (PSS): {rows[1][2] / rows[0][2]:.2f}×.\n")
EOF
}

make_tree
[ "$SECTIONS" = tree ] && exit 0
pack_snapshot
build_images
log "tree: $(find "$TREE" -type f | wc -l) files, $(du -sh "$TREE" | cut -f1); snapshot $(du -h "$SNAP" | cut -f1)"
for s in $SECTIONS; do
  case $s in
    shares | requests | startup | memory) "section_$s" ;;
    report) ;;
    *) log "unknown section $s"; exit 2 ;;
  esac
done
[[ " $SECTIONS " == *" report "* ]] && section_report > "$OUT/report.md" && cat "$OUT/report.md"
exit 0
