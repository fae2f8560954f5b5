# Sourced by the bench/oci*.sh scripts: a docker-registry on loopback for them.
#   registry_up DIR [LOG]  writes DIR/config.yml (filesystem storage in DIR/data, request
#                          log at info level) on a free port, unless DIR has one, starts
#                          the registry with its log in LOG (DIR/log), waits until it
#                          answers, and sets PORT and RPID (the caller stops it by PID).
registry_up() {
  local dir=$1 log=${2:-$1/log}
  mkdir -p "$dir"
  if [ ! -e "$dir/config.yml" ]; then
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$dir/config.yml" <<CFG
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $(realpath "$dir")/data
http:
  addr: 127.0.0.1:$port
CFG
  fi
  PORT=$(sed -n 's/.*addr: 127.0.0.1:\([0-9]*\).*/\1/p' "$dir/config.yml")
  docker-registry serve "$dir/config.yml" > "$log" 2>&1 & RPID=$!
  until curl -sf "http://127.0.0.1:$PORT/v2/" > /dev/null; do sleep 0.1; done
}
