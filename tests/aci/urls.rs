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
