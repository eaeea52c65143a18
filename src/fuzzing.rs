//! The bodies of the fuzz targets (`fuzz/fuzz_targets/`), here so that the regression test
//! (`tests/fuzz_regressions.rs`) runs the very same code over the committed corpus and crash files.
//! Each takes arbitrary bytes, drives one parser of untrusted input the way the service does, and
//! panics when an invariant breaks; an error for bad input is fine, a panic never is.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::entry::{self, Item};
use crate::format::docker_archive::DockerArchive;
use crate::limits::{Budget, Guard, Limits};
use crate::manifest::{self, Platform};
use crate::merge::{merge_tar, LayerHints, Merger, TarSink};
use crate::reference::{Reference, DOCKER_HUB};
use crate::server::routes;
use crate::summary;

/// References, request paths, queries and platforms, as a request names them. A reference that
/// parses prints (canonically) as one that parses back to the same reference.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = routes::route(s);
    let _ = routes::query(Some(s));
    let _ = Platform::parse(s);
    for default in [DOCKER_HUB, "localhost:5000"] {
        let Ok(r) = Reference::parse(s, default) else {
            continue;
        };
        let canonical = r.to_string();
        let again = Reference::parse(&canonical, default)
            .unwrap_or_else(|e| panic!("{s:?} parses, its canonical form {canonical:?} not: {e}"));
        assert_eq!(again, r, "{s:?} → {canonical:?}");
        let _ = (r.api_host(), r.manifest_ref(), r.name());
        if default == DOCKER_HUB {
            let familiar = r.familiar();
            let f = Reference::parse(&familiar, default).unwrap_or_else(|e| {
                panic!("{s:?} parses, its familiar form {familiar:?} not: {e}")
            });
            assert_eq!(
                (&f.registry, &f.repository),
                (&r.registry, &r.repository),
                "{s:?} → {familiar:?}"
            );
        }
    }
}

/// Registry JSON: the same bytes read as a manifest endpoint's answer (index or not), as an image
/// manifest, as an image config, and as a schema 1 manifest.
pub fn manifest(data: &[u8]) {
    let r = Reference::parse("fuzz/manifest", DOCKER_HUB).expect("a valid reference");
    let limits = Limits::default();
    for platform in ["linux/amd64", "linux/arm64/v8"] {
        let platform = Platform::parse(platform).expect("a valid platform");
        if let Ok(Some(digest)) = manifest::choose_from_index(&r, data, "", &platform) {
            let _ = digest.len();
        }
    }
    let _ = manifest::choose_from_index(
        &r,
        data,
        "application/vnd.oci.image.index.v1+json",
        &Platform::default(),
    );
    let layers = match manifest::parse_image_manifest(&r, data, &limits) {
        Ok(m) => {
            assert!(m.layers.len() as u64 <= limits.max_layers);
            assert!(m.config_size <= limits.max_config_bytes);
            m.layers.len()
        }
        Err(_) => 1,
    };
    if let Ok((config, _platform)) = manifest::parse_config(&r, data, layers) {
        assert!(config.is_object());
    }
    // As a schema 1 manifest: its signed payload (never longer than the bytes and their tail), and
    // the image docker would make of it.
    let payload = manifest::schema1::signed_payload(data).ok().flatten();
    if let Ok(image) = manifest::schema1::parse(payload.as_deref().unwrap_or(data)) {
        assert!(image.config.is_object());
    }
}

/// Layer count and lengths in front of the layers' bytes: `n = data[0] % 4 + 1` layers, bottom
/// first; each but the last preceded by its length (u16, little endian), the last taking the rest.
pub fn split_layers(data: &[u8]) -> Vec<&[u8]> {
    let Some((&first, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let n = first % 4 + 1;
    let mut layers = Vec::new();
    for _ in 1..n {
        if rest.len() < 2 {
            break;
        }
        let len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        layers.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    layers.push(rest);
    layers
}

/// The inverse of [`split_layers`], to write seeds.
pub fn join_layers(layers: &[&[u8]]) -> Vec<u8> {
    assert!((1..=4).contains(&layers.len()));
    let mut out = vec![layers.len() as u8 - 1];
    for (i, l) in layers.iter().enumerate() {
        if i + 1 < layers.len() {
            out.extend_from_slice(&(l.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(l);
    }
    out
}

const LAYER_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Uncompressed layers (see [`split_layers`]) through the synchronous path of a conversion: the
/// limits guard, the sizing scan, then the merge into the docker archive. A set of layers that sizes
/// must merge, to exactly the announced size, into an archive whose layer is a tar with clean paths,
/// no whiteouts, each path once, and every hardlink after its target. Returns whether the layers made
/// an image.
pub fn merge(data: &[u8]) -> bool {
    let layers = split_layers(data);
    if layers.is_empty() {
        return false;
    }
    let limits = Limits::default();
    let budget = Arc::new(Budget::default());
    let summaries: Result<Vec<Vec<Item>>, _> = layers
        .iter()
        .map(|l| summary::scan(Guard::new(*l, limits, budget.clone())))
        .collect();
    let Ok(summaries) = summaries else {
        return false;
    };
    let refs: Vec<&[Item]> = summaries.iter().map(|s| &s[..]).collect();
    let Ok(layer_size) = summary::merged_size(&refs) else {
        return false;
    };

    let mut merged = Vec::new();
    let mut sink = TarSink(&mut merged);
    let mut merger = Merger::new();
    let budget = Arc::new(Budget::default());
    for (depth, (layer, items)) in layers.iter().zip(&refs).rev().enumerate() {
        merger.begin_layer(depth as u32, LayerHints::from_items(items));
        if let Err(e) = merge_tar(
            &mut merger,
            Guard::new(*layer, limits, budget.clone()),
            &mut sink,
        ) {
            panic!("layer {depth} from the top sized but does not merge: {e}");
        }
    }
    if let Err(e) = merger.finish(&mut sink) {
        panic!("the layers sized but their merge does not finish: {e}");
    }
    entry::write_end(&mut sink.0).expect("writes to memory");
    assert_eq!(
        merged.len() as u64,
        layer_size,
        "the merge is not the size the sizing pass announced"
    );

    let archive = DockerArchive::new(
        LAYER_ID.to_string(),
        layer_size,
        serde_json::json!({"os": "linux", "architecture": "amd64"}),
        Some("fuzz:latest".to_string()),
        "fuzz".to_string(),
    );
    let mut out = Vec::new();
    archive.write_head(&mut out).expect("writes to memory");
    out.extend_from_slice(&merged);
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&merged)));
    archive
        .write_tail(&mut out, &diff_id)
        .expect("writes to memory");
    assert_eq!(out.len() as u64, archive.total_len(), "announced length");
    check_archive(&out, &merged);
    check_layer(&merged);
    true
}

/// The docker archive reads as a tar whose first member is the layer.
fn check_archive(archive: &[u8], layer: &[u8]) {
    let mut tar = tar::Archive::new(archive);
    let mut members = tar.entries().expect("the archive reads");
    let mut first = members.next().expect("a first member").expect("it reads");
    assert_eq!(
        &*first.path_bytes(),
        format!("{LAYER_ID}/layer.tar").as_bytes()
    );
    let mut content = Vec::new();
    first.read_to_end(&mut content).expect("the layer reads");
    assert!(content == layer, "the layer member holds the merge");
    drop(first);
    for m in members {
        let mut m = m.expect("a member reads");
        io::copy(&mut m, &mut io::sink()).expect("its content reads");
    }
}

fn clean(path: &[u8]) -> bool {
    !path.is_empty()
        && !path.starts_with(b"/")
        && !path.contains(&0)
        && path
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// The merged layer: what any extractor can apply without surprises.
fn check_layer(layer: &[u8]) {
    let mut tar = tar::Archive::new(layer);
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut files: HashSet<Vec<u8>> = HashSet::new();
    for e in tar.entries().expect("the merged layer reads") {
        let mut e = e.expect("a merged entry reads");
        let path = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&path).into_owned();
        assert!(clean(&path), "unclean path {shown:?}");
        let name = entry::split_parent(&path).1;
        assert!(
            !name.starts_with(b".wh."),
            "whiteout {shown:?} in the output"
        );
        assert!(seen.insert(path.clone()), "{shown:?} twice");
        let kind = e.header().entry_type();
        if kind == tar::EntryType::Link {
            let target = e
                .link_name_bytes()
                .expect("a link has a target")
                .into_owned();
            assert!(
                files.contains(&target),
                "link {shown:?} before its target {:?}",
                String::from_utf8_lossy(&target)
            );
        } else if !kind.is_dir() {
            files.insert(path);
        }
        io::copy(&mut e, &mut io::sink()).expect("its content reads");
    }
}
