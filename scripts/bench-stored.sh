#!/usr/bin/env bash
# Stored tarball repeats: a 1 GiB squash converted once (and stored), then served from the store,
# measured with curl to /dev/null against reading the stored blob itself (`cat`; `curl file://`, the
# same client without HTTP; and a minimal HTTP server that answers with sendfile(2), the ceiling of
# HTTP over loopback to curl). No registry: the image is an OCI layout of one uncompressed layer of
# four 256 MiB files of random bytes. The same repeats from a store on S3 (moto's server on loopback,
# as the tests run it: `--store s3://…`), the reference being the same store on disk.
#
#   scripts/bench-stored.sh [RUNS]      # default 5 runs of each; prints a table
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata
work=$(mktemp -d /tmp/strata-bench-stored.XXXXXX)
server_pid=
sendfile_pid=
s3_pid=
moto_pid=
cleanup() {
  # `|| true`: under `set -e` a killed child's status (143) from `wait` would end the trap early and
  # leave the other servers running.
  for p in $server_pid $sendfile_pid $s3_pid $moto_pid; do
    kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/layout" <<'EOF'
import hashlib, io, json, os, sys, tarfile
root = sys.argv[1]
os.makedirs(f"{root}/blobs/sha256")
class Random(io.RawIOBase):
    def __init__(self, n): self.n = n
    def readable(self): return True
    def readinto(self, b):
        k = min(len(b), self.n)
        b[:k] = os.urandom(k)
        self.n -= k
        return k
tmp = f"{root}/layer.tmp"
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo("data"); d.type = tarfile.DIRTYPE; d.mode = 0o755; t.addfile(d)
    for i in range(4):
        f = tarfile.TarInfo(f"data/f{i}"); f.size = 256 << 20; f.mode = 0o644
        t.addfile(f, io.BufferedReader(Random(f.size), 1 << 20))
h = hashlib.sha256()
with open(tmp, "rb") as f:
    for c in iter(lambda: f.read(1 << 20), b""): h.update(c)
layer, size = h.hexdigest(), os.path.getsize(tmp)
os.rename(tmp, f"{root}/blobs/sha256/{layer}")
def put(obj):
    b = json.dumps(obj).encode(); d = hashlib.sha256(b).hexdigest()
    open(f"{root}/blobs/sha256/{d}", "wb").write(b)
    return d, len(b)
config = put({"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer]}})
manifest = put({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + config[0], "size": config[1]},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + layer, "size": size}]})
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "sha256:" + manifest[0], "size": manifest[1],
    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{root}/index.json", "w"))
open(f"{root}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF

target/release/strata serve --listen 127.0.0.1:0 --oci-layout "$work/layout" \
  --cache-dir "$work/cache" 2>"$work/strata.log" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/strata.log" && break; sleep 0.1; done
url=$(sed -n 's/^strata: listening on //p' "$work/strata.log")/squash/big:v1

mbs() { python3 -c "print(f'{$1 / $2 / 1e6:.0f}')"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() { curl -sS -o /dev/null -w '%{time_total}\n' "$@"; }

first=$(timed "$url")
blob=$(ls -S "$work"/cache/store/blobs/sha256/* | head -1)
bytes=$(stat -c %s "$blob")
stored=$(for _ in $(seq "$runs"); do timed "$url"; done | median)
file=$(for _ in $(seq "$runs"); do timed "file://$blob"; done | median)
python3 - "$blob" "$work/sendfile.port" <<'EOF' &
import os, socket, sys
path, size = sys.argv[1], os.path.getsize(sys.argv[1])
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(4)
open(sys.argv[2], "w").write(str(s.getsockname()[1]))
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    c.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
    with open(path, "rb") as f:
        c.sendfile(f)
    c.close()
EOF
sendfile_pid=$!
for _ in $(seq 100); do [ -s "$work/sendfile.port" ] && break; sleep 0.1; done
sendfile=$(for _ in $(seq "$runs"); do timed "http://127.0.0.1:$(cat "$work/sendfile.port")/"; done | median)
cat=$(for _ in $(seq "$runs"); do
  s=$(date +%s.%N); cat "$blob" >/dev/null; e=$(date +%s.%N)
  python3 -c "print(f'{$e - $s:.4f}')"
done | median)

# The same from a store on S3 (moto), converted there once.
. scripts/lib.sh
s3_port=$(free_port)
python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
for _ in $(seq 50); do curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$s3_port/bench" 2>/dev/null && break; sleep 0.2; done
AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  target/release/strata serve --listen 127.0.0.1:0 --oci-layout "$work/layout" \
  --cache-dir "$work/cache-s3" --store s3://bench/strata 2>"$work/strata-s3.log" &
s3_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/strata-s3.log" && break; sleep 0.1; done
s3_url=$(sed -n 's/^strata: listening on //p' "$work/strata-s3.log")/squash/big:v1
s3_first=$(timed "$s3_url")
s3_stored=$(for _ in $(seq "$runs"); do timed "$s3_url"; done | median)

echo "stored tarball repeat, $(date -u +%FT%TZ), $(nproc) cores, $bytes bytes, median of $runs"
echo
echo "| what | seconds | MB/s | vs cat |"
echo "| --- | --- | --- | --- |"
printf '| first GET (converted, stored) | %s | %s | |\n' "$first" "$(mbs "$bytes" "$first")"
printf '| repeat GET, curl to /dev/null | %s | %s | %s |\n' "$stored" "$(mbs "$bytes" "$stored")" \
  "$(python3 -c "print(f'{$cat / $stored:.2f}')")"
printf '| S3 store (moto): first GET (converted, stored) | %s | %s | |\n' "$s3_first" "$(mbs "$bytes" "$s3_first")"
printf '| S3 store (moto): repeat GET | %s | %s | %s |\n' "$s3_stored" "$(mbs "$bytes" "$s3_stored")" \
  "$(python3 -c "print(f'{$cat / $s3_stored:.2f}')")"
printf '| sendfile(2) HTTP server, curl to /dev/null | %s | %s | %s |\n' "$sendfile" \
  "$(mbs "$bytes" "$sendfile")" "$(python3 -c "print(f'{$cat / $sendfile:.2f}')")"
printf '| curl file:// of the stored blob | %s | %s | %s |\n' "$file" "$(mbs "$bytes" "$file")" \
  "$(python3 -c "print(f'{$cat / $file:.2f}')")"
printf '| cat blob > /dev/null | %s | %s | 1 |\n' "$cat" "$(mbs "$bytes" "$cat")"
