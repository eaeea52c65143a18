#!/usr/bin/env python3
"""Builds the realistic image of the end-to-end benchmark as an OCI image layout, from real Debian
packages: a `debootstrap --variant=minbase` layer, an `apt-get install` layer and a cleanup layer
(whiteouts for what it deleted), the way a Dockerfile's RUN steps stack up.

    scripts/debian_image.py DIR [PACKAGES...]      # needs root, debootstrap and network to the mirror

Each layer is the difference of the root file system before and after its step: entries whose ctime
moved (new or changed; dpkg keeps the packages' mtimes, so mtime would miss them) and a whiteout for
each path that went away.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
DEFAULT_PACKAGES = ["python3", "perl", "curl", "ca-certificates", "git", "less"]


def snapshot(root):
    """path -> (ctime_ns, is_dir) for every entry under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_ctime_ns, os.path.isdir(full) and not os.path.islink(full))
    return out


def skip(rel):
    top = rel.split("/", 1)[0]
    return top in ("proc", "sys", "dev") and rel != top


def layer_tar(root, before, after, out_path):
    """Writes the tar of what changed from `before` to `after`; returns its sha256 (the diff_id)."""
    with open(out_path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            gone = sorted(p for p in before if p not in after and not skip(p))
            # Only the topmost path of a deleted subtree needs a whiteout.
            tops = []
            for p in gone:
                if not any(p.startswith(t + "/") for t in tops):
                    tops.append(p)
            for p in tops:
                parent, name = os.path.split(p)
                info = tarfile.TarInfo(os.path.join(parent, ".wh." + name))
                info.mtime = 0
                tar.addfile(info)
            for p in sorted(after):
                if skip(p):
                    continue
                if p in before and before[p][0] == after[p][0]:
                    continue
                tar.add(os.path.join(root, p), arcname=p, recursive=False)
    h = hashlib.sha256()
    with open(out_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def put_blob(blobs, path_or_bytes):
    h = hashlib.sha256()
    if isinstance(path_or_bytes, bytes):
        h.update(path_or_bytes)
        digest = h.hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(path_or_bytes)
        return "sha256:" + digest, len(path_or_bytes)
    with open(path_or_bytes, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    os.replace(path_or_bytes, os.path.join(blobs, digest))
    return "sha256:" + digest, os.path.getsize(os.path.join(blobs, digest))


def chroot(root, *cmd):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    subprocess.run(["chroot", root, *cmd], check=True, env=env, stdout=subprocess.DEVNULL)


def main():
    out = sys.argv[1]
    packages = sys.argv[2:] or DEFAULT_PACKAGES
    work = tempfile.mkdtemp(prefix="strata-debian-")
    root = os.path.join(work, "root")
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers, diff_ids = [], []

    def add_layer(before, after):
        tar_path = os.path.join(work, "layer.tar")
        diff_ids.append(layer_tar(root, before, after, tar_path))
        gz_path = tar_path + ".gz"
        with open(gz_path, "wb") as f:
            subprocess.run(["pigz", "-6", "-n", "-c", tar_path], check=True, stdout=f)
        os.remove(tar_path)
        digest, size = put_blob(blobs, gz_path)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
        print(f"layer {len(layers) - 1}: {digest} {size} bytes", file=sys.stderr)

    try:
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, root, MIRROR], check=True, stdout=subprocess.DEVNULL)
        # As base images ship: without the downloaded packages.
        chroot(root, "apt-get", "clean")
        base = snapshot(root)
        add_layer({}, base)

        subprocess.run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")], check=True)
        try:
            chroot(root, "apt-get", "update", "-qq")
            chroot(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages)
        finally:
            subprocess.run(["umount", os.path.join(root, "proc")], check=True)
        installed = snapshot(root)
        add_layer(base, installed)

        chroot(root, "sh", "-c", "apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /var/log/*")
        add_layer(installed, snapshot(root))
    finally:
        subprocess.run(["umount", os.path.join(root, "proc")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    config = json.dumps({
        "created": "2025-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/bash"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    config_digest, config_size = put_blob(blobs, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers,
    }).encode()
    manifest_digest, manifest_size = put_blob(blobs, manifest)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


if __name__ == "__main__":
    main()
