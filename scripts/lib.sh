# Shared by the bench and soak scripts (and test.sh's registry and dockerd): packages, a scratch directory with
# the processes to stop, a distribution registry on a free loopback port. Sourced.

# need_packages NAME...: installs those (Debian package = command name) that are missing.
need_packages() {
  local missing=() p
  for p in "$@"; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# scratch_work PREFIX: sets $work to a new directory and $pids to an empty list; on exit, the
# processes in $pids are stopped and $work removed.
scratch_work() {
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"' EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_strata LOG ARGS...: `strata serve` on a free loopback port with ARGS, stderr to LOG; sets
# $server_pid and $url once it listens, and adds the pid to $pids.
start_strata() {
  local log=$1
  shift
  target/release/strata serve --listen 127.0.0.1:0 "$@" 2>"$log" &
  server_pid=$!
  pids+=("$server_pid")
  url=
  for _ in $(seq 1 50); do
    url=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -1 | sed 's/listening on //') || true
    [ -n "$url" ] && return 0
    sleep 0.1
  done
  cat "$log"
  echo "strata did not start" >&2
  return 1
}

# start_registry DIR: starts it, waits until it answers, sets $registry (host:port) and $registry_pid.
# The caller stops it.
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

# start_dockerd DIR: a Docker daemon with vfs storage and no networking, its socket in DIR; exports
# DOCKER_HOST and adds the pid to $pids. Waits until it answers.
start_dockerd() {
  local dir=$1
  mkdir -p "$dir"
  dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
    --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
    -H "unix://$dir/docker.sock" >"$dir/dockerd.log" 2>&1 &
  pids+=($!)
  export DOCKER_HOST="unix://$dir/docker.sock"
}

# wait_dockerd DIR: waits (60 s at most) until the daemon of start_dockerd answers.
wait_dockerd() {
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  tail -50 "$1/dockerd.log"
  echo "dockerd did not start" >&2
  return 1
}
