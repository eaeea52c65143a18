#!/usr/bin/env bash
# End-to-end benchmark against a real registry on loopback. Generates the synthetic bench image
# (examples/bench_image.rs: 6 gzip layers, ~1.1 GiB uncompressed, ~60k small files, large files,
# whiteouts), pushes it, and measures in one run, as ratios against `pigz -dc` over the same blobs:
# cold and warm squash throughput, time to first byte, peak RSS (VmHWM of the server), and 8 and 32
# concurrent clients. Prints a table and writes it to $RESULTS (default target/bench-e2e.md).
#
#   scripts/bench-e2e.sh [SCALE]     # SCALE divides the image's sizes (1 = the benchmark image)
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-1}
results=${RESULTS:-target/bench-e2e.md}

packages=(docker-registry skopeo pigz curl)
missing=()
for p in "${packages[@]}"; do
  command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --bin strata --example bench_image

work=$(mktemp -d /tmp/strata-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

reg_port=$(free_port)
cat > "$work/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
log:
  level: warn
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 30); do curl -fsS "http://127.0.0.1:$reg_port/v2/" >/dev/null 2>&1 && break; sleep 0.5; done
registry=127.0.0.1:$reg_port

echo "bench: generating the image (scale 1/$scale)"
target/release/examples/bench_image "$work/layout" "$scale"
skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
  "oci:$work/layout:bench" "docker://$registry/bench/synthetic:v1"
image="$registry/bench/synthetic:v1"

# The layer blobs, bottom first, from the layout's manifest.
manifest=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]+"/index.json")); print(d["manifests"][0]["digest"][7:])' "$work/layout")
mapfile -t blobs < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); [print(l["digest"][7:]) for l in m["layers"]]' "$work/layout/blobs/sha256/$manifest")
compressed=0
for b in "${blobs[@]}"; do compressed=$((compressed + $(stat -c %s "$work/layout/blobs/sha256/$b"))); done
uncompressed=0
for b in "${blobs[@]}"; do uncompressed=$((uncompressed + $(pigz -dc "$work/layout/blobs/sha256/$b" | wc -c))); done

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }

# Reference: pigz -dc over the same blobs, one after the other, as the squash reads them.
sync
t0=$(now)
for b in "${blobs[@]}"; do pigz -dc "$work/layout/blobs/sha256/$b" >/dev/null; done
t1=$(now)
pigz_s=$(secs "$t0" "$t1")

server_pid=
start_server() {
  [ -n "$server_pid" ] && { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }
  target/release/strata serve --listen 127.0.0.1:0 --insecure-registry "$registry" \
    --cache-dir "$work/cache" --max-concurrent 64 2>"$work/strata.log" &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 1 50); do
    url=$(grep -o 'listening on http://[0-9.:]*' "$work/strata.log" | head -1 | sed 's/listening on //') && [ -n "$url" ] && break
    sleep 0.1
  done
}
hwm() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$server_pid/status"; }

# One client: "seconds ttfb bytes exit".
one() {
  local out
  out=$(curl -sS -o /dev/null -w '%{time_total} %{time_starttransfer} %{size_download} %{http_code}' "$url/squash/$image" 2>/dev/null) \
    && echo "$out 0" || echo "$out 1"
}

rows=()
row() { rows+=("$(printf '| %s | %s | %s | %s | %s | %s |' "$@")"); }
ratio() { python3 -c "print(f'{($uncompressed*$2/$1)/($uncompressed/$pigz_s):.2f}x')"; }
mbps() { python3 -c "print(f'{$uncompressed*$2/$1/1e6:.0f}')"; }

rm -rf "$work/cache"
start_server
read -r t ttfb bytes code fail <<<"$(one)"
[ "$fail$code" = 0200 ] || { cat "$work/strata.log"; echo "cold squash failed"; exit 1; }
row "squash, cold (nothing remembered)" "$(mbps "$t" 1)" "$(ratio "$t" 1)" "${ttfb}s" "$(hwm)" 0
size=$bytes

start_server
read -r t ttfb bytes code fail <<<"$(one)"
[ "$fail$code" = 0200 ] && [ "$bytes" = "$size" ] || { echo "warm squash failed"; exit 1; }
row "squash, warm (sizes remembered)" "$(mbps "$t" 1)" "$(ratio "$t" 1)" "${ttfb}s" "$(hwm)" 0

for n in 8 32; do
  start_server
  t0=$(now)
  clients=()
  for i in $(seq 1 "$n"); do one >"$work/c$i" & clients+=($!); done
  wait "${clients[@]}"
  t1=$(now)
  failures=0
  for i in $(seq 1 "$n"); do
    read -r _ _ b code fail <"$work/c$i"
    [ "$fail$code" = 0200 ] && [ "$b" = "$size" ] || failures=$((failures + 1))
  done
  wall=$(secs "$t0" "$t1")
  row "$n concurrent clients, warm (aggregate)" "$(mbps "$wall" "$n")" "$(ratio "$wall" "$n")" "-" "$(hwm)" "$failures"
done

{
  echo "strata end-to-end benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores"
  echo
  echo "Image: 6 gzip layers, $compressed bytes compressed, $uncompressed bytes uncompressed; squashed output $size bytes."
  echo "Reference: pigz -dc over the same blobs, one after the other: ${pigz_s}s = $(python3 -c "print(f'{$uncompressed/$pigz_s/1e6:.0f}')") MB/s."
  echo "Throughput counts the layers' uncompressed bytes per second of wall time."
  echo
  echo "| run | MB/s | vs pigz -dc | time to first byte | peak RSS (MiB) | failures |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$results"
