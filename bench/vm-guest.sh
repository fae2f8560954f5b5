# Runs inside the bench VM (bench/vm.sh passes it as `sh -c "$(cat bench/vm-guest.sh)"`).
# /workspace is hexz; this script mounts the same tree over virtio-9p (/p9) and virtiofs
# (/vfs), then times each workload on each share, order rotated per round.
# Prints one line per measurement: `R <share> <workload> <phase> <seconds>`.
# Env: ROUNDS (3), SHARES ("/workspace /p9 /vfs"), WORKLOADS ("tar stat git create make").
export PATH=/opt/bench/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/tmp GIT_CONFIG_NOSYSTEM=1
ROUNDS=${ROUNDS:-3}
SHARES=${SHARES:-"/workspace /p9 /vfs"}
WORKLOADS=${WORKLOADS:-"tar stat git create make"}
DATE=/opt/bench/date

mkdir -p /p9 /vfs
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose ws /p9 || echo "ERR mount 9p"
mount -t virtiofs vfs /vfs || echo "ERR mount virtiofs"
git config --global safe.directory '*'
git config --global core.untrackedCache false
echo "I cc: $(command -v gcc || echo none) make: $(command -v make || echo none) git: $(command -v git || echo none)"
echo "I mounts: $(grep -E ' /(workspace|p9|vfs) ' /proc/mounts | awk '{printf "%s=%s ", $2, $3}')"

now() { $DATE +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

w_tar() { cd "$1" && tar cf - . | wc -c; }
w_stat() { cd "$1" && find . -type f | xargs stat > /dev/null; }
w_git() { cd "$1/repo" && git status --porcelain | wc -l; }
w_create() {
  mkdir "$1/.bench-create" && cd "$1/.bench-create" || return 1
  i=0
  while [ $i -lt 300 ]; do echo "$i" > "f$i"; i=$((i + 1)); done
  cd / && rm -rf "$1/.bench-create"
}
w_make() { cd "$1/cproj" && make -s -j2; }
clean_make() { (cd "$1/cproj" && make -s clean) > /dev/null 2>&1; }

# Where the guest's time went: its CPUs' busy and idle ticks (idle = waiting for a host),
# the hexz daemon's own CPU ticks (user + system), and the workload's own (this shell's
# children's user and system ticks), all in USER_HZ (100/s).
DAEMON=
for p in /proc/[0-9]*; do
  [ "$(cat "$p/comm" 2> /dev/null)" = hexz-guestfused ] && DAEMON=${p#/proc/} && break
done
ticks() {
  awk '/^cpu /{printf "%d %d ", $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat
  if [ -n "$DAEMON" ]; then awk '{printf "%d ", $14 + $15}' "/proc/$DAEMON/stat"; else printf '0 '; fi
  awk '{print $16, $17}' "/proc/$ME/stat"
}

# time_it SHARE WORKLOAD PHASE
time_it() {
  # This shell process (time_it runs in a pipeline's subshell, which reaps the workload).
  read -r ME _ < /proc/self/stat
  t0=$(ticks)
  s=$(now)
  out=$( (w_$2 "$1") 2>&1) || echo "ERR $1 $2 $3: $(echo "$out" | tail -3 | tr '\n' ' ')"
  e=$(now)
  t1=$(ticks)
  echo "R $1 $2 $3 $(awk "BEGIN{printf \"%.3f\", $e - $s}")"
  # C SHARE WORKLOAD PHASE busy-s idle-s daemon-s workload-user-s workload-system-s
  echo "$t0 $t1" | awk -v h="$1 $2 $3" '{printf "C %s %.2f %.2f %.2f %.2f %.2f\n", h,
    ($6-$1)/100, ($7-$2)/100, ($8-$3)/100, ($9-$4)/100, ($10-$5)/100}'
}

name() { case $1 in /workspace) echo hexz ;; /p9) echo 9p ;; /vfs) echo virtiofs ;; *) echo "$1" ;; esac; }

# Run each tool once on a copy in the guest's own memory first: under TCG the first run of
# gcc or git in a boot pays for QEMU translating its code, and that must not be charged to
# whichever share happens to go first.
warm_up() {
  rm -rf /tmp/warm && mkdir -p /tmp/warm || return
  d=$(for s in $SHARES; do echo "$s"; done | tail -1)
  cp -a "$d/cproj" "$d/repo" /tmp/warm/ 2> /dev/null
  (cd /tmp/warm/cproj && make -s clean && make -s -j2 && make -s clean) > /dev/null 2>&1
  (cd /tmp/warm/repo && git status --porcelain) > /dev/null 2>&1
  (cd /tmp/warm && tar cf - . | wc -c && find . -type f | xargs stat) > /dev/null 2>&1
  rm -rf /tmp/warm
}
warm_up

# The first git status in each share refreshes the index (new inode numbers): its own row.
case " $WORKLOADS " in *" git "*)
  for d in $SHARES; do drop; time_it "$d" git first | sed "s| $d | $(name "$d") |"; done ;;
esac

r=0
while [ $r -lt "$ROUNDS" ]; do
  # Rotate the share order by the round number.
  set -- $SHARES
  k=0
  while [ $k -lt $r ]; do first=$1; shift; set -- "$@" "$first"; k=$((k + 1)); done
  for d in "$@"; do
    n=$(name "$d")
    for w in $WORKLOADS; do
      case $w in
        create) drop; time_it "$d" create cold | sed "s| $d | $n |" ;;
        make)
          clean_make "$d"; drop; time_it "$d" make cold | sed "s| $d | $n |"
          clean_make "$d"; time_it "$d" make warm | sed "s| $d | $n |"
          clean_make "$d" ;;
        *)
          drop; time_it "$d" "$w" cold | sed "s| $d | $n |"
          time_it "$d" "$w" warm | sed "s| $d | $n |" ;;
      esac
    done
  done
  r=$((r + 1))
done
echo "I done"
