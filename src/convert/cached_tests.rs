//! The tarball store's rules, on a directory store.

use super::*;
use crate::convert::tee::Tee;
use futures::StreamExt;
use std::io::Write;

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
    let parts: Vec<_> = [&b"head"[..], b"layer", b"tail"]
        .iter()
        .map(|p| (Digest::of(p), p.len() as u64))
        .collect();
    let bytes = descriptor(&parts, None);
    let refs = crate::store::repo::references(&Digest::of(&bytes), &bytes).unwrap();
    assert_eq!(
        refs.blobs,
        parts.into_iter().map(|(d, _)| d).collect::<Vec<_>>()
    );
}

fn publish(store: &Store, key: &ArtifactKey, bytes: &[u8], expected: u64) {
    let tee = Tee::for_test(store, key, Some(expected), Some("made-with".into()));
    let thread = tee.start().unwrap();
    assert!(thread.feed(Bytes::copy_from_slice(bytes)));
    tee.publish(thread.finish(), bytes.len() as u64);
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
    assert_eq!(found.parts, vec![(Digest::of(b"12345"), 5)]);
    assert_eq!(found.size, 5);
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

/// A squash's layer member is stored as a part of its own, named by the digest its tap computed (not
/// hashed again), whatever the chunks' boundaries; the parts read back as the bytes sent, whole and
/// in ranges across them.
#[test]
fn a_tapped_range_is_stored_as_a_part_named_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let key = squash_key(&Digest::of(b"m"), None, "r/x");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (head, layer) = (100_003, 2_500_000);
    let tee = Tee::for_test(&store, &key, Some(data.len() as u64), None);
    let (tx, mut rx) = mpsc::channel(1024);
    let mut out = super::super::body::ChannelWriter::new(tx);
    out.set_tee(tee.start());
    out.write_all(&data[..head]).unwrap();
    out.flush().unwrap();
    out.tap_next_sha256(layer as u64);
    for piece in data[head..head + layer].chunks(77_777) {
        out.write_all(piece).unwrap();
    }
    let tapped = String::from_utf8(out.finish_tap().unwrap()).unwrap();
    assert_eq!(tapped, Digest::of(&data[head..head + layer]).to_string());
    out.write_all(&data[head + layer..]).unwrap();
    out.flush().unwrap();
    let parts = out.take_tee();
    tee.publish(parts, data.len() as u64);
    let mut sent = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        sent.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(sent, data);

    let found = lookup(&store, &key).unwrap().expect("stored");
    let expected: Vec<_> = [
        &data[..head],
        &data[head..head + layer],
        &data[head + layer..],
    ]
    .iter()
    .map(|p| (Digest::of(p), p.len() as u64))
    .collect();
    assert_eq!(found.parts, expected);
    for range in [
        0..data.len() as u64,
        5..head as u64 + 1,
        2_000_000..2_900_000,
        2_999_999..3_000_000,
    ] {
        let (mut reader, _) = open(&store, &found, Some(range.clone())).unwrap();
        let mut back = Vec::new();
        reader.read_to_end(&mut back).unwrap();
        assert_eq!(reader.len, range.end - range.start);
        assert!(
            back == data[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
}
