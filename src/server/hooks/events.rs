//! Registries' push notifications, read into the pushes they announce. Three shapes: distribution's
//! envelope (`docker-registry`'s `notifications:` endpoints, one event per pushed blob or manifest),
//! Harbor's webhook (`PUSH_ARTIFACT`, one resource per tag) and Quay's `repo_push` (a list of
//! updated tags). Pure: what the notification says, not yet whether strata may act on it.

use serde::Deserialize;
use serde_json::Value;

use crate::format::image::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::manifest::schema1::{SIGNED_MEDIA_TYPE, UNSIGNED_MEDIA_TYPE};

/// A tag pushed to `host`'s `repository`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The registry as the pusher named it (`host[:port]`).
    pub host: String,
    pub repository: String,
    pub tag: String,
    /// The manifest pushed, when the notification says: a repeat of the same push is the same job.
    pub digest: Option<String>,
}

/// One notification's item: a push to act on, or why it is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Push(Push),
    Ignored(String),
}

/// What a manifest push names in `target.mediaType`; everything else (blobs are
/// `application/octet-stream`, or a layer's type) is no image to convert.
const MANIFEST_TYPES: [&str; 6] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    SIGNED_MEDIA_TYPE,
    UNSIGNED_MEDIA_TYPE,
];

#[derive(Deserialize, Default)]
#[serde(default)]
struct Envelope {
    events: Vec<Event>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Event {
    action: String,
    target: Target,
    request: RequestRecord,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Target {
    media_type: String,
    digest: String,
    repository: String,
    tag: String,
    url: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestRecord {
    host: String,
}

/// The items of a notification body, or why it is not one strata reads.
pub fn parse(body: &[u8]) -> Result<Vec<Item>, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON notification: {e}"))?;
    if doc.get("events").is_some_and(Value::is_array) {
        let envelope: Envelope = serde_json::from_value(doc)
            .map_err(|e| format!("not a distribution notification envelope: {e}"))?;
        return Ok(envelope.events.into_iter().map(distribution).collect());
    }
    if doc.get("event_data").is_some() && doc.get("type").is_some() {
        return Ok(harbor(&doc));
    }
    if doc.get("updated_tags").is_some() {
        return Ok(quay(&doc));
    }
    Err(
        "unknown notification: expected distribution's {\"events\":[…]}, Harbor's \
         {\"type\":…,\"event_data\":…} or Quay's repo_push {\"updated_tags\":…}"
            .into(),
    )
}

/// The authority of an absolute `scheme://host[:port]/…` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let host = rest.split(['/', '?', '#']).next()?;
    // Credentials in a URL are not the registry's name.
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    (!host.is_empty()).then_some(host)
}

fn distribution(e: Event) -> Item {
    let t = e.target;
    if e.action != "push" {
        return Item::Ignored(format!("action {:?}: only pushes are converted", e.action));
    }
    if !MANIFEST_TYPES.contains(&t.media_type.as_str()) {
        return Item::Ignored(format!(
            "a blob push ({:?} is no manifest type)",
            t.media_type
        ));
    }
    if t.tag.is_empty() {
        return Item::Ignored(format!(
            "{}@{}: pushed by digest, no tag to convert",
            t.repository, t.digest
        ));
    }
    // The URL names the registry as it calls itself (its `http.host`, when set); the request's
    // Host header as the pusher called it, which is all a registry with relative URLs gives.
    let host = url_host(&t.url).unwrap_or(&e.request.host);
    push(host, &t.repository, &t.tag, Some(t.digest))
}

fn push(host: &str, repository: &str, tag: &str, digest: Option<String>) -> Item {
    if host.is_empty() {
        return Item::Ignored(format!(
            "{repository}:{tag}: the notification names no registry host"
        ));
    }
    if repository.is_empty() {
        return Item::Ignored("the notification names no repository".into());
    }
    Item::Push(Push {
        host: host.to_string(),
        repository: repository.to_string(),
        tag: tag.to_string(),
        digest: digest.filter(|d| !d.is_empty()),
    })
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Harbor 2's `PUSH_ARTIFACT` (1.x called it `pushImage`): `resource_url` is
/// `host/project/repo:tag`, the repository `repo_full_name`.
fn harbor(doc: &Value) -> Vec<Item> {
    let kind = text(doc, "type");
    if kind != "PUSH_ARTIFACT" && kind != "pushImage" {
        return vec![Item::Ignored(format!(
            "Harbor event {kind:?}: only pushes are converted"
        ))];
    }
    let data = &doc["event_data"];
    let repository = text(&data["repository"], "repo_full_name");
    let resources = data["resources"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if resources.is_empty() {
        return vec![Item::Ignored("Harbor event without resources".into())];
    }
    resources
        .iter()
        .map(|r| {
            let tag = text(r, "tag");
            if tag.is_empty() {
                return Item::Ignored(format!("{repository}: pushed by digest, no tag to convert"));
            }
            let host = text(r, "resource_url").split('/').next().unwrap_or("");
            let digest = Some(text(r, "digest").to_string());
            push(host, repository, tag, digest)
        })
        .collect()
}

/// Quay's `repo_push`: `docker_url` is `host/namespace/repo`; no digest.
fn quay(doc: &Value) -> Vec<Item> {
    let repository = text(doc, "repository");
    let host = text(doc, "docker_url").split('/').next().unwrap_or("");
    let tags = doc["updated_tags"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if tags.is_empty() {
        return vec![Item::Ignored(format!("{repository}: no updated tags"))];
    }
    tags.iter()
        .map(|t| match t.as_str() {
            Some(tag) if !tag.is_empty() => push(host, repository, tag, None),
            _ => Item::Ignored(format!("{repository}: an updated tag that is no string")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(host: &str, repository: &str, tag: &str, digest: Option<&str>) -> Item {
        Item::Push(Push {
            host: host.into(),
            repository: repository.into(),
            tag: tag.into(),
            digest: digest.map(str::to_string),
        })
    }

    fn ignored(items: &[Item]) -> bool {
        items.iter().all(|i| matches!(i, Item::Ignored(_)))
    }

    #[test]
    fn distribution_envelope() {
        let d = format!("sha256:{}", "a".repeat(64));
        let event = |action: &str, media: &str, tag: &str, url: &str| {
            serde_json::json!({
                "id": "x", "timestamp": "2024-01-01T00:00:00Z", "action": action,
                "target": {"mediaType": media, "size": 7, "digest": d, "length": 7,
                           "repository": "ns/app", "url": url, "tag": tag},
                "request": {"id": "r", "addr": "10.0.0.1:4444", "host": "reg.local:5000",
                            "method": "PUT", "useragent": "skopeo"},
                "actor": {}, "source": {"addr": "box:5000", "instanceID": "i"}
            })
        };
        let url = format!("http://registry.example.com/v2/ns/app/manifests/{d}");
        let body = serde_json::json!({"events": [
            event("push", OCI_MANIFEST, "1.0", &url),
            // Relative URLs (`http.relativeurls`): the Host header names the registry.
            event("push", DOCKER_LIST, "2.0", &format!("/v2/ns/app/manifests/{d}")),
            event("pull", OCI_MANIFEST, "1.0", &url),
            event("push", "application/octet-stream", "", &url),
            event("push", OCI_MANIFEST, "", &url),
            event("delete", "", "1.0", ""),
        ]});
        let items = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            items[0],
            pushed("registry.example.com", "ns/app", "1.0", Some(&d))
        );
        assert_eq!(
            items[1],
            pushed("reg.local:5000", "ns/app", "2.0", Some(&d))
        );
        assert!(ignored(&items[2..]), "{items:?}");
        assert_eq!(items.len(), 6);
        let Item::Ignored(why) = &items[4] else {
            unreachable!()
        };
        assert!(why.contains("by digest"), "{why}");
    }

    #[test]
    fn harbor_and_quay() {
        let harbor = serde_json::json!({
            "type": "PUSH_ARTIFACT", "occur_at": 1, "operator": "admin",
            "event_data": {
                "resources": [
                    {"digest": "sha256:b", "tag": "v1", "resource_url": "harbor.example.com/lib/app:v1"},
                    {"digest": "sha256:b", "tag": "", "resource_url": "harbor.example.com/lib/app@sha256:b"}
                ],
                "repository": {"name": "app", "namespace": "lib", "repo_full_name": "lib/app",
                               "repo_type": "private"}
            }
        });
        let items = parse(harbor.to_string().as_bytes()).unwrap();
        assert_eq!(
            items[0],
            pushed("harbor.example.com", "lib/app", "v1", Some("sha256:b"))
        );
        assert!(ignored(&items[1..]));
        let pulled = serde_json::json!({"type": "PULL_ARTIFACT", "event_data": {}});
        assert!(ignored(&parse(pulled.to_string().as_bytes()).unwrap()));

        let quay = serde_json::json!({
            "name": "repository", "repository": "ns/app", "namespace": "ns",
            "docker_url": "quay.io/ns/app", "homepage": "https://quay.io/repository/ns/app",
            "updated_tags": ["latest", "1.0"]
        });
        assert_eq!(
            parse(quay.to_string().as_bytes()).unwrap(),
            vec![
                pushed("quay.io", "ns/app", "latest", None),
                pushed("quay.io", "ns/app", "1.0", None)
            ]
        );
    }

    #[test]
    fn not_notifications() {
        assert!(parse(b"nonsense").is_err());
        assert!(parse(b"{\"hello\":1}").is_err());
        assert!(parse(b"{\"events\":[{\"target\":7}]}").is_err());
        assert_eq!(parse(b"{\"events\":[]}").unwrap(), vec![]);
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("https://r.io:5000/v2/x"), Some("r.io:5000"));
        assert_eq!(url_host("http://u:p@r.io/v2/x"), Some("r.io"));
        assert_eq!(url_host("/v2/x"), None);
        assert_eq!(url_host("http:///v2"), None);
    }
}
