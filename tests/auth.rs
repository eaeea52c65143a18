//! Private repositories: real registries started by these tests, one with htpasswd (Basic)
//! authentication, one with token authentication backed by the test's own token server
//! (`common/token.rs`). The caller's own credentials reach the registry (Basic) or the token server
//! (token auth, where the registry only ever sees the bearer token) through strata; without them, or
//! with wrong ones, the answer is a JSON 401 before the first byte, even once the image's sizes are
//! remembered; tokens are fetched once per caller and repository, not per request, and one caller's
//! token is never used for another; and credentials never show up in strata's log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::fixtures::{write_layout, Comp, Image, Layer};
use common::proxy::{Fault, Outcome, Proxy};
use common::registry::Registry;
use common::token::{basic, Fields, TokenServer, User, ISSUER, SERVICE};
use common::*;
use serde_json::Value;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55word";
/// The caller of most tests; allowed to push, for the fixtures.
const ALICE: User = User {
    name: USER,
    password: PASSWORD,
    actions: &["pull", "push"],
};
/// Another caller who may pull.
const BOB: User = User {
    name: "bob",
    password: "b0b-Pa55word",
    actions: &["pull"],
};
/// A caller the token server knows but grants nothing.
const CAROL: User = User {
    name: "carol",
    password: "car0l-Pa55word",
    actions: &[],
};

/// Basic authentication against an htpasswd file.
fn basic_registry() -> Registry {
    let dir = scratch(&format!("private-registry-{}", rand_suffix()));
    Registry::htpasswd(&dir, USER, PASSWORD)
}

/// Token authentication: the challenge sends clients to `tokens`, and the registry trusts what its
/// key signs.
fn token_registry(tokens: &TokenServer) -> Registry {
    let dir = scratch(&format!("token-registry-{}", rand_suffix()));
    let auth = format!(
        "  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        tokens.realm,
        tokens.cert.display()
    );
    Registry::start(&dir, "", Some(&auth))
}

/// Writes `layers` as an OCI layout and pushes it to the private registry as `repo:v1`.
fn push_private(registry: &Registry, name: &str, layers: Vec<Layer>, repo: &str) {
    let image = Image::new(layers.into_iter().map(|l| (l, Comp::Gzip)).collect());
    push_images(registry, &ALICE, name, vec![image], repo);
}

/// Writes `images` as an OCI layout and pushes it as `user` to the private registry as `repo:v1`.
fn push_images(registry: &Registry, user: &User, name: &str, images: Vec<Image>, repo: &str) {
    let layout = scratch(name);
    write_layout(&layout, &images, "v1");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .args(["--dest-creds", &user.creds()])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/{repo}:v1", registry.addr)));
}

#[test]
fn private_images_need_the_callers_own_credentials() {
    let _env = env();
    let registry = basic_registry();
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
    let _env = env();
    let registry = basic_registry();
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

    let redirected = storage.settled_requests("/blobs/");
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

/// Token authentication as distribution implements it (`auth: token:` with a root certificate
/// bundle): strata follows the registry's challenge to the token server with each caller's own Basic
/// credentials, and the registry itself only ever sees bearer tokens.
#[test]
fn token_auth_uses_the_callers_own_credentials_at_the_token_server() {
    let env = env();
    let tokens = TokenServer::start(
        &scratch(&format!("tokens-{}", rand_suffix())),
        &[ALICE, BOB, CAROL],
    );
    let registry = token_registry(&tokens);
    push_images(
        &registry,
        &ALICE,
        "token-layout",
        images::whiteouts(),
        "private/tokened",
    );
    let pushed = tokens.requests();
    assert!(
        !pushed.is_empty() && pushed.iter().all(|r| r.status == 200),
        "skopeo pushed with tokens: {pushed:?}"
    );
    let pushed = pushed.len();
    // The same image on the open registry, for docker pull to compare with.
    let twin = publish(&env, "tokened-twin", images::whiteouts());

    // `front` records what strata sends the registry.
    let front = Proxy::start(&registry.addr);
    let server = Server::start_logging(&front.addr, &[], "debug");
    let url = format!("{}/squash/{}/private/tokened:v1", server.url, front.addr);

    // No credentials, a wrong password: the token server refuses them, strata answers a JSON 401.
    let v = json_error(&url, 401);
    assert_eq!(v["error"]["code"], "UNAUTHORIZED", "{v}");
    json_error_curl(&["-u", &format!("{USER}:wrong"), &url], 401);

    // Alice's squash has the file system docker pull gives.
    let tag = "strata-test/tokened:squashed";
    let (status, _, body) = curl(&["-f", "-u", &ALICE.creds(), &format!("{url}?tag={tag}")]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let file = scratch("tokened-out").join("image.tar");
    std::fs::write(&file, &body).unwrap();
    run(docker()
        .args(["load", "-i"])
        .arg(&file)
        .env("DOCKER_CLI_HINTS", "false"));
    assert_eq!(load_name(&body), tag);
    assert_same(&oracle(&twin), &export_listing(tag), "token-auth squash");

    // The token server saw each caller's own credentials, once, for the challenge's service and scope.
    let asked = tokens.requests()[pushed..].to_vec();
    let who: Vec<_> = asked
        .iter()
        .map(|r| (r.authorization.clone(), r.status))
        .collect();
    assert_eq!(
        who,
        [
            (None, 401),
            (Some(basic(USER, "wrong")), 401),
            (Some(ALICE.basic()), 200)
        ],
        "{asked:?}"
    );
    for r in &asked {
        assert_eq!(r.service.as_deref(), Some(SERVICE), "{r:?}");
        assert_eq!(r.scopes, ["repository:private/tokened:pull"], "{r:?}");
    }
    let alice_token = asked[2].token.clone().unwrap();

    // The registry never got a Basic header; one token served the whole conversion: the manifest
    // after the challenge, the config and both layers.
    let bearer = |token: &str| Some(format!("Bearer {token}"));
    let seen = front.requests("/v2/");
    for r in &seen {
        assert!(
            r.authorization.is_none() || r.authorization.as_deref().unwrap().starts_with("Bearer "),
            "the registry got more than a bearer token: {r:?}"
        );
    }
    let blobs = seen
        .iter()
        .filter(|r| r.path.contains("/blobs/") && r.authorization == bearer(&alice_token))
        .count();
    assert!(blobs >= 3, "config and two layers: {seen:?}");

    // Alice again: her cached token, no new request to the token server.
    let (seen_before, asked_before) = (seen.len(), tokens.requests().len());
    let (status, _, alice_body) = curl(&["-f", "-u", &ALICE.creds(), &url]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&alice_body));
    assert_eq!(tokens.requests().len(), asked_before, "a second token");
    let again = &front.requests("/v2/")[seen_before..];
    assert!(!again.is_empty());
    for r in again {
        assert_eq!(r.authorization, bearer(&alice_token), "{r:?}");
    }

    // Bob: a token of his own, asked for with his own credentials, used for all his requests.
    let seen_before = front.requests("/v2/").len();
    let (status, _, bob_body) = curl(&["-f", "-u", &BOB.creds(), &url]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bob_body));
    assert_eq!(bob_body, alice_body, "the same image for both callers");
    let asked = tokens.requests()[asked_before..].to_vec();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].authorization, Some(BOB.basic()));
    assert_eq!(asked[0].user.as_deref(), Some("bob"));
    let bob_token = asked[0].token.clone().unwrap();
    assert_ne!(bob_token, alice_token);
    let bobs = &front.requests("/v2/")[seen_before..];
    assert!(bobs.iter().any(|r| r.authorization == bearer(&bob_token)));
    assert!(
        bobs.iter()
            .all(|r| r.authorization.is_none() || r.authorization == bearer(&bob_token)),
        "bob's conversion used another token: {bobs:?}"
    );

    // Carol is known to the token server but may not pull: her token grants nothing, and the
    // registry refuses her although tokens that may pull this repository are cached.
    let asked_before = tokens.requests().len();
    let v = json_error_curl(&["-u", &CAROL.creds(), &url], 401);
    assert_eq!(v["error"]["code"], "UNAUTHORIZED", "{v}");
    let asked = tokens.requests()[asked_before..].to_vec();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].authorization, Some(CAROL.basic()));
    assert_eq!(asked[0].status, 200, "a token, for nothing");

    let log = server.log.lock().unwrap().clone();
    assert!(
        log.contains("private/tokened"),
        "the debug log is on: {log}"
    );
    for secret in [PASSWORD, &ALICE.basic(), &alice_token, &bob_token] {
        assert!(!log.contains(secret), "a secret in the log: {log}");
    }
}

/// A cached token the registry stops trusting before it expires (its signing key rotated, the
/// registry restarted on the new certificate) is replaced by a new one, once, and the conversion goes
/// on with it.
#[test]
fn a_token_the_registry_refuses_is_fetched_again() {
    let _env = env();
    let tokens = TokenServer::start(&scratch(&format!("tokens-{}", rand_suffix())), &[ALICE]);
    let mut registry = token_registry(&tokens);
    push_images(
        &registry,
        &ALICE,
        "rotated-layout",
        images::basic(),
        "private/rotated",
    );
    let front = Proxy::start(&registry.addr);
    let server = Server::start(&front.addr, &[]);
    let url = format!("{}/squash/{}/private/rotated:v1", server.url, front.addr);
    let squash = || {
        let (status, _, body) = curl(&["-f", "-u", &ALICE.creds(), &url]);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    };

    let asked_before = tokens.requests().len();
    let first = squash();
    let old = tokens.requests()[asked_before..].to_vec();
    assert_eq!(old.len(), 1, "{old:?}");
    let old = old[0].token.clone().unwrap();

    tokens.rotate_key();
    registry.restart();
    let seen_before = front.requests("/v2/").len();
    let second = squash();
    assert_eq!(first, second);
    let asked = tokens.requests()[asked_before + 1..].to_vec();
    assert_eq!(asked.len(), 1, "one new token: {asked:?}");
    assert_eq!(asked[0].authorization, Some(ALICE.basic()));
    let new = asked[0].token.clone().unwrap();
    let seen = &front.requests("/v2/")[seen_before..];
    assert_eq!(seen[0].authorization, Some(format!("Bearer {old}")));
    assert!(
        seen[1..]
            .iter()
            .all(|r| r.authorization == Some(format!("Bearer {new}"))),
        "{seen:?}"
    );
}

/// The token spec lets a token server answer with `token`, `access_token` or both; either alone will
/// do.
#[test]
fn either_token_field_is_accepted() {
    let _env = env();
    let tokens = TokenServer::start(&scratch(&format!("tokens-{}", rand_suffix())), &[ALICE]);
    let registry = token_registry(&tokens);
    push_private(
        &registry,
        "fields-layout",
        vec![Layer::new().file("f", 0o644, b"f")],
        "private/fields",
    );
    for fields in [Fields::Token, Fields::AccessToken] {
        tokens.set_fields(fields);
        // A server of its own each time: an empty token cache.
        let server = Server::start(&registry.addr, &[]);
        let url = format!("{}/squash/{}/private/fields:v1", server.url, registry.addr);
        let (status, _, body) = curl(&["-f", "-u", &ALICE.creds(), &url]);
        assert_eq!(
            status,
            200,
            "{fields:?}: {}",
            String::from_utf8_lossy(&body)
        );
    }
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

/// Writes a docker `config.json` in `dir` whose `auths` give `registry` these credentials, once as
/// `auth` (base64 `user:password`), once as `username`/`password`, as `docker login` and people write
/// them.
fn auth_file(dir: &Path, registry: &str, user: &User, as_fields: bool) -> PathBuf {
    let entry = if as_fields {
        serde_json::json!({"username": user.name, "password": user.password})
    } else {
        serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode(user.creds())})
    };
    let config = serde_json::json!({"auths": {
        registry: entry,
        "https://index.docker.io/v1/": {"auth": "bm9ib2R5Om5vdGhpbmc="},
    }});
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// Service credentials (`--registry-auth-file`) stand in for a caller who sends none, and only then:
/// a caller's own credentials, right or wrong, go to the token server alone, never mixed with the
/// service's and never replaced by them; and the service's token is cached apart from every caller's,
/// even one who sends the very same credentials.
#[test]
fn service_credentials_serve_anonymous_callers_only() {
    let _env = env();
    let tokens = TokenServer::start(
        &scratch(&format!("tokens-{}", rand_suffix())),
        &[ALICE, BOB],
    );
    let registry = token_registry(&tokens);
    push_images(
        &registry,
        &ALICE,
        "served-layout",
        images::basic(),
        "private/served",
    );
    let front = Proxy::start(&registry.addr);
    let dir = scratch(&format!("service-auth-{}", rand_suffix()));
    let file = auth_file(&dir, &front.addr, &BOB, false);
    let server = Server::start_logging(
        &front.addr,
        &["--registry-auth-file", file.to_str().unwrap()],
        "debug",
    );
    let url = format!("{}/squash/{}/private/served:v1", server.url, front.addr);
    let squash = |args: &[&str]| {
        let mut all = vec!["-f"];
        all.extend_from_slice(args);
        all.push(&url);
        let (status, _, body) = curl(&all);
        assert_eq!(status, 200, "{args:?}: {}", String::from_utf8_lossy(&body));
        body
    };
    let new_requests = |since: usize| tokens.requests()[since..].to_vec();

    // Anonymous: served with the service's credentials, which the token server sees.
    let before = tokens.requests().len();
    let anonymous = squash(&[]);
    let asked = new_requests(before);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].authorization, Some(BOB.basic()), "{asked:?}");
    assert_eq!(asked[0].status, 200);
    let service_token = asked[0].token.clone().unwrap();
    // Again: the service's cached token.
    let (before, seen_before) = (tokens.requests().len(), front.requests("/v2/").len());
    assert_eq!(squash(&[]), anonymous);
    assert_eq!(new_requests(before).len(), 0, "a second service token");
    for r in &front.requests("/v2/")[seen_before..] {
        assert_eq!(r.authorization, Some(format!("Bearer {service_token}")));
    }

    // A caller's wrong credentials: a 401, with nothing of the service's tried instead.
    let before = tokens.requests().len();
    let v = json_error_curl(&["-u", &format!("{USER}:wrong"), &url], 401);
    assert_eq!(v["error"]["code"], "UNAUTHORIZED", "{v}");
    let asked = new_requests(before);
    let who: Vec<_> = asked.iter().map(|r| r.authorization.clone()).collect();
    assert_eq!(who, [Some(basic(USER, "wrong"))], "{asked:?}");

    // A caller's right credentials: their own token, as without service credentials.
    let before = tokens.requests().len();
    let seen_before = front.requests("/v2/").len();
    assert_eq!(squash(&["-u", &ALICE.creds()]), anonymous);
    let asked = new_requests(before);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].authorization, Some(ALICE.basic()));
    let alice_token = asked[0].token.clone().unwrap();
    let alices = &front.requests("/v2/")[seen_before..];
    assert!(
        alices.iter().all(|r| r.authorization.is_none()
            || r.authorization == Some(format!("Bearer {alice_token}"))),
        "{alices:?}"
    );

    // Bob as a caller: the service's token is not his; he gets his own.
    let before = tokens.requests().len();
    squash(&["-u", &BOB.creds()]);
    let asked = new_requests(before);
    assert_eq!(
        asked.len(),
        1,
        "the service's cached token served a caller: {asked:?}"
    );
    assert_ne!(asked[0].token.as_deref(), Some(service_token.as_str()));

    let log = server.log.lock().unwrap().clone();
    for secret in [BOB.password, &BOB.basic(), &service_token] {
        assert!(!log.contains(secret), "a secret in the log: {log}");
    }
}

/// `strata squash` without credentials of its own reads `$DOCKER_CONFIG/config.json`, as docker does;
/// a file given with `--registry-auth-file` takes its place.
#[test]
fn the_cli_reads_the_docker_config() {
    let _env = env();
    let registry = basic_registry();
    push_private(
        &registry,
        "cli-auth-layout",
        vec![Layer::new().file("f", 0o600, b"private")],
        "private/cli",
    );
    let alice = User {
        actions: &[],
        ..ALICE
    };
    let dir = scratch(&format!("cli-auth-{}", rand_suffix()));
    let docker_config = dir.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    auth_file(&docker_config, &registry.addr, &alice, true);
    let empty = dir.join("empty-home");
    std::fs::create_dir_all(&empty).unwrap();
    let out = dir.join("out.tar");
    let squash = |envs: &[(&str, &Path)], extra: &[&str]| {
        let mut cmd = strata();
        cmd.args([
            "squash",
            "--no-cache",
            "--insecure-registry",
            &registry.addr,
        ])
        .arg(format!("{}/private/cli:v1", registry.addr))
        .arg("-o")
        .arg(&out)
        .args(extra)
        .env_remove("DOCKER_CONFIG")
        .env("HOME", &empty);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    let none = squash(&[], &[]);
    assert!(!none.status.success());
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(stderr.contains("UNAUTHORIZED"), "{stderr}");

    let from_config = squash(&[("DOCKER_CONFIG", &docker_config)], &[]);
    assert!(
        from_config.status.success(),
        "{}",
        String::from_utf8_lossy(&from_config.stderr)
    );
    let listing = listing(std::fs::File::open(&out).unwrap());
    assert!(
        listing.keys().any(|k| k.ends_with("layer.tar")),
        "a docker archive: {listing:?}"
    );

    let file = docker_config.join("config.json");
    let flag = squash(&[], &["--registry-auth-file", file.to_str().unwrap()]);
    assert!(
        flag.status.success(),
        "{}",
        String::from_utf8_lossy(&flag.stderr)
    );
}
