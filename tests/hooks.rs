//! Convert on push: a real registry's notifications (distribution's `notifications:` endpoint) reach
//! `POST /hooks/registry`, the pushed tag is converted into the store before anyone pulls it, and
//! `docker pull` of its squash is served from the store. Also: the token is checked before anything
//! is read, what is no tag push is left alone, and a burst of notifications converts each tag once.

mod common;

use std::time::{Duration, Instant};

use common::registry::Registry;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "hook-secret-0123456789";
/// How long a small image's conversion may take on a busy two-core machine.
const CONVERSION_TIMEOUT: Duration = Duration::from_secs(120);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn host_port(url: &str) -> &str {
    url.strip_prefix("http://").unwrap()
}

fn count(server: &Server, needle: &str) -> usize {
    server.log.lock().unwrap().matches(needle).count()
}

/// Waits until the server logged `needle` `n` times.
fn wait_logged(server: &Server, needle: &str, n: usize) {
    let deadline = Instant::now() + CONVERSION_TIMEOUT;
    while count(server, needle) < n {
        assert!(
            Instant::now() < deadline,
            "strata logged {needle:?} {} times, not {n}, within {CONVERSION_TIMEOUT:?}",
            count(server, needle)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// POSTs `body` to the hook; (status, headers, JSON body).
fn post(server: &Server, authorization: Option<&str>, body: &Value) -> (u16, String, Value) {
    let body = body.to_string();
    let auth = authorization.map(|a| format!("Authorization: {a}"));
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/vnd.docker.distribution.events.v1+json",
        "--data-binary",
        &body,
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a]);
    }
    let url = format!("{}/hooks/registry", server.url);
    args.push(&url);
    let (status, headers, body) = curl(&args);
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, headers, v)
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A distribution notification event, as `docker-registry` sends it.
fn event(action: &str, media_type: &str, host: &str, repo: &str, tag: &str, digest: &str) -> Value {
    let mut target = json!({
        "mediaType": media_type, "size": 500, "digest": digest, "length": 500, "repository": repo,
        "url": format!("http://{host}/v2/{repo}/manifests/{digest}"),
    });
    if !tag.is_empty() {
        target["tag"] = json!(tag);
    }
    json!({
        "id": "5c1c0f6a-0000-4000-8000-000000000000", "timestamp": "2024-05-06T07:08:09Z",
        "action": action, "target": target,
        "request": {"id": "r", "addr": "127.0.0.1:40000", "host": host, "method": "PUT",
                    "useragent": "skopeo/1.9"},
        "actor": {}, "source": {"addr": "registry:5000", "instanceID": "i"}
    })
}

fn manifest_digest(registry: &str, repo: &str, tag: &str) -> String {
    let (status, headers, _) = curl(&[
        "-I",
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &format!("http://{registry}/v2/{repo}/manifests/{tag}"),
    ]);
    assert_eq!(status, 200);
    header_value(&headers, "docker-content-digest").unwrap()
}

fn outcomes(v: &Value) -> Vec<String> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap().to_string())
        .collect()
}

/// A multi-platform image pushed to a registry that notifies strata is converted (both platforms)
/// before any pull, and the first `docker pull` of its squash converts nothing more.
#[test]
fn push_converts_before_the_first_pull() {
    let dir = scratch("hooks-registry");
    let mut registry = Registry::start(&dir, "", None);
    let server = Server::start_logging(
        &registry.addr,
        &["--default-registry", &registry.addr, "--hook-token", TOKEN],
        "info",
    );
    // The endpoint needs strata's port and strata needs the registry's: the registry is started
    // first, then given its endpoint and restarted on the same port.
    let notifications = format!(
        "notifications:\n  endpoints:\n    - name: strata\n      url: {}/hooks/registry\n      \
         headers:\n        Authorization: [\"Bearer {TOKEN}\"]\n      timeout: 5s\n      \
         threshold: 3\n      backoff: 1s\n",
        server.url
    );
    let config = dir.join("config.yml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&notifications);
    std::fs::write(&config, text).unwrap();
    registry.restart();

    let mut arm = common::images::basic().remove(0);
    arm.arch = "arm64";
    let mut images = common::images::basic();
    images.push(arm);
    let layout = scratch("hooks-layout");
    fixtures::write_layout(&layout, &images, "v1");
    // Blobs, the platforms' manifests by digest, then the index by tag: one event each.
    push(&layout, "v1", &registry.addr, "ns/app", "1.0", "oci");
    wait_logged(&server, "converted on push", 1);
    assert_eq!(count(&server, "stored conversion"), 2, "both platforms");

    let want = oracle(&format!("{}/ns/app:1.0", registry.addr));
    let pulled = format!("{}/squash/ns/app:1.0", host_port(&server.url));
    run(docker().args(["pull", "-q", &pulled]));
    assert_same(&want, &export_listing(&pulled), &pulled);
    let inspect: Value =
        serde_json::from_slice(&run(docker().args(["image", "inspect", &pulled]))).unwrap();
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(),
        1,
        "one squashed layer"
    );
    assert_eq!(inspect[0]["Architecture"], "amd64");
    assert_eq!(
        count(&server, "stored conversion"),
        2,
        "the pull found the conversions stored"
    );
    assert_eq!(count(&server, "converted on push"), 1);
    run(docker().args(["rmi", &pulled]));
}

/// The token is checked before the body is read; pulls, blobs, digest-only pushes and registries
/// strata may not fetch from are answered "ignored"; Quay's and Harbor's shapes convert too.
#[test]
fn only_tag_pushes_with_the_token_are_converted() {
    let env = env();
    let reference = publish(&env, "hooked", common::images::whiteouts());
    let repo = "fixtures/hooked";
    let digest = manifest_digest(&env.registry, repo, "v1");
    let server = Server::start_logging(
        &env.registry,
        &[
            "--hook-token",
            TOKEN,
            "--default-registry",
            &env.registry,
            "--allow-registry",
            "127.0.0.2:5000",
        ],
        "info",
    );
    let pushed =
        json!({"events": [event("push", OCI_MANIFEST, &env.registry, repo, "v1", &digest)]});

    use base64::Engine;
    let wrong_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("hook:not-the-token")
    );
    let wrong_bearer = format!("Bearer {TOKEN}x");
    for auth in [
        None,
        Some(wrong_bearer.as_str()),
        Some(wrong_basic.as_str()),
    ] {
        let (status, headers, body) = post(&server, auth, &pushed);
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(
            header_value(&headers, "www-authenticate").is_some_and(|c| c.starts_with("Bearer")),
            "{headers}"
        );
    }
    let (status, _, _) = curl(&[
        "-H",
        &format!("Authorization: {}", bearer()),
        &format!("{}/hooks/registry", server.url),
    ]);
    assert_eq!(status, 405, "GET");

    let d = &digest;
    let reg = &env.registry;
    let ignored = json!({"events": [
        event("pull", OCI_MANIFEST, reg, repo, "v1", d),
        event("push", "application/octet-stream", reg, repo, "", d),
        event("push", "application/vnd.oci.image.layer.v1.tar+gzip", reg, repo, "", d),
        event("push", OCI_MANIFEST, reg, repo, "", d),
        event("delete", "", reg, repo, "v1", d),
        event("push", OCI_MANIFEST, "elsewhere.example.com:5000", repo, "v1", d),
        event("push", OCI_MANIFEST, "127.0.0.2:5000", repo, "v1", d),
    ]});
    let (status, _, body) = post(&server, Some(&bearer()), &ignored);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["queued"], 0, "{body}");
    assert_eq!(outcomes(&body), vec!["ignored"; 7], "{body}");
    let reasons: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    for (reason, says) in reasons.iter().zip([
        "only pushes",
        "blob",
        "blob",
        "by digest",
        "only pushes",
        "not one this service fetches from",
        "--registry-alias",
    ]) {
        assert!(reason.contains(says), "{reason:?} should say {says:?}");
    }
    // Queuing is logged before the answer leaves: none of the above queued anything.
    assert_eq!(count(&server, "queued conversion on push"), 0);
    assert_eq!(count(&server, "stored conversion"), 0);

    // Quay takes no headers: the token is the password of the hook URL's userinfo.
    let quay = json!({
        "name": "hooked", "repository": repo, "namespace": "fixtures",
        "docker_url": format!("{reg}/{repo}"), "updated_tags": ["v1"]
    });
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("quay:{TOKEN}"))
    );
    let (status, _, body) = post(&server, Some(&basic), &quay);
    assert_eq!(status, 202, "{body}");
    assert_eq!(outcomes(&body), vec!["queued"], "{body}");
    assert_eq!(body["events"][0]["repository"], "squash/fixtures/hooked");
    assert_eq!(body["events"][0]["source"], reference);
    wait_logged(&server, "converted on push", 1);
    assert_eq!(count(&server, "stored conversion"), 1);

    // Harbor's auth header is sent as it is configured.
    let harbor = json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1714979289, "operator": "admin",
        "event_data": {
            "resources": [{"digest": d, "tag": "v1", "resource_url": format!("{reg}/{repo}:v1")}],
            "repository": {"name": "hooked", "namespace": "fixtures", "repo_full_name": repo,
                           "repo_type": "public"}
        }
    });
    let (status, _, body) = post(&server, Some(&bearer()), &harbor);
    assert_eq!(status, 202, "{body}");
    assert_eq!(outcomes(&body), vec!["queued"], "{body}");
    wait_logged(&server, "converted on push", 2);
    assert_eq!(count(&server, "stored conversion"), 1, "stored already");

    let (status, headers, _) = curl(&[
        "-I",
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &format!("{}/v2/squash/{repo}/manifests/v1", server.url),
    ]);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(
        count(&server, "stored conversion"),
        1,
        "served from the store"
    );
}

/// Without `--hook-token` there is no hook: no one may make strata convert on their say.
#[test]
fn no_hook_without_a_token() {
    let env = env();
    let server = Server::start(&env.registry, &[]);
    let (status, _, body) = post(&server, Some(&bearer()), &json!({"events": []}));
    assert_eq!(status, 404, "{body}");
}

/// Twenty notifications for two tags, in one envelope as a registry batches a burst: two jobs,
/// two conversions.
#[test]
fn a_burst_converts_each_tag_once() {
    let env = env();
    let repo = "fixtures/hookburst";
    for (tag, images) in [
        ("a", common::images::basic()),
        ("b", common::images::hardlinks()),
    ] {
        let layout = scratch(&format!("hookburst-{tag}"));
        fixtures::write_layout(&layout, &images, "v1");
        push(&layout, "v1", &env.registry, repo, tag, "oci");
    }
    let digests = [
        manifest_digest(&env.registry, repo, "a"),
        manifest_digest(&env.registry, repo, "b"),
    ];
    let server = Server::start_logging(
        &env.registry,
        &["--hook-token", TOKEN, "--default-registry", &env.registry],
        "info",
    );
    let events: Vec<Value> = (0..20)
        .map(|i| {
            let (tag, digest) = [("a", &digests[0]), ("b", &digests[1])][i % 2];
            event("push", OCI_MANIFEST, &env.registry, repo, tag, digest)
        })
        .collect();
    let (status, _, body) = post(&server, Some(&bearer()), &json!({ "events": events }));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["queued"], 2, "{body}");
    let o = outcomes(&body);
    assert_eq!(o.iter().filter(|o| *o == "queued").count(), 2, "{body}");
    assert_eq!(
        o.iter().filter(|o| *o == "deduplicated").count(),
        18,
        "{body}"
    );
    wait_logged(&server, "converted on push", 2);
    // Anything queued late would be converting by now.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&server, "converted on push"), 2);
    assert_eq!(count(&server, "stored conversion"), 2);
}
