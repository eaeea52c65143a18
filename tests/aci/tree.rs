//! The ACI's `rootfs/` against what `docker pull` gives, fixture by fixture.

use super::*;

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

    let got = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
    assert_same_as_docker_pull(env, twin, &got, &format!("ACI of {repo}"));
    file
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
