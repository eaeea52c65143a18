//! The real rkt (1.30, the last release) against strata: `rkt trust` of the key discovery names,
//! `rkt fetch` by URL and by name (appc discovery), each verifying the signature, and
//! `rkt image extract --rootfs-only` giving the file system `docker pull` gives.
//!
//! Not in the default run: it needs a rkt binary, named by `STRATA_TEST_RKT`, and port 80 on
//! loopback, because appc names hold no port and rkt's discovery asks the default one. Run it by
//! hand: `STRATA_TEST_RKT=/path/to/rkt cargo test --release --test aci -- --ignored rkt`.

use std::process::Stdio;

use super::*;

/// Where name-based discovery finds the service: the name `127.0.0.1/...` on the default port.
const DISCOVERY_LISTEN: &str = "127.0.0.1:80";
/// How long strata may take to listen.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// rkt with every directory it writes (store, keys, configuration) in a scratch directory.
struct Rkt {
    bin: PathBuf,
    dir: PathBuf,
}

impl Rkt {
    fn new() -> Rkt {
        let bin = std::env::var("STRATA_TEST_RKT")
            .unwrap_or_else(|_| panic!("STRATA_TEST_RKT must name a rkt binary"));
        Rkt {
            bin: bin.into(),
            dir: scratch("rkt"),
        }
    }

    /// Runs `rkt <args>`, printing the command line and everything rkt printed (the evidence a
    /// reader of the test log wants); whether it succeeded, and stdout and stderr.
    fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(&self.bin);
        for (flag, sub) in [
            ("--dir", "data"),
            ("--local-config", "local"),
            ("--system-config", "system"),
            ("--user-config", "user"),
        ] {
            cmd.arg(format!("{flag}={}", self.dir.join(sub).display()));
        }
        // Plain http on loopback; signatures are still checked (that would be `image`).
        cmd.arg("--insecure-options=http").args(args);
        eprintln!("$ {cmd:?}");
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("{stdout}{stderr}[exit: {}]", out.status);
        (out.status.success(), stdout, stderr)
    }

    fn run(&self, args: &[&str]) -> (String, String) {
        let (ok, stdout, stderr) = self.try_run(args);
        assert!(ok, "rkt {args:?} failed:\n{stderr}");
        (stdout, stderr)
    }

    /// `rkt image extract --rootfs-only`, listed as the docker-pull oracle lists a container.
    fn rootfs_listing(&self, hash: &str) -> BTreeMap<String, String> {
        let root = self.dir.join(format!("rootfs-{}", rand_suffix()));
        self.run(&[
            "image",
            "extract",
            "--rootfs-only",
            hash,
            root.to_str().unwrap(),
        ]);
        let mut tar = Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*"])
            .args(["--format=posix", "-C"])
            .arg(&root)
            .args(["-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut listing = listing(tar.stdout.take().unwrap());
        assert!(tar.wait().unwrap().success());
        // The root itself, which a container's export does not list.
        listing.remove(".");
        listing
    }
}

/// strata on the default port, signing with the shared test key; killed when dropped.
struct DefaultPortServer(std::process::Child);

impl DefaultPortServer {
    fn start(env: &Env, key: &Path) -> DefaultPortServer {
        let log = scratch("rkt-strata").join("strata.log");
        let child = strata()
            .args(["serve", "--listen", DISCOVERY_LISTEN])
            .args(["--insecure-registry", &env.registry])
            .args(["--default-registry", &env.registry])
            .args(["--public-name", PUBLIC_NAME, "--signing-key"])
            .arg(key)
            .arg("--cache-dir")
            .arg(scratch("rkt-cache"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = DefaultPortServer(child);
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let (status, _, _) = curl(&[&format!("http://{DISCOVERY_LISTEN}/healthz")]);
            if status == 200 {
                return server;
            }
            if let Some(exit) = server.0.try_wait().unwrap() {
                panic!(
                    "strata on {DISCOVERY_LISTEN} exited ({exit}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "strata not listening on {DISCOVERY_LISTEN}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for DefaultPortServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The one identity of the key rkt trusted, as `rkt fetch` names it when a signature verifies.
fn signer(public_key: &Path) -> String {
    let gpg = gpg_with(public_key);
    let listing = String::from_utf8(run(gpg().args(["--with-colons", "--list-keys"]))).unwrap();
    listing
        .lines()
        .find_map(|l| l.strip_prefix("uid:"))
        .and_then(|l| l.split(':').nth(8))
        .expect("a user id")
        .to_string()
}

/// Asserts rkt said it verified a signature by the test key, and returns the image hash it printed.
fn verified_hash(stdout: &str, stderr: &str, signer: &str) -> String {
    let verified = stderr
        .split_once("signature verified:")
        .unwrap_or_else(|| panic!("rkt verified no signature:\n{stderr}"))
        .1;
    assert!(
        verified.lines().nth(1).is_some_and(|l| l.trim() == signer),
        "signed by someone else:\n{stderr}"
    );
    let hash = stdout.trim();
    assert!(hash.starts_with("sha512-"), "no image hash: {stdout}");
    hash.to_string()
}

#[test]
#[ignore = "needs a rkt binary in STRATA_TEST_RKT"]
fn rkt_trusts_fetches_and_extracts() {
    let env = env();
    let rkt = Rkt::new();
    let by_url = published(&env, "hardlinks");
    let by_name = published(&env, "special");
    let keys = aci_server(&env);
    let _server = DefaultPortServer::start(&env, &keys.key);
    let url = format!(
        "http://{DISCOVERY_LISTEN}/c1/aci/{PUBLIC_NAME}/fixtures/hardlinks/v1/aci/linux/amd64/hardlinks-v1.aci"
    );

    // Before any trust the signature is checked, and refused.
    let (ok, _, stderr) = rkt.try_run(&["fetch", "--full", &url]);
    assert!(
        !ok,
        "rkt fetched an image signed by a key it does not trust"
    );
    assert!(stderr.contains("signature"), "{stderr}");

    // The key as discovery names it (`ac-discovery-pubkeys`), fetched from `/aci-signing-key`.
    let (_, stderr) = rkt.run(&[
        "trust",
        "--prefix",
        &format!("{PUBLIC_NAME}/fixtures"),
        "--insecure-allow-http",
        "--skip-fingerprint-review",
    ]);
    assert!(
        stderr.contains(&format!("http://{PUBLIC_NAME}/aci-signing-key")),
        "{stderr}"
    );
    let signer = signer(&keys.public_key);

    let (stdout, stderr) = rkt.run(&["fetch", "--full", &url]);
    let hash = verified_hash(&stdout, &stderr, &signer);
    assert_same_as_docker_pull(
        &env,
        &by_url,
        &rkt.rootfs_listing(&hash),
        "rkt's rootfs of the ACI fetched by URL",
    );

    let name = format!("{PUBLIC_NAME}/fixtures/special:v1");
    let (stdout, stderr) = rkt.run(&["fetch", "--full", &name]);
    let hash = verified_hash(&stdout, &stderr, &signer);
    let rootfs = rkt.rootfs_listing(&hash);
    assert_same_as_docker_pull(
        &env,
        &by_name,
        &rootfs,
        "rkt's rootfs of the ACI fetched by name",
    );
    // The comparison leaves xattrs out (docker's vfs driver drops them); rkt's extraction keeps them.
    assert!(
        rootfs["xattr"].ends_with("[user.bin=000102,user.strata=796573]"),
        "{}",
        rootfs["xattr"]
    );
    let (images, _) = rkt.run(&["image", "list", "--no-legend", "--fields=name"]);
    assert!(
        images.contains(&format!("{PUBLIC_NAME}/fixtures/special:v1")),
        "{images}"
    );
    assert!(
        images.contains(&format!("{PUBLIC_NAME}/fixtures/hardlinks:v1")),
        "{images}"
    );
}
