//! Private repositories: a real registry with htpasswd (Basic) authentication, started by this test.
//! The caller's own `Authorization: Basic` reaches the registry through strata; without it, or with wrong
//! credentials, the answer is a JSON 401 before the first byte, even once the image's sizes are
//! remembered; and the credentials never show up in strata's log.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::fixtures::{write_layout, Comp, Image, Layer};
use common::proxy::{Fault, Outcome, Proxy};
use common::*;
use serde_json::Value;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55word";

/// A registry that wants Basic credentials, killed on drop.
struct PrivateRegistry {
    child: Child,
    addr: String,
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateRegistry {
    fn start() -> PrivateRegistry {
        let dir = scratch(&format!("private-registry-{}", rand_suffix()));
        let hash = bcrypt::hash(PASSWORD, 4).unwrap();
        std::fs::write(dir.join("htpasswd"), format!("{USER}:{hash}\n")).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: {addr}\n\
             auth:\n  htpasswd:\n    realm: strata-test\n    path: {htpasswd}\nlog:\n  level: warn\n",
            root = dir.join("data").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry installed by scripts/test.sh");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "private registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRegistry { child, addr }
    }
}

/// Writes `layers` as an OCI layout and pushes it to the private registry as `repo:v1`.
fn push_private(registry: &PrivateRegistry, name: &str, layers: Vec<Layer>, repo: &str) {
    let layout = scratch(name);
    let image = Image::new(layers.into_iter().map(|l| (l, Comp::Gzip)).collect());
    write_layout(&layout, &[image], "v1");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .args(["--dest-creds", &format!("{USER}:{PASSWORD}")])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/{repo}:v1", registry.addr)));
}

#[test]
fn private_images_need_the_callers_own_credentials() {
    let Some(_env) = env() else { return };
    let registry = PrivateRegistry::start();
    push_private(
        &registry,
        "private-layout",
        vec![Layer::new().file("secret-file", 0o600, b"private")],
        "private/app",
    );

    let server = Server::start_logging(&registry.addr, &[], "debug");
    let url = format!("{}/squash/{}/private/app:v1", server.url, registry.addr);

    let anonymous = || {
        let v = json_error(&url, 401);
        assert_eq!(v["error"]["code"], "UNAUTHORIZED", "{v}");
    };
    anonymous();
    json_error_curl(&["-u", &format!("{USER}:wrong"), &url], 401);

    let (status, headers, body) = curl(&["-f", "-u", &format!("{USER}:{PASSWORD}"), &url]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header_value(&headers, "content-length").unwrap(),
        body.len().to_string()
    );
    let file = scratch("private-out").join("image.tar");
    std::fs::write(&file, &body).unwrap();
    let tag = "strata-test/private:squashed";
    run(docker()
        .args(["load", "-i"])
        .arg(&file)
        .env("DOCKER_CLI_HINTS", "false"));
    run(docker().args(["tag", &load_name(&body), tag]));
    let listing = export_listing(tag);
    assert!(
        listing["secret-file"].starts_with("Regular 600 "),
        "{listing:?}"
    );

    // Remembered sizes are no way in: the registry still has to accept the caller.
    anonymous();
    let (status, _, body) = curl(&["-I", &url]);
    assert_eq!(status, 401, "HEAD: {}", String::from_utf8_lossy(&body));

    let log = server.log.lock().unwrap().clone();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(log.contains("private/app"), "the debug log is on: {log}");
    assert!(
        !log.contains(PASSWORD) && !log.contains(&basic),
        "credentials in the log: {log}"
    );
}

/// Registries backed by object storage answer blob requests with a redirect to another host; strata
/// follows it without the caller's credentials, which are for the registry alone.
#[test]
fn blob_redirects_to_another_host_carry_no_credentials() {
    let Some(_env) = env() else { return };
    let registry = PrivateRegistry::start();
    push_private(
        &registry,
        "redirect-layout",
        vec![
            Layer::new().file("a", 0o644, b"a"),
            Layer::new().file("b", 0o644, b"b"),
        ],
        "private/redirected",
    );
    let creds = format!("{USER}:{PASSWORD}");

    // `front` is the registry strata knows; `storage` the other host its blobs redirect to, which lets
    // requests in on its own authority, as a presigned URL would.
    let front = Proxy::start(&registry.addr);
    let storage = Proxy::start(&registry.addr);
    let basic = base64::engine::general_purpose::STANDARD.encode(&creds);
    storage.authorize_upstream(&format!("Basic {basic}"));
    front.rule("/blobs/", Fault::Redirect(storage.addr.clone()), None);

    let server = Server::start(&front.addr, &[]);
    let url = format!("{}/squash/{}/private/redirected:v1", server.url, front.addr);
    let (status, headers, body) = curl(&["-f", "-u", &creds, &url]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header_value(&headers, "content-length").unwrap(),
        body.len().to_string()
    );

    let redirected = storage.requests("/blobs/");
    assert!(
        redirected.len() >= 3,
        "config and two layers: {redirected:?}"
    );
    for r in &redirected {
        assert_eq!(
            r.authorization, None,
            "credentials sent to another host: {r:?}"
        );
        assert_eq!(r.outcome, Outcome::Complete, "{r:?}");
    }
    assert!(
        front
            .requests("/manifests/")
            .iter()
            .any(|r| r.authorization.is_some()),
        "the registry itself did get the credentials"
    );
}

/// The name `docker load` gave the image: the first RepoTags entry of the archive's manifest.json.
fn load_name(archive: &[u8]) -> String {
    let mut tar = tar::Archive::new(archive);
    for e in tar.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_str() == Some("manifest.json") {
            let m: Value = serde_json::from_reader(e).unwrap();
            return m[0]["RepoTags"][0].as_str().unwrap().to_string();
        }
    }
    panic!("no manifest.json")
}
