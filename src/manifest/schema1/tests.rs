use super::*;

fn id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// A v1 JSON for entry `n` whose parent is entry `parent`.
fn v1(n: u8, parent: Option<u8>, extra: Value) -> String {
    let mut v = json!({
        "id": id(n),
        "created": format!("2016-01-0{}T00:00:00Z", n + 1),
        "container_config": {"Cmd": ["/bin/sh", "-c", format!("step {n}")]},
        "docker_version": "1.13.1",
        "os": "linux",
        "architecture": "amd64",
    });
    if let Some(p) = parent {
        v["parent"] = json!(id(p));
    }
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

fn blob(n: u8) -> String {
    format!("sha256:{}", format!("{n:x}").repeat(64))
}

/// A manifest of (blob, v1) entries, newest first, as in the format.
fn manifest(entries: &[(String, String)]) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 1, "name": "r", "tag": "t", "architecture": "amd64",
        "fsLayers": entries.iter().map(|(b, _)| json!({"blobSum": b})).collect::<Vec<_>>(),
        "history": entries.iter().map(|(_, v)| json!({"v1Compatibility": v})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn message(bytes: &[u8]) -> String {
    parse(bytes).unwrap_err().to_string()
}

#[test]
fn layers_bottom_first_without_throwaways_and_config_from_the_newest() {
    let top = json!({
        "throwaway": true,
        "config": {"Cmd": ["run"], "Env": ["A=1"]},
        "author": "someone",
        "Size": 12,
        "layer_id": "x",
        "custom": "kept, as docker keeps what it does not know",
    });
    let m = manifest(&[
        (blob(1), v1(3, Some(2), top)),
        (blob(2), v1(2, Some(1), json!({}))),
        (blob(1), v1(1, Some(0), json!({"throwaway": true}))),
        (blob(2), v1(0, None, json!({}))),
    ]);
    let image = parse(&m).unwrap();
    let layers: Vec<String> = image.layers.iter().map(|l| l.digest.to_string()).collect();
    // The same blob may repeat; throwaway entries make no layer.
    assert_eq!(layers, [blob(2), blob(2)]);
    assert!(image
        .layers
        .iter()
        .all(|l| l.size == SIZE_UNKNOWN && l.compression == Compression::Detect));
    let c = &image.config;
    assert_eq!(c["config"], json!({"Cmd": ["run"], "Env": ["A=1"]}));
    assert_eq!(c["created"], "2016-01-04T00:00:00Z");
    assert_eq!(c["custom"], "kept, as docker keeps what it does not know");
    for dropped in ["id", "parent", "Size", "layer_id", "throwaway"] {
        assert!(c.get(dropped).is_none(), "{dropped}: {c}");
    }
    assert_eq!(c["rootfs"], json!({"type": "layers"}));
    assert_eq!(
        c["history"],
        json!([
            {"created": "2016-01-01T00:00:00Z", "created_by": "/bin/sh -c step 0"},
            {"created": "2016-01-02T00:00:00Z", "created_by": "/bin/sh -c step 1", "empty_layer": true},
            {"created": "2016-01-03T00:00:00Z", "created_by": "/bin/sh -c step 2"},
            {"created": "2016-01-04T00:00:00Z", "created_by": "/bin/sh -c step 3", "author": "someone", "empty_layer": true},
        ])
    );
}

#[test]
fn an_entry_repeating_the_one_below_is_dropped() {
    let m = manifest(&[
        (blob(3), v1(1, Some(0), json!({}))),
        (blob(3), v1(1, Some(0), json!({}))),
        (blob(2), v1(0, None, json!({}))),
    ]);
    let image = parse(&m).unwrap();
    assert_eq!(image.layers.len(), 2, "{:?}", image.layers);
    assert_eq!(image.config["history"].as_array().unwrap().len(), 2);
}

#[test]
fn old_docker_versions_keep_only_the_v1_image_fields() {
    for (version, kept) in [
        ("1.8.2", false),
        ("", false),
        ("1.8.3", true),
        ("1.10.0", true),
    ] {
        let m = manifest(&[(
            blob(1),
            v1(
                0,
                None,
                json!({"docker_version": version, "custom": 1, "created": null}),
            ),
        )]);
        let c = parse(&m).unwrap().config;
        assert_eq!(c.get("custom").is_some(), kept, "{version}: {c}");
        if !kept {
            assert_eq!(c["created"], ZERO_TIME, "{version}");
            assert_eq!(c["os"], "linux");
        }
    }
}

#[test]
fn what_docker_refuses_is_refused_with_its_reason() {
    let good_base = (blob(1), v1(0, None, json!({})));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"nope".to_vec(), "not JSON"),
        (b"[]".to_vec(), "not a JSON object"),
        (manifest(&[]), "no fsLayers"),
        (
            serde_json::to_vec(
                &json!({"schemaVersion": 1, "fsLayers": [{"blobSum": blob(1)}], "history": []}),
            )
            .unwrap(),
            "1 fsLayers but 0 history",
        ),
        (
            manifest(&[(blob(1), v1(0, Some(9), json!({})))]),
            "invalid parent ID in the base layer",
        ),
        (
            manifest(&[(blob(2), v1(1, Some(5), json!({}))), good_base.clone()]),
            "invalid parent ID: expected",
        ),
        (
            manifest(&[
                (blob(1), v1(0, Some(1), json!({}))),
                (blob(2), v1(1, Some(0), json!({}))),
                good_base.clone(),
            ]),
            "appears multiple times",
        ),
        (
            manifest(&[(blob(1), v1(0, None, json!({"id": "ABC"})))]),
            "invalid image ID",
        ),
        (manifest(&[(blob(1), "[1]".into())]), "not a JSON object"),
        (
            manifest(&[(blob(1), v1(0, None, json!({"throwaway": "yes"})))]),
            "`throwaway` is not a boolean",
        ),
        (
            manifest(&[("md5:00".into(), v1(0, None, json!({})))]),
            "could not validate layer digest",
        ),
        (
            manifest(&[(
                blob(1),
                v1(0, None, json!({"container_config": {"Cmd": "sh"}})),
            )]),
            "Cmd is not a list",
        ),
    ];
    for (bytes, fragment) in cases {
        let m = message(&bytes);
        assert!(m.contains(fragment), "{fragment:?} in {m:?}");
    }
}

#[test]
fn sha512_blob_sums_are_layers_too() {
    let d = format!("sha512:{}", "a".repeat(128));
    let m = manifest(&[(d.clone(), v1(0, None, json!({})))]);
    assert_eq!(parse(&m).unwrap().layers[0].digest.to_string(), d);
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// libtrust's layout: the payload up to its last member, `"signatures": […]`, then the tail.
fn signed(payload: &[u8], protected: &[Value]) -> Vec<u8> {
    let close = payload.iter().rposition(|&b| b == b'}').unwrap();
    let length = payload[..close]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap()
        + 1;
    let signatures: Vec<Value> = protected
        .iter()
        .map(|p| {
            let mut p = p.clone();
            // A header with a time only is a good one: it gets the real format.
            if p.get("time").is_some() {
                p["formatLength"] = json!(length);
                p["formatTail"] = json!(b64(&payload[length..]));
            }
            json!({"header": {"alg": "ES256"}, "signature": "c2ln", "protected": b64(p.to_string().as_bytes())})
        })
        .collect();
    let mut out = payload[..length].to_vec();
    out.extend_from_slice(b",\n   \"signatures\": ");
    out.extend_from_slice(&serde_json::to_vec(&signatures).unwrap());
    out.extend_from_slice(b"\n}");
    out
}

#[test]
fn the_signed_payload_is_the_manifest_without_its_signatures() {
    let payload = manifest(&[(blob(1), v1(0, None, json!({})))]);
    let time = json!({"time": "2016-01-01T00:00:00Z"});
    let bytes = signed(&payload, &[time.clone(), time.clone()]);
    assert_ne!(bytes, payload);
    assert_eq!(signed_payload(&bytes).unwrap().unwrap(), payload);
    // Not signed, or not schema 1: no payload of its own.
    assert!(signed_payload(&payload).unwrap().is_none());
    assert!(signed_payload(br#"{"schemaVersion":2,"signatures":[]}"#)
        .unwrap()
        .is_none());
    for (protected, fragment) in [
        (vec![], "is empty"),
        (
            vec![time.clone(), json!({"formatLength": 3, "formatTail": "fQ"})],
            "disagree",
        ),
        (
            vec![json!({"formatLength": 1_000_000, "formatTail": "fQ"})],
            "past the manifest's end",
        ),
        (vec![json!({"formatTail": "fQ"})], "no formatLength"),
    ] {
        let e = signed_payload(&signed(&payload, &protected)).unwrap_err();
        assert!(e.to_string().contains(fragment), "{fragment}: {e}");
    }
}

#[test]
fn docker_version_comparison_is_mobys() {
    for (v, before) in [
        ("1.8.2", true),
        ("1.8.3", false),
        ("1.13.1", false),
        ("1.8", true),
        ("", true),
        ("1.8.3-rc1", true),
        ("20.10.24", false),
    ] {
        assert_eq!(
            docker_version_before(v, NO_FALLBACK_MIN_VERSION),
            before,
            "{v}"
        );
    }
}
