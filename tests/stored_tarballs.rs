//! The tarball routes served from the content-addressed store: strata behind a counting proxy in
//! front of the real registry. A repeat streams the stored bytes (no blob fetched upstream), identical
//! to a fresh conversion, with `304`, `HEAD`, `Range` (`206`, `416`) and a `curl -C -` resume; a
//! conversion that fails or is cut stores nothing; `--no-cache` converts every time; a stored ACI
//! is signed from its stored bytes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{noise, Comp, Image, Layer};
use common::proxy::{Fault, Proxy};
use common::*;

/// Three layers, the bottom one `bottom_len` bytes of noise, pushed as `fixtures/<name>:v1`; returns
/// the reference through the proxy and the layer blobs' hex digests, bottom first.
fn setup(env: &Env, proxy: &Proxy, name: &str, bottom_len: usize) -> (String, Vec<String>) {
    // Bytes of its own per name, so no two tests share a blob (or a stored tarball).
    let seed = {
        use sha2::Digest;
        u64::from_le_bytes(sha2::Sha256::digest(name)[..8].try_into().unwrap())
    };
    let image = Image::new(vec![
        (
            Layer::new()
                .dir("data", 0o755)
                .file("data/bottom", 0o644, &noise(bottom_len, seed)),
            Comp::Gzip,
        ),
        (
            Layer::new().file("data/mid", 0o644, name.as_bytes()),
            Comp::Zstd,
        ),
        (
            Layer::new().file("data/top", 0o644, &noise(200 << 10, seed + 1)),
            Comp::Gzip,
        ),
    ]);
    publish(env, name, vec![image]);
    let layers = layer_digests(&env.registry, &format!("fixtures/{name}"), "v1");
    (
        format!("{}/fixtures/{name}:v1", proxy.addr),
        layers.iter().map(|l| l[7..].to_string()).collect(),
    )
}

/// Layer blob requests strata sent upstream so far (the config, a small blob, is read with the
/// manifest on every request).
fn layer_fetches(proxy: &Proxy, layers: &[String]) -> usize {
    layers.iter().map(|l| proxy.requests(l).len()).sum()
}

/// curl with `args`, the body into `out`: (status, headers, curl's exit code).
fn curl_to(args: &[&str], out: &Path) -> (u16, String, i32) {
    let headers = out.with_extension("headers");
    let o = Command::new("curl")
        .args(["-sS", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(out)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let h = std::fs::read_to_string(&headers).unwrap_or_default();
    (status, h, o.status.code().unwrap_or(-1))
}

/// A whole download that must succeed: (headers, bytes).
fn fetch(url: &str) -> (String, Vec<u8>) {
    let out = scratch(&format!("stored-{}", rand_suffix())).join("body");
    let (status, headers, code) = curl_to(&[url], &out);
    assert_eq!((status, code), (200, 0), "{url}: status and curl exit code");
    (headers, std::fs::read(&out).unwrap())
}

/// A download cut after `keep` bytes, as a dropped connection leaves it: curl's output piped into
/// `head -c`, which exits and so makes curl stop reading.
fn cut_download(url: &str, keep: usize, file: &Path) {
    let mut curl = Command::new("curl")
        .args(["-sS", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let head = Command::new("head")
        .args(["-c", &keep.to_string()])
        .stdin(curl.stdout.take().unwrap())
        .stdout(std::fs::File::create(file).unwrap())
        .status()
        .unwrap();
    assert!(head.success());
    let _ = curl.wait();
    assert_eq!(std::fs::metadata(file).unwrap().len(), keep as u64);
}

/// `curl -C - -o file`: resumes `file` where it ends; (status, curl's exit code).
fn resume(url: &str, file: &Path) -> (u16, i32) {
    let (status, _, code) = curl_to(&["-C", "-", url], file);
    (status, code)
}

/// Files under `dir` (recursively), as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// What the store at `dir` holds once no upload is in progress (a conversion that failed or lost its
/// client removes its upload when it notices, a moment after the client does).
fn stored_files(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files = files_under(dir);
        if files.iter().all(|f| !f.starts_with("tmp/")) {
            return files;
        }
        assert!(Instant::now() < deadline, "an upload stayed: {files:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the proxy has seen every blob request through (it logs them as they end).
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// The tarball is published after its last byte has left, so the client does not wait for the
/// store's writes; a HEAD or GET asked meanwhile waits for the record and is answered from it, with
/// the validator and bytes of the first response (not a conversion of its own, sized exactly).
#[test]
fn a_request_right_after_the_last_byte_is_answered_from_the_store() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let hold = Duration::from_millis(1500);
    let server = Server::start_with_env(
        &proxy.addr,
        &scratch(&format!("cache-{}", rand_suffix())),
        &[],
        "warn",
        &[("STRATA_TEST_PUBLISH_HOLD", &hold.as_millis().to_string())],
    );
    let (r, layers) = setup(&env, &proxy, "stored-publishing", 1 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let started = Instant::now();
    let (h1, first) = fetch(&url);
    assert!(
        started.elapsed() < hold,
        "the client waited for the publication: {:?}",
        started.elapsed()
    );
    let asked = Instant::now();
    let (status, h2, _) = curl(&["-I", &url]);
    assert_eq!(status, 200);
    assert!(
        asked.elapsed() >= hold / 2,
        "the HEAD did not wait for the record: {:?}",
        asked.elapsed()
    );
    for name in ["etag", "content-length"] {
        assert_eq!(header_value(&h2, name), header_value(&h1, name), "{name}");
    }
    settle();
    let fetched = layer_fetches(&proxy, &layers);
    let (h3, again) = fetch(&url);
    assert!(again == first);
    assert_eq!(header_value(&h3, "etag"), header_value(&h1, "etag"));
    settle();
    assert_eq!(layer_fetches(&proxy, &layers), fetched, "converted again");
    assert!(stored_whole(&server.cache.join("store"), &first));
}

#[test]
fn a_repeat_streams_the_stored_bytes() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, layers) = setup(&env, &proxy, "stored-repeat", 3 << 20);
    let url = format!("{}/squash/{r}", server.url);

    let (h1, first) = fetch(&url);
    settle();
    let fetched = layer_fetches(&proxy, &layers);
    assert!(
        fetched >= 3,
        "the first request converts: {fetched} blob fetches"
    );
    let etag = header_value(&h1, "etag").unwrap();
    assert_eq!(
        header_value(&h1, "content-length"),
        Some(first.len().to_string())
    );

    // The repeat: the same bytes, length and validator, and not one blob asked of the registry.
    let (h2, second) = fetch(&url);
    assert!(second == first, "the stored bytes are the converted ones");
    assert_eq!(header_value(&h2, "etag").as_deref(), Some(etag.as_str()));
    assert_eq!(
        header_value(&h2, "content-length"),
        Some(first.len().to_string())
    );
    assert_eq!(header_value(&h2, "accept-ranges").as_deref(), Some("bytes"));
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "the repeat fetched blobs"
    );
    // The manifest is still asked upstream each time: the tag may have moved, and the caller's access
    // is checked by it.
    assert!(proxy.requests("/manifests/").len() >= 2);

    // What a server that stores nothing converts is byte for byte what was stored.
    let fresh = Server::start(&proxy.addr, &["--no-cache"]);
    let (h3, converted) = fetch(&format!("{}/squash/{r}", fresh.url));
    assert!(
        converted == first,
        "stored bytes differ from a fresh conversion"
    );
    assert_eq!(header_value(&h3, "etag").as_deref(), Some(etag.as_str()));
    drop(fresh);
    settle();
    let fetched = layer_fetches(&proxy, &layers);

    let dir = scratch("stored-repeat");
    // 304, HEAD: nothing read, exact length.
    let (status, _, _) = curl_to(
        &["-H", &format!("If-None-Match: {etag}"), &url],
        &dir.join("nm"),
    );
    assert_eq!(status, 304);
    let (status, head, _) = curl_to(&["-I", &url], &dir.join("head"));
    assert_eq!(status, 200);
    assert_eq!(
        header_value(&head, "content-length"),
        Some(first.len().to_string())
    );
    assert_eq!(header_value(&head, "etag").as_deref(), Some(etag.as_str()));

    // Ranges: a middle part, the last bytes, one past the end.
    let len = first.len();
    let part = dir.join("part");
    let (status, h, code) = curl_to(&["-r", "1000-70999", &url], &part);
    assert_eq!((status, code), (206, 0));
    assert_eq!(
        header_value(&h, "content-range"),
        Some(format!("bytes 1000-70999/{len}"))
    );
    assert_eq!(header_value(&h, "content-length").as_deref(), Some("70000"));
    assert!(std::fs::read(&part).unwrap() == first[1000..71000]);
    let (status, h, _) = curl_to(&["-r", "-512", &url], &part);
    assert_eq!(status, 206);
    assert_eq!(
        header_value(&h, "content-range"),
        Some(format!("bytes {}-{}/{len}", len - 512, len - 1))
    );
    assert!(std::fs::read(&part).unwrap() == first[len - 512..]);
    let (status, h, _) = curl_to(&["-r", &format!("{len}-"), &url], &part);
    assert_eq!(status, 416);
    assert_eq!(
        header_value(&h, "content-range"),
        Some(format!("bytes */{len}"))
    );
    // If-Range with other bytes' validator: the whole, as the RFC says.
    let (status, _, _) = curl_to(&["-r", "0-9", "-H", "If-Range: \"other\"", &url], &part);
    assert_eq!(status, 200);
    assert!(std::fs::read(&part).unwrap() == first);

    // A download cut in the middle, resumed with `curl -C -`: the whole file.
    let cut = dir.join("cut.tar");
    cut_download(&url, len / 2, &cut);
    assert_eq!(resume(&url, &cut), (206, 0));
    assert!(
        std::fs::read(&cut).unwrap() == first,
        "resumed file differs"
    );
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "serving from the store fetched blobs"
    );
}

/// The store holds a copy per key: a tag of its own (`?tag=`) is other bytes, converted and stored
/// apart, and neither is served for the other.
#[test]
fn each_name_is_stored_apart() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, layers) = setup(&env, &proxy, "stored-tags", 1 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let (h1, plain) = fetch(&url);
    let tagged_url = format!("{url}?tag=other/name:1");
    let (h2, tagged) = fetch(&tagged_url);
    assert!(tagged != plain);
    assert_ne!(header_value(&h1, "etag"), header_value(&h2, "etag"));
    settle();
    let fetched = layer_fetches(&proxy, &layers);
    assert!(fetch(&url).1 == plain);
    assert!(fetch(&tagged_url).1 == tagged);
    settle();
    assert_eq!(layer_fetches(&proxy, &layers), fetched);
}

/// A first download cut in the middle stores nothing (a hang-up stops the conversion); its resume is
/// converted again, sends only the missing part, and is stored, so the next request is served stored.
#[test]
fn a_cut_first_download_stores_nothing_and_resumes() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, layers) = setup(&env, &proxy, "stored-cut-first", 48 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("stored-cut-first");
    let cut = dir.join("cut.tar");
    cut_download(&url, 4 << 20, &cut);
    settle();
    let store = server.cache.join("store");
    assert_eq!(
        stored_files(&store),
        Vec::<String>::new(),
        "a cut download stored something"
    );

    let before = layer_fetches(&proxy, &layers);
    assert_eq!(resume(&url, &cut), (206, 0));
    settle();
    assert!(
        layer_fetches(&proxy, &layers) > before,
        "the resume converts"
    );
    let whole = {
        let fresh = Server::start(&proxy.addr, &["--no-cache"]);
        fetch(&format!("{}/squash/{r}", fresh.url)).1
    };
    assert!(
        std::fs::read(&cut).unwrap() == whole,
        "resumed file differs"
    );

    settle();
    let fetched = layer_fetches(&proxy, &layers);
    assert!(fetch(&url).1 == whole);
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "the resume was not stored"
    );
}

/// A conversion failing after its first byte (a blob corrupted in flight) stores nothing, and the
/// repeat converts again and fails the same way; a layer refused before the first byte is refused
/// again. Once the registry behaves, the image is converted and stored.
#[test]
fn a_failed_conversion_stores_nothing() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, layers) = setup(&env, &proxy, "stored-fails", 4 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let store = server.cache.join("store");
    // Sized first, so the corrupted fetch is the streaming one, after the first byte.
    let (status, _, _) = curl_to(&["-I", &url], &scratch("stored-fails").join("head"));
    assert_eq!(status, 200);

    proxy.rule(&layers[0], Fault::Corrupt(2 << 20), Some(2));
    for attempt in ["first", "repeat"] {
        let before = layer_fetches(&proxy, &layers);
        let out = scratch(&format!("stored-fails-{attempt}")).join("partial");
        let (status, _, code) = curl_to(&[&url], &out);
        assert_eq!(
            status, 200,
            "{attempt}: the failure comes after the first byte"
        );
        assert_ne!(code, 0, "{attempt}: curl must see a failed transfer");
        settle();
        assert!(
            layer_fetches(&proxy, &layers) > before,
            "{attempt}: converted, not served stored"
        );
        assert_eq!(stored_files(&store), Vec::<String>::new(), "{attempt}");
    }
    let (_, whole) = fetch(&url);
    settle();
    let fetched = layer_fetches(&proxy, &layers);
    assert!(fetch(&url).1 == whole);
    settle();
    assert_eq!(layer_fetches(&proxy, &layers), fetched);

    // Refused before the first byte: the same 502 twice, nothing stored.
    let hostile = Layer::new().raw_name("../escape", tar::EntryType::Regular, 0o644, b"x");
    publish(
        &env,
        "stored-hostile",
        vec![Image::new(vec![(hostile, Comp::Gzip)])],
    );
    let hostile_url = format!(
        "{}/squash/{}/fixtures/stored-hostile:v1",
        server.url, proxy.addr
    );
    let first = json_error(&hostile_url, 502);
    let again = json_error(&hostile_url, 502);
    assert_eq!(first, again);
    assert!(
        first["error"]["message"]
            .as_str()
            .unwrap()
            .contains("escapes the image root"),
        "{first}"
    );
    assert_eq!(
        files_under(&store.join("derived")).len(),
        1,
        "only the good image is recorded"
    );
}

/// Under `--cache-max-bytes` the least recently used tarball goes once another is stored; its
/// repeat converts again (the same bytes), and a tarball read since is kept.
#[test]
fn the_bound_evicts_the_least_recently_used_tarball() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    // Each tarball is about 1.8 MiB: two do not fit.
    let server = Server::start(
        &proxy.addr,
        &["--cache-max-bytes", &(3u64 << 20).to_string()],
    );
    let (a, a_layers) = setup(&env, &proxy, "stored-evict-a", 3 << 19);
    let (b, b_layers) = setup(&env, &proxy, "stored-evict-b", 3 << 19);
    let url = |r: &str| format!("{}/squash/{r}", server.url);
    let store = server.cache.join("store");
    // Gone: some part of it is no longer stored.
    let gone = |bytes: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let parts = stored_parts(&store, bytes);
            if parts.is_empty() || parts.iter().any(|p| !p.exists()) {
                return;
            }
            assert!(Instant::now() < deadline, "the tarball was not evicted");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (_, a_bytes) = fetch(&url(&a));
    assert!(stored_whole(&store, &a_bytes), "stored");
    let (_, b_bytes) = fetch(&url(&b));
    assert!(stored_whole(&store, &b_bytes), "stored");
    gone(&a_bytes);

    settle();
    let (a_before, b_before) = (
        layer_fetches(&proxy, &a_layers),
        layer_fetches(&proxy, &b_layers),
    );
    assert!(fetch(&url(&b)).1 == b_bytes);
    // Converted again, now sized exactly (the first was padded to a bound): the same image.
    let a_again = fetch(&url(&a)).1;
    assert_eq!(squash_listing(&a_again), squash_listing(&a_bytes));
    assert!(a_again.len() <= a_bytes.len());
    settle();
    assert_eq!(layer_fetches(&proxy, &b_layers), b_before, "b was stored");
    assert!(
        layer_fetches(&proxy, &a_layers) > a_before,
        "a was converted again"
    );
    assert!(stored_whole(&store, &a_again));
    gone(&b_bytes);
}

/// `--no-cache`: no store, so every request converts, as before the store existed.
#[test]
fn no_cache_converts_every_time() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &["--no-cache"]);
    let (r, layers) = setup(&env, &proxy, "stored-no-cache", 1 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let (_, first) = fetch(&url);
    settle();
    let fetched = layer_fetches(&proxy, &layers);
    let (_, second) = fetch(&url);
    assert!(second == first);
    settle();
    assert!(
        layer_fetches(&proxy, &layers) >= fetched + 3,
        "a repeat converts again"
    );
}

fn aci_url(server: &Server, repo: &str, ext: &str) -> String {
    format!(
        "{}/c1/aci/127.0.0.1/{repo}/v1/{ext}/linux/amd64/",
        server.url
    )
}

fn keygen(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("key.asc");
    run(strata().args(["keygen", "-o"]).arg(&key));
    key
}

fn sqv_verifies(public_key: &Path, signature: &[u8], data: &[u8]) -> bool {
    let dir = scratch(&format!("sqv-{}", rand_suffix()));
    let home = dir.join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    let gpg = || {
        let mut c = Command::new("gpg");
        c.arg("--homedir")
            .arg(&home)
            .args(["--batch", "--no-autostart"]);
        c
    };
    run(gpg().arg("--import").arg(public_key));
    let keyring = dir.join("keyring.gpg");
    std::fs::write(&keyring, run(gpg().arg("--export"))).unwrap();
    let (sig, file) = (dir.join("sig.asc"), dir.join("data"));
    std::fs::write(&sig, signature).unwrap();
    std::fs::write(&file, data).unwrap();
    Command::new("sqv")
        .arg("--keyring")
        .arg(&keyring)
        .arg(&sig)
        .arg(&file)
        .output()
        .unwrap()
        .status
        .success()
}

/// The signature once it exists (`202` until then).
fn signature(url: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = curl(&[url]);
        if status == 200 {
            return body;
        }
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
        assert!(Instant::now() < deadline, "no signature after 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// ACIs: the repeat is the stored bytes, with a length now, ranges and HEAD; the kept signature
/// verifies them; a server with another key signs the stored bytes without fetching a blob.
#[test]
fn a_stored_aci_is_served_and_signed_from_the_store() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let dir = scratch("stored-aci");
    let key = keygen(&dir);
    let cache = dir.join("cache");
    // A server signing with `key`, on `cache`: the second one is a restart with another key.
    let with = |key: &Path| {
        let args = [
            "--default-registry",
            &proxy.addr,
            "--public-name",
            "127.0.0.1",
            "--signing-key",
            key.to_str().unwrap(),
        ];
        Server::start_with_cache(&proxy.addr, &cache, &args, "warn")
    };
    let server = with(&key);
    let (_, layers) = setup(&env, &proxy, "stored-aci", 2 << 20);
    let url = aci_url(&server, "fixtures/stored-aci", "aci");

    let (h1, first) = fetch(&url);
    assert_eq!(
        header_value(&h1, "content-length"),
        None,
        "a fresh ACI's length is unknown"
    );
    let sig = signature(&aci_url(&server, "fixtures/stored-aci", "aci.asc"));
    settle();
    let fetched = layer_fetches(&proxy, &layers);

    let (h2, second) = fetch(&url);
    assert!(second == first);
    assert_eq!(header_value(&h2, "etag"), header_value(&h1, "etag"));
    assert_eq!(
        header_value(&h2, "content-length"),
        Some(first.len().to_string())
    );
    assert!(sqv_verifies(&key.with_extension("asc.pub"), &sig, &second));
    let part = dir.join("part");
    let (status, h, _) = curl_to(&["-r", "100-199", &url], &part);
    assert_eq!(status, 206);
    assert_eq!(
        header_value(&h, "content-range"),
        Some(format!("bytes 100-199/{}", first.len()))
    );
    assert!(std::fs::read(&part).unwrap() == first[100..200]);
    let (status, head, _) = curl_to(&["-I", &url], &dir.join("head"));
    assert_eq!(status, 200);
    assert_eq!(
        header_value(&head, "content-length"),
        Some(first.len().to_string())
    );
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "the stored ACI fetched blobs"
    );
    drop(server);

    // Same store, another key: no signature of it is kept, and the one made in the background is
    // of the stored bytes, read from the store.
    let other = keygen(&scratch("stored-aci-other"));
    let server = with(&other);
    let sig = signature(&aci_url(&server, "fixtures/stored-aci", "aci.asc"));
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "signing the stored ACI fetched blobs"
    );
    assert!(sqv_verifies(&other.with_extension("asc.pub"), &sig, &first));
    assert!(!sqv_verifies(&key.with_extension("asc.pub"), &sig, &first));
    assert!(fetch(&aci_url(&server, "fixtures/stored-aci", "aci")).1 == first);
    settle();
    assert_eq!(
        layer_fetches(&proxy, &layers),
        fetched,
        "the restarted server converted"
    );
}
