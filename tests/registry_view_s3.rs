//! The registry view with its store on object storage (`--store s3://…`, the moto server
//! `scripts/test.sh` starts): docker pulls a conversion that strata stores in the bucket, then a
//! second strata process, with a cache directory of its own (nothing local shared), serves the
//! stored image from the same bucket by digest, converting nothing and reading no source blob.

mod common;

use std::time::Duration;

use common::fixtures::sha;
use common::images;
use common::proxy::Proxy;
use common::pull::{self, Client};
use common::view::*;
use common::*;

fn fetch_blob(view: &View, name: &str, desc: &serde_json::Value) {
    let digest = desc["digest"].as_str().unwrap();
    let (status, headers, body) = view.blob(name, digest, &[]);
    assert_eq!(status, 200, "{digest}: {headers}");
    assert_eq!(sha(&body), digest);
    assert_eq!(body.len() as u64, desc["size"].as_u64().unwrap(), "{desc}");
}

#[test]
fn docker_pull_served_from_s3_and_a_second_server_on_the_bucket_serves_it_stored() {
    let env = env();
    let name = "view-s3";
    let source = publish(&env, name, images::whiteouts());
    let want = oracle(&source);
    let base =
        std::env::var("STRATA_TEST_S3").expect("STRATA_TEST_S3 is unset: run scripts/test.sh");
    let store = format!("{base}/view-{}-{}", std::process::id(), rand_suffix());
    // strata reaches the registry through a proxy that records what it fetched.
    let proxy = Proxy::start(&env.registry);
    let extra = [
        "--default-registry",
        proxy.addr.as_str(),
        "--store",
        store.as_str(),
    ];
    let mut first = View::of(Server::start_logging(&proxy.addr, &extra, "info"));
    let reference = first.reference(name, "v1");
    let local = "strata-view/view-s3:first";
    assert_eq!(
        pull::pull_into_docker(&env, Client::Docker, &reference, local),
        1
    );
    assert_same(&want, &export_listing(local), &reference);
    assert_eq!(first.conversions(), 1);
    let (status, _, body) = first.manifest(name, "v1", OCI_MANIFEST);
    assert_eq!(status, 200);
    let digest = sha(&body);
    first.server.terminate();
    assert!(first.server.wait_exit(Duration::from_secs(30)).is_some());
    drop(first);
    let fetched = proxy.requests("/blobs/").len();
    assert!(fetched > 0, "the first conversion read the source's blobs");
    // docker must fetch the layer again, from the second server.
    run(docker().args(["rmi", "-f", local, reference.as_str()]));

    let second = View::of(Server::start_logging(&proxy.addr, &extra, "info"));
    let (status, headers, stored) = second.manifest(name, &digest, OCI_MANIFEST);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(
        stored, body,
        "the manifest by digest, as stored in the bucket"
    );
    let manifest = json_body(&stored);
    fetch_blob(&second, name, &manifest["layers"][0]);
    fetch_blob(&second, name, &manifest["config"]);
    let by_digest = format!("{}/squash/fixtures/{name}@{digest}", second.host);
    let local = "strata-view/view-s3:second";
    assert_eq!(
        pull::pull_into_docker(&env, Client::Docker, &by_digest, local),
        1
    );
    assert_same(&want, &export_listing(local), &by_digest);
    assert_eq!(
        second.conversions(),
        0,
        "{}",
        second.server.log.lock().unwrap()
    );
    let since: Vec<String> = proxy.requests("/blobs/")[fetched..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        since,
        Vec::<String>::new(),
        "source blobs read by the second server"
    );
}

#[test]
fn serve_stops_at_start_up_when_the_bucket_cannot_be_reached() {
    let base =
        std::env::var("STRATA_TEST_S3").expect("STRATA_TEST_S3 is unset: run scripts/test.sh");
    let closed = format!("http://127.0.0.1:{}", closed_port());
    // A bucket the server does not have, and an endpoint nothing listens on.
    for (store, endpoint) in [
        ("s3://strata-no-such-bucket/x".to_string(), None),
        (format!("{base}/x"), Some(closed.as_str())),
    ] {
        let mut cmd = strata();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", &store]);
        if let Some(e) = endpoint {
            cmd.env("AWS_ENDPOINT_URL", e);
        }
        let started = std::time::Instant::now();
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}: served: {stderr}");
        assert!(
            stderr.contains("strata: error:") && stderr.contains("bucket strata-"),
            "{store}: {stderr}"
        );
        assert!(!stderr.contains("listening on"), "{stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{store}: {:?}",
            started.elapsed()
        );
    }
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
