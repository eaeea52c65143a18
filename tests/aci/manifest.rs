//! The manifest strata generates, platform choice, errors before the first byte, CLI bytes.

use super::*;

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
