//! Squash end to end against the real parts: fixtures pushed to a real registry, the oracle from a
//! real `docker pull`, strata's output loaded by real docker (and podman, skopeo, containerd).

mod common;

use std::process::Command;

use common::fixtures::{Comp, Image, Layer};
use common::images;
use common::squashing::*;
use common::*;
use serde_json::Value;

#[test]
fn basic_matches_docker_pull() {
    let env = env();
    let r = publish(&env, "basic", images::basic());
    check_against_oracle(&env, &r, "strata-test/basic:squashed");
}

#[test]
fn whiteouts_match_docker_pull() {
    let env = env();
    let r = publish(&env, "whiteouts", images::whiteouts());
    check_against_oracle(&env, &r, "strata-test/whiteouts:squashed");
}

/// docker pull refuses a layer with duplicate paths ("duplicates of file paths not supported"), so this
/// case has no docker oracle; containerd and containers/image extract entries in order, the last one
/// winning, and so must strata, writing each path once.
#[test]
fn duplicate_paths_keep_the_last_occurrence() {
    let env = env();
    let r = publish(&env, "duplicates", images::duplicates());
    let server = shared_server(&env.registry);
    let tag = "strata-test/duplicates:squashed";
    let file = fetch(server, &r, &format!("?tag={tag}"));
    run(docker().arg("load").arg("-i").arg(&file));
    let got = export_listing(tag);
    let sha = |b: &[u8]| common::fixtures::sha(b)[7..19].to_string();
    assert!(
        got["dup"].starts_with("Regular 640 ") && got["dup"].contains(&sha(b"second")),
        "{got:?}"
    );
    assert!(
        got["dir2dup"].starts_with("Regular 644 ") && got["dir2dup"].contains(&sha(b"two")),
        "{got:?}"
    );
    assert!(!got.contains_key("dir2dup/child"), "{got:?}");
}

#[test]
fn hardlinks_match_docker_pull() {
    let env = env();
    let r = publish(&env, "hardlinks", images::hardlinks());
    check_against_oracle(&env, &r, "strata-test/hardlinks:squashed");
}

#[test]
fn special_entries_match_docker_pull_and_load_everywhere() {
    let env = env();
    let r = publish(&env, "special", images::special());
    let file = check_against_oracle(&env, &r, "strata-test/special:squashed");
    other_loaders(&env, &file);
}

/// podman, skopeo and containerd accept the archive too: a first conversion's, whose layer member
/// is zero-padded to an upper bound (checked here), as docker did in `check_against_oracle`.
fn other_loaders(env: &Env, file: &std::path::Path) {
    let archive = std::fs::read(file).unwrap();
    let mut tar = tar::Archive::new(&archive[..]);
    let mut layer = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().ends_with("layer.tar") {
            std::io::Read::read_to_end(&mut e, &mut layer).unwrap();
        }
    }
    let zeros = layer.iter().rev().take_while(|&&b| b == 0).count();
    assert!(
        zeros > 64 << 10,
        "the layer member is not padded to a bound ({zeros} trailing zeros of {})",
        layer.len()
    );
    let podman = scratch("podman");
    run(common::pull::podman(&podman).args(["load", "-i"]).arg(file));
    let oci = scratch("skopeo-oci");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("docker-archive:{}", file.display()))
        .arg(format!("oci:{}:x", oci.display())));
    match &env.containerd {
        Some(sock) => {
            run(Command::new("ctr")
                .args(["-a", sock, "-n", "strata-test", "images", "import"])
                .arg(file));
        }
        None => {
            panic!("STRATA_TEST_CONTAINERD is not set: containerd's import is part of the test")
        }
    }
}

/// The test daemon (Docker 20.10) cannot pull zstd layers (support came in Docker 23), so the oracle is
/// the gzip twin: same uncompressed layers, hence the same file system and diff_ids.
#[test]
fn compressions_match_docker_pull() {
    let env = env();
    let r = publish(&env, "compression", images::compression(false));
    let twin = publish(&env, "compression-gzip", images::compression(true));
    check_against_twin(
        shared_server(&env.registry),
        &r,
        &twin,
        "strata-test/compression:squashed",
    );
}

#[test]
fn multiarch_picks_the_platform_and_404s_otherwise() {
    let env = env();
    check_multiarch(&env, &publish(&env, "multiarch", images::multiarch()));
}

/// Docker's own manifest types: a schema 2 manifest list over schema 2 manifests.
#[test]
fn docker_schema2_manifests_and_lists_are_read() {
    let env = env();
    check_multiarch(
        &env,
        &publish_as(&env, "v2s2-list", images::multiarch(), "v2s2"),
    );
    let r = publish_as(&env, "v2s2", images::basic(), "v2s2");
    check_against_oracle(&env, &r, "strata-test/v2s2:squashed");
}

fn check_multiarch(env: &Env, r: &str) {
    let server = shared_server(&env.registry);
    for (platform, content) in [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/arm64/v8", "arm64"),
    ] {
        let file = fetch(server, r, &format!("?platform={platform}"));
        let tar = std::fs::read(&file).unwrap();
        let mut outer = tar::Archive::new(&tar[..]);
        let mut layer = Vec::new();
        for e in outer.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().ends_with("layer.tar") {
                std::io::Read::read_to_end(&mut e, &mut layer).unwrap();
            }
        }
        let listing = listing(&layer[..]);
        assert!(
            listing["arch"].contains(&common::fixtures::sha(content.as_bytes())[7..19]),
            "{platform}: {listing:?}"
        );
    }
    let (status, headers, body) =
        curl(&[&format!("{}/squash/{r}?platform=linux/s390x", server.url)]);
    assert_eq!(status, 404);
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/json")
    );
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn busybox_image_runs() {
    let env = env();
    let r = publish(&env, "busybox", vec![images::busybox()]);
    check_against_oracle(&env, &r, "strata-test/busybox:squashed");
    let out = run(docker().args([
        "run",
        "--rm",
        "--network",
        "none",
        "strata-test/busybox:squashed",
    ]));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "hello from a squashed image\n"
    );
    let out = run(docker().args([
        "run",
        "--rm",
        "--network",
        "none",
        "strata-test/busybox:squashed",
        "/bin/sh",
        "-c",
        "echo $A",
    ]));
    assert_eq!(String::from_utf8_lossy(&out), "b=c\n");
}

#[test]
fn cli_and_http_bytes_are_identical_and_reproducible() {
    let env = env();
    let r = publish(&env, "repro", images::basic());
    // A server of its own: what a server remembers of an image (other tests convert the same one)
    // decides whether its layer is sized exactly or to a bound, and the CLI below starts cold too.
    let server = &Server::start(&env.registry, &[]);
    let http = std::fs::read(fetch(server, &r, "")).unwrap();
    let again = std::fs::read(fetch(server, &r, "")).unwrap();
    assert_eq!(http, again, "same image, same bytes");
    for cache in ["--no-cache", "--cache-dir"] {
        let out = scratch(&format!("cli-{}", rand_suffix())).join("x.tar");
        let mut cmd = strata();
        cmd.args(["squash", &r, "-o"]).arg(&out).args([
            "--insecure-registry",
            &env.registry,
            cache,
        ]);
        if cache == "--cache-dir" {
            cmd.arg(scratch(&format!("clicache-{}", rand_suffix())));
        }
        run(&mut cmd);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            http,
            "CLI ({cache}) and HTTP give the same bytes"
        );
    }
    // Quay's spelling, against the default registry, names the same image.
    let quay = Server::start(&env.registry, &["--default-registry", &env.registry]);
    let short = std::fs::read(fetch(&quay, "fixtures/repro:v1", "")).unwrap();
    let url = format!("{}/c1/squash/fixtures/repro/v1", quay.url);
    let (status, _, c1) = curl(&["-f", &url]);
    assert_eq!(status, 200, "{url}");
    assert!(
        c1 == short,
        "/c1/squash/ns/repo/tag and /squash/ns/repo:tag give the same bytes"
    );
    // HEAD: same headers, no body.
    let (status, headers, body) = curl(&["-I", &format!("{}/squash/{r}", server.url)]);
    assert_eq!(status, 200);
    assert_eq!(
        header_value(&headers, "content-length").unwrap(),
        http.len().to_string()
    );
    // `curl -I` writes the header block as its output: nothing may follow it.
    assert_eq!(String::from_utf8_lossy(&body), headers);
    let etag = header_value(&headers, "etag").unwrap();
    let (status, _, _) = curl(&[
        "-H",
        &format!("If-None-Match: {etag}"),
        &format!("{}/squash/{r}", server.url),
    ]);
    assert_eq!(status, 304);
}

#[test]
fn errors_before_the_first_byte_are_json() {
    let env = env();
    publish(&env, "errs", images::basic());
    let server = shared_server(&env.registry);
    let cases = [
        (format!("/squash/{}/fixtures/errs:nope", env.registry), 404),
        (
            format!("/squash/{}/fixtures/no-such-repo:v1", env.registry),
            404,
        ),
        ("/squash/Bad..Reference".to_string(), 400),
        (
            format!("/squash/{}/fixtures/errs:v1?platform=linux", env.registry),
            400,
        ),
        (
            format!("/squash/{}/fixtures/errs:v1?bogus=1", env.registry),
            400,
        ),
        ("/squash/example.com/x:y".to_string(), 403),
        ("/nope".to_string(), 404),
    ];
    for (path, want) in cases {
        let (status, headers, body) = curl(&[&format!("{}{path}", server.url)]);
        assert_eq!(status, want, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            header_value(&headers, "content-type").as_deref(),
            Some("application/json"),
            "{path}"
        );
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{path}: not JSON"));
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{path}: {v}"
        );
    }
}

/// Past 4 GiB the gzip trailer's ISIZE wraps, and a tar size field needs all its octal digits: the
/// layer must come through whole all the same, with memory flat.
#[test]
fn a_layer_over_4_gib_matches_docker_pull() {
    let env = env();
    let size = (4u64 << 30) + (1 << 20) + 123;
    let image = Image::new(vec![
        (
            Layer::new()
                .dir("big", 0o755)
                .file("big/before", 0o644, b"before")
                .zeros_file("big/zeros", size),
            Comp::Gzip,
        ),
        (Layer::new().file("big/after", 0o644, b"after"), Comp::Gzip),
    ]);
    let r = publish(&env, "over-4gib", vec![image]);
    let server = Server::start(&env.registry, &[]);
    let tag = "strata-test/over-4gib:squashed";
    let file = check_against_twin(&server, &r, &r, tag);
    eprintln!(
        "over-4gib: {} bytes squashed; strata server peak RSS {} KiB",
        std::fs::metadata(&file).unwrap().len(),
        server.peak_rss_kib()
    );
    // Several GiB each: give the disk back to the other tests.
    let _ = std::fs::remove_file(&file);
    let _ = docker().args(["rmi", "-f", tag, &r]).output();
}
