//! Hostile layers, pushed to the real registry: each is refused with a JSON error before the first byte
//! that names the layer and the entry, and the service goes on serving good images.

mod common;

use common::fixtures::{Comp, Image, Layer};
use common::*;

fn base() -> (Layer, Comp) {
    (
        Layer::new()
            .dir("etc", 0o755)
            .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        Comp::Gzip,
    )
}

#[test]
fn hostile_layers_are_refused_before_the_first_byte() {
    let env = env();
    let server = shared_server(&env.registry);
    let cases: Vec<(&str, Layer, &str)> = vec![
        (
            "dotdot",
            Layer::new().raw_name("../escape", tar::EntryType::Regular, 0o644, b"x"),
            "escapes the image root",
        ),
        (
            "dotdot-inside",
            Layer::new().raw_name("etc/../../escape", tar::EntryType::Regular, 0o644, b"x"),
            "escapes the image root",
        ),
        (
            "link-escape",
            Layer::new().raw_link("etc/shadow-link", "../../etc/shadow"),
            "escapes the image root",
        ),
        (
            "whiteout-escape",
            Layer::new().raw_name("etc/.wh...", tar::EntryType::Regular, 0o644, b""),
            "escapes the image root",
        ),
        (
            "bare-whiteout",
            Layer::new().raw_name("etc/.wh.", tar::EntryType::Regular, 0o644, b""),
            "bare whiteout",
        ),
        (
            "nul-in-name",
            Layer::new().pax_file("plain", 0o644, b"x", &[("path", b"etc/a\0b")]),
            "NUL byte",
        ),
        (
            "pax-size-differential",
            // The ustar header says 10 bytes, PAX says 1000: readers would disagree on where the next
            // header starts.
            Layer::new()
                .pax_file("smuggler", 0o644, &[b'a'; 10], &[("size", b"1000")])
                .file("after", 0o644, b"hidden"),
            "PAX size contradicts",
        ),
        (
            "pax-size-zero-field",
            // A zero size field may stand for a PAX size only when that size does not fit the field.
            Layer::new()
                .pax_sized("smuggler", 0, &[b'a'; 10], &[("size", b"10")])
                .file("after", 0o644, b"hidden"),
            "PAX size contradicts",
        ),
        (
            "pax-size-saturated-field",
            Layer::new()
                .pax_sized("smuggler", 0o77777777777, &[b'a'; 10], &[("size", b"10")])
                .file("after", 0o644, b"hidden"),
            "PAX size contradicts",
        ),
        (
            // docker refuses it too: "unhandled tar header type 83".
            "gnu-sparse-type-s",
            Layer::new().gnu_sparse("sparse", 4096, &[(0, b"data")]),
            "GNU sparse entry (type S)",
        ),
        (
            "truncated-mid-entry",
            Layer::new()
                .file("whole", 0o644, b"fine")
                .truncated_file("cut", 10_000, &[b'c'; 700]),
            "",
        ),
    ];
    for (name, layer, fragment) in cases {
        let r = publish(
            &env,
            &format!("hostile-{name}"),
            vec![Image::new(vec![base(), (layer, Comp::Gzip)])],
        );
        let v = json_error(&format!("{}/squash/{r}", server.url), 502);
        let message = v["error"]["message"].as_str().unwrap();
        assert_eq!(v["error"]["code"], "INVALID_IMAGE", "{name}: {v}");
        assert!(
            message.contains("layer sha256:") && message.contains(fragment),
            "{name}: {message}"
        );
    }
    // Still serving: a good image right after.
    let r = publish(&env, "hostile-then-good", vec![Image::new(vec![base()])]);
    let (status, _, body) = curl(&["-f", &format!("{}/squash/{r}", server.url)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// Each limit, with a server whose limit is low (and the PAX one at its default), refuses the image
/// before the first byte with a message naming the flag that raises it. The manifest, config and
/// layer-count limits are met before any layer is fetched; the others while sizing.
#[test]
fn limits_refuse_images_past_them() {
    let env = env();
    let many = (0..20).fold(Layer::new(), |l, i| l.file(&format!("f{i}"), 0o644, b"x"));
    let big_xattr = vec![b'v'; 2 << 20];
    let cases: Vec<(&str, Layer, &[&str], &str)> = vec![
        ("entries", many, &["--max-entries", "10"], "--max-entries"),
        (
            "bomb",
            // 64 MiB of zeros: a blob of a few dozen KiB.
            Layer::new().file("zeros", 0o644, &vec![0u8; 64 << 20]),
            &["--max-image-bytes", "16777216"],
            "--max-image-bytes",
        ),
        (
            "path",
            Layer::new().file(&format!("{}/f", "d".repeat(300)), 0o644, b"x"),
            &["--max-path-bytes", "200"],
            "--max-path-bytes",
        ),
        (
            "pax",
            Layer::new().pax_file("x", 0o644, b"x", &[("SCHILY.xattr.user.big", &big_xattr)]),
            &[],
            "--max-pax-bytes",
        ),
        // The fixture's manifest is some 500 bytes, its config some 300, and it has two layers.
        (
            "manifest",
            Layer::new().file("m", 0o644, b"x"),
            &["--max-manifest-bytes", "200"],
            "the manifest exceeds the limit of 200 (--max-manifest-bytes)",
        ),
        (
            "config",
            Layer::new().file("c", 0o644, b"x"),
            &["--max-config-bytes", "100"],
            "the image config exceeds the limit of 100 (--max-config-bytes)",
        ),
        (
            "layers",
            Layer::new().file("l", 0o644, b"x"),
            &["--max-layers", "1"],
            "2 layers: the layer count exceeds the limit of 1 (--max-layers)",
        ),
    ];
    for (name, layer, flags, fragment) in cases {
        let server = Server::start(&env.registry, flags);
        let r = publish(
            &env,
            &format!("limit-{name}"),
            vec![Image::new(vec![base(), (layer, Comp::Gzip)])],
        );
        let v = json_error(&format!("{}/squash/{r}", server.url), 502);
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(fragment), "{name}: {message}");
        assert_eq!(v["error"]["code"], "INVALID_IMAGE", "{name}: {v}");
    }
}
