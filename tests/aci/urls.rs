//! How clients reach the ACI: URLs ending in a file name (what `rkt fetch <URL>` takes) and appc
//! discovery, whose templates yield such URLs.

use super::*;

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
    // File-name URLs, which `rkt fetch` also takes when given by hand.
    let base = format!(
        "{}/c1/aci/{PUBLIC_NAME}/fixtures/basic/v1/aci/linux/{arch}",
        s.server.url
    );
    let endpoint = &found["ACIEndpoints"][0];
    assert_eq!(endpoint["ACI"], format!("{base}/image.aci"), "{text}");
    assert_eq!(endpoint["ASC"], format!("{base}/image.aci.asc"), "{text}");
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
    let sig = file.with_extension("aci.asc");
    download_to(endpoint["ASC"].as_str().unwrap(), &sig);
    assert!(gpg_verifies(&s.public_key, &sig, &file), "gpg --verify");
}

/// The URL forms rkt fetches by hand (`….aci`, and `….aci.asc` for its signature): the same bytes
/// and headers as the route without a file name, the signature with the same `202` first, then one
/// that verifies the bytes as downloaded.
#[test]
fn file_name_urls_serve_the_aci_and_its_signature() {
    let env = env();
    // An image of its own, so no other test has made its signature yet.
    publish(
        &env,
        "aci-file-name",
        vec![Image::new(vec![(
            Layer::new().file("named", 0o644, b"named"),
            Comp::Gzip,
        )])],
    );
    let s = aci_server(&env);
    let dir = aci_url(&s.server, "fixtures/aci-file-name", "v1", "aci", "amd64");
    let aci = format!("{dir}aci-file-name-v1.aci");
    let asc = format!("{aci}.asc");

    // rkt's order: the signature, the ACI, the signature again.
    let (status, headers, body) = curl(&[&asc]);
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    assert!(header_value(&headers, "retry-after").is_some());
    let work = scratch("aci-file-name");
    let named = work.join("named.aci");
    let named_headers = download_to(&aci, &named);
    let plain = work.join("plain.aci");
    let plain_headers = download_to(&dir, &plain);
    assert_eq!(
        std::fs::read(&named).unwrap(),
        std::fs::read(&plain).unwrap()
    );
    let (_, head_named, _) = curl(&["-I", &aci]);
    let (_, head_plain, _) = curl(&["-I", &dir]);
    for name in ["content-type", "etag", "content-disposition"] {
        let plain = header_value(&plain_headers, name);
        assert!(plain.is_some(), "{name}");
        assert_eq!(header_value(&named_headers, name), plain, "GET {name}");
        assert_eq!(header_value(&head_named, name), plain, "HEAD {name}");
        assert_eq!(header_value(&head_plain, name), plain, "HEAD {name}");
    }

    let (status, headers, sig) = curl(&[&asc]);
    assert_eq!(status, 200, "signature after the download");
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/pgp-signature")
    );
    let (_, _, sig_plain) = curl(&[&aci_url(
        &s.server,
        "fixtures/aci-file-name",
        "v1",
        "aci.asc",
        "amd64",
    )]);
    assert_eq!(sig, sig_plain, "one signature, whichever URL asks");
    let sig_file = named.with_extension("aci.asc");
    std::fs::write(&sig_file, &sig).unwrap();
    assert!(
        gpg_verifies(&s.public_key, &sig_file, &named),
        "gpg --verify"
    );
    assert!(sqv_verifies(&s.public_key, &sig_file, &named), "sqv");

    // Only the two endings rkt uses are file names.
    json_error(&format!("{dir}aci-file-name-v1.tar"), 400);
}
