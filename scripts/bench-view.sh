#!/usr/bin/env bash
# Registry-view benchmark, one run, real registry and dockerd on loopback. For each image (the
# synthetic one of examples/bench_image.rs at SCALE, and the Debian one of scripts/debian_image.py):
#   - `docker pull` of the source straight from the registry (the reference);
#   - `docker pull` of squash/<name> from strata with an empty store (first pull: the conversion);
#   - the same again after `docker rmi` (second pull: served from the store);
#   - for each wire compression (gzip, zstd, none): conversion time, layer blob size, and the
#     stored pull's time.
# Figures are ratios against the direct pull measured in the same run. Writes $RESULTS (default
# target/bench-view.md).
#
#   scripts/bench-view.sh [SCALE] [IMAGES...]    # IMAGES: synthetic debian (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-2}
shift || true
images=("${@:-synthetic debian}")
read -r -a images <<<"${images[*]}"
results=${RESULTS:-target/bench-view.md}

. scripts/lib.sh
need_packages docker-registry skopeo curl debootstrap
command -v dockerd >/dev/null || need_packages docker.io
cargo build --release --bin strata --example bench_image
scratch_work strata-bench-view
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { case $1 in failed*) echo "-" ;; *) python3 -c "print(f'{$1 / $2:.2f}x')" ;; esac; }

start_registry "$work/registry"
pids+=("$registry_pid")
start_dockerd "$work/docker"
wait_dockerd "$work/docker"

server_pid=
# start_server COMPRESSION: strata on an empty store.
start_server() {
  if [ -n "$server_pid" ]; then kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work/cache"
  start_strata "$work/strata.log" --insecure-registry "$registry" --default-registry "$registry" \
    --cache-dir "$work/cache" --layer-compression "$1" --manifest-wait 3600
  view=${url#http://}
}
# timed_pull REF: seconds of `docker pull REF`, every image removed first (a squashed image has the
# same ID whichever strata port or compression served it, and would be found already there).
timed_pull() {
  docker images -q | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
  local t0 t1
  t0=$(now)
  # A failed pull is a row that says so, not a time (docker 20.10 cannot apply zstd layers).
  if ! docker pull -q "$1" >/dev/null 2>"$work/pull.err"; then
    echo "failed ($(tail -1 "$work/pull.err" | cut -c1-60))"
    return
  fi
  t1=$(now)
  secs "$t0" "$t1"
}
layer_size() {
  local token
  token=$(curl -fsS "$url/v2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -fsS -H "Authorization: Bearer $token" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "$url/v2/squash/bench/$1/manifests/v1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["size"])'
}

rows=()
notes=()
row() { rows+=("$(printf '| %s | %s | %s | %s | %s |' "$@")"); }

measure() {
  local name=$1 layout=$2
  local source="$registry/bench/$name:v1"
  skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$layout:bench" "docker://$source"
  local direct first second c convert size pull
  direct=$(timed_pull "$source")
  row "$name" "docker pull of the source, from the registry" "$direct" "1.00x" "-"
  start_server gzip
  first=$(timed_pull "$view/squash/bench/$name:v1")
  row "$name" "first pull from strata (converts; gzip)" "$first" "$(ratio "$first" "$direct")" "$(layer_size "$name")"
  second=$(timed_pull "$view/squash/bench/$name:v1")
  row "$name" "second pull from strata (stored; gzip)" "$second" "$(ratio "$second" "$direct")" "-"
  # The tarball route: a first GET stores the archive, a repeat streams the stored bytes; the
  # reference is reading the same stored file (page cache) with cat.
  curl -fsS -o /dev/null "$url/squash/bench/$name:v1"
  local stored_file bytes t0 t1 tar_s cat_s
  stored_file=$(find "$work/cache/store/blobs" -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
  bytes=$(stat -c %s "$stored_file")
  t0=$(now); curl -fsS -o /dev/null "$url/squash/bench/$name:v1"; t1=$(now)
  tar_s=$(secs "$t0" "$t1")
  t0=$(now); cat "$stored_file" >/dev/null; t1=$(now)
  cat_s=$(secs "$t0" "$t1")
  rows+=("$(printf '| %s | %s | %s | %s | %s |' "$name" "stored tarball repeat (curl of /squash/…), $(python3 -c "print(f'{$bytes/$tar_s/1e6:.0f}')") MB/s" "${tar_s}s" "$(ratio "$cat_s" "$tar_s") of cat's rate" "$bytes")")
  for c in gzip zstd none; do
    start_server "$c"
    local t0 t1
    t0=$(now)
    size=$(layer_size "$name")
    t1=$(now)
    convert=$(secs "$t0" "$t1")
    pull=$(timed_pull "$view/squash/bench/$name:v1")
    row "$name" "$c: conversion (manifest GET, empty store)" "$convert" "$(ratio "$convert" "$direct")" "$size"
    row "$name" "$c: pull of the stored image" "$pull" "$(ratio "$pull" "$direct")" "$size"
  done
  notes+=("- $name: $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(len(m["layers"]), "layers,", sum(l["size"] for l in m["layers"]), "bytes compressed")' "$layout/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:])' "$layout")").")
}

for img in "${images[@]}"; do
  echo "bench-view: building the $img image"
  case $img in
    synthetic) target/release/examples/bench_image "$work/synthetic" "$scale"; measure synthetic "$work/synthetic" ;;
    debian) python3 scripts/debian_image.py "$work/debian"; measure debian "$work/debian" ;;
    *) echo "unknown image $img"; exit 2 ;;
  esac
  rm -rf "${work:?}/$img"
done

mkdir -p "$(dirname "$results")"
{
  echo "strata registry-view benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, synthetic scale 1/$scale"
  echo
  printf '%s\n' "${notes[@]}"
  echo
  echo "Times are wall seconds of \`docker pull\` (vfs storage driver) or of the manifest GET that runs"
  echo "the conversion; ratios are against the direct pull of the source in the same run."
  echo
  echo "| image | run | seconds | vs direct pull | blob bytes |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$results"
