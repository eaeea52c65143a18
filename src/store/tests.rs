//! The store's guarantees, on temporary directories.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::digest::SIZE_UNKNOWN;

pub(super) fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    (dir, store)
}

fn read_all(store: &Store, d: &Digest, range: Option<Range<u64>>) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open_blob(d, range)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Sets a blob's access time `secs` into the past, as if written and read that long ago.
pub(super) fn age(root: &Path, d: &Digest, secs: u64) {
    let path = root.join(blob_key(d));
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

pub(super) fn manifest(config: &Digest, layers: &[&Digest]) -> Vec<u8> {
    let d = |d: &Digest| serde_json::json!({"mediaType": "x", "digest": d.to_string(), "size": 1});
    let m = serde_json::json!({
        "schemaVersion": 2,
        "config": d(config),
        "layers": layers.iter().map(|l| d(l)).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&m).unwrap()
}

#[test]
fn publish_read_range_stat() {
    let (_dir, store) = store();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);
    let mut w = store
        .blob_writer(Some((d.clone(), data.len() as u64)))
        .unwrap();
    for chunk in data.chunks(7_777) {
        w.write_all(chunk).unwrap();
    }
    assert!(
        store.stat_blob(&d).unwrap().is_none(),
        "visible before finish"
    );
    let p = w.finish().unwrap();
    assert!(p.created);
    assert_eq!((p.digest.clone(), p.size), (d.clone(), data.len() as u64));
    drop(p);
    assert_eq!(
        store.stat_blob(&d).unwrap().unwrap().size,
        data.len() as u64
    );
    assert_eq!(read_all(&store, &d, None), data);
    assert_eq!(read_all(&store, &d, Some(10..20)), &data[10..20]);
    assert_eq!(read_all(&store, &d, Some(99_990..100_000)), &data[99_990..]);
    let r = store.open_blob(&d, Some(5..5)).unwrap();
    assert_eq!((r.size, r.range.clone()), (100_000, 5..5));
    for bad in [99_990..100_001, Range { start: 20, end: 10 }] {
        assert!(matches!(
            store.open_blob(&d, Some(bad)),
            Err(StoreError::Range { .. })
        ));
    }
    let absent = Digest::of(b"absent");
    assert!(matches!(
        store.open_blob(&absent, None),
        Err(StoreError::BlobUnknown(_))
    ));
    // Without an expected digest the writer names the blob by its sha256.
    let p = store.put_blob(b"conversion output").unwrap();
    assert_eq!(p.digest, Digest::of(b"conversion output"));
}

#[test]
fn runs_of_zeros_are_stored_as_holes_and_read_back_as_zeros() {
    use std::os::unix::fs::MetadataExt;
    let (dir, store) = store();
    let zeros = vec![0u8; 4 << 20];
    // Zeros in the middle, a write of zeros too short to skip, and zeros at the end (the length
    // must still count them).
    let parts: [&[u8]; 5] = [b"head", &zeros, &[0; 100], b"tail", &zeros];
    let data = parts.concat();
    let mut w = store.blob_writer(None).unwrap();
    for part in parts {
        w.write_all(part).unwrap();
    }
    let p = w.finish().unwrap();
    assert_eq!(
        (p.digest.clone(), p.size),
        (Digest::of(&data), data.len() as u64)
    );
    assert_eq!(read_all(&store, &p.digest, None), data);
    let meta = std::fs::metadata(dir.path().join(blob_key(&p.digest))).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated for 8 MiB of zeros",
        meta.blocks() * 512
    );
}

#[test]
fn digest_or_size_mismatch_leaves_nothing() {
    let (dir, store) = store();
    let cases = [
        (Digest::of(b"other"), 5), // wrong digest
        (Digest::of(b"hello"), 4), // more bytes than announced
        (Digest::of(b"hello"), 6), // fewer
        (Digest::of(b"hellO"), SIZE_UNKNOWN),
    ];
    for (expected, size) in cases {
        let mut w = store.blob_writer(Some((expected.clone(), size))).unwrap();
        let result = w
            .write_all(b"hello")
            .map_err(|_| ())
            .and_then(|_| w.finish().map(drop).map_err(|_| ()));
        assert!(result.is_err(), "{expected} {size} accepted");
        assert!(store.stat_blob(&expected).unwrap().is_none());
        assert!(store.stat_blob(&Digest::of(b"hello")).unwrap().is_none());
    }
    assert_eq!(files_in(&dir.path().join("blobs/sha256")), 0);
    assert_eq!(
        files_in(&dir.path().join("tmp")),
        0,
        "upload files left behind"
    );
}

#[test]
fn dropped_writer_leaves_nothing_and_stale_uploads_are_cleaned() {
    let (dir, store) = store();
    let mut w = store.blob_writer(None).unwrap();
    w.write_all(&[7; 50_000]).unwrap();
    assert_eq!(files_in(&dir.path().join("tmp")), 1);
    drop(w);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
    assert!(store.backend.list("blobs/").unwrap().is_empty());
    // A crash leaves its upload file: an old one goes on the next open, a live one stays.
    let tmp = dir.path().join("tmp");
    let stale = File::create(tmp.join("crashed")).unwrap();
    stale
        .set_modified(SystemTime::now() - fs::STALE_UPLOAD_AGE - Duration::from_secs(1))
        .unwrap();
    File::create(tmp.join("live")).unwrap();
    Store::open_dir(dir.path()).unwrap();
    assert!(!tmp.join("crashed").exists() && tmp.join("live").exists());
}

#[test]
fn concurrent_writers_of_one_digest_make_one_copy() {
    let (dir, store) = store();
    let data: Arc<Vec<u8>> = Arc::new((0..300_000u32).map(|i| (i * 7 % 256) as u8).collect());
    let d = Digest::of(&data);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (store, data, d) = (store.clone(), data.clone(), d.clone());
            std::thread::spawn(move || {
                let mut w = store.blob_writer(Some((d, data.len() as u64))).unwrap();
                for chunk in data.chunks(4096) {
                    w.write_all(chunk).unwrap();
                }
                w.finish().unwrap().created
            })
        })
        .collect();
    let created: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    assert_eq!(read_all(&store, &d, None), *data);
    assert_eq!(store.backend.list("blobs/").unwrap().len(), 1);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
}

#[test]
fn publish_order_is_enforced_and_tags_move() {
    let (_dir, store) = store();
    let layer = store.put_blob(b"layer").unwrap();
    let config = Digest::of(b"config");
    let m = manifest(&config, &[&layer.digest]);
    assert!(
        matches!(store.put_manifest("ns/app", &m), Err(StoreError::MissingBlob { missing, .. }) if missing == config)
    );
    assert!(
        store.stat_blob(&Digest::of(&m)).unwrap().is_none(),
        "manifest stored without its blobs"
    );
    let cfg = store.put_blob(b"config").unwrap();
    let m1 = store.put_manifest("ns/app", &m).unwrap().digest;
    let m2 = store
        .put_manifest("ns/app", &manifest(&cfg.digest, &[]))
        .unwrap()
        .digest;
    assert!(matches!(
        store.set_tag("ns/app", "1.0", &Digest::of(b"nope")),
        Err(StoreError::ManifestUnknown { .. })
    ));
    assert!(matches!(
        store.set_tag("other", "1.0", &m1),
        Err(StoreError::ManifestUnknown { .. })
    ));
    store.set_tag("ns/app", "1.0", &m1).unwrap();
    assert_eq!(store.tag("ns/app", "1.0").unwrap(), Some(m1.clone()));
    store.set_tag("ns/app", "1.0", &m2).unwrap();
    assert_eq!(store.tag("ns/app", "1.0").unwrap(), Some(m2.clone()));
    assert_eq!(store.tag("ns/app", "2.0").unwrap(), None);
    assert!(store.has_manifest("ns/app", &m1).unwrap());
    // Deleting a manifest takes its tags with it, and no other.
    store.set_tag("ns/app", "old", &m1).unwrap();
    assert!(store.delete_manifest("ns/app", &m2).unwrap());
    assert_eq!(store.tags("ns/app", None, None).unwrap(), ["old"]);
    assert!(!store.has_manifest("ns/app", &m2).unwrap());
    assert!(matches!(
        store.tag("../x", "1"),
        Err(StoreError::InvalidRepository(_))
    ));
    assert!(matches!(
        store.set_tag("ns/app", "a/b", &m1),
        Err(StoreError::InvalidTag(_))
    ));
}

#[test]
fn tags_and_repositories_list_in_lexical_pages() {
    let (_dir, store) = store();
    let cfg = store.put_blob(b"config").unwrap();
    let m = manifest(&cfg.digest, &[]);
    for repo in ["zz", "a/b", "a", "a/b/c", "m-1"] {
        store.put_manifest(repo, &m).unwrap();
    }
    let d = Digest::of(&m);
    for tag in ["v2", "latest", "v10", "V1", "1.0", "_x"] {
        store.set_tag("a/b", tag, &d).unwrap();
    }
    let all = ["1.0", "V1", "_x", "latest", "v10", "v2"];
    assert_eq!(store.tags("a/b", None, None).unwrap(), all);
    assert_eq!(store.tags("a/b", None, Some(2)).unwrap(), ["1.0", "V1"]);
    assert_eq!(
        store.tags("a/b", Some("V1"), Some(2)).unwrap(),
        ["_x", "latest"]
    );
    assert_eq!(
        store.tags("a/b", Some("v2"), None).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.tags("a", None, None).unwrap(),
        Vec::<String>::new(),
        "a/b's tags seen in a"
    );
    assert_eq!(
        store.repositories(None, None).unwrap(),
        ["a", "a/b", "a/b/c", "m-1", "zz"]
    );
    assert_eq!(
        store.repositories(Some("a/b"), Some(2)).unwrap(),
        ["a/b/c", "m-1"]
    );
}

#[test]
fn derived_keys_record_the_output_manifest() {
    let (_dir, store) = store();
    let key =
        ArtifactKey::new(Digest::of(b"source"), "docker-archive").option("platform", "linux/amd64");
    assert_eq!(store.derived(&key).unwrap(), None);
    assert!(matches!(
        store.put_derived(&key, &Digest::of(b"m")),
        Err(StoreError::BlobUnknown(_))
    ));
    let cfg = store.put_blob(b"config").unwrap();
    let m = store.put_blob(&manifest(&cfg.digest, &[])).unwrap();
    store.put_derived(&key, &m.digest).unwrap();
    assert_eq!(store.derived(&key).unwrap(), Some(m.digest.clone()));
    assert_eq!(
        store
            .derived(&key.clone().option("platform", "linux/arm64"))
            .unwrap(),
        None
    );
    assert!(store.delete_derived(&key).unwrap());
    assert_eq!(store.derived(&key).unwrap(), None);
}

#[test]
fn a_repository_serves_only_the_blobs_its_manifests_name() {
    let (_dir, store) = store();
    let layer = store.put_blob(b"private layer").unwrap();
    let cfg = store.put_blob(b"config").unwrap();
    let m = store
        .put_manifest("private/app", &manifest(&cfg.digest, &[&layer.digest]))
        .unwrap();
    let other = store.put_blob(b"other config").unwrap();
    store
        .put_manifest("public/app", &manifest(&other.digest, &[]))
        .unwrap();
    assert!(store
        .repository_has_blob("private/app", &layer.digest)
        .unwrap());
    assert!(store
        .repository_has_blob("private/app", &cfg.digest)
        .unwrap());
    assert!(!store
        .repository_has_blob("public/app", &layer.digest)
        .unwrap());
    // A repository nested under another does not lend it its blobs, nor the other way round.
    assert!(!store.repository_has_blob("private", &layer.digest).unwrap());
    // Through an index: its children's blobs are the repository's too.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"digest": m.digest.to_string(), "size": 1,
            "mediaType": "application/vnd.oci.image.manifest.v1+json"}],
    }))
    .unwrap();
    store.put_manifest("multi/app", &index).unwrap();
    assert!(store
        .repository_has_blob("multi/app", &layer.digest)
        .unwrap());
}
