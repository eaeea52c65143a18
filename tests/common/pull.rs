//! The pull clients users point at a registry (docker, podman, skopeo, containerd's ctr), over plain
//! HTTP to a loopback registry. Each client's image is then brought into the test docker under a fresh
//! name, so that one listing (`export_listing`) compares what every client got.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::*;

#[derive(Clone, Copy, Debug)]
pub enum Client {
    Docker,
    Podman,
    Skopeo,
    Containerd,
}

/// Pulls `reference` (`host:port/repo:tag` or `host:port/repo@sha256:…`) with `client`, and loads what
/// it got into docker as `name` (`repo:tag`, no host); returns the image's layer count as the client
/// itself holds it (docker's for docker).
pub fn pull_into_docker(env: &Env, client: Client, reference: &str, name: &str) -> usize {
    pull_platform_into_docker(env, client, reference, name, None)
}

/// Same, for `platform` (`os/arch`; `None`: the client's own), as each client is told to pick one
/// from an index. docker loads and creates (without running) an image of another architecture.
pub fn pull_platform_into_docker(
    env: &Env,
    client: Client,
    reference: &str,
    name: &str,
    platform: Option<&str>,
) -> usize {
    match client {
        Client::Docker => {
            let mut pull = docker();
            pull.args(["pull", "-q"]);
            if let Some(p) = platform {
                pull.args(["--platform", p]);
            }
            run(pull.arg(reference));
            run(docker().args(["tag", reference, name]));
            docker_layers(name)
        }
        Client::Podman => podman_pull(reference, name, platform),
        Client::Skopeo => skopeo_pull(reference, name, platform),
        Client::Containerd => ctr_pull(env, reference, name, platform),
    }
}

/// The layer count of an image docker holds.
pub fn docker_layers(image: &str) -> usize {
    let out = run(docker().args(["image", "inspect", "-f", "{{len .RootFS.Layers}}", image]));
    String::from_utf8_lossy(&out).trim().parse().unwrap()
}

/// `docker load` of an archive that must name `name`.
fn docker_load(file: &Path, name: &str) {
    let out = run(docker().arg("load").arg("-i").arg(file));
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains(name), "docker load said: {out}");
}

/// podman with storage of its own: running as root, podman would otherwise share
/// /var/lib/containers with anything else on the machine, and the overlay driver it picks there does
/// not work on every file system the tests run on; vfs does.
pub fn podman(dir: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ]);
    cmd
}

fn podman_pull(reference: &str, name: &str, platform: Option<&str>) -> usize {
    let dir = scratch(&format!("podman-{}", rand_suffix()));
    let mut pull = podman(&dir);
    pull.args(["pull", "--quiet", "--tls-verify=false"]);
    if let Some(p) = platform {
        pull.args(["--platform", p]);
    }
    run(pull.arg(reference));
    let out = run(podman(&dir).args([
        "image",
        "inspect",
        "-f",
        "{{len .RootFS.Layers}}",
        reference,
    ]));
    let layers = String::from_utf8_lossy(&out).trim().parse().unwrap();
    // `podman push` to a docker-archive names the archive's image as asked (it also keeps the pulled
    // name, so docker gets both tags).
    let file = dir.join("image.tar");
    run(podman(&dir).args([
        "push",
        "--quiet",
        reference,
        &format!("docker-archive:{}:{name}", file.display()),
    ]));
    docker_load(&file, name);
    let _ = std::fs::remove_dir_all(&dir);
    layers
}

/// skopeo's spelling of a platform: `--override-os` and `--override-arch` (before `copy`).
pub fn skopeo_platform(platform: Option<&str>) -> Vec<String> {
    let Some((os, arch)) = platform.and_then(|p| p.split_once('/')) else {
        return Vec::new();
    };
    let arch = arch.split('/').next().unwrap();
    ["--override-os", os, "--override-arch", arch]
        .map(String::from)
        .to_vec()
}

fn skopeo_pull(reference: &str, name: &str, platform: Option<&str>) -> usize {
    let dir = scratch(&format!("skopeo-{}", rand_suffix()));
    let layout = dir.join("oci");
    run(Command::new("skopeo")
        .args(skopeo_platform(platform))
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:pulled", layout.display())));
    let layers = oci_layout_layers(&layout);
    let file = dir.join("image.tar");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:pulled", layout.display()))
        .arg(format!("docker-archive:{}:{name}", file.display())));
    docker_load(&file, name);
    let _ = std::fs::remove_dir_all(&dir);
    layers
}

/// `skopeo copy` of `reference` into an OCI layout (skopeo checks every blob's digest), nothing
/// loaded anywhere: the image's layer count and its first layer blob.
pub fn skopeo_first_layer(reference: &str) -> (usize, Vec<u8>) {
    let dir = scratch(&format!("skopeo-layer-{}", rand_suffix()));
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:pulled", dir.display())));
    let blob = |digest: &str| std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let first = blob(layers[0]["digest"].as_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    (layers.len(), first)
}

/// `docker login` to `host` with a client configuration of its own in `config` (`DOCKER_CONFIG`),
/// so the login reaches only the docker commands given that directory.
pub fn docker_login(config: &Path, host: &str, user: &str, password: &str) {
    let mut login = docker()
        .env("DOCKER_CONFIG", config)
        .args(["login", host, "-u", user, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut login.stdin.take().unwrap(), password.as_bytes()).unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker login {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The layer count of the one image of an OCI layout skopeo wrote.
fn oci_layout_layers(layout: &Path) -> usize {
    let blob = |digest: &str| -> Value {
        let path = layout.join("blobs/sha256").join(&digest[7..]);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = blob(manifests[0]["digest"].as_str().unwrap());
    manifest["layers"].as_array().unwrap().len()
}

/// `ctr` against the test containerd, in a namespace of the registry view tests.
pub fn ctr(env: &Env) -> Command {
    let sock = env.containerd.as_ref().expect(
        "STRATA_TEST_CONTAINERD is not set: containerd's pull is part of the registry view tests",
    );
    let mut cmd = Command::new("ctr");
    cmd.args(["--address", sock, "-n", "strata-view"]);
    cmd
}

fn ctr_pull(env: &Env, reference: &str, name: &str, platform: Option<&str>) -> usize {
    let platform: Vec<&str> = platform.map(|p| vec!["--platform", p]).unwrap_or_default();
    // The native snapshotter: overlayfs mounts are not available everywhere the tests run.
    run(ctr(env)
        .args(["images", "pull", "--plain-http", "--snapshotter", "native"])
        .args(&platform)
        .arg(reference));
    // ctr names the images it exports by their containerd names, which docker normalizes.
    let full = format!("docker.io/{name}");
    run(ctr(env).args(["images", "tag", "--force", reference, &full]));
    let dir = scratch(&format!("ctr-{}", rand_suffix()));
    let file = dir.join("image.tar");
    run(ctr(env)
        .args(["images", "export"])
        .args(&platform)
        .arg(&file)
        .arg(&full));
    let layers = archive_layers(&file);
    docker_load(&file, name);
    let _ = std::fs::remove_dir_all(&dir);
    layers
}

/// The layer count in the `manifest.json` of an exported archive holding one image.
fn archive_layers(file: &Path) -> usize {
    let mut archive = tar::Archive::new(std::fs::File::open(file).unwrap());
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_str() == Some("manifest.json") {
            let m: Value = serde_json::from_reader(e).unwrap();
            assert_eq!(m.as_array().unwrap().len(), 1, "{m}");
            return m[0]["Layers"].as_array().unwrap().len();
        }
    }
    panic!("{}: no manifest.json", file.display())
}
