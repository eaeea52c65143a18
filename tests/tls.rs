//! Registries behind TLS with a certificate from a private CA: the test makes a CA and a server
//! certificate for 127.0.0.1 (an IP SAN) with `openssl`, and starts a registry serving HTTPS with it.
//! strata reaches it when told of the CA, with `--registry-ca` or through `SSL_CERT_FILE`, as the
//! system store; without, the caller gets a JSON 502 that names the certificate failure. The image
//! pushed there is pushed to the plain-HTTP registry too, where docker pulls it for the oracle: the
//! merged layers from both registries are byte for byte the same (the image configs differ only in
//! the history comment, which names the reference).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::write_layout;
use common::registry::Registry;
use common::*;

/// A CA of the test's own, and a registry serving TLS with a certificate it signed.
struct TlsRegistry {
    registry: Registry,
    /// The CA's certificate (PEM).
    ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

impl TlsRegistry {
    fn start() -> TlsRegistry {
        let dir = scratch(&format!("tls-registry-{}", rand_suffix()));
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=strata-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        let http = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        );
        TlsRegistry {
            registry: Registry::start(&dir, &http, None),
            ca: dir.join("ca.pem"),
        }
    }
}

#[test]
fn a_registry_with_a_private_ca() {
    let env = env();
    let tls = TlsRegistry::start();
    let addr = tls.registry.addr.clone();
    let ca = tls.ca.to_str().unwrap();
    let layout = scratch(&format!("tls-layout-{}", rand_suffix()));
    write_layout(&layout, &images::whiteouts(), "v1");
    // skopeo without verification: it tries HTTPS first, which this registry speaks.
    push(&layout, "v1", &addr, "fixtures/tls", "v1", "oci");
    let twin = publish(&env, "tls-twin", images::whiteouts());
    let tag = "strata-test/tls:squashed";

    // The plain-HTTP twin, and the TLS registry unknown to strata: a JSON 502 naming the failure.
    let plain = Server::start(&env.registry, &["--allow-registry", &addr]);
    let (status, _, want) = curl(&["-f", &format!("{}/squash/{twin}?tag={tag}", plain.url)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&want));
    let url = |server: &Server| format!("{}/squash/{addr}/fixtures/tls:v1?tag={tag}", server.url);
    let v = json_error(&url(&plain), 502);
    assert_eq!(v["error"]["code"], "UPSTREAM", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&addr) && message.contains("certificate"),
        "{v}"
    );
    assert!(message.contains("--registry-ca"), "a hint: {v}");

    // The CA as the system store: SSL_CERT_FILE in strata's environment.
    let out = scratch(&format!("tls-out-{}", rand_suffix())).join("image.tar");
    let squash = |env_file: Option<&str>| {
        let mut cmd = strata();
        cmd.args(["squash", "--no-cache", "--allow-registry", &addr])
            .args(["--tag", tag, "-o"])
            .arg(&out)
            .arg(format!("{addr}/fixtures/tls:v1"))
            .env_remove("SSL_CERT_DIR");
        match env_file {
            Some(f) => cmd.env("SSL_CERT_FILE", f),
            None => cmd.env_remove("SSL_CERT_FILE"),
        };
        cmd.output().unwrap()
    };
    let result = squash(Some(ca));
    assert!(
        result.status.success(),
        "with SSL_CERT_FILE: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        layer_tar(&std::fs::read(&out).unwrap()) == layer_tar(&want),
        "with SSL_CERT_FILE: not the plain registry's layer"
    );
    let result = squash(None);
    assert!(!result.status.success(), "reached without the CA");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");

    // The CA named with --registry-ca.
    let server = Server::start(
        &env.registry,
        &["--allow-registry", &addr, "--registry-ca", ca],
    );
    let (status, _, got) = curl(&["-f", &url(&server)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert!(
        layer_tar(&got) == layer_tar(&want),
        "with --registry-ca: not the plain registry's layer"
    );

    // And that is what docker pull gives.
    let file = out.with_file_name("loaded.tar");
    std::fs::write(&file, &got).unwrap();
    run(docker()
        .args(["load", "-i"])
        .arg(&file)
        .env("DOCKER_CLI_HINTS", "false"));
    assert_same(&oracle(&twin), &export_listing(tag), "squash over TLS");
}

/// A `--registry-ca` file that holds no certificate is refused at start-up, naming the file.
#[test]
fn a_registry_ca_file_without_certificates_is_refused() {
    let _env = env();
    let dir = scratch(&format!("tls-bad-ca-{}", rand_suffix()));
    let file = dir.join("empty.pem");
    std::fs::write(&file, "not a certificate\n").unwrap();
    let out = strata()
        .args(["squash", "x/y:z", "-o", "/dev/null", "--registry-ca"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("empty.pem") && stderr.contains("certificate"),
        "{stderr}"
    );
}

/// The merged layer of a docker archive: the bytes of its `<id>/layer.tar` member.
fn layer_tar(archive: &[u8]) -> Vec<u8> {
    let mut tar = tar::Archive::new(archive);
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().ends_with("layer.tar") {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut out).unwrap();
            return out;
        }
    }
    panic!("no layer.tar")
}
