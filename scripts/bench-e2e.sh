#!/usr/bin/env bash
# End-to-end benchmark against a real registry on loopback. Builds three images and pushes them:
#   synthetic  examples/bench_image.rs: 6 gzip layers, 1.2 GiB uncompressed, ~60k small files, large
#              files, whiteouts and an opaque directory in the upper layers;
#   debian     scripts/debian_image.py: debootstrap minbase + an apt-get install layer + a cleanup
#              layer, real binaries (needs the Debian mirror);
#   big        one layer of 4.3 GiB uncompressed, past gzip's 4 GiB ISIZE wrap.
# For each, in one run and as ratios against `pigz -dc` over the same blobs: cold and warm squash
# throughput, time to first byte, peak RSS (VmHWM of the server); for the synthetic image also 8 and
# 32 concurrent clients. Prints a table and writes it to $RESULTS (default target/bench-e2e.md).
#
#   scripts/bench-e2e.sh [SCALE] [IMAGES...]   # SCALE divides the synthetic sizes (1 = as above);
#                                              # IMAGES: any of synthetic debian big (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-1}
shift || true
images=("${@:-synthetic debian big}")
read -r -a images <<<"${images[*]}"
results=${RESULTS:-target/bench-e2e.md}

. scripts/lib.sh
need_packages docker-registry skopeo pigz curl debootstrap
cargo build --release --bin strata --example bench_image
scratch_work strata-bench
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
median() { python3 -c 'import sys, statistics; print(f"{statistics.median(map(float, sys.argv[1:])):.3f}")' "$@"; }
rounds=${ROUNDS:-3}

start_registry "$work/registry"
pids+=("$registry_pid")

server_pid=
start_server() {
  if [ -n "$server_pid" ]; then kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; fi
  start_strata "$work/strata.log" --insecure-registry "$registry" --cache-dir "$work/cache" \
    --max-concurrent 64
}
hwm() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$server_pid/status"; }

# One client: "seconds ttfb bytes status failed".
one() {
  local out
  out=$(curl -sS -o /dev/null -w '%{time_total} %{time_starttransfer} %{size_download} %{http_code}' "$url/squash/$1" 2>/dev/null) \
    && echo "$out 0" || echo "$out 1"
}

rows=()
notes=()
# row IMAGE RUN "MB/s | ratio" TTFB RSS FAILURES
row() { rows+=("$(printf '| %s | %s | %s | %s | %s | %s |' "$@")"); }

# measure NAME LAYOUT CONCURRENCY...
measure() {
  local name=$1 layout=$2
  shift 2
  local image="$registry/bench/$name:v1"
  skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$layout:bench" "docker://$image"
  local manifest blobs compressed=0 uncompressed=0 b t0 t1 pigz_s top_s
  manifest=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]+"/index.json")); print(d["manifests"][0]["digest"][7:])' "$layout")
  mapfile -t blobs < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); [print(l["digest"][7:]) for l in m["layers"]]' "$layout/blobs/sha256/$manifest")
  for b in "${blobs[@]}"; do
    compressed=$((compressed + $(stat -c %s "$layout/blobs/sha256/$b")))
    uncompressed=$((uncompressed + $(pigz -dc "$layout/blobs/sha256/$b" | wc -c)))
  done
  # The top layer alone: what a first byte could have to wait for, were it read first.
  sync
  t0=$(now)
  pigz -dc "$layout/blobs/sha256/${blobs[-1]}" >/dev/null
  t1=$(now)
  top_s=$(secs "$t0" "$t1")
  # The reference, pigz -dc over the same blobs one after the other as the squash reads them, is
  # alternated with the conversions: pigz, cold, pigz, warm, each round; medians are reported.
  pigz_once() {
    local t0 t1 b
    t0=$(now)
    for b in "${blobs[@]}"; do pigz -dc "$layout/blobs/sha256/$b" >/dev/null; done
    t1=$(now)
    secs "$t0" "$t1"
  }
  local t ttfb bytes code fail size r r_rss
  local pigz_runs=() cold_t=() cold_f=() cold_rss=0 warm_t=() warm_f=() aborted=0 abort_bytes=0 abort_f=()
  for r in $(seq 1 "$rounds"); do
    pigz_runs+=("$(pigz_once)")
    rm -rf "$work/cache"
    start_server
    read -r t ttfb bytes code fail <<<"$(one "$image")"
    if [ "$fail$code" = 1200 ]; then
      # Aborted after the first byte: the bound was outgrown (logged), as a gzip trailer past 4 GiB
      # can make it; the image is merged with summaries and sized exactly from now on.
      grep -q "outgrew the bound" "$work/strata.log" || { cat "$work/strata.log"; exit 1; }
      aborted=$((aborted + 1))
      abort_bytes=$bytes
      abort_f+=("$ttfb")
      read -r t ttfb bytes code fail <<<"$(one "$image")"
    fi
    [ "$fail$code" = 0200 ] || { cat "$work/strata.log"; echo "$name: cold squash failed"; exit 1; }
    cold_t+=("$t")
    cold_f+=("$ttfb")
    # Each cold round has a server of its own: its peak is that conversion's (the largest is kept).
    r_rss=$(hwm)
    cold_rss=$((r_rss > cold_rss ? r_rss : cold_rss))
    size=$bytes
    pigz_runs+=("$(pigz_once)")
    # Warm: a conversion again, its size remembered; another `?tag=` each time, so the stored copy
    # of the cold run (another repository tag in its manifest.json) is not what answers.
    start_server
    read -r t ttfb bytes code fail <<<"$(one "$image?tag=bench/$name:warm$r")"
    [ "$fail$code" = 0200 ] || { echo "$name: warm squash failed"; exit 1; }
    warm_t+=("$t")
    warm_f+=("$ttfb")
  done
  pigz_s=$(median "${pigz_runs[@]}")
  rate() { python3 -c "import sys;u,p,t,n=map(float,sys.argv[1:]);print(f'{u*n/t/1e6:.0f} | {(u*n/t)/(u/p):.2f}x')" "$uncompressed" "$pigz_s" "$1" "$2"; }
  if [ "$aborted" -gt 0 ]; then
    row "$name" "cold: first request aborted after $abort_bytes bytes (bound outgrown), $aborted of $rounds rounds" "- | -" "$(median "${abort_f[@]}")s" "-" "$aborted"
    row "$name" "cold retry (summaries first, sized exactly)" "$(rate "$(median "${cold_t[@]}")" 1)" "$(median "${cold_f[@]}")s" "$cold_rss" 0
  else
    row "$name" "cold (nothing remembered)" "$(rate "$(median "${cold_t[@]}")" 1)" "$(median "${cold_f[@]}")s" "$cold_rss" 0
  fi
  row "$name" "warm (size remembered, converted again)" "$(rate "$(median "${warm_t[@]}")" 1)" "$(median "${warm_f[@]}")s" "$(hwm)" 0
  rounds_note="cold ${cold_t[*]} s, warm ${warm_t[*]} s, pigz ${pigz_runs[*]} s"
  start_server
  read -r t ttfb bytes code fail <<<"$(one "$image")"
  [ "$fail$code" = 0200 ] && [ "$bytes" = "$size" ] || { echo "$name: repeat failed"; exit 1; }
  row "$name" "repeat (served from the store)" "$(rate "$t" 1)" "${ttfb}s" "$(hwm)" 0
  local n i clients failures wall
  for n in "$@"; do
    start_server
    t0=$(now)
    clients=()
    for i in $(seq 1 "$n"); do one "$image?tag=bench/$name:c$n-$i" >"$work/c$i" & clients+=($!); done
    wait "${clients[@]}"
    t1=$(now)
    failures=0
    for i in $(seq 1 "$n"); do
      read -r _ _ b code fail <"$work/c$i"
      [ "$fail$code" = 0200 ] || failures=$((failures + 1))
    done
    wall=$(secs "$t0" "$t1")
    row "$name" "$n concurrent clients, warm (aggregate)" "$(rate "$wall" "$n")" "-" "$(hwm)" "$failures"
  done
  notes+=("- $name: ${#blobs[@]} gzip layers, $compressed bytes compressed, $uncompressed uncompressed, squashed output $size bytes; pigz -dc ${pigz_s}s (median) = $(python3 -c "print(f'{$uncompressed/$pigz_s/1e6:.0f}')") MB/s; the top layer alone ${top_s}s; per round: $rounds_note.")
}

for img in "${images[@]}"; do
  echo "bench: building the $img image"
  case $img in
    synthetic) target/release/examples/bench_image "$work/synthetic" "$scale"; measure synthetic "$work/synthetic" 8 32 ;;
    debian) python3 scripts/debian_image.py "$work/debian"; measure debian "$work/debian" ;;
    big) target/release/examples/bench_image "$work/big" 1 big; measure big "$work/big" ;;
    *) echo "unknown image $img"; exit 2 ;;
  esac
  rm -rf "${work:?}/$img" "$work/registry"/data/docker/registry/v2/blobs 2>/dev/null || true
done

mkdir -p "$(dirname "$results")"
{
  echo "strata end-to-end benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores"
  echo
  printf '%s\n' "${notes[@]}"
  echo
  echo "Throughput counts the layers' uncompressed bytes per second of wall time; the reference is"
  echo "pigz -dc over the same blobs, one after the other, measured in the same run."
  echo
  echo "| image | run | MB/s | vs pigz -dc | time to first byte | peak RSS (MiB) | failures |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$results"
