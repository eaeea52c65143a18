//! ACIs end to end: fixtures pushed to the real registry, the ACI fetched over HTTP the way rkt does
//! (discovery, signature first, 202, download, signature again), checked with appc's own `actool`,
//! verified with gpg and sqv, and its `rootfs/` compared with what `docker pull` gives.

mod common;

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

/// The ACI of `images`, pushed as `fixtures/<name>:v1`: valid for actool, named and labelled as asked,
/// its `rootfs/` exactly the file system `docker pull` gives.
fn check_against_docker_pull(env: &Env, name: &'static str) -> PathBuf {
    let r = published(env, name);
    check_against_twin(env, name, &r)
}

/// Same, the oracle pulled from `twin`: an image with the same uncompressed layers, for inputs the
/// test daemon cannot pull itself.
fn check_against_twin(env: &Env, name: &'static str, twin: &str) -> PathBuf {
    let s = aci_server(env);
    let repo = format!("fixtures/{name}");
    let file = download(&aci_url(&s.server, &repo, "v1", "aci", "amd64"));
    actool_validate(&file);

    let manifest = manifest_of(&file);
    assert_eq!(manifest["name"], format!("{PUBLIC_NAME}/{repo}"));
    assert_eq!(
        manifest["labels"],
        json!([
            {"name": "version", "value": "v1"},
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": "amd64"},
        ])
    );
    // Top level: the manifest and rootfs/, nothing else, nothing twice.
    let names = entry_names(&file);
    assert_eq!(names[0], "rootfs");
    assert_eq!(names.last().unwrap(), "manifest");
    assert!(names[1..names.len() - 1]
        .iter()
        .all(|n| n.starts_with("rootfs/")));
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicate entries");

    let mut want = oracle(twin);
    let got = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
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
    assert_same(&blind(&want), &blind(&got), &format!("ACI of {repo}"));
    file
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

#[test]
fn basic_aci_matches_docker_pull() {
    let env = env();
    check_against_docker_pull(&env, "basic");
}

#[test]
fn whiteouts_aci_matches_docker_pull() {
    let env = env();
    check_against_docker_pull(&env, "whiteouts");
}

#[test]
fn hardlinks_aci_matches_docker_pull() {
    let env = env();
    check_against_docker_pull(&env, "hardlinks");
}

#[test]
fn special_aci_matches_docker_pull() {
    let env = env();
    let file = check_against_docker_pull(&env, "special");
    let listing = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
    assert!(
        listing["xattr"].ends_with("[user.bin=000102,user.strata=796573]"),
        "{}",
        listing["xattr"]
    );
}

#[test]
fn busybox_aci_matches_docker_pull() {
    let env = env();
    let file = check_against_docker_pull(&env, "busybox");
    let app = &manifest_of(&file)["app"];
    assert_eq!(app["exec"], json!(["/bin/sh", "-c", "cat /etc/greeting"]));
    assert_eq!(app["environment"], json!([{"name": "A", "value": "b=c"}]));
}

/// zstd and uncompressed layers: the oracle is the all-gzip twin (Docker 20.10 pulls no zstd).
#[test]
fn compression_aci_matches_docker_pull() {
    let env = env();
    published(&env, "compression");
    let twin = published(&env, "compression-gzip");
    check_against_twin(&env, "compression", &twin);
}

/// Docker schema 2 manifests, not only OCI ones.
#[test]
fn v2s2_aci_matches_docker_pull() {
    let env = env();
    let r = publish_as(&env, "aci-v2s2", images::basic(), "v2s2");
    check_against_twin(&env, "aci-v2s2", &r);
}

/// Paths a layer holds twice: one entry each in `rootfs/`, the last occurrence's.
#[test]
fn duplicates_aci_keeps_the_last_occurrence() {
    let env = env();
    published(&env, "duplicates");
    let s = aci_server(&env);
    let file = download(&aci_url(
        &s.server,
        "fixtures/duplicates",
        "v1",
        "aci",
        "amd64",
    ));
    actool_validate(&file);
    let names = entry_names(&file);
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicate entries: {names:?}");
    let got = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
    let sha = |b: &[u8]| common::fixtures::sha(b)[7..19].to_string();
    assert!(got["dup"].starts_with("Regular 640 ") && got["dup"].contains(&sha(b"second")));
    assert!(got["dir2dup"].contains(&sha(b"two")));
    assert!(!got.contains_key("dir2dup/child"), "{got:?}");
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

/// rkt's order: signature (202), the ACI, the signature again, which must now exist and verify the
/// bytes as downloaded; the public key as `/aci-signing-key` serves it.
#[test]
fn signature_flow_as_rkt_does_it() {
    let env = env();
    // An image of its own, so no other test has made its signature yet.
    publish(
        &env,
        "aci-signed",
        vec![Image::new(vec![(
            Layer::new().file("signed", 0o644, b"signed content"),
            Comp::Gzip,
        )])],
    );
    let s = aci_server(&env);
    let asc_url = aci_url(&s.server, "fixtures/aci-signed", "v1", "aci.asc", "amd64");
    let (status, headers, _) = curl(&[&asc_url]);
    assert_eq!(status, 202, "signature before any download");
    assert!(header_value(&headers, "retry-after").is_some());

    let aci = download(&aci_url(
        &s.server,
        "fixtures/aci-signed",
        "v1",
        "aci",
        "amd64",
    ));
    let (status, headers, sig) = curl(&[&asc_url]);
    assert_eq!(status, 200, "signature right after the download");
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/pgp-signature")
    );
    assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
    let sig_file = aci.with_extension("aci.asc");
    std::fs::write(&sig_file, &sig).unwrap();

    // The key as served equals the one keygen wrote.
    let (status, _, served_key) = curl(&[&format!("{}/aci-signing-key", s.server.url)]);
    assert_eq!(status, 200);
    assert_eq!(served_key, std::fs::read(&s.public_key).unwrap());

    assert!(gpg_verifies(&s.public_key, &sig_file, &aci), "gpg --verify");
    assert!(sqv_verifies(&s.public_key, &sig_file, &aci), "sqv");

    // A v4 signature (rkt verifies no other) over SHA-256.
    let packets = String::from_utf8_lossy(&run(Command::new("gpg")
        .args(["--batch", "--list-packets"])
        .arg(&sig_file)))
    .into_owned();
    assert!(packets.contains("version 4"), "{packets}");
    assert!(packets.contains("digest algo 8"), "{packets}");

    // The bytes are deterministic: a second download is identical, so the kept signature fits it.
    let again = download(&aci_url(
        &s.server,
        "fixtures/aci-signed",
        "v1",
        "aci",
        "amd64",
    ));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&aci).unwrap());
    let (_, _, sig_again) = curl(&[&asc_url]);
    assert_eq!(sig_again, sig, "the first signature is the one kept");

    // And it is a real check: one flipped byte fails both verifiers.
    let mut bytes = std::fs::read(&aci).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 1;
    let tampered = aci.with_extension("tampered");
    std::fs::write(&tampered, bytes).unwrap();
    assert!(!gpg_verifies(&s.public_key, &sig_file, &tampered));
    assert!(!sqv_verifies(&s.public_key, &sig_file, &tampered));
}

/// A signature asked for twice before any download: the first 202 starts a conversion, so the
/// signature comes to exist without the ACI being fetched here (it may be fetched from another
/// instance behind the same load balancer).
#[test]
fn a_pending_signature_is_made_in_the_background() {
    let env = env();
    publish(
        &env,
        "aci-background",
        vec![Image::new(vec![(
            Layer::new().file("bg", 0o644, b"background"),
            Comp::Gzip,
        )])],
    );
    let s = aci_server(&env);
    let asc_url = aci_url(
        &s.server,
        "fixtures/aci-background",
        "v1",
        "aci.asc",
        "amd64",
    );
    let (status, _, _) = curl(&[&asc_url]);
    assert_eq!(status, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let sig = loop {
        let (status, _, body) = curl(&[&asc_url]);
        if status == 200 {
            break body;
        }
        assert_eq!(status, 202);
        assert!(
            std::time::Instant::now() < deadline,
            "no signature after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let sig_file = scratch("aci-bg").join("sig.asc");
    std::fs::write(&sig_file, sig).unwrap();
    let aci = download(&aci_url(
        &s.server,
        "fixtures/aci-background",
        "v1",
        "aci",
        "amd64",
    ));
    assert!(gpg_verifies(&s.public_key, &sig_file, &aci));
}

/// `actool discover`, appc's own discovery client, against the discovery page: it finds the ACI, its
/// signature and the key, and those URLs serve them.
#[test]
fn actool_discovers_the_endpoints() {
    let env = env();
    published(&env, "basic");
    let s = aci_server(&env);
    let port = s.server.url.rsplit(':').next().unwrap();
    let name = format!("{PUBLIC_NAME}/fixtures/basic:v1");
    let out = run(Command::new("actool").args([
        "discover",
        "--insecure",
        "--port",
        port,
        "--json",
        &name,
    ]));
    let text = String::from_utf8_lossy(&out);
    // Lines of failed walks come first; the JSON follows.
    let json_start = text.find('{').unwrap_or_else(|| panic!("{text}"));
    let found: Value = serde_json::from_str(&text[json_start..]).unwrap();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "aarch64",
        other => other,
    };
    let endpoint = &found["ACIEndpoints"][0];
    assert_eq!(
        endpoint["ACI"],
        format!(
            "{}/c1/aci/{PUBLIC_NAME}/fixtures/basic/v1/aci/linux/{arch}/",
            s.server.url
        ),
        "{text}"
    );
    assert_eq!(
        endpoint["ASC"],
        format!(
            "{}/c1/aci/{PUBLIC_NAME}/fixtures/basic/v1/aci.asc/linux/{arch}/",
            s.server.url
        )
    );
    assert_eq!(
        found["PublicKeys"],
        json!([format!("{}/aci-signing-key", s.server.url)])
    );
    let file = download(endpoint["ACI"].as_str().unwrap());
    actool_validate(&file);
    assert_eq!(
        manifest_of(&file)["name"],
        format!("{PUBLIC_NAME}/fixtures/basic")
    );
}

/// The manifest of an image using every config field appc can express.
#[test]
fn feature_rich_manifest() {
    let env = env();
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\n")
        .dir("srv", 0o755);
    // The upper layer's account files are the ones the container sees.
    let upper = Layer::new()
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/srv:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\napp:x:1001:\naudio:x:29:app\nvideo:x:44:root,app\n",
        );
    let mut image = Image::new(vec![(lower, Comp::Gzip), (upper, Comp::Gzip)]);
    image.config = json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo \"$GREETING\" 'two words'"],
        "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b=c", "EMPTY="],
        "User": "app",
        "WorkingDir": "/srv",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8000-8010/tcp": {}},
        "Volumes": {"/data1": {}, "/data2": {}, "/var/lib/Data1": {}},
        "Labels": {"org.opencontainers.image.title": "rich", "Maintainer": "strata"},
    });
    publish(&env, "aci-rich", vec![image]);
    let s = aci_server(&env);
    let file = download(&aci_url(
        &s.server,
        "fixtures/aci-rich",
        "v1",
        "aci",
        "amd64",
    ));
    actool_validate(&file);
    let m = manifest_of(&file);
    eprintln!(
        "feature-rich manifest:\n{}",
        serde_json::to_string_pretty(&m).unwrap()
    );
    let app = &m["app"];
    assert_eq!(
        app["exec"],
        json!(["/bin/sh", "-c", "echo \"$GREETING\" 'two words'"])
    );
    assert_eq!(
        app["environment"],
        json!([
            {"name": "PATH", "value": "/usr/bin:/bin"},
            {"name": "GREETING", "value": "a=b=c"},
            {"name": "EMPTY", "value": ""},
        ])
    );
    assert_eq!(
        (&app["user"], &app["group"]),
        (&json!("1000"), &json!("1001"))
    );
    assert_eq!(app["supplementaryGIDs"], json!([29, 44]));
    assert_eq!(app["workingDirectory"], "/srv");
    assert_eq!(
        app["ports"],
        json!([
            {"name": "53-udp", "protocol": "udp", "port": 53, "count": 1, "socketActivated": false},
            {"name": "80-tcp", "protocol": "tcp", "port": 80, "count": 1, "socketActivated": false},
            {"name": "8000-8010-tcp", "protocol": "tcp", "port": 8000, "count": 11, "socketActivated": false},
        ])
    );
    assert_eq!(
        app["mountPoints"],
        json!([
            {"name": "data1", "path": "/data1"},
            {"name": "data2", "path": "/data2"},
            {"name": "var-lib-data1", "path": "/var/lib/Data1"},
        ])
    );
    assert!(app.get("isolators").is_none());
    let annotations: BTreeMap<&str, &str> = m["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["value"].as_str().unwrap()))
        .collect();
    assert_eq!(annotations["org.opencontainers.image.title"], "rich");
    assert_eq!(annotations["maintainer"], "strata");
    assert_eq!(
        annotations["appc.io/docker/repository"],
        "fixtures/aci-rich"
    );
    assert!(annotations["appc.io/docker/manifesthash"].starts_with("sha256:"));
}

/// appc spellings pick the platform of a multi-arch image, and the labels say it back.
#[test]
fn appc_arch_picks_the_platform() {
    let env = env();
    publish(&env, "aci-multiarch", images::multiarch());
    let s = aci_server(&env);
    for (arch, content) in [("amd64", "amd64"), ("aarch64", "arm64")] {
        let file = download(&aci_url(
            &s.server,
            "fixtures/aci-multiarch",
            "v1",
            "aci",
            arch,
        ));
        actool_validate(&file);
        let m = manifest_of(&file);
        assert_eq!(m["labels"][2], json!({"name": "arch", "value": arch}));
        let listing = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
        assert!(listing["arch"].contains(&common::fixtures::sha(content.as_bytes())[7..19]));
    }
    let url = aci_url(&s.server, "fixtures/aci-multiarch", "v1", "aci", "s390x");
    json_error(&url, 404);
}

#[test]
fn errors_before_the_first_byte_are_json() {
    let env = env();
    let mut bad_env = Image::new(vec![(Layer::new().file("x", 0o644, b"x"), Comp::Gzip)]);
    bad_env.config = json!({"Cmd": ["/x"], "Env": ["1BAD=x"]});
    publish(&env, "aci-bad-env", vec![bad_env]);
    published(&env, "basic");
    let s = aci_server(&env);
    let err = json_error(
        &aci_url(&s.server, "fixtures/aci-bad-env", "v1", "aci", "amd64"),
        502,
    );
    assert!(
        err["error"]["message"].as_str().unwrap().contains("1BAD"),
        "{err}"
    );
    assert_eq!(err["error"]["code"], "INVALID_IMAGE");
    json_error(
        &aci_url(&s.server, "fixtures/basic", "v1", "aci", "sparc"),
        400,
    );
    json_error(
        &format!(
            "{}/c1/aci/{PUBLIC_NAME}/fixtures/basic/v1/aci/darwin/amd64/",
            s.server.url
        ),
        400,
    );
    json_error(
        &aci_url(&s.server, "fixtures/basic", "nope", "aci", "amd64"),
        404,
    );
    json_error(
        &aci_url(&s.server, "fixtures/nope", "v1", "aci.asc", "amd64"),
        404,
    );
    json_error(
        &format!("{}/c1/aci/{PUBLIC_NAME}/v1/aci/linux/amd64/", s.server.url),
        400,
    );

    // A service without a key or a public name says so.
    let plain = Server::start(&env.registry, &["--default-registry", &env.registry]);
    json_error(&format!("{}/aci-signing-key", plain.url), 404);
    json_error(
        &aci_url(&plain, "fixtures/basic", "v1", "aci.asc", "amd64"),
        404,
    );
    json_error(&format!("{}/fixtures/basic?ac-discovery=1", plain.url), 404);
    // Unsigned ACIs are still served.
    actool_validate(&download(&aci_url(
        &plain,
        "fixtures/basic",
        "v1",
        "aci",
        "amd64",
    )));
}

/// `strata aci` writes the bytes the server sends for the same name and tag.
#[test]
fn cli_and_http_bytes_are_identical() {
    let env = env();
    published(&env, "basic");
    let s = aci_server(&env);
    let http = download(&aci_url(&s.server, "fixtures/basic", "v1", "aci", "amd64"));
    let out = scratch("aci-cli").join("cli.aci");
    run(strata()
        .args([
            "aci",
            "fixtures/basic:v1",
            "--name",
            &format!("{PUBLIC_NAME}/fixtures/basic"),
            "--default-registry",
            &env.registry,
            "--insecure-registry",
            &env.registry,
            "--no-cache",
            "-o",
        ])
        .arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&http).unwrap());
}

/// A registry cutting a blob after the ACI has started: curl sees a failed transfer, the partial file
/// is no valid ACI, no signature is kept for bytes never sent whole, and the next request is whole.
#[test]
fn a_registry_failing_mid_aci_aborts_and_signs_nothing() {
    let env = env();
    let keys = aci_server(&env);
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(
        &proxy.addr,
        &[
            "--default-registry",
            &proxy.addr,
            "--public-name",
            PUBLIC_NAME,
            "--signing-key",
            keys.key.to_str().unwrap(),
        ],
    );
    let image = Image::new(vec![
        (
            Layer::new().file("bottom", 0o644, &noise(4 << 20, 7)),
            Comp::Gzip,
        ),
        (Layer::new().file("top", 0o644, b"top"), Comp::Gzip),
    ]);
    publish(&env, "aci-upstream-dies", vec![image]);
    let bottom = &layer_digests(&env.registry, "fixtures/aci-upstream-dies", "v1")[0][7..];
    // The squash route remembers the layers' summaries (so the ACI starts at once) but signs nothing.
    let (status, _, _) = curl(&[&format!(
        "{}/squash/fixtures/aci-upstream-dies:v1",
        server.url
    )]);
    assert_eq!(status, 200);

    proxy.rule(bottom, Fault::Truncate(1 << 20), Some(1));
    let url = aci_url(&server, "fixtures/aci-upstream-dies", "v1", "aci", "amd64");
    let partial = scratch("aci-partial").join("partial.aci");
    let out = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&partial)
        .args(["-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "failure after the first byte"
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "curl must see a failed transfer"
    );
    let validate = Command::new("actool")
        .arg("validate")
        .arg(&partial)
        .output()
        .unwrap();
    assert!(!validate.status.success(), "actool took a broken transfer");

    let asc = aci_url(
        &server,
        "fixtures/aci-upstream-dies",
        "v1",
        "aci.asc",
        "amd64",
    );
    let (status, _, _) = curl(&[&asc]);
    assert_eq!(status, 202, "no signature for a transfer that failed");
    let whole = download(&url);
    actool_validate(&whole);
    let (status, _, sig) = curl(&[&asc]);
    assert_eq!(status, 200);
    let sig_file = whole.with_extension("aci.asc");
    std::fs::write(&sig_file, sig).unwrap();
    assert!(gpg_verifies(&keys.public_key, &sig_file, &whole));
}
