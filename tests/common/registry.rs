//! Registries a test starts for itself (`docker-registry serve` on a free loopback port with its own
//! storage), for what the shared one `scripts/test.sh` starts cannot show: authentication, TLS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a registry may take to accept connections after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry of the test's own, killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    config: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts `docker-registry` with storage in `dir`; `http` is the indented rest of its `http:`
    /// section after `addr` (`tls:`, say) and `auth` the indented body of an `auth:` section.
    pub fn start(dir: &Path, http: &str, auth: Option<&str>) -> Registry {
        let addr = format!("127.0.0.1:{}", free_port());
        let auth = auth.map(|a| format!("auth:\n{a}")).unwrap_or_default();
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: {addr}\n\
             {http}{auth}log:\n  level: warn\n",
            root = dir.join("data").display(),
        );
        let path = dir.join("config.yml");
        std::fs::write(&path, config).unwrap();
        Registry {
            child: spawn(&path, &addr),
            addr,
            config: path,
        }
    }

    /// A registry with storage in `dir` that lets `user` in with `password` only (htpasswd, Basic).
    pub fn htpasswd(dir: &Path, user: &str, password: &str) -> Registry {
        let hash = bcrypt::hash(password, 4).unwrap();
        std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let auth = format!(
            "  htpasswd:\n    realm: strata-test\n    path: {}\n",
            dir.join("htpasswd").display()
        );
        Registry::start(dir, "", Some(&auth))
    }

    /// Pushes `images` (an index if several) as `repo:tag` with `creds` (`user:password`).
    pub fn push(&self, creds: &str, images: Vec<super::fixtures::Image>, repo_tag: &str) {
        let layout = super::scratch(&format!("push-layout-{}", super::rand_suffix()));
        super::fixtures::write_layout(&layout, &images, "v1");
        super::run(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--preserve-digests"])
                .args(["--dest-tls-verify=false", "--dest-creds", creds])
                .arg(format!("oci:{}:v1", layout.display()))
                .arg(format!("docker://{}/{repo_tag}", self.addr)),
        );
        let _ = std::fs::remove_dir_all(&layout);
    }

    /// Stops the registry and starts it again on the same port and storage, so that it reads its
    /// configuration (and certificate bundle) anew.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.config, &self.addr);
    }
}

/// Runs `docker-registry serve config` and waits until `addr` accepts connections; its log is added
/// to the one next to the configuration.
fn spawn(config: &Path, addr: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("docker-registry installed by scripts/test.sh");
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "registry {addr} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
