#!/usr/bin/env bash
# Soak test (not in the default test run): CLIENTS concurrent clients squash images (and one request
# in three fetch a signed ACI and its signature) from a local registry in a loop for SECONDS, half of them through cold sizing (the cache is wiped under them
# every minute), a few hanging up mid-transfer on purpose. Every 10 s it records the server's RSS and
# open file descriptors; at the end it prints them with the failure count (it must be 0: a transfer
# that was not hung up on purpose must complete with the exact length) and exits non-zero on failures
# or on growth (RSS or fds at the end more than 1.5x their level after the first minute).
#
#   scripts/soak.sh [SECONDS=600] [CLIENTS=32]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
clients=${2:-32}
results=${RESULTS:-target/soak.md}

. scripts/lib.sh
need_packages docker-registry skopeo curl
cargo build --release --bin strata --example bench_image
scratch_work strata-soak
start_registry "$work/registry"
pids+=("$registry_pid")

# Two images: the bench image at 1/16 (~75 MB uncompressed) and at 1/64.
for s in 16 64; do
  target/release/examples/bench_image "$work/img$s" "$s" 2>/dev/null
  skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$work/img$s:bench" "docker://$registry/soak/img$s:v1"
done

target/release/strata keygen -o "$work/key.asc" 2>/dev/null
start_strata "$work/strata.log" --insecure-registry "$registry" --cache-dir "$work/cache" \
  --max-concurrent "$((clients * 2))" --default-registry "$registry" --public-name soak \
  --signing-key "$work/key.asc"
server=$server_pid

end=$(( $(date +%s) + seconds ))
client() {
  local i=$1 n=0 img out
  while [ "$(date +%s)" -lt "$end" ]; do
    n=$((n + 1))
    img=img$(( (i + n) % 2 == 0 ? 16 : 64 ))
    if [ $(( (i * 7 + n) % 10 )) -eq 0 ]; then
      # A client that hangs up after 200 ms.
      curl -sS -o /dev/null --max-time 0.2 "$url/squash/$registry/soak/$img:v1" 2>/dev/null || true
      echo hangup
      continue
    fi
    if [ $(( (i + n) % 3 )) -eq 0 ]; then
      # An ACI (no length ahead: curl's exit status says whether it ended well), then its signature,
      # which must exist once the download has ended.
      out=$(curl -sS -o /dev/null -w '%{http_code}' "$url/c1/aci/soak/soak/$img/v1/aci/linux/amd64/" 2>/dev/null) || { echo "fail aci curl $out"; continue; }
      sig=$(curl -sS -o /dev/null -w '%{http_code}' "$url/c1/aci/soak/soak/$img/v1/aci.asc/linux/amd64/" 2>/dev/null) || true
      if [ "$out" = 200 ] && [ "$sig" = 200 ]; then echo ok; else echo "fail aci $out signature $sig"; fi
      continue
    fi
    out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %header{content-length}' "$url/squash/$registry/soak/$img:v1" 2>/dev/null) || { echo "fail curl $out"; continue; }
    read -r code size length <<<"$out"
    if [ "$code" = 200 ] && [ "$size" = "$length" ]; then echo ok; else echo "fail $out"; fi
  done
}
for i in $(seq 1 "$clients"); do client "$i" >"$work/client$i" & pids+=($!); done

samples=()
start=$(date +%s)
while [ "$(date +%s)" -lt "$end" ]; do
  sleep 10
  [ "$(( ($(date +%s) - start) % 60 ))" -lt 10 ] && rm -rf "$work/cache"
  rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$server/status")
  fds=$(ls "/proc/$server/fd" | wc -l)
  samples+=("$(( $(date +%s) - start )) $rss $fds")
done
wait "${pids[@]:2}" 2>/dev/null || true

ok=$(cat "$work"/client* | grep -c '^ok' || true)
hangups=$(cat "$work"/client* | grep -c '^hangup' || true)
failures=$(cat "$work"/client* | grep -c '^fail' || true)
read -r _ rss_1m fds_1m <<<"${samples[5]:-${samples[0]}}"
read -r _ rss_end fds_end <<<"${samples[-1]}"
{
  echo "strata soak, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores: $clients clients for ${seconds}s"
  echo
  echo "transfers completed: $ok; deliberate hang-ups: $hangups; failures: $failures"
  echo
  echo "| seconds | RSS (MiB) | open fds |"
  echo "| --- | --- | --- |"
  for s in "${samples[@]}"; do read -r t r f <<<"$s"; echo "| $t | $r | $f |"; done
} | tee "$results"
grep '^fail' "$work"/client* | head -5 || true
[ "$failures" -eq 0 ] || { echo "soak: $failures failures"; exit 1; }
python3 -c "import sys; r1,re,f1,fe=map(int,sys.argv[1:]); sys.exit(0 if re<=1.5*r1+8 and fe<=1.5*f1+8 else 1)" \
  "$rss_1m" "$rss_end" "$fds_1m" "$fds_end" || { echo "soak: RSS or fds grew"; exit 1; }
