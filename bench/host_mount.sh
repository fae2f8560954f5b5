#!/bin/bash
# The host mount (`hexz-host mount`) against squashfuse_ll and against the kernel's own
# squashfs and EROFS (loop mounts: the limit), with the local directory as reference, on
# the same tree. Workloads, cold (fresh mounts + drop_caches before each run) and warm:
#   tar      `tar cf - . | wc -c`
#   stat     `find . -type f | xargs stat`
#   open     2000 x (open + 4 KiB pread + close) of files spread over the tree (python3)
#   par1/4   every file read with `xargs cat` by 1 reader, then by 4 readers at once
#   git      `git status --porcelain` in GIT_TREE (a packed repository; its own images)
# Runs are interleaved (each system takes its turn) so load noise hits all alike.
# Usage (root): bench/host_mount.sh TREE [WORKDIR]   N=5; GIT_TREE=DIR adds the git row.
# Needs squashfuse_ll, mksquashfs, mkfs.erofs (apt: squashfuse squashfs-tools erofs-utils),
# python3, bc; the kernel's squashfs and erofs file systems.
set -eu
TREE=$(realpath "$1"); W=${2:-/tmp/hexz-bench-mount}; N=${N:-5}
H=${HEXZ_HOST:-$(dirname "$0")/../target/release/hexz-host}; H=$(realpath "$H")
mkdir -p "$W"; cd "$W"
t() { local s=$(date +%s.%N); bash -c "$1" >/dev/null 2>&1; local e=$(date +%s.%N); echo "$e - $s" | bc; }
med() { printf "%s\n" "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Images of a tree under prefix P: P.hxz, P.sqfs (zstd), P.erofs (lz4hc; Debian 12's
# erofs-utils writes only lz4/lz4hc).
images() { # $1 tree, $2 prefix
  [ -e "$2.hxz" ] || "$H" pack "$1" -o "$2.hxz" > /dev/null
  [ -e "$2.sqfs" ] || mksquashfs "$1" "$2.sqfs" -comp zstd -noappend -quiet > /dev/null
  [ -e "$2.erofs" ] || mkfs.erofs -zlz4hc "$2.erofs" "$1" > /dev/null
}
SYSTEMS="local hexz sqfuse ksq kerofs"
up() { # $1 system, $2 prefix, $3 tree -> mount point on stdout
  local m="$W/mnt-$1"; mkdir -p "$m"
  case $1 in
    local) echo "$3"; return ;;
    hexz) "$H" mount "$2.hxz" "$m" --daemon --log "$W/m.log" --pid-file "$W/m.pid" > /dev/null ;;
    sqfuse) squashfuse_ll "$2.sqfs" "$m" ;;
    ksq) mount -t squashfs -o loop,ro "$2.sqfs" "$m" ;;
    kerofs) mount -t erofs -o loop,ro "$2.erofs" "$m" ;;
  esac
  echo "$m"
}
down() { # $1 system
  local m="$W/mnt-$1"
  case $1 in
    local) ;;
    hexz) umount "$m"; while [ -e "$W/m.pid" ]; do sleep 0.05; done ;;
    sqfuse) fusermount3 -u "$m" ;;
    *) umount "$m" ;;
  esac
}

# The workloads, run in the current directory.
cat > "$W/open.py" <<'EOF'
import os, sys
files = [l.rstrip("\n") for l in open(sys.argv[1])]
for p in files:
    fd = os.open(p, os.O_RDONLY)
    os.pread(fd, 4096, 0)
    os.close(fd)
EOF
(cd "$TREE" && find . -type f -size +0 | awk 'NR % 5 == 0' | head -2000) > "$W/open.list"
(cd "$TREE" && find . -type f) > "$W/all.list"
split -n r/4 -d "$W/all.list" "$W/part."
declare -A OPS=(
  [tar]='tar cf - . | wc -c'
  [stat]='find . -type f | xargs stat'
  [open]="python3 $W/open.py $W/open.list"
  [par1]="xargs -d '\n' cat < $W/all.list"
  [par4]="for p in $W/part.0*; do xargs -d '\n' cat < \$p & done; wait"
)

images "$TREE" "$W/tree"
row() { # $1 name, $2 command, $3 prefix, $4 tree
  local sys mnt; declare -A C W2 M
  for sys in $SYSTEMS; do C[$sys]=""; W2[$sys]=""; done
  for i in $(seq "$N"); do
    for sys in $SYSTEMS; do
      mnt=$(up "$sys" "$3" "$4"); drop
      C[$sys]+=" $(t "cd $mnt && $2")"; down "$sys"
    done
  done
  for sys in $SYSTEMS; do M[$sys]=$(up "$sys" "$3" "$4"); bash -c "cd ${M[$sys]} && $2" > /dev/null 2>&1 || true; done
  for i in $(seq "$N"); do
    for sys in $SYSTEMS; do W2[$sys]+=" $(t "cd ${M[$sys]} && $2")"; done
  done
  for sys in $SYSTEMS; do down "$sys"; done
  printf "%-5s cold" "$1"; for sys in $SYSTEMS; do printf "  %s %s" "$sys" "$(med ${C[$sys]})"; done; echo
  printf "%-5s warm" "$1"; for sys in $SYSTEMS; do printf "  %s %s" "$sys" "$(med ${W2[$sys]})"; done; echo
}
for op in tar stat open par1 par4; do row "$op" "${OPS[$op]}" "$W/tree" "$TREE"; done
if [ -n "${GIT_TREE:-}" ]; then
  G=$(realpath "$GIT_TREE"); git -C "$G" status --porcelain > /dev/null
  images "$G" "$W/git"
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' GIT_OPTIONAL_LOCKS=0
  row git 'git status --porcelain' "$W/git" "$G"
fi
