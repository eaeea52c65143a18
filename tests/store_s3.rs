//! The store on S3-compatible object storage: the scenarios of `src/store/tests.rs` through the
//! public API, against the real server `scripts/test.sh` starts (moto, `STRATA_TEST_S3` and the
//! `AWS_*` environment). Each test keeps to a prefix of its own in the one bucket. Ages cannot be
//! set on S3 (the server stamps `Last-Modified`), so `space.rs` waits real seconds instead.

#[path = "store_s3/space.rs"]
mod space;

use std::io::{Read, Write};
use std::ops::Range;
use std::process::Command;
use std::sync::Arc;

use strata::digest::{Digest, SIZE_UNKNOWN};
use strata::store::backend::Backend;
use strata::store::s3::{S3Backend, S3Url, PART_SIZE};
use strata::store::{ArtifactKey, Location, Store, StoreError};

/// A store under a fresh prefix, and its backend for looking at the objects themselves.
pub fn store(name: &str) -> (Arc<S3Backend>, Store) {
    let url = fresh_url(name);
    let backend = Arc::new(S3Backend::open(&url).unwrap());
    (backend.clone(), Store::with_backend(backend))
}

pub fn fresh_url(name: &str) -> S3Url {
    let base = std::env::var("STRATA_TEST_S3").expect(
        "no S3 server (STRATA_TEST_S3 is unset): run the integration tests with scripts/test.sh",
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let text = format!("{base}/{name}-{}-{nanos:x}", std::process::id());
    match Location::parse(&text).unwrap() {
        Location::S3(url) => url,
        other => panic!("{text} parsed as {other:?}"),
    }
}

/// Multipart uploads begun under the store's prefix and neither completed nor aborted, as the
/// server lists them (`ListMultipartUploads`; moto does not check signatures, so curl asks).
pub fn pending_uploads(url: &S3Url) -> usize {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let out = Command::new("curl")
        .args([
            "-fsS",
            &format!("{endpoint}/{}?uploads&prefix={}", url.bucket, url.prefix),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .matches("<Upload>")
        .count()
}

pub fn read_all(store: &Store, d: &Digest, range: Option<Range<u64>>) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open_blob(d, range)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub fn manifest(config: &Digest, layers: &[&Digest]) -> Vec<u8> {
    let d = |d: &Digest| serde_json::json!({"mediaType": "x", "digest": d.to_string(), "size": 1});
    let m = serde_json::json!({
        "schemaVersion": 2,
        "config": d(config),
        "layers": layers.iter().map(|l| d(l)).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&m).unwrap()
}

/// Bytes that differ from part to part, so a part sent twice or out of order shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect()
}

fn write_in_chunks(w: &mut impl Write, data: &[u8], chunk: usize) {
    for c in data.chunks(chunk) {
        w.write_all(c).unwrap();
    }
}

#[test]
fn publish_read_range_stat_in_one_put_and_in_parts() {
    let (backend, store) = store("publish");
    // One PutObject (under a part), and a multipart upload: two whole parts and a short last one.
    for (before, len) in [100_000, 2 * PART_SIZE + 1_234_567].into_iter().enumerate() {
        let data = pattern(len, len as u32);
        let d = Digest::of(&data);
        let mut w = store
            .blob_writer(Some((d.clone(), data.len() as u64)))
            .unwrap();
        write_in_chunks(&mut w, &data, 100_003);
        assert!(
            store.stat_blob(&d).unwrap().is_none(),
            "visible before finish"
        );
        assert_eq!(backend.list("blobs/").unwrap().len(), before);
        let p = w.finish().unwrap();
        assert!(p.created);
        assert_eq!((p.digest.clone(), p.size), (d.clone(), len as u64));
        drop(p);
        assert_eq!(store.stat_blob(&d).unwrap().unwrap().size, len as u64);
        assert_eq!(read_all(&store, &d, None), data);
        let len = len as u64;
        for r in [10..20, len - 10..len, 0..len, 5..5] {
            assert_eq!(
                read_all(&store, &d, Some(r.clone())),
                &data[r.start as usize..r.end as usize]
            );
        }
        let border = PART_SIZE as u64;
        if len > border {
            let r = border - 3..border + 3;
            assert_eq!(
                read_all(&store, &d, Some(r.clone())),
                &data[r.start as usize..r.end as usize]
            );
        }
        let r = store.open_blob(&d, Some(5..5)).unwrap();
        assert_eq!((r.size, r.range.clone()), (len, 5..5));
        for bad in [len - 10..len + 1, Range { start: 20, end: 10 }] {
            assert!(matches!(
                store.open_blob(&d, Some(bad)),
                Err(StoreError::Range { .. })
            ));
        }
    }
    // The staging object of the multipart upload went once copied into place.
    assert_eq!(backend.list("uploads/").unwrap(), Vec::<String>::new());
    assert!(matches!(
        store.open_blob(&Digest::of(b"absent"), None),
        Err(StoreError::BlobUnknown(_))
    ));
    let p = store.put_blob(b"conversion output").unwrap();
    assert_eq!(p.digest, Digest::of(b"conversion output"));
}

#[test]
fn digest_or_size_mismatch_leaves_nothing() {
    let (backend, store) = store("mismatch");
    let big = pattern(PART_SIZE + 10, 7);
    let cases: [(Digest, u64, &[u8]); 5] = [
        (Digest::of(b"other"), 5, b"hello"), // wrong digest
        (Digest::of(b"hello"), 4, b"hello"), // more bytes than announced
        (Digest::of(b"hello"), 6, b"hello"), // fewer
        (Digest::of(b"hellO"), SIZE_UNKNOWN, b"hello"),
        (Digest::of(b"other"), big.len() as u64, &big), // wrong digest, after a part was sent
    ];
    for (expected, size, data) in cases {
        let mut w = store.blob_writer(Some((expected.clone(), size))).unwrap();
        let result = w
            .write_all(data)
            .map_err(|_| ())
            .and_then(|_| w.finish().map(drop).map_err(|_| ()));
        assert!(result.is_err(), "{expected} {size} accepted");
        assert!(store.stat_blob(&expected).unwrap().is_none());
        assert!(store.stat_blob(&Digest::of(data)).unwrap().is_none());
    }
    assert_eq!(backend.list("blobs/").unwrap(), Vec::<String>::new());
    assert_eq!(backend.list("uploads/").unwrap(), Vec::<String>::new());
    assert_eq!(pending_uploads(backend.url()), 0);
}

#[test]
fn dropped_writer_leaves_nothing_and_stale_uploads_are_cleaned() {
    let (backend, store) = store("dropped");
    let url = backend.url().clone();
    let mut w = store.blob_writer(None).unwrap();
    w.write_all(&[7; 50_000]).unwrap();
    drop(w);
    // Two parts sent and a third begun: a multipart upload in progress, aborted by the drop.
    let mut w = store.blob_writer(None).unwrap();
    write_in_chunks(&mut w, &pattern(2 * PART_SIZE + 99, 3), 1 << 20);
    assert_eq!(pending_uploads(&url), 1, "the test saw no multipart upload");
    drop(w);
    assert_eq!(pending_uploads(&url), 0, "a dropped writer left its parts");
    assert!(backend.list("blobs/").unwrap().is_empty());
    assert!(backend.list("uploads/").unwrap().is_empty());
    // A crash after completing a staging object leaves it: an old one goes, a live one stays.
    let put = |key: &str| {
        let mut up = backend.upload().unwrap();
        up.write_all(b"staged").unwrap();
        up.replace(key).unwrap();
    };
    put("uploads/crashed");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    put("uploads/live");
    assert_eq!(
        backend
            .remove_stale_uploads(std::time::Duration::from_secs(2))
            .unwrap(),
        1
    );
    assert_eq!(backend.list("uploads/").unwrap(), ["uploads/live"]);
}

#[test]
fn concurrent_writers_of_one_digest_make_one_copy() {
    let (backend, store) = store("concurrent");
    let write = |data: &[u8], d: &Digest| -> bool {
        let mut w = store
            .blob_writer(Some((d.clone(), data.len() as u64)))
            .unwrap();
        write_in_chunks(&mut w, data, 65_536);
        w.finish().unwrap().created
    };
    // One PutObject each, then staged uploads copied into place: both creates are conditional.
    for (len, one_winner) in [(300_000, true), (PART_SIZE + 4096, false)] {
        let data = pattern(len, 11);
        let d = Digest::of(&data);
        let created: Vec<bool> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..6).map(|_| s.spawn(|| write(&data, &d))).collect();
            writers.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let winners = created.iter().filter(|c| **c).count();
        // moto checks a CompleteMultipartUpload's If-None-Match before it assembles the parts,
        // not in one step with the write, so racing completions there may both succeed (seen: 2
        // of 6, in one run of 4); AWS answers the losers 412. Its PutObject checks and writes at
        // once. Either way the bytes are the same verified ones, and one object holds them.
        if one_winner {
            assert_eq!(winners, 1, "{len}: {created:?}");
        } else {
            assert!(winners >= 1, "{len}: {created:?}");
        }
        // A writer after the race is refused by the server itself.
        assert!(!write(&data, &d), "{len}: the create was not conditional");
        assert_eq!(read_all(&store, &d, None), data);
    }
    assert_eq!(backend.list("blobs/").unwrap().len(), 2);
    assert!(backend.list("uploads/").unwrap().is_empty());
    assert_eq!(pending_uploads(backend.url()), 0);
}

#[test]
fn publish_order_is_enforced_and_tags_move() {
    let (_backend, store) = store("order");
    let layer = store.put_blob(b"layer").unwrap();
    let config = Digest::of(b"config");
    let m = manifest(&config, &[&layer.digest]);
    assert!(
        matches!(store.put_manifest("ns/app", &m), Err(StoreError::MissingBlob { missing, .. }) if missing == config)
    );
    assert!(store.stat_blob(&Digest::of(&m)).unwrap().is_none());
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
    store.set_tag("ns/app", "1.0", &m1).unwrap();
    assert_eq!(store.tag("ns/app", "1.0").unwrap(), Some(m1.clone()));
    store.set_tag("ns/app", "1.0", &m2).unwrap();
    assert_eq!(store.tag("ns/app", "1.0").unwrap(), Some(m2.clone()));
    assert_eq!(store.tag("ns/app", "2.0").unwrap(), None);
    store.set_tag("ns/app", "old", &m1).unwrap();
    assert!(store.delete_manifest("ns/app", &m2).unwrap());
    assert!(
        !store.delete_manifest("ns/app", &m2).unwrap(),
        "deleted twice"
    );
    assert_eq!(store.tags("ns/app", None, None).unwrap(), ["old"]);
    assert!(!store.has_manifest("ns/app", &m2).unwrap());
    assert!(store.has_manifest("ns/app", &m1).unwrap());
}

#[test]
fn tags_repositories_derived_and_blob_scopes_list_as_on_disk() {
    let (_backend, store) = store("listing");
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
    assert_eq!(
        store.tags("a/b", Some("V1"), Some(2)).unwrap(),
        ["_x", "latest"]
    );
    assert!(
        store.tags("a", None, None).unwrap().is_empty(),
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

    let key =
        ArtifactKey::new(Digest::of(b"source"), "docker-archive").option("platform", "linux/amd64");
    assert_eq!(store.derived(&key).unwrap(), None);
    store.put_derived(&key, &d).unwrap();
    assert_eq!(store.derived(&key).unwrap(), Some(d.clone()));
    assert!(store.delete_derived(&key).unwrap());
    assert_eq!(store.derived(&key).unwrap(), None);

    let layer = store.put_blob(b"private layer").unwrap();
    store
        .put_manifest("private/app", &manifest(&cfg.digest, &[&layer.digest]))
        .unwrap();
    assert!(store
        .repository_has_blob("private/app", &layer.digest)
        .unwrap());
    assert!(!store.repository_has_blob("a/b", &layer.digest).unwrap());
    assert!(!store.repository_has_blob("private", &layer.digest).unwrap());
}

#[test]
fn an_unreachable_bucket_fails_at_open() {
    let url = S3Url::parse("s3://strata-no-such-bucket/x")
        .unwrap()
        .unwrap();
    let err = match Store::open(&Location::S3(url)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a store on a missing bucket opened"),
    };
    assert!(
        err.contains("bucket strata-no-such-bucket") && err.contains("NoSuchBucket"),
        "{err}"
    );
    for bad in ["s3://", "s3:///x", "s3://b/../x", "s3://b/a//c"] {
        assert!(Location::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        Location::parse("s3://b/p/q/").unwrap(),
        Location::S3(S3Url {
            bucket: "b".into(),
            prefix: "p/q/".into()
        })
    );
}
