#!/usr/bin/env bash
# The one test command: installs what the tests need, checks formatting and lints, starts the real
# services on loopback (registry, dockerd, containerd) with scratch directories, runs every test, and
# stops the services again whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- packages (idempotent: apt-get only runs when something is missing) ---
# nasm, autoconf, automake, libtool: the build of ISA-L's inflate (isal-sys, Cargo.toml).
packages=(docker.io docker-registry skopeo podman containerd pigz zstd busybox-static curl appc-spec gnupg sqv openssl nasm autoconf automake libtool)
commands=(dockerd docker-registry skopeo podman containerd pigz zstd busybox curl actool gpg sqv openssl nasm autoconf automake libtoolize)
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

# The S3-compatible server of the object-storage store's tests: moto's (PyPI `moto[server]`), chosen
# over s3s-fs (crates.io), the other real candidate. Both honour `If-None-Match: *` on PutObject and
# on CompleteMultipartUpload (the conditional create the store relies on); neither makes the check
# and the write one step, and moto's gap is the narrower (the body is already in memory when it
# checks, where s3s-fs checks and then streams the body to a file). Install on a fresh machine,
# measured: pip into a new venv 58 s, while the machine image already has moto (nothing to do);
# `cargo install s3s-fs` 444 s on 2 cores, and its newer releases want a newer rustc than ours.
# moto speaks the S3 REST protocol (multipart, UploadPartCopy, ranges, ListObjectsV2 paging) to the
# same AWS client strata ships; it does not check signatures, which s3s-fs would.
if ! python3 -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
  echo "test.sh: installing moto[server]"
  python3 -m pip install -q "moto[server]>=5.1,<6"
fi

# deploy/kubernetes/ is checked without a cluster (tests/deploy_manifests.rs): kubectl renders the
# kustomization, kubernetes-validate (PyPI; it ships the official schemas of Kubernetes 1.25-1.37)
# checks every object strictly. kubectl from Debian's kubernetes-client when none is installed.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "test.sh: installing kubernetes-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
if ! python3 -c "import kubernetes_validate, yaml" 2>/dev/null; then
  echo "test.sh: installing kubernetes-validate"
  python3 -m pip install -q "kubernetes-validate>=1.37,<2"
fi

# --- static checks ---
if [ "${STRATA_TEST_SHELL:-}" != 1 ]; then
cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
# The build without ISA-L (zlib-rs inflates) stays a build, and its decompression tests pass.
cargo clippy --release --lib --no-default-features -- -D warnings
cargo test --release --lib --no-default-features layer::
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

# moto on a free loopback port, one bucket for the tests (each test keeps to its own prefix).
s3_port=$(free_port)
python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
pids+=($!)

wait_dockerd "$work/docker"
for _ in $(seq 1 50); do
  curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$s3_port/strata-test" 2>/dev/null && break
  sleep 0.2
done
curl -fsS -o /dev/null "http://127.0.0.1:$s3_port/strata-test" || { tail -50 "$work/moto.log"; echo "moto did not start"; exit 1; }
for _ in $(seq 1 30); do
  [ -S "$work/containerd/containerd.sock" ] && break
  sleep 1
done
[ -S "$work/containerd/containerd.sock" ] || { tail -50 "$work/containerd.log"; echo "containerd did not start"; exit 1; }

export STRATA_TEST_REGISTRY="$registry"
export STRATA_TEST_CONTAINERD="$work/containerd/containerd.sock"
export STRATA_TEST_WORK="$work"
# The store's AWS environment (object_store reads it), for the tests and the servers they start.
export STRATA_TEST_S3="s3://strata-test"
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=strata-test AWS_SECRET_ACCESS_KEY=strata-test

# STRATA_TEST_SHELL=1: keep the services up and open a shell with their environment, for debugging.
if [ "${STRATA_TEST_SHELL:-}" = 1 ]; then
  env | grep -E '^(DOCKER_HOST|STRATA_TEST_|AWS_)' > "${STRATA_TEST_ENV_FILE:-/dev/stdout}"
  sleep infinity
fi

# --- tests ---
cargo test --release --lib --bins --tests -- --test-threads=4
cargo bench --no-run
