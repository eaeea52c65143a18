//! The tarball store's rules, on a directory store.

use super::*;
use futures::StreamExt;

fn chunks(sizes: &[usize]) -> ByteStream {
    let mut n = 0u8;
    let items: Vec<io::Result<Bytes>> = sizes
        .iter()
        .map(|&s| {
            let c: Vec<u8> = (0..s)
                .map(|_| {
                    n = n.wrapping_add(1);
                    n
                })
                .collect();
            Ok(Bytes::from(c))
        })
        .collect();
    Box::pin(futures::stream::iter(items))
}

async fn collect(s: ByteStream) -> Vec<u8> {
    s.map(|c| c.unwrap().to_vec()).concat().await
}

#[tokio::test]
async fn window_cuts_across_chunks() {
    let whole = collect(chunks(&[3, 5, 1, 7])).await;
    for (a, b) in [(0, 16), (2, 9), (3, 8), (8, 9), (15, 16), (0, 1), (4, 4)] {
        let got = collect(window(chunks(&[3, 5, 1, 7]), a..b)).await;
        assert_eq!(got, whole[a as usize..b as usize], "{a}..{b}");
    }
}

#[test]
fn descriptor_roots_the_tarball_for_gc() {
    let d = Digest::of(b"tarball");
    let bytes = descriptor(&d, 7, None);
    let refs = crate::store::repo::references(&Digest::of(&bytes), &bytes).unwrap();
    assert_eq!(refs.blobs, vec![d]);
}

fn publish(store: &Store, key: &ArtifactKey, bytes: &[u8], expected: u64) {
    let tee = Tee {
        store: store.clone(),
        key: key.clone(),
        expected: Some(expected),
        etag: Some("made-with".into()),
        max_bytes: None,
        metrics: Arc::default(),
        leases: None,
        converting: None,
    };
    let mut w = tee.writer().unwrap();
    w.write_all(bytes).unwrap();
    tee.publish(Some(w), bytes.len() as u64);
}

/// Makes every blob look older than any grace period: only references keep them from GC then.
fn age(root: &std::path::Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let mut pending = vec![root.join("blobs")];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(old).unwrap();
            }
        }
    }
}

#[test]
fn published_tarballs_are_found_kept_by_gc_and_missed_once_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let key = squash_key(&Digest::of(b"m"), None, "r/x");
    publish(&store, &key, b"1234", 5);
    assert!(
        lookup(&store, &key).unwrap().is_none(),
        "a short output was stored"
    );
    publish(&store, &key, b"12345", 5);
    let found = lookup(&store, &key).unwrap().expect("stored");
    assert_eq!((found.digest, found.size), (Digest::of(b"12345"), 5));
    assert_eq!(
        found.etag.as_deref(),
        Some("made-with"),
        "the validator kept"
    );
    age(dir.path());
    let report = store.gc(std::time::Duration::ZERO).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.referenced, 2, "the descriptor and the tarball");
    store.evict(0).unwrap();
    assert!(lookup(&store, &key).unwrap().is_none());
}

/// A tarball read since another was stored outlives it under the bound, descriptor included.
#[test]
fn reading_a_tarball_makes_it_and_its_descriptor_recent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let tick = || std::thread::sleep(std::time::Duration::from_millis(30));
    let (a, b) = (
        squash_key(&Digest::of(b"a"), None, "r/a"),
        squash_key(&Digest::of(b"b"), None, "r/b"),
    );
    publish(&store, &a, &[1; 1000], 1000);
    tick();
    publish(&store, &b, &[2; 1000], 1000);
    tick();
    let found = lookup(&store, &a).unwrap().unwrap();
    drop(open(&store, &found, None).unwrap());
    let descriptor = store.stat_blob(&found.descriptor).unwrap().unwrap().size;
    store.evict(1000 + descriptor).unwrap();
    assert!(
        lookup(&store, &a).unwrap().is_some(),
        "the one read was evicted"
    );
    assert!(lookup(&store, &b).unwrap().is_none());
}

#[test]
fn keys_separate_what_changes_the_bytes() {
    let m = Digest::of(b"m");
    let base = squash_key(&m, Some("a:b"), "r/x");
    assert_ne!(base, squash_key(&m, None, "r/x"));
    assert_ne!(base, squash_key(&m, Some("a:c"), "r/x"));
    assert_ne!(base, squash_key(&m, Some("a:b"), "s/x"));
    assert_ne!(base, squash_key(&Digest::of(b"n"), Some("a:b"), "r/x"));
}
