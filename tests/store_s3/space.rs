//! Eviction and GC on object storage. The server stamps `Last-Modified` in whole seconds and no
//! age can be set, so "least recent" and "old" are made by waiting: a second between writes that
//! must order, the grace period and GC's one-second slack (plus the truncation) before a sweep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;

/// Past the next whole second: what is written after it is stamped later than what came before.
fn next_second() {
    std::thread::sleep(Duration::from_millis(1200));
}

const GRACE: Duration = Duration::from_secs(2);

/// Until what was written before is older than `GRACE`, the slack and the truncation.
fn past_grace() {
    std::thread::sleep(GRACE + Duration::from_millis(2500));
}

fn present(store: &Store, d: &Digest) -> bool {
    store.stat_blob(d).unwrap().is_some()
}

#[test]
fn eviction_removes_least_recent_and_keeps_leased() {
    let (_backend, store) = store("evict");
    let mut blobs = Vec::new();
    for i in 0..5u8 {
        if i > 0 {
            next_second();
        }
        blobs.push(store.put_blob(&[i; 100]).unwrap().digest); // blobs[0] least recent
    }
    let reader = store.open_blob(&blobs[0], None).unwrap();
    let report = store.evict(250).unwrap();
    assert_eq!(report.removed, blobs[1..4].to_vec());
    assert_eq!(report.bytes, 200);
    next_second();
    drop(reader);
    assert!(present(&store, &blobs[0]) && present(&store, &blobs[4]));
    // The reader's end counted as an access (a marker, stamped now): blobs[0] is the most recent.
    assert_eq!(store.evict(100).unwrap().removed, [blobs[4].clone()]);
    assert!(present(&store, &blobs[0]));
}

#[test]
fn gc_removes_exactly_unreferenced_old_blobs() {
    let (_backend, store) = store("gc");
    let put = |b: &[u8]| store.put_blob(b).unwrap().digest;
    let (cfg, layer, orphan, leased) = (put(b"cfg"), put(b"layer"), put(b"orphan"), put(b"leased"));
    let (child_cfg, derived_cfg) = (put(b"child cfg"), put(b"derived cfg"));
    let linked = store
        .put_manifest("r", &manifest(&cfg, &[&layer]))
        .unwrap()
        .digest;
    let child = put(&manifest(&child_cfg, &[]));
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": child.to_string(), "size": 1}]});
    let index = store
        .put_manifest("r", &serde_json::to_vec(&index).unwrap())
        .unwrap()
        .digest;
    let derived = put(&manifest(&derived_cfg, &[]));
    store
        .put_derived(&ArtifactKey::new(Digest::of(b"src"), "aci"), &derived)
        .unwrap();
    past_grace();
    let young = put(b"young");
    let everything = [
        &cfg,
        &layer,
        &orphan,
        &young,
        &leased,
        &child_cfg,
        &derived_cfg,
        &linked,
        &child,
        &index,
        &derived,
    ];
    let lease = store.lease(&leased).unwrap().unwrap();
    let before = store.stat_blob(&linked).unwrap().unwrap().modified;
    let report = store.gc(GRACE).unwrap();
    assert_eq!(
        store.stat_blob(&linked).unwrap().unwrap().modified,
        before,
        "mark touched a manifest"
    );
    assert_eq!(report.removed, std::slice::from_ref(&orphan));
    assert_eq!((report.spared, report.referenced), (2, 8));
    for d in everything.iter().filter(|d| ***d != orphan) {
        assert!(present(&store, d), "{d} removed");
    }
    drop(lease);
    // Unlinked, the manifest and its blobs go once old, with the lease's blob and (old by now)
    // the young one; what the index and the derived record name stays.
    store.delete_manifest("r", &linked).unwrap();
    past_grace();
    let mut removed = store.gc(GRACE).unwrap().removed;
    removed.sort();
    let mut expected = vec![cfg, layer, linked, leased, young];
    expected.sort();
    assert_eq!(removed, expected);
    for d in [&child_cfg, &derived_cfg, &child, &index, &derived] {
        assert!(present(&store, d), "{d} removed");
    }
}

/// A writer re-publishing blobs that exist, unreferenced and old, then linking a manifest to them,
/// while GC sweeps in a loop with no grace: every linked manifest must keep all its blobs.
#[test]
fn gc_racing_writers_never_loses_a_published_blob() {
    for round in 0..2 {
        let (backend, store) = store(&format!("gc-race-{round}"));
        let contents: Vec<Vec<u8>> = (0..24u32)
            .map(|i| format!("{round} blob {i}").into_bytes())
            .collect();
        for c in &contents {
            store.put_blob(c).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2200));
        let stop = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut passes = 0;
                while !stop.load(Ordering::Relaxed) {
                    store.gc(Duration::ZERO).unwrap();
                    passes += 1;
                }
                passes
            })
        };
        // Pairs (config, layer) re-written, then linked; odd blobs stay unreferenced.
        for (i, pair) in contents.chunks(4).enumerate() {
            let cfg = store.put_blob(&pair[0]).unwrap();
            let layer = store.put_blob(&pair[2]).unwrap();
            let m = manifest(&cfg.digest, &[&layer.digest]);
            let published = store.put_manifest("race", &m).unwrap();
            store
                .set_tag("race", &format!("t{i}"), &published.digest)
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let passes = sweeper.join().unwrap();
        store.gc(Duration::ZERO).unwrap();
        for tag in store.tags("race", None, None).unwrap() {
            let m = store.tag("race", &tag).unwrap().unwrap();
            let bytes = read_all(&store, &m, None);
            for d in strata::store::repo::references(&m, &bytes).unwrap().all() {
                assert!(
                    present(&store, d),
                    "round {round}: {d} of {tag} lost ({passes} passes)"
                );
            }
        }
        // The odd blobs were old and unreferenced: by now every one is gone.
        assert_eq!(
            backend.list("blobs/").unwrap().len(),
            6 * 3,
            "round {round}"
        );
    }
}

#[test]
fn eviction_of_a_layer_makes_its_manifest_incomplete() {
    let (_backend, store) = store("incomplete");
    let layer = store.put_blob(&[1; 1000]).unwrap().digest;
    next_second();
    let cfg = store.put_blob(b"cfg").unwrap().digest;
    let m = store
        .put_manifest("r", &manifest(&cfg, &[&layer]))
        .unwrap()
        .digest;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": m.to_string(), "size": 1}]});
    let index = store
        .put_blob(&serde_json::to_vec(&index).unwrap())
        .unwrap()
        .digest;
    assert!(store.complete(&m).unwrap() && store.complete(&index).unwrap());
    assert_eq!(store.evict(500).unwrap().removed, [layer]);
    assert!(
        !store.complete(&m).unwrap(),
        "a manifest without its layer is served"
    );
    assert!(
        !store.complete(&index).unwrap(),
        "an index without a child's layer is served"
    );
}

#[test]
fn delete_unlinks_untags_forgets_and_gc_then_collects() {
    let (_backend, store) = store("delete");
    let put = |b: &[u8]| store.put_blob(b).unwrap().digest;
    let (cfg, layer, kept_cfg) = (put(b"cfg"), put(b"layer"), put(b"kept cfg"));
    let oci = store
        .put_manifest("squash/a", &manifest(&cfg, &[&layer]))
        .unwrap()
        .digest;
    store.set_tag("squash/a", "1", &oci).unwrap();
    let key = ArtifactKey::new(Digest::of(b"source"), "squash-image");
    store.put_derived(&key, &oci).unwrap();
    let kept = store
        .put_manifest("squash/b", &manifest(&kept_cfg, &[]))
        .unwrap()
        .digest;
    assert!(
        !store.delete_image("squash/b", &oci).unwrap(),
        "not in that repository"
    );
    assert!(store.delete_image("squash/a", &oci).unwrap());
    assert!(!store.has_manifest("squash/a", &oci).unwrap());
    assert!(store.tags("squash/a", None, None).unwrap().is_empty());
    assert_eq!(store.derived(&key).unwrap(), None);
    assert_eq!(store.repositories(None, None).unwrap(), ["squash/b"]);
    // Within the grace period nothing goes.
    assert!(store
        .gc(Duration::from_secs(60))
        .unwrap()
        .removed
        .is_empty());
    past_grace();
    let mut removed = store.gc(GRACE).unwrap().removed;
    removed.sort();
    let mut want = vec![cfg, layer, oci];
    want.sort();
    assert_eq!(removed, want);
    assert!(store.has_manifest("squash/b", &kept).unwrap());
    assert!(store.complete(&kept).unwrap());
}
