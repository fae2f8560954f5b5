#!/usr/bin/env bash
# Memory templates vs cold boots (docs/BENCHMARKS.md, "Memory templates"):
#  1. wall time from the start of `hexz-host run` to the first byte of the command's
#     output, restored from a template vs booted cold, RUNS each, alternating;
#  2. PAR runs from one template started at once (time to each one's first byte, and
#     until the last one's);
#  3. host memory (RSS and PSS of every process of the runs) of PAR parallel sandboxes
#     from one template vs PAR cold boots, each idle after its first output.
# One VM benchmark at a time on a machine: this script runs its VMs itself.
#
# Usage: bench/template.sh            Env: RUNS=10 PAR=8 HEXZ=target/release/hexz-host
# Needs what `hexz-host run` needs (QEMU, vhost-device-vsock, the guest binaries built
# with `cargo build --release -p hexz-guestfused --target x86_64-unknown-linux-musl`).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
PAR=${PAR:-8}
HEXZ=${HEXZ:-target/release/hexz-host}
[ -x "$HEXZ" ] || cargo build --release -p hexz-host
WORK=$(mktemp -d /tmp/hexz-bench-template.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/tree/src"
echo "# bench" > "$WORK/tree/README.md"
seq 1 2000 > "$WORK/tree/src/numbers.txt"
"$HEXZ" pack "$WORK/tree" -o "$WORK/ws.hxz" > /dev/null
"$HEXZ" image build > /dev/null
echo "template: $("$HEXZ" template build 2>&1 | tr '\n' ' ')" >&2

python3 - "$HEXZ" "$WORK/ws.hxz" "$RUNS" "$PAR" << 'EOF'
import os, signal, statistics, subprocess, sys, threading, time

hexz, snap, runs, par = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def start(mode, cmd):
    args = [hexz, "run", "-q", snap] + (["--cold"] if mode == "cold" else []) + ["--"] + cmd
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)

def first_byte(p, t0):
    b = p.stdout.read(1)
    if not b:
        raise SystemExit(f"no output: {p.stderr.read().decode(errors='replace')}")
    return time.monotonic() - t0

def med(v):
    return f"{statistics.median(v):.2f} s ({min(v):.2f}–{max(v):.2f})"

# 1. sequential, alternating
seq = {"template": [], "cold": []}
for i in range(runs):
    for mode in ("template", "cold"):
        t0 = time.monotonic()
        p = start(mode, ["echo", "run-ok"])
        seq[mode].append(first_byte(p, t0))
        p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{mode} run failed: {p.returncode}")
for mode in ("template", "cold"):
    print(f"first byte, {mode}: median {med(seq[mode])} over {runs} runs", flush=True)
ratio = statistics.median(seq["template"]) / statistics.median(seq["cold"])
print(f"template/cold: {ratio:.2f}x", flush=True)

def tree(pids):
    """The processes of these runs: each hexz-host and its descendants."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except OSError:
                pass
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out

def memory(pids):
    rss = pss = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    k, v = line.split(":", 1)
                    if k == "Rss":
                        rss += int(v.split()[0])
                    elif k == "Pss":
                        pss += int(v.split()[0])
        except OSError:
            pass
    return rss / 1024, pss / 1024

# 2 + 3. PAR at once: first bytes, then memory while all are idle
for mode in ("template", "cold"):
    t0 = time.monotonic()
    procs = [start(mode, ["sh", "-c", "echo run-ok; sleep 600"]) for _ in range(par)]
    firsts = [None] * par
    def wait_first(i):
        if procs[i].stdout.read(1):
            firsts[i] = time.monotonic() - t0
    readers = [threading.Thread(target=wait_first, args=(i,)) for i in range(par)]
    try:
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        time.sleep(2)
        rss, pss = memory([p.pid for p in procs if p.poll() is None])
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        errs = [p.communicate()[1].decode(errors="replace") for p in procs]
    ok = [f for f in firsts if f is not None]
    for p, f, tail in zip(procs, firsts, errs):
        if f is None:
            print(f"  a {mode} run printed nothing (exit {p.returncode}): {tail[-400:]}", flush=True)
    if ok:
        print(f"{par} parallel, {mode}: {len(ok)} printed; first byte median {med(ok)}, all by "
              f"{max(ok):.2f} s; memory RSS {rss:.0f} MiB, PSS {pss:.0f} MiB "
              f"({pss / len(ok):.0f} MiB each)", flush=True)
EOF
