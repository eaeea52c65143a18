//! Eviction and GC on temporary directories, with writers and readers running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tests::{age, manifest, store};
use super::*;

#[test]
fn eviction_removes_least_recent_and_keeps_leased() {
    let (dir, store) = store();
    let blobs: Vec<Digest> = (0..5u8)
        .map(|i| store.put_blob(&[i; 100]).unwrap().digest)
        .collect();
    for (i, d) in blobs.iter().enumerate() {
        age(dir.path(), d, 1000 - i as u64 * 100); // blobs[0] least recent
    }
    let reader = store.open_blob(&blobs[0], None).unwrap();
    let report = store.evict(250).unwrap();
    assert_eq!(report.removed, blobs[1..4].to_vec());
    assert_eq!(report.bytes, 200);
    drop(reader);
    assert!(
        store.stat_blob(&blobs[0]).unwrap().is_some()
            && store.stat_blob(&blobs[4]).unwrap().is_some()
    );
    // The reader's end counted as an access: blobs[0] is now the most recent.
    assert_eq!(store.evict(100).unwrap().removed, [blobs[4].clone()]);
}

#[test]
fn gc_removes_exactly_unreferenced_old_blobs() {
    let (dir, store) = store();
    let put = |b: &[u8]| store.put_blob(b).unwrap().digest;
    let (cfg, layer, orphan, young, leased) = (
        put(b"cfg"),
        put(b"layer"),
        put(b"orphan"),
        put(b"young"),
        put(b"leased"),
    );
    let (child_cfg, derived_cfg) = (put(b"child cfg"), put(b"derived cfg"));
    let linked = store
        .put_manifest("r", &manifest(&cfg, &[&layer]))
        .unwrap()
        .digest;
    // An index whose child manifest is a blob only the index names.
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
    for d in everything {
        if *d != young {
            age(dir.path(), d, 7200);
        }
    }
    let lease = store.lease(&leased).unwrap().unwrap();
    let before = store.stat_blob(&linked).unwrap().unwrap().modified;
    let report = store.gc(Duration::from_secs(3600)).unwrap();
    // Reading manifests to mark is not an access: it would make every manifest recent for LRU.
    assert_eq!(
        store.stat_blob(&linked).unwrap().unwrap().modified,
        before,
        "mark touched a manifest"
    );
    assert_eq!(report.removed, std::slice::from_ref(&orphan));
    assert_eq!((report.spared, report.referenced), (2, 8));
    for d in everything.iter().filter(|d| ***d != orphan) {
        assert!(store.stat_blob(d).unwrap().is_some(), "{d} removed");
    }
    drop(lease);
    // Unlinking the manifest frees it and its blobs (once old enough).
    store.delete_manifest("r", &linked).unwrap();
    for d in [&cfg, &layer, &linked, &leased] {
        age(dir.path(), d, 7200);
    }
    let mut removed = store.gc(Duration::from_secs(3600)).unwrap().removed;
    removed.sort();
    let mut expected = vec![cfg, layer, linked, leased];
    expected.sort();
    assert_eq!(removed, expected);
}

/// A writer re-publishing blobs that exist, unreferenced and old, then linking a manifest to them,
/// while GC sweeps in a loop with no grace: every linked manifest must keep all its blobs.
#[test]
fn gc_racing_writers_never_loses_a_published_blob() {
    for round in 0..8 {
        let (dir, store) = store();
        let contents: Vec<Vec<u8>> = (0..40u32)
            .map(|i| format!("{round} blob {i}").into_bytes())
            .collect();
        for c in &contents {
            let d = store.put_blob(c).unwrap().digest;
            age(dir.path(), &d, 7200);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += store.gc(Duration::ZERO).unwrap().removed.len();
                }
                removed
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
        sweeper.join().unwrap();
        let removed = store.gc(Duration::ZERO).unwrap().removed.len();
        for tag in store.tags("race", None, None).unwrap() {
            let m = store.tag("race", &tag).unwrap().unwrap();
            let bytes = store.read_small(&m, repo::MAX_MANIFEST_BYTES).unwrap();
            for d in repo::references(&m, &bytes).unwrap().all() {
                assert!(
                    store.stat_blob(d).unwrap().is_some(),
                    "round {round}: {d} of {tag} lost"
                );
            }
        }
        // The odd blobs were old and unreferenced: by now every one is gone.
        let left = store.backend.list("blobs/").unwrap().len();
        assert_eq!(
            left,
            10 * 3,
            "round {round}: {left} blobs left ({removed} in the last sweep)"
        );
    }
}

#[test]
fn eviction_of_a_layer_makes_its_manifest_incomplete() {
    let (dir, store) = store();
    let cfg = store.put_blob(b"cfg").unwrap().digest;
    let layer = store.put_blob(&[1; 1000]).unwrap().digest;
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
    age(dir.path(), &layer, 100);
    assert_eq!(store.evict(500).unwrap().removed, [layer]);
    assert!(
        !store.complete(&m).unwrap(),
        "a manifest without its layer is served"
    );
    assert!(
        !store.complete(&index).unwrap(),
        "an index without a child's layer is served"
    );
    assert!(!store.complete(&Digest::of(b"absent")).unwrap());
}

#[test]
fn delete_unlinks_untags_forgets_and_gc_then_collects() {
    let (dir, store) = store();
    let put = |b: &[u8]| store.put_blob(b).unwrap().digest;
    let (cfg, layer, kept_cfg) = (put(b"cfg"), put(b"layer"), put(b"kept cfg"));
    let oci = store
        .put_manifest("squash/a", &manifest(&cfg, &[&layer]))
        .unwrap()
        .digest;
    store.set_tag("squash/a", "1", &oci).unwrap();
    let key = ArtifactKey::new(Digest::of(b"source"), "squash-image");
    store.put_derived(&key, &oci).unwrap();
    // Another repository's image stays.
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
    // Within the grace period (and the mtime slack) nothing goes.
    assert!(store
        .gc(Duration::from_secs(60))
        .unwrap()
        .removed
        .is_empty());
    for d in [&cfg, &layer, &oci, &kept_cfg, &kept] {
        age(dir.path(), d, 120);
    }
    let report = store.gc(Duration::from_secs(60)).unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut want = vec![cfg, layer, oci];
    want.sort();
    assert_eq!(removed, want);
    assert!(store.has_manifest("squash/b", &kept).unwrap());
    assert!(store.complete(&kept).unwrap());

    // An index: its children go with it unless another manifest of the repository names them.
    let (c1, c2) = (put(b"c1"), put(b"c2"));
    let m1 = store
        .put_manifest("squash/m", &manifest(&c1, &[]))
        .unwrap()
        .digest;
    let m2 = store
        .put_manifest("squash/m", &manifest(&c2, &[]))
        .unwrap()
        .digest;
    let index = |children: &[&Digest]| {
        let list: Vec<_> = children
            .iter()
            .map(|d| serde_json::json!({"digest": d.to_string(), "size": 1}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": list})).unwrap()
    };
    let both = store
        .put_manifest("squash/m", &index(&[&m1, &m2]))
        .unwrap()
        .digest;
    let only2 = store
        .put_manifest("squash/m", &index(&[&m2]))
        .unwrap()
        .digest;
    assert!(store.delete_image("squash/m", &both).unwrap());
    assert!(!store.has_manifest("squash/m", &m1).unwrap());
    assert!(store.has_manifest("squash/m", &m2).unwrap());
    assert!(store.has_manifest("squash/m", &only2).unwrap());
}

/// Two replicas on one directory (two `Store`s: pins are per process). Replica A's sweep holds
/// between its last look at old, unreferenced blobs and its delete; replica B publishes those very
/// blobs then (they are stored, so its writer only finds them there) and links a manifest to them.
/// The manifest must keep its blobs: B waits for A's doom marks to go and writes them anew.
#[test]
fn a_sweep_on_one_replica_never_deletes_what_another_is_reusing() {
    let (dir, a) = store();
    let b = Store::open_dir(dir.path()).unwrap();
    let (cfg, layer) = (
        a.put_blob(b"reused cfg").unwrap().digest,
        a.put_blob(b"reused layer").unwrap().digest,
    );
    age(dir.path(), &cfg, 7200);
    age(dir.path(), &layer, 7200);
    let reuse = Arc::new(std::sync::Mutex::new(None));
    let hold: DeleteHold = {
        let (reuse, b) = (reuse.clone(), b.clone());
        Arc::new(move |_| {
            let mut reuse = reuse.lock().unwrap();
            if reuse.is_some() {
                return;
            }
            let b = b.clone();
            *reuse = Some(std::thread::spawn(move || {
                let c = b.put_blob(b"reused cfg").unwrap();
                let l = b.put_blob(b"reused layer").unwrap();
                let m = b
                    .put_manifest("r", &manifest(&c.digest, &[&l.digest]))
                    .unwrap();
                (m.digest.clone(), (c.created, l.created))
            }));
            // B is done by now, or waiting for the doom marks.
            std::thread::sleep(Duration::from_millis(300));
        })
    };
    let report = a.clone().with_delete_hold(hold).gc(Duration::ZERO).unwrap();
    let reused = reuse
        .lock()
        .unwrap()
        .take()
        .expect("the sweep deleted nothing");
    let (linked, created) = reused.join().unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut both = vec![cfg.clone(), layer.clone()];
    both.sort();
    assert_eq!(removed, both, "{report:?}");
    assert_eq!(
        created,
        (true, true),
        "B reused blobs the sweep then deleted"
    );
    assert!(
        a.complete(&linked).unwrap(),
        "the linked manifest lost a blob"
    );

    // A use mark seen by the sweep spares an old unreferenced blob until it is dropped.
    let held = b.put_blob(b"held by B").unwrap();
    age(dir.path(), &held.digest, 7200);
    let report = a.gc(Duration::ZERO).unwrap();
    assert!(!report.removed.contains(&held.digest), "{report:?}");
    let digest = held.digest.clone();
    drop(held);
    age(dir.path(), &digest, 7200);
    assert!(a.gc(Duration::ZERO).unwrap().removed.contains(&digest));
    assert!(
        a.backend.list("inuse/").unwrap().is_empty()
            && a.backend.list("doomed/").unwrap().is_empty(),
        "marks left behind"
    );
}
