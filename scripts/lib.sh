# Shared by the scripts: a distribution registry on a free loopback port, storing under a directory.
# Sourced; the caller keeps the pid (in $registry_pid) and stops it.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry DIR: starts it, waits until it answers, sets $registry (host:port) and $registry_pid.
start_registry() {
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir"
  cat > "$dir/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
log:
  level: warn
YML
  docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
  registry_pid=$!
  registry=127.0.0.1:$port
  for _ in $(seq 1 60); do
    curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  cat "$dir/registry.log"
  echo "registry did not start" >&2
  return 1
}
