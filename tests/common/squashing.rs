//! Squash requests and their docker-pull comparison, shared by the squash test binaries.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use super::*;

/// Fetches the squash of `reference` with curl into a file; returns its path.
pub fn fetch(server: &Server, reference: &str, query: &str) -> PathBuf {
    let dir = scratch(&format!("out-{}", rand_suffix()));
    let file = dir.join("image.tar");
    let headers = download_to(&format!("{}/squash/{reference}{query}", server.url), &file);
    let length: u64 = header_value(&headers, "content-length")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, std::fs::metadata(&file).unwrap().len());
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/x-tar")
    );
    file
}

/// The squash of `reference`, loaded by docker under `tag`, must list exactly what `docker pull` gives.
pub fn check_against_oracle(env: &Env, reference: &str, tag: &str) -> PathBuf {
    check_against_twin(shared_server(&env.registry), reference, reference, tag)
}

/// Same, with the oracle pulled from `twin`: an image with the same uncompressed layers (so the same
/// file system and config), for inputs the test daemon cannot pull itself.
pub fn check_against_twin(server: &Server, reference: &str, twin: &str, tag: &str) -> PathBuf {
    let want = oracle(twin);
    let file = fetch(server, reference, &format!("?tag={tag}"));
    let out = run(docker().arg("load").arg("-i").arg(&file));
    assert!(
        String::from_utf8_lossy(&out).contains(tag),
        "docker load said: {}",
        String::from_utf8_lossy(&out)
    );
    let got = export_listing(tag);
    assert_same(&want, &got, reference);
    let inspect: Value =
        serde_json::from_slice(&run(docker().args(["image", "inspect", tag]))).unwrap();
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(),
        1,
        "one squashed layer"
    );
    let original: Value =
        serde_json::from_slice(&run(docker().args(["image", "inspect", twin]))).unwrap();
    assert_eq!(
        inspect[0]["Config"], original[0]["Config"],
        "image config kept"
    );
    assert_eq!(inspect[0]["Architecture"], original[0]["Architecture"]);
    file
}

/// `ctr` against the test containerd, in the tests' namespace.
fn ctr(env: &Env) -> Command {
    let sock = env
        .containerd
        .as_ref()
        .expect("STRATA_TEST_CONTAINERD is not set: containerd is the oracle here");
    let mut cmd = Command::new("ctr");
    cmd.args(["-a", sock, "-n", "strata-test"]);
    cmd
}

/// The file system containerd extracts for `image` (pulled or imported with the native snapshotter,
/// which applies each layer onto a copy of the one below, in order).
pub fn containerd_listing(env: &Env, image: &str) -> BTreeMap<String, String> {
    let mnt = scratch(&format!("ctr-mnt-{}", rand_suffix()));
    run(ctr(env)
        .args(["images", "mount", "--snapshotter", "native", image])
        .arg(&mnt));
    let mut child = Command::new("tar")
        .arg("-C")
        .arg(&mnt)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut listing = listing(child.stdout.take().unwrap());
    assert!(child.wait().unwrap().success());
    run(ctr(env).args(["images", "unmount", "--rm"]).arg(&mnt));
    listing.remove(".");
    listing
}

/// For layers docker (and podman) refuse: containerd's pull of `reference` against strata's squash
/// imported into containerd; the squash must load into docker too (no duplicates, no whiteouts left).
pub fn check_against_containerd(env: &Env, reference: &str, tag: &str) -> BTreeMap<String, String> {
    run(ctr(env).args([
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        reference,
    ]));
    let want = containerd_listing(env, reference);
    let file = fetch(
        shared_server(&env.registry),
        reference,
        &format!("?tag={tag}"),
    );
    run(ctr(env)
        .args(["images", "import", "--snapshotter", "native"])
        .arg(&file));
    let got = containerd_listing(env, &format!("docker.io/{tag}"));
    assert_same(&want, &got, reference);
    run(docker().arg("load").arg("-i").arg(&file));
    got
}

/// The listing of the squashed layer inside a squash archive.
pub fn layer_listing(file: &Path) -> BTreeMap<String, String> {
    let tar = std::fs::File::open(file).unwrap();
    let mut outer = tar::Archive::new(tar);
    for e in outer.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().ends_with("layer.tar") {
            return listing(e);
        }
    }
    panic!("{}: no layer.tar", file.display())
}
