//! Signatures the way rkt asks for them: first, `202`, the ACI, again; verified with gpg and sqv.

use super::*;

/// rkt's order: signature (202), the ACI, the signature again, which must now exist and verify the
/// bytes as downloaded; the public key as `/aci-signing-key` serves it.
#[test]
fn signature_flow_as_rkt_does_it() {
    let env = env();
    // An image of its own, so no other test has made its signature yet.
    publish(
        &env,
        "aci-signed",
        vec![Image::new(vec![(
            Layer::new().file("signed", 0o644, b"signed content"),
            Comp::Gzip,
        )])],
    );
    let s = aci_server(&env);
    let asc_url = aci_url(&s.server, "fixtures/aci-signed", "v1", "aci.asc", "amd64");
    let (status, headers, _) = curl(&[&asc_url]);
    assert_eq!(status, 202, "signature before any download");
    assert!(header_value(&headers, "retry-after").is_some());

    let aci = download(&aci_url(
        &s.server,
        "fixtures/aci-signed",
        "v1",
        "aci",
        "amd64",
    ));
    let (status, headers, sig) = curl(&[&asc_url]);
    assert_eq!(status, 200, "signature right after the download");
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/pgp-signature")
    );
    assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
    let sig_file = aci.with_extension("aci.asc");
    std::fs::write(&sig_file, &sig).unwrap();

    // The key as served equals the one keygen wrote, and is one rkt trusts: its verifier takes RSA
    // and DSA primary keys only (an ECDSA one fails `rkt trust`).
    let (status, _, served_key) = curl(&[&format!("{}/aci-signing-key", s.server.url)]);
    assert_eq!(status, 200);
    assert_eq!(served_key, std::fs::read(&s.public_key).unwrap());
    let key_packets = String::from_utf8_lossy(&run(Command::new("gpg")
        .args(["--batch", "--list-packets"])
        .arg(&s.public_key)))
    .into_owned();
    let primary = key_packets
        .split(":public key packet:")
        .nth(1)
        .and_then(|p| p.lines().nth(1))
        .unwrap_or_else(|| panic!("{key_packets}"));
    assert!(primary.contains("algo 1,"), "not an RSA key: {primary}");

    assert!(gpg_verifies(&s.public_key, &sig_file, &aci), "gpg --verify");
    assert!(sqv_verifies(&s.public_key, &sig_file, &aci), "sqv");

    // A v4 signature (rkt verifies no other) over SHA-256.
    let packets = String::from_utf8_lossy(&run(Command::new("gpg")
        .args(["--batch", "--list-packets"])
        .arg(&sig_file)))
    .into_owned();
    assert!(packets.contains("version 4"), "{packets}");
    assert!(packets.contains("digest algo 8"), "{packets}");

    // The bytes are deterministic: a second download is identical, so the kept signature fits it.
    let again = download(&aci_url(
        &s.server,
        "fixtures/aci-signed",
        "v1",
        "aci",
        "amd64",
    ));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&aci).unwrap());
    let (_, _, sig_again) = curl(&[&asc_url]);
    assert_eq!(sig_again, sig, "the first signature is the one kept");

    // And it is a real check: one flipped byte fails both verifiers.
    let mut bytes = std::fs::read(&aci).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 1;
    let tampered = aci.with_extension("tampered");
    std::fs::write(&tampered, bytes).unwrap();
    assert!(!gpg_verifies(&s.public_key, &sig_file, &tampered));
    assert!(!sqv_verifies(&s.public_key, &sig_file, &tampered));
}

/// A signature asked for twice before any download: the first 202 starts a conversion, so the
/// signature comes to exist without the ACI being fetched here (it may be fetched from another
/// instance behind the same load balancer).
#[test]
fn a_pending_signature_is_made_in_the_background() {
    let env = env();
    publish(
        &env,
        "aci-background",
        vec![Image::new(vec![(
            Layer::new().file("bg", 0o644, b"background"),
            Comp::Gzip,
        )])],
    );
    let s = aci_server(&env);
    let asc_url = aci_url(
        &s.server,
        "fixtures/aci-background",
        "v1",
        "aci.asc",
        "amd64",
    );
    let (status, _, _) = curl(&[&asc_url]);
    assert_eq!(status, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let sig = loop {
        let (status, _, body) = curl(&[&asc_url]);
        if status == 200 {
            break body;
        }
        assert_eq!(status, 202);
        assert!(
            std::time::Instant::now() < deadline,
            "no signature after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let sig_file = scratch("aci-bg").join("sig.asc");
    std::fs::write(&sig_file, sig).unwrap();
    let aci = download(&aci_url(
        &s.server,
        "fixtures/aci-background",
        "v1",
        "aci",
        "amd64",
    ));
    assert!(gpg_verifies(&s.public_key, &sig_file, &aci));
}

/// A registry cutting a blob after the ACI has started: curl sees a failed transfer, the partial file
/// is no valid ACI, no signature is kept for bytes never sent whole, and the next request is whole.
#[test]
fn a_registry_failing_mid_aci_aborts_and_signs_nothing() {
    let env = env();
    let keys = aci_server(&env);
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(
        &proxy.addr,
        &[
            "--default-registry",
            &proxy.addr,
            "--public-name",
            PUBLIC_NAME,
            "--signing-key",
            keys.key.to_str().unwrap(),
        ],
    );
    let image = Image::new(vec![
        (
            Layer::new().file("bottom", 0o644, &noise(4 << 20, 7)),
            Comp::Gzip,
        ),
        (Layer::new().file("top", 0o644, b"top"), Comp::Gzip),
    ]);
    publish(&env, "aci-upstream-dies", vec![image]);
    let bottom = &layer_digests(&env.registry, "fixtures/aci-upstream-dies", "v1")[0][7..];
    // The squash route remembers the layers' summaries (so the ACI starts at once) but signs nothing.
    let (status, _, _) = curl(&[&format!(
        "{}/squash/fixtures/aci-upstream-dies:v1",
        server.url
    )]);
    assert_eq!(status, 200);

    // Past the bytes a response holds back before it starts.
    proxy.rule(bottom, Fault::Truncate(3 << 20), Some(1));
    let url = aci_url(&server, "fixtures/aci-upstream-dies", "v1", "aci", "amd64");
    let partial = scratch("aci-partial").join("partial.aci");
    let out = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&partial)
        .args(["-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "failure after the first byte"
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "curl must see a failed transfer"
    );
    let validate = Command::new("actool")
        .arg("validate")
        .arg(&partial)
        .output()
        .unwrap();
    assert!(!validate.status.success(), "actool took a broken transfer");

    let asc = aci_url(
        &server,
        "fixtures/aci-upstream-dies",
        "v1",
        "aci.asc",
        "amd64",
    );
    let (status, _, _) = curl(&[&asc]);
    assert_eq!(status, 202, "no signature for a transfer that failed");
    let whole = download(&url);
    actool_validate(&whole);
    let (status, _, sig) = curl(&[&asc]);
    assert_eq!(status, 200);
    let sig_file = whole.with_extension("aci.asc");
    std::fs::write(&sig_file, sig).unwrap();
    assert!(gpg_verifies(&keys.public_key, &sig_file, &whole));
}
