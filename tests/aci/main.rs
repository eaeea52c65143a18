//! ACIs end to end: fixtures pushed to the real registry, the ACI fetched over HTTP the way rkt does
//! (discovery, signature first, 202, download, signature again), checked with appc's own `actool`,
//! verified with gpg and sqv, and its `rootfs/` compared with what `docker pull` gives. One test
//! binary; this file holds what its modules share.

#[path = "../common/mod.rs"]
mod common;
mod manifest;
mod rkt;
mod signing;
mod tree;
mod urls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::fixtures::{noise, Comp, Image, Layer};
use common::images;
use common::proxy::{Fault, Proxy};
use common::*;
use serde_json::{json, Value};

/// The name prefix the test server answers discovery for.
const PUBLIC_NAME: &str = "127.0.0.1";

struct AciServer {
    server: Server,
    /// Armored secret and public key files, as `strata keygen` wrote them.
    key: PathBuf,
    public_key: PathBuf,
}

/// A key made by `strata keygen`, and a server signing with it, shared by the tests of this binary.
fn aci_server(env: &Env) -> &'static AciServer {
    static SERVER: OnceLock<AciServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = scratch("aci-key");
        let key = dir.join("key.asc");
        run(strata().args(["keygen", "-o"]).arg(&key));
        let server = Server::start(
            &env.registry,
            &[
                "--default-registry",
                &env.registry,
                "--public-name",
                PUBLIC_NAME,
                "--signing-key",
                key.to_str().unwrap(),
            ],
        );
        AciServer {
            server,
            public_key: dir.join("key.asc.pub"),
            key,
        }
    })
}

fn aci_url(server: &Server, repo: &str, tag: &str, ext: &str, arch: &str) -> String {
    format!(
        "{}/c1/aci/{PUBLIC_NAME}/{repo}/{tag}/{ext}/linux/{arch}/",
        server.url
    )
}

/// Downloads with curl, failing on any error status; the file's path.
fn download(url: &str) -> PathBuf {
    let file = scratch(&format!("aci-{}", rand_suffix())).join("image.aci");
    download_to(url, &file);
    file
}

/// `actool validate`, appc's own checker; its output line.
fn actool_validate(file: &Path) -> String {
    let out = Command::new("actool")
        .args(["--debug", "validate"])
        .arg(file)
        .output()
        .unwrap();
    // It reports on stderr.
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "actool validate: {text}");
    assert!(text.contains("valid app container image"), "{text}");
    text
}

/// Member names in archive order.
fn entry_names(file: &Path) -> Vec<String> {
    tar::Archive::new(std::fs::File::open(file).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn manifest_of(file: &Path) -> Value {
    serde_json::from_slice(&run(Command::new("actool").arg("cat-manifest").arg(file))).unwrap()
}

/// What a container's export holds that its image does not (`/.dockerenv`, `/etc/hosts`, …), learned
/// from an image of one file.
fn docker_additions(env: &Env) -> &'static BTreeMap<String, String> {
    static ADDED: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ADDED.get_or_init(|| {
        let r = publish(
            env,
            "aci-one-file",
            vec![Image::new(vec![(
                Layer::new().file("only", 0o644, b"x"),
                Comp::Gzip,
            )])],
        );
        let mut listing = oracle(&r);
        assert!(listing.remove("only").is_some());
        listing
    })
}

/// Asserts that `got` (a listing of a root file system) is the file system `docker pull` gives for
/// `image`, but for what docker adds to a container and the xattrs.
fn assert_same_as_docker_pull(env: &Env, image: &str, got: &BTreeMap<String, String>, what: &str) {
    let mut want = oracle(image);
    for (path, line) in docker_additions(env) {
        if !got.contains_key(path) && want.get(path) == Some(line) {
            want.remove(path);
        }
    }
    // Docker's vfs driver drops xattrs on the way to `docker export`; the ACI keeps them (checked on
    // their own where a fixture has them).
    let blind = |l: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        l.iter()
            .map(|(p, line)| (p.clone(), line[..line.rfind(" [").unwrap()].to_string()))
            .collect()
    };
    assert_same(&blind(&want), &blind(got), what);
}

/// The fixture images, pushed once per test binary: pushing one tag from several tests at once makes
/// the registry answer 500 for a moment.
fn published(env: &Env, name: &'static str) -> String {
    static DONE: std::sync::Mutex<BTreeMap<&'static str, String>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut done = DONE.lock().unwrap();
    done.entry(name)
        .or_insert_with(|| {
            let images = match name {
                "basic" => images::basic(),
                "whiteouts" => images::whiteouts(),
                "hardlinks" => images::hardlinks(),
                "special" => images::special(),
                "busybox" => vec![images::busybox()],
                "compression" => images::compression(false),
                "compression-gzip" => images::compression(true),
                "duplicates" => images::duplicates(),
                other => panic!("no fixture {other}"),
            };
            publish(env, name, images)
        })
        .clone()
}

/// gpg with a home (keyring) of its own, holding `public_key`.
fn gpg_with(public_key: &Path) -> impl Fn() -> Command {
    let home = scratch(&format!("gnupg-{}", rand_suffix()));
    let gpg = move || {
        let mut c = Command::new("gpg");
        c.arg("--homedir")
            .arg(&home)
            .args(["--batch", "--no-autostart"]);
        c
    };
    run(gpg().arg("--import").arg(public_key));
    gpg
}

/// `gpg --verify`; whether the signature is good.
fn gpg_verifies(public_key: &Path, signature: &Path, data: &Path) -> bool {
    let gpg = gpg_with(public_key);
    let out = gpg()
        .arg("--verify")
        .arg(signature)
        .arg(data)
        .output()
        .unwrap();
    out.status.success()
}

/// sqv (Sequoia's verifier) with a binary keyring; whether the signature is good.
fn sqv_verifies(public_key: &Path, signature: &Path, data: &Path) -> bool {
    let gpg = gpg_with(public_key);
    let keyring = scratch(&format!("keyring-{}", rand_suffix())).join("keyring.gpg");
    std::fs::write(&keyring, run(gpg().arg("--export"))).unwrap();
    let out = Command::new("sqv")
        .arg("--keyring")
        .arg(&keyring)
        .arg(signature)
        .arg(data)
        .output()
        .unwrap();
    out.status.success()
}
