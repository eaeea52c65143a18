#!/usr/bin/env bash
# The one test command: installs what the tests need, checks formatting and lints, starts the real
# services on loopback (registry, dockerd, containerd) with scratch directories, runs every test, and
# stops the services again whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- packages (idempotent: apt-get only runs when something is missing) ---
packages=(docker.io docker-registry skopeo podman containerd pigz zstd busybox-static curl appc-spec gnupg sqv openssl)
commands=(dockerd docker-registry skopeo podman containerd pigz zstd busybox curl actool gpg sqv openssl)
missing=()
for i in "${!commands[@]}"; do
  command -v "${commands[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- static checks ---
if [ "${STRATA_TEST_SHELL:-}" != 1 ]; then
cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
cargo build --release --all-targets
fi

# --- services ---
work=$(mktemp -d /tmp/strata-test.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  # dockerd's own containerd and the containers' shims live in its exec root.
  pkill -f "$work" 2>/dev/null || true
  umount -R "$work" 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

. scripts/lib.sh
start_registry "$work/registry"
pids+=("$registry_pid")

start_dockerd "$work/docker"

mkdir -p "$work/containerd"
cat > "$work/containerd/config.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd/containerd.sock"
TOML
containerd --config "$work/containerd/config.toml" >"$work/containerd.log" 2>&1 &
pids+=($!)

wait_dockerd "$work/docker"
for _ in $(seq 1 30); do
  [ -S "$work/containerd/containerd.sock" ] && break
  sleep 1
done
[ -S "$work/containerd/containerd.sock" ] || { tail -50 "$work/containerd.log"; echo "containerd did not start"; exit 1; }

export STRATA_TEST_REGISTRY="$registry"
export STRATA_TEST_CONTAINERD="$work/containerd/containerd.sock"
export STRATA_TEST_WORK="$work"

# STRATA_TEST_SHELL=1: keep the services up and open a shell with their environment, for debugging.
if [ "${STRATA_TEST_SHELL:-}" = 1 ]; then
  env | grep -E '^(DOCKER_HOST|STRATA_TEST_)' > "${STRATA_TEST_ENV_FILE:-/dev/stdout}"
  sleep infinity
fi

# --- tests ---
cargo test --release --lib --bins --tests -- --test-threads=4
cargo bench --no-run
