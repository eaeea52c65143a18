//! What the service tells about itself, against the real server binary and registry: `/metrics`
//! after real requests, `/readyz` on a store that goes away (a directory, a bucket on the S3 test
//! server), the JSON request log and its ids, `STRATA_*` variables, and the CLI's progress bar.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The value of the sample `series` (name and labels exactly as exported), if exported.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

fn scrape(server: &Server) -> String {
    let (status, headers, body) = curl(&[&format!("{}/metrics", server.url)]);
    assert_eq!(status, 200);
    assert!(
        header_value(&headers, "content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{headers}"
    );
    String::from_utf8(body).unwrap()
}

/// Scrapes until every `(series, value)` holds: a request is counted when its response starts, and
/// its bytes as they leave, which may be a moment after the client has them all.
fn wait_for(server: &Server, want: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(server);
        let missing: Vec<String> = want
            .iter()
            .filter(|(s, v)| sample(&text, s) != Some(*v))
            .map(|(s, v)| format!("{s} = {v} (is {:?})", sample(&text, s)))
            .collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "not in /metrics: {missing:#?}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The image's manifest in the registry.
fn manifest(registry: &str, repo: &str, tag: &str) -> serde_json::Value {
    let (status, _, body) = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{registry}/v2/{repo}/manifests/{tag}"),
    ]);
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Compressed bytes of the image's layers.
fn layer_bytes(registry: &str, repo: &str, tag: &str) -> f64 {
    manifest(registry, repo, tag)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_f64().unwrap())
        .sum()
}

#[test]
fn metrics_count_requests_bytes_conversions_upstream_and_the_store() {
    let env = env();
    let image = publish(&env, "metrics", images::basic());
    let server = Server::start(&env.registry, &[]);
    let squash = format!("{}/squash/{image}", server.url);
    let file = scratch("metrics").join("image.tar");
    download_to(&squash, &file);
    let tar_bytes = std::fs::metadata(&file).unwrap().len() as f64;
    let (status, _, _) = curl(&["-I", &squash]);
    assert_eq!(status, 200);
    json_error(&format!("{}/nothing-here", server.url), 404);
    let missing = format!(
        "{}/squash/{}/fixtures/no-such-image:v1",
        server.url, env.registry
    );
    let (status, _, missing_body) = curl(&[&missing]);
    assert_eq!(status, 404);

    let layers = layer_bytes(&env.registry, "fixtures/metrics", "v1");
    let config = manifest(&env.registry, "fixtures/metrics", "v1")["config"]["size"]
        .as_f64()
        .unwrap();
    let text = wait_for(
        &server,
        &[
            // The GET converted, the HEAD was answered from the store, the missing image is a 404
            // of the squash route.
            (
                r#"strata_http_requests_total{route="squash",status="200"}"#,
                2.0,
            ),
            (
                r#"strata_http_requests_total{route="squash",status="404"}"#,
                1.0,
            ),
            (
                r#"strata_http_requests_total{route="not_found",status="404"}"#,
                1.0,
            ),
            // The 404's JSON body is counted too.
            (
                r#"strata_http_response_bytes_total{route="squash"}"#,
                tar_bytes + missing_body.len() as f64,
            ),
            (
                r#"strata_conversion_duration_seconds_count{format="squash"}"#,
                1.0,
            ),
            (r#"strata_store_misses_total{artifact="tarball"}"#, 1.0),
            (r#"strata_store_hits_total{artifact="tarball"}"#, 1.0),
            (r#"strata_upstream_errors_total{kind="not_found"}"#, 1.0),
            ("strata_conversions_in_flight", 0.0),
            ("strata_lease_waits_total", 0.0),
        ],
    );
    // Each layer read once by the GET (the merge; the few bytes the tarball is sized from are not
    // layer reads), and the config once by each of GET and HEAD (both resolve the tag afresh).
    assert_eq!(
        sample(&text, "strata_upstream_bytes_total"),
        Some(layers + 2.0 * config),
        "{text}"
    );
    // The route label is the route's kind, never the path: one series for any image.
    assert!(!text.contains("fixtures/"), "{text}");
}

#[test]
fn readyz_follows_a_store_directory_that_goes_away() {
    let env = env();
    let store = scratch(&format!("ready-store-{}", rand_suffix()));
    let store_arg = store.to_str().unwrap().to_string();
    let server = Server::start(&env.registry, &["--store", &store_arg]);
    let ready = format!("{}/readyz", server.url);
    let (status, _, body) = curl(&[&ready]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ready");
    std::fs::remove_dir_all(&store).unwrap();
    let v = json_error(&ready, 503);
    assert_eq!(v["error"]["code"], "STORE_UNAVAILABLE", "{v}");
    // Liveness is not readiness: the process still answers.
    let (status, _, _) = curl(&[&format!("{}/healthz", server.url)]);
    assert_eq!(status, 200);
}

#[test]
fn readyz_follows_a_bucket_that_goes_away() {
    let env = env();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (scripts/test.sh)");
    let bucket = format!("strata-readyz-{}", std::process::id());
    // The S3 test server takes unsigned requests: enough to make and remove a bucket.
    let (status, _, _) = curl(&["-X", "PUT", &format!("{endpoint}/{bucket}")]);
    assert_eq!(status, 200);
    let url = format!("s3://{bucket}/replica");
    let server = Server::start(&env.registry, &["--store", &url]);
    let ready = format!("{}/readyz", server.url);
    let (status, _, body) = curl(&[&ready]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Nothing was written yet, so the bucket is empty and may be deleted.
    let (status, _, body) = curl(&["-X", "DELETE", &format!("{endpoint}/{bucket}")]);
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
    let started = Instant::now();
    let v = json_error(&ready, 503);
    assert_eq!(v["error"]["code"], "STORE_UNAVAILABLE", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NoSuchBucket"),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn json_log_has_one_line_per_request_with_the_id_sent_back() {
    let env = env();
    let image = publish(&env, "jsonlog", images::basic());
    let server = Server::start_logging(&env.registry, &["--log-format", "json"], "info");
    let squash = format!("{}/squash/{image}", server.url);
    // A caller's sane id is kept; an unusable one (a space in it) is replaced.
    let (status, h1, body) = curl(&["-H", "X-Request-Id: caller-id.42", &squash]);
    assert_eq!(status, 200);
    let (status, h2, _) = curl(&["-H", "X-Request-Id: not sane", "-I", &squash]);
    assert_eq!(status, 200);
    let (status, h3, _) = curl(&[&format!("{}/nothing-here", server.url)]);
    assert_eq!(status, 404);
    let ids: Vec<String> = [&h1, &h2, &h3]
        .iter()
        .map(|h| header_value(h, "x-request-id").expect("an X-Request-Id header"))
        .collect();
    assert_eq!(ids[0], "caller-id.42");
    assert_ne!(ids[1], "not sane");
    assert_ne!(ids[1], ids[2]);

    let deadline = Instant::now() + Duration::from_secs(10);
    let finished = loop {
        let log = server.log.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.starts_with("strata: listening on"))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        let finished: Vec<serde_json::Value> = lines
            .into_iter()
            .filter(|l| l["message"] == "request finished")
            .collect();
        if finished.len() >= 3 || Instant::now() > deadline {
            break finished;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(finished.len(), 3, "{finished:#?}");
    let line = |id: &str| {
        let of: Vec<_> = finished.iter().filter(|l| l["id"] == id).collect();
        assert_eq!(of.len(), 1, "one line for {id}: {finished:#?}");
        of[0].clone()
    };
    let get = line(&ids[0]);
    assert_eq!(get["route"], "squash");
    assert_eq!(get["reference"], image);
    assert_eq!(get["status"], 200);
    assert_eq!(get["bytes"], body.len() as u64);
    assert_eq!(get["outcome"], "complete");
    assert!(get["duration_ms"].is_u64(), "{get}");
    let head = line(&ids[1]);
    assert_eq!(head["method"], "HEAD");
    assert_eq!(head["bytes"], 0);
    let miss = line(&ids[2]);
    assert_eq!(miss["route"], "not_found");
    assert_eq!(miss["status"], 404);
    // Events inside a request (the conversion's) carry its id in their spans.
    let log = server.log.lock().unwrap().clone();
    let prepared = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "prepared")
        .expect("the conversion's 'prepared' line");
    assert_eq!(prepared["spans"][0]["id"], ids[0], "{prepared}");
}

/// `strata serve` configured by `STRATA_*` alone: where it listens, that it has no store, how it logs.
#[test]
fn strata_variables_configure_the_server() {
    let port = free_port();
    let mut child = strata()
        .arg("serve")
        .env("STRATA_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRATA_NO_CACHE", "true")
        .env("STRATA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, _, body) = curl(&[&format!("{url}/readyz")]);
        if status == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "nothing listens on {url}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["store"], false, "STRATA_NO_CACHE: no store, {v}");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let finished = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "request finished")
        .unwrap_or_else(|| panic!("no JSON request line: {log}"));
    assert_eq!(finished["route"], "readyz");

    // A value from the environment is checked as the flag's would be.
    let out = strata()
        .arg("serve")
        .env("STRATA_MAX_CONCURRENT", "0")
        .env("STRATA_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-concurrent must be at least 1"), "{err}");
    // A flag wins over its variable.
    let out = strata()
        .args(["serve", "--max-concurrent", "0"])
        .env("STRATA_MAX_CONCURRENT", "4")
        .env("STRATA_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A 16 MiB layer of noise: long enough for the bar to be drawn mid-way.
fn big_image(env: &Env) -> String {
    let layer = fixtures::Layer::new().file("noise", 0o644, &fixtures::noise(16 << 20, 7));
    let image = fixtures::Image::new(vec![(layer, fixtures::Comp::Gzip)]);
    publish(env, "progress", vec![image])
}

fn squash_command(env: &Env, image: &str, out: &std::path::Path) -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_strata").to_string(),
        "squash".into(),
        "--no-cache".into(),
        "--insecure-registry".into(),
        env.registry.clone(),
        image.to_string(),
        "-o".into(),
        out.to_str().unwrap().to_string(),
    ]
}

#[test]
fn the_cli_draws_a_progress_bar_only_on_a_terminal() {
    let env = env();
    let image = big_image(&env);
    let dir = scratch(&format!("progress-{}", rand_suffix()));
    let out = dir.join("image.tar");

    // Standard error a file: log lines only, no bar.
    let args = squash_command(&env, &image, &out);
    let err = dir.join("stderr");
    let status = Command::new(&args[0])
        .args(&args[1..])
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let logged = std::fs::read_to_string(&err).unwrap();
    assert!(logged.contains("prepared"), "{logged}");
    assert!(
        !logged.contains("ETA") && !logged.contains('\r') && !logged.contains('\x1b'),
        "{logged:?}"
    );

    // On a terminal (script(1) gives it one): the bar, ending with every layer byte read.
    let on_terminal = |extra: &str| -> String {
        let line = format!("{} {extra}", args.join(" "));
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("script(1), from util-linux");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let drawn = on_terminal("");
    let total = layer_bytes(&env.registry, "fixtures/progress", "v1") as u64;
    assert!(drawn.contains("converting"), "{drawn:?}");
    assert!(drawn.contains("ETA"), "{drawn:?}");
    // indicatif's binary units: the total as it prints it, e.g. "16.00 MiB".
    let shown = format!("{:.2} MiB", total as f64 / f64::from(1 << 20));
    assert!(
        drawn.contains(&format!("{shown}/{shown}")),
        "no {shown}/{shown} in {drawn:?}"
    );
    let quiet = on_terminal("--quiet");
    assert!(!quiet.contains("ETA"), "{quiet:?}");
    assert!(quiet.contains("prepared"), "{quiet:?}");
}

/// A layer read for longer than the progress interval (here: a slow reader of the output holds the
/// merge back, through a pipe's few KiB rather than a socket's MiB) logs its progress while it goes,
/// and its end.
#[test]
fn a_long_layer_transfer_logs_its_progress() {
    use std::io::Read;
    let env = env();
    let image = big_image(&env);
    let dir = scratch(&format!("slow-{}", rand_suffix()));
    let args = squash_command(&env, &image, std::path::Path::new("-"));
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .args(["--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .unwrap();
    // 64 KiB every 40 ms, 1.6 MiB/s: 16 MiB take about 10 s, the layer's read a few MiB less.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut read = 0u64;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read += n as u64;
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(child.wait().unwrap().success());
    assert!(read > 16 << 20, "{read}");
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    let digest = &manifest(&env.registry, "fixtures/progress", "v1")["layers"][0]["digest"];
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .filter(|l: &serde_json::Value| l["digest"] == *digest)
        .collect();
    let progress: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "layer progress")
        .collect();
    assert!(!progress.is_empty(), "no progress line: {log}");
    let first = progress[0];
    assert_eq!(first["image"], image);
    assert!(first["bytes"].as_u64().unwrap() > 0, "{first}");
    assert!(
        first["bytes"].as_u64().unwrap() < first["size"].as_u64().unwrap(),
        "{first}"
    );
    assert!(first["mib_per_s"].as_f64().unwrap() > 0.0, "{first}");
    let end = lines
        .iter()
        .find(|l| l["message"] == "layer read")
        .unwrap_or_else(|| panic!("no end line: {log}"));
    assert_eq!(end["bytes"], end["size"], "{end}");
}

/// An image of two layers of bytes of its own (no summary of one is remembered from another): a
/// small bottom one and a top one of `top_len` bytes of noise.
fn own_image(env: &Env, name: &str, top_len: usize) -> Vec<String> {
    let seed = name.bytes().map(u64::from).sum::<u64>() * 31;
    let image = fixtures::Image::new(vec![
        (
            fixtures::Layer::new().file("bottom", 0o644, name.as_bytes()),
            fixtures::Comp::Gzip,
        ),
        (
            fixtures::Layer::new().file("top", 0o644, &fixtures::noise(top_len, seed)),
            fixtures::Comp::Gzip,
        ),
    ]);
    publish(env, name, vec![image]);
    layer_digests(&env.registry, &format!("fixtures/{name}"), "v1")
}

/// The duration histogram covers each format's whole conversion, not only its merge: here each
/// conversion's first read of its top layer (the summary read before the first byte, outside the
/// merge) is held for a second.
#[test]
fn conversion_durations_cover_the_whole_conversion_of_every_format() {
    use common::proxy::{Fault, Proxy};
    const HELD: Duration = Duration::from_secs(1);
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(
        &proxy.addr,
        &[
            "--default-registry",
            &proxy.addr,
            "--public-name",
            "127.0.0.1",
        ],
    );
    let urls = [
        ("squash", "squash/fixtures/duration-squash:v1".to_string()),
        (
            "aci",
            "c1/aci/127.0.0.1/fixtures/duration-aci/v1/aci/linux/amd64/".to_string(),
        ),
        (
            "view",
            "v2/squash/fixtures/duration-view/manifests/v1".to_string(),
        ),
    ];
    for (format, path) in &urls {
        let layers = own_image(&env, &format!("duration-{format}"), 64 << 10);
        proxy.rule(layers.last().unwrap(), Fault::Stall(HELD), Some(1));
        let (status, headers, _) = curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("{}/{path}", server.url),
        ]);
        assert_eq!(status, 200, "{format}: {headers}");
    }
    let want: Vec<(String, f64)> = urls
        .iter()
        .map(|(f, _)| {
            (
                format!("strata_conversion_duration_seconds_count{{format=\"{f}\"}}"),
                1.0,
            )
        })
        .collect();
    let want: Vec<(&str, f64)> = want.iter().map(|(s, v)| (s.as_str(), *v)).collect();
    let text = wait_for(&server, &want);
    for (format, _) in &urls {
        let series = format!("strata_conversion_duration_seconds_sum{{format=\"{format}\"}}");
        let sum = sample(&text, &series).unwrap();
        assert!(
            sum >= HELD.as_secs_f64(),
            "{series} = {sum}: the held read is left out"
        );
    }
}

/// A layer transfer of a request's conversion logs its progress inside the request's span: the
/// JSON lines carry the request id. Its summary and size are remembered from a first conversion
/// (under another name), so the one slow read is the merge's.
#[test]
fn layer_progress_lines_carry_the_request_id() {
    use common::proxy::{Fault, Proxy};
    let env = env();
    let layers = own_image(&env, "progress-id", 12 << 20);
    let proxy = Proxy::start(&env.registry);
    let server = Server::start_logging(&proxy.addr, &["--log-format", "json"], "info");
    let url = format!(
        "{}/squash/{}/fixtures/progress-id:v1",
        server.url, proxy.addr
    );
    let (status, _, _) = curl(&[&format!("{url}?tag=first:run")]);
    assert_eq!(status, 200);
    // 2 MiB/s: the 12 MiB layer takes about 6 s, past the 5 s progress interval.
    let top = layers.last().unwrap();
    proxy.rule(top, Fault::Throttle(2 << 20), None);
    let (status, _, _) = curl(&["-H", "X-Request-Id: slow-layer-7", &url]);
    assert_eq!(status, 200);
    let log = server.log.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["digest"] == *top)
        .collect();
    let in_request = |l: &serde_json::Value| {
        l["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["id"] == "slow-layer-7"))
    };
    let progress: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "layer progress")
        .collect();
    assert!(!progress.is_empty(), "no progress line: {log}");
    for line in &progress {
        assert!(
            in_request(line),
            "a progress line without the request id: {line}"
        );
    }
    let end = lines
        .iter()
        .rfind(|l| l["message"] == "layer read")
        .unwrap_or_else(|| panic!("no end line: {log}"));
    assert!(in_request(end), "{end}");
}
