//! Shared by the integration tests: the services `scripts/test.sh` started (registry, dockerd,
//! containerd), pushing fixtures, the docker-pull oracle, and a strata server per test binary.
#![allow(dead_code)]

pub mod fixtures;
pub mod images;
pub mod proxy;
pub mod pull;
pub mod registry;
pub mod schema1;
pub mod squashing;
pub mod token;
pub mod view;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The services, from the environment `scripts/test.sh` sets. Without them a test fails rather than
/// passing without having run: `cargo test` alone is not how the integration tests are run.
pub struct Env {
    pub registry: String,
    pub containerd: Option<String>,
    pub work: PathBuf,
}

pub fn env() -> Env {
    let Ok(registry) = std::env::var("STRATA_TEST_REGISTRY") else {
        panic!(
            "no test services (STRATA_TEST_REGISTRY is unset): run the integration tests with \
             scripts/test.sh, which starts the registry, dockerd and containerd they need"
        )
    };
    Env {
        registry,
        containerd: std::env::var("STRATA_TEST_CONTAINERD").ok(),
        work: std::env::var("STRATA_TEST_WORK")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir()),
    }
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn docker() -> Command {
    Command::new("docker")
}

/// A fresh scratch directory under the test work dir.
pub fn scratch(name: &str) -> PathBuf {
    let base = env().work;
    let dir = base.join(format!("t-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Pushes an OCI layout to the registry as `repo:tag`, blobs unchanged; `format` `v2s2` converts the
/// manifests (and index) to Docker's schema 2 types.
pub fn push(
    layout: &Path,
    tag_in_layout: &str,
    registry: &str,
    repo: &str,
    tag: &str,
    format: &str,
) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
    match format {
        "oci" => cmd.arg("--preserve-digests"),
        other => cmd.args(["--format", other]),
    };
    run(cmd.args([
        &format!("oci:{}:{tag_in_layout}", layout.display()),
        &format!("docker://{registry}/{repo}:{tag}"),
    ]));
}

/// Pushes `images` as `fixtures/<name>:v1` with OCI manifests; returns the reference.
pub fn publish(env: &Env, name: &str, images: Vec<fixtures::Image>) -> String {
    publish_as(env, name, images, "oci")
}

/// Same, with the manifest format `oci` or `v2s2` (Docker schema 2 manifests and manifest list).
pub fn publish_as(env: &Env, name: &str, images: Vec<fixtures::Image>, format: &str) -> String {
    // Unique: tests of one binary may publish the same image at once.
    let dir = scratch(&format!("layout-{name}-{}", rand_suffix()));
    fixtures::write_layout(&dir, &images, "v1");
    push(
        &dir,
        "v1",
        &env.registry,
        &format!("fixtures/{name}"),
        "v1",
        format,
    );
    let _ = std::fs::remove_dir_all(&dir);
    format!("{}/fixtures/{name}:v1", env.registry)
}

/// Pushes `fixtures/<name>:v1` again as `fixtures/<name>:<tag>`.
pub fn retag(env: &Env, name: &str, tag: &str) {
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg("--dest-tls-verify=false")
        .arg(format!("docker://{}/fixtures/{name}:v1", env.registry))
        .arg(format!("docker://{}/fixtures/{name}:{tag}", env.registry)));
}

/// Pushes a one-layer gzip image `fixtures/<name>:v1`; returns its layer blob's digest, hex only (what
/// the proxy's rules match in blob URLs).
pub fn publish_layer(env: &Env, name: &str, layer: fixtures::Layer) -> String {
    let image = fixtures::Image::new(vec![(layer, fixtures::Comp::Gzip)]);
    publish(env, name, vec![image]);
    layer_digests(&env.registry, &format!("fixtures/{name}"), "v1")[0][7..].to_string()
}

/// The digests of an image's layer blobs, bottom first, as the registry serves its manifest.
pub fn layer_digests(registry: &str, repo: &str, tag: &str) -> Vec<String> {
    let (status, _, body) = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{registry}/v2/{repo}/manifests/{tag}"),
    ]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// One line per path of a container's exported file system: path, type, mode, uid, gid, size,
/// content hash, link target, xattrs. Hardlinks are listed with their target's content.
pub fn listing<R: Read>(tar: R) -> BTreeMap<String, String> {
    listing_under(tar, "")
}

/// The listing of a docker-load archive's squashed layer: what two archives of one image share
/// whether their layer member was sized exactly or padded to a bound.
pub fn squash_listing(archive: &[u8]) -> BTreeMap<String, String> {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().ends_with("layer.tar") {
            return listing(entry);
        }
    }
    panic!("no layer.tar in the archive");
}

/// [`listing`] of the entries under `prefix` (an ACI's `rootfs/`), paths and hardlink targets taken
/// relative to it; entries elsewhere are left out.
pub fn listing_under<R: Read>(tar: R, prefix: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut content_of: BTreeMap<String, (String, String, usize)> = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes())
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_string();
        let Some(path) = path.strip_prefix(prefix).map(str::to_string) else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        let h = e.header().clone();
        let kind = h.entry_type();
        let mut xattrs = Vec::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                if let Some(k) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push(format!("{k}={}", hex::encode(ext.value_bytes())));
                }
            }
        }
        xattrs.sort();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        // Hashed as it streams: fixtures hold files of several GiB.
        let mut hasher = Sha256::new();
        let len = std::io::copy(&mut e, &mut hasher).unwrap() as usize;
        let digest = hasher.finalize();
        // A hardlink is listed as the file it shares: which name of a group an archive stores first
        // (the content) and which as links differs between writers, not between file systems.
        let (t, hash, size) = match kind {
            tar::EntryType::Link => {
                let target = link.trim_start_matches("./");
                let target = target.strip_prefix(prefix).unwrap_or(target).to_string();
                content_of
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| ("Regular".into(), format!("missing-target:{target}"), 0))
            }
            _ => {
                let c = hex::encode(digest);
                let line = (
                    format!("{kind:?}"),
                    if kind.is_file() { c } else { String::new() },
                    len,
                );
                if kind.is_file() {
                    content_of.insert(path.clone(), line.clone());
                }
                line
            }
        };
        let (major, minor) = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        let dev = if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            format!(" dev={major},{minor}")
        } else {
            String::new()
        };
        let link = if kind == tar::EntryType::Symlink {
            format!(" -> {link}")
        } else {
            String::new()
        };
        let line = format!(
            "{t} {:o} {}:{} size={size} {}{link}{dev} [{}]",
            h.mode().unwrap() & 0o7777,
            h.uid().unwrap(),
            h.gid().unwrap(),
            &hash.get(..12).unwrap_or(""),
            xattrs.join(",")
        );
        out.insert(path, line);
    }
    out
}

/// The exported file system of a container created from `image`.
pub fn export_listing(image: &str) -> BTreeMap<String, String> {
    let id = String::from_utf8(run(docker().args(["create", image, "/nonexistent"])))
        .unwrap()
        .trim()
        .to_string();
    let mut child = docker()
        .args(["export", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let listing = listing(child.stdout.take().unwrap());
    assert!(child.wait().unwrap().success());
    run(docker().args(["rm", &id]));
    listing
}

/// The oracle: what `docker pull` gives.
pub fn oracle(image: &str) -> BTreeMap<String, String> {
    run(docker().args(["pull", "-q", image]));
    export_listing(image)
}

/// Asserts two listings are equal, showing only the differing lines.
pub fn assert_same(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>, what: &str) {
    let mut diff = Vec::new();
    for (p, l) in want {
        match got.get(p) {
            Some(g) if g == l => {}
            Some(g) => diff.push(format!("  {p}\n    docker pull: {l}\n    strata:      {g}")),
            None => diff.push(format!("  {p} missing from strata's image ({l})")),
        }
    }
    for (p, l) in got {
        if !want.contains_key(p) {
            diff.push(format!("  {p} only in strata's image ({l})"));
        }
    }
    assert!(
        diff.is_empty(),
        "{what}: file systems differ:\n{}",
        diff.join("\n")
    );
}

/// A strata server for the test binary's lifetime (killed when the `Server` drops).
pub struct Server {
    child: Child,
    pub url: String,
    pub cache: PathBuf,
    /// Everything the server logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        LIVE.lock().unwrap().retain(|pid| *pid != self.child.id());
    }
}

/// Servers not dropped yet. Static ones (shared by the tests of a binary) never are, and a server that
/// outlived its test binary would hold the binary's output open (`cargo test | grep` would hang):
/// whatever is left is killed when the binary exits.
static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

extern "C" fn kill_live_servers() {
    let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for pid in live {
        // SAFETY: kill(2) with a pid this binary spawned and has not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

fn track(pid: u32) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a function that only reads a mutex and sends signals.
        assert_eq!(unsafe { libc::atexit(kill_live_servers) }, 0);
    });
    LIVE.lock().unwrap().push(pid);
}

impl Server {
    /// Sends SIGTERM, as a service manager stopping it would.
    pub fn terminate(&self) {
        run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
    }

    /// SIGKILL, as a crash or the OOM killer would: nothing of the process runs after it.
    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits up to `timeout` for the process to exit; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server process's peak resident set size so far (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

pub fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

impl Server {
    pub fn start(registry: &str, extra: &[&str]) -> Server {
        Server::start_logging(registry, extra, "warn")
    }

    /// Starts a server with `RUST_LOG` set to `filter`, on a scratch cache directory of its own
    /// (none if `extra` holds `--no-cache`).
    pub fn start_logging(registry: &str, extra: &[&str], filter: &str) -> Server {
        let cache = scratch(&format!("cache-{}", rand_suffix()));
        Server::start_with_cache(registry, &cache, extra, filter)
    }

    /// Starts a server on an existing cache directory: a restart of an earlier one that used `cache`.
    pub fn start_with_cache(registry: &str, cache: &Path, extra: &[&str], filter: &str) -> Server {
        Server::start_with_env(registry, cache, extra, filter, &[])
    }

    /// Same, with more environment variables.
    pub fn start_with_env(
        registry: &str,
        cache: &Path,
        extra: &[&str],
        filter: &str,
        vars: &[(&str, &str)],
    ) -> Server {
        let cache = cache.to_path_buf();
        // strata refuses `--cache-dir` beside `--no-cache`.
        let cached = !extra.contains(&"--no-cache");
        let mut child = strata()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--insecure-registry",
                registry,
            ])
            .args(cached.then_some("--cache-dir"))
            .args(cached.then_some(&cache))
            .args(extra)
            .envs(vars.iter().copied())
            .env("RUST_LOG", filter)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        track(child.id());
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let url = loop {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "strata serve exited before listening"
            );
            if let Some(u) = line.trim().strip_prefix("strata: listening on ") {
                break u.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(line.clone()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                eprint!("[strata] {sink}");
                kept.lock().unwrap().push_str(&sink);
                sink.clear();
            }
        });
        Server {
            child,
            url,
            cache,
            log,
        }
    }
}

/// A loopback port nothing listens on (for a moment): for services a test starts, or for a dead host.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

/// One server shared by the tests of a binary.
pub fn shared_server(registry: &str) -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(registry, &[]))
}

/// Downloads `url` into `file` with curl, failing the test on an error status or a failed transfer;
/// returns the response headers.
pub fn download_to(url: &str, file: &Path) -> String {
    let headers = file.with_extension("headers");
    let out = Command::new("curl")
        .args(["-sS", "-f", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(file)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&headers).unwrap()
}

/// GET with curl: (status, headers, body). `curl` is what users run.
pub fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = scratch(&format!("curl-{}", rand_suffix()));
    let headers = dir.join("h");
    let body = dir.join("b");
    let out = Command::new("curl")
        .args(["-sS", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let h = std::fs::read_to_string(&headers).unwrap_or_default();
    let b = std::fs::read(&body).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, h, b)
}

/// GETs `url`, which must fail before the first byte with `status` and a JSON error body
/// `{"error":{"code":…,"message":…}}`; returns the body.
pub fn json_error(url: &str, status: u16) -> serde_json::Value {
    json_error_curl(&[url], status)
}

/// Same, with more curl arguments (credentials, say) before the URL.
pub fn json_error_curl(args: &[&str], status: u16) -> serde_json::Value {
    let (got, headers, body) = curl(args);
    assert_eq!(got, status, "{args:?}: {}", String::from_utf8_lossy(&body));
    assert_eq!(
        header_value(&headers, "content-type").as_deref(),
        Some("application/json"),
        "{args:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
    assert!(
        v["error"]["code"].is_string() && v["error"]["message"].is_string(),
        "{args:?}: {v}"
    );
    v
}

pub fn header_value(headers: &str, name: &str) -> Option<String> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The files of the blobs a tarball with these bytes is stored as in the store at `store` (its
/// parts, in order, as its descriptor names them, whether or not each file is still there); empty
/// when no descriptor names such parts.
pub fn stored_parts(store: &Path, bytes: &[u8]) -> Vec<PathBuf> {
    let blobs = store.join("blobs/sha256");
    let Ok(dir) = std::fs::read_dir(&blobs) else {
        return Vec::new();
    };
    for entry in dir {
        let path = entry.unwrap().path();
        if std::fs::metadata(&path).map_or(true, |m| m.len() > 64 << 10) {
            continue;
        }
        let Ok(doc) =
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path).unwrap_or_default())
        else {
            continue;
        };
        if doc["mediaType"] != "application/vnd.strata.tarball.v1+json" {
            continue;
        }
        let mut offset = 0usize;
        let mut parts = Vec::new();
        for part in doc["layers"].as_array().unwrap() {
            let size = part["size"].as_u64().unwrap() as usize;
            let digest = part["digest"].as_str().unwrap();
            let Some(piece) = bytes.get(offset..offset + size) else {
                break;
            };
            if format!("sha256:{}", hex::encode(Sha256::digest(piece))) != digest {
                break;
            }
            parts.push(blobs.join(&digest["sha256:".len()..]));
            offset += size;
        }
        if offset == bytes.len() && parts.len() == doc["layers"].as_array().unwrap().len() {
            return parts;
        }
    }
    Vec::new()
}

/// Whether a tarball with these bytes is stored whole in the store at `store`, waiting up to 10 s
/// for it to be (it is published once its last byte has been sent).
pub fn stored_whole(store: &Path, bytes: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let parts = stored_parts(store, bytes);
        if !parts.is_empty() && parts.iter().all(|p| p.exists()) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
