//! The published Dockerfile, built and run with nothing pulled from anywhere: the test makes the
//! two images its runtime stage takes as build arguments (`RUNTIME_BASE`: the libraries `ldd` lists,
//! /etc/passwd and the directories Debian's base has; `BIN_IMAGE`: this build's binary where the
//! build stage would leave it), builds the Dockerfile with BuildKit, which skips the Rust build stage
//! nothing then uses, runs the image as it ships (its user, volume and healthcheck) and squashes an
//! image through it over HTTP.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The service's uid and gid, fixed in the Dockerfile.
const SERVICE_ID: &str = "10001";

/// `docker build` with BuildKit. Debian's docker.io CLI has BuildKit built in (DOCKER_BUILDKIT=1);
/// a newer CLI without the buildx plugin falls back to the legacy builder, which builds every stage
/// and so would try to pull the Rust image: take Debian's where it is installed.
fn docker_build() -> Command {
    let debian = Path::new("/usr/bin/docker");
    let mut cmd = Command::new(if debian.exists() {
        debian
    } else {
        Path::new("docker")
    });
    cmd.env("DOCKER_BUILDKIT", "1").arg("build");
    cmd
}

/// Removes what the test made in docker, whatever the outcome.
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker().args(["rm", "-f", "-v", c]).output();
        }
        for i in &self.images {
            let _ = docker().args(["rmi", "-f", i]).output();
        }
    }
}

/// `docker import` of `dir` as `name`, the tree as it is on disk (owned by root here).
fn import(dir: &Path, name: &str) {
    let tar = dir.with_extension("tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    run(docker().arg("import").arg(&tar).arg(name));
}

/// A runtime base with what the binary needs and nothing to run besides it: its shared libraries,
/// the passwd and group entries of root and the service, and the directories a Debian base has
/// that the Dockerfile writes into (so the COPY into /var/cache creates only the store's directory).
fn make_base(dir: &Path, binary: &Path) {
    let ldd = String::from_utf8(run(Command::new("ldd").arg(binary))).unwrap();
    let libs: Vec<&str> = ldd
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .collect();
    assert!(
        libs.iter().any(|l| l.contains("libc.so")),
        "ldd listed no libc: {ldd}"
    );
    for lib in libs {
        let to = dir.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap_or_else(|e| panic!("copying {lib}: {e}"));
    }
    for d in ["etc", "tmp", "var/cache", "usr/local/bin"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             strata:x:{SERVICE_ID}:{SERVICE_ID}:strata:/var/cache/strata:/sbin/nologin\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        format!("root:x:0:\nstrata:x:{SERVICE_ID}:\n"),
    )
    .unwrap();
}

/// What the build stage leaves: /out/strata with its debug info stripped (as the stage does, else
/// vfs copies 120 MB per layer) and the store's empty directory.
fn make_bin(dir: &Path, binary: &Path) {
    std::fs::create_dir_all(dir.join("out/cache/strata")).unwrap();
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(dir.join("out/strata")));
}

fn inspect(what: &str, format: &str) -> String {
    let out = run(docker().args(["inspect", "-f", format, what]));
    String::from_utf8(out).unwrap().trim().to_string()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits until docker reports the container's health as `healthy`, failing on `unhealthy`, on an
/// exit, or after `timeout`.
fn wait_healthy(container: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let state = inspect(container, "{{.State.Status}} {{.State.Health.Status}}");
        match state.as_str() {
            "running healthy" => return,
            s if s.ends_with("unhealthy") || !s.starts_with("running") => {
                let logs = docker().args(["logs", container]).output().unwrap();
                panic!(
                    "container {container}: {s}; health log {}; logs:\n{}{}",
                    inspect(container, "{{json .State.Health.Log}}"),
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            s => assert!(Instant::now() < deadline, "{container} still {s}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn runtime_image_builds_offline_runs_unprivileged_and_serves_a_squash() {
    let env = env();
    let id = format!("{}-{}", std::process::id(), rand_suffix());
    let base = format!("strata-test/runtime-base:{id}");
    let bin = format!("strata-test/runtime-bin:{id}");
    let image = format!("strata-test/runtime:{id}");
    let container = format!("strata-test-runtime-{id}");
    let as_shipped = format!("strata-test-runtime-default-{id}");
    let _cleanup = Cleanup {
        containers: vec![container.clone(), as_shipped.clone()],
        images: vec![image.clone(), bin.clone(), base.clone()],
    };

    let binary = Path::new(env!("CARGO_BIN_EXE_strata"));
    let dir = scratch("runtime-image");
    make_base(&dir.join("base"), binary);
    import(&dir.join("base"), &base);
    make_bin(&dir.join("bin"), binary);
    import(&dir.join("bin"), &bin);

    // The repository as the build context, the Dockerfile as published.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let build = docker_build()
        .args(["--progress", "plain"])
        .args(["--build-arg", &format!("RUNTIME_BASE={base}")])
        .args(["--build-arg", &format!("BIN_IMAGE={bin}")])
        .args(["-t", &image])
        .arg(repo)
        .output()
        .unwrap();
    let progress = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "docker build failed:\n{progress}");
    // Nothing was pulled, nor even looked up: on a machine with a network too, the build stage's
    // image is never resolved (BuildKit's progress names every image whose metadata it loads).
    assert!(
        progress.contains(&base) && !progress.contains("rust:1-bookworm"),
        "the build looked beyond the images it was given:\n{progress}"
    );

    // As the Dockerfile says: the service's user, the store on a volume, the healthcheck.
    assert_eq!(
        inspect(&image, "{{.Config.User}}"),
        format!("{SERVICE_ID}:{SERVICE_ID}")
    );
    assert_eq!(
        inspect(&image, "{{json .Config.Volumes}}"),
        r#"{"/var/cache/strata":{}}"#
    );
    assert_eq!(
        inspect(&image, "{{json .Config.Healthcheck.Test}}"),
        r#"["CMD","/usr/local/bin/strata","healthcheck"]"#
    );
    assert_eq!(
        inspect(&image, "{{json .Config.ExposedPorts}}"),
        r#"{"8080/tcp":{}}"#
    );

    // As shipped, no argument: CMD listens on 0.0.0.0:8080 and the HEALTHCHECK's default URL finds
    // it. A network of its own (only loopback, `none`), so port 8080 of the host is not involved.
    run(docker()
        .args(["run", "-d", "--name", &as_shipped, "--network", "none"])
        .args(["--health-interval", "1s", "--health-start-period", "0s"])
        .arg(&image));
    wait_healthy(&as_shipped, Duration::from_secs(60));
    run(docker().args(["rm", "-f", "-v", &as_shipped]));

    // The host's network: this daemon runs with --bridge=none, so a container has no network of
    // its own to publish a port from; on the host's it reaches the test registry on loopback. The
    // port is a free one rather than the image's 8080, so the healthcheck is told the same URL.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    run(docker()
        .args(["run", "-d", "--name", &container, "--network", "host"])
        // As Kubernetes runs it (readOnlyRootFilesystem, an emptyDir at /tmp): only the volume
        // and /tmp are writable.
        .args(["--read-only", "--tmpfs", "/tmp"])
        .args(["--health-interval", "1s", "--health-start-period", "0s"])
        .args([
            "-e",
            &format!("STRATA_HEALTHCHECK_URL=http://{listen}/healthz"),
        ])
        .arg(&image)
        .args(["serve", "--listen", &listen])
        .args(["--insecure-registry", &env.registry]));
    wait_healthy(&container, Duration::from_secs(60));

    // The server runs as the service's uid, not root.
    let pid = inspect(&container, "{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uids.split_whitespace().skip(1).collect::<Vec<_>>(),
        [SERVICE_ID; 4],
        "{uids}"
    );

    let reference = publish(&env, "runtime-image", common::images::basic());
    let want = oracle(&reference);
    let tag = format!("strata-test/runtime-squashed:{id}");
    let file = dir.join("squash.tar");
    download_to(
        &format!("http://{listen}/squash/{reference}?tag={tag}"),
        &file,
    );
    let loaded = run(docker().arg("load").arg("-i").arg(&file));
    assert!(
        String::from_utf8_lossy(&loaded).contains(&tag),
        "docker load said: {}",
        String::from_utf8_lossy(&loaded)
    );
    let got = export_listing(&tag);
    let _ = docker().args(["rmi", "-f", &tag]).output();
    assert_same(&want, &got, "squash served from the container");

    // The conversion was stored on the volume, as the service's user.
    let volume = inspect(
        &container,
        "{{range .Mounts}}{{if eq .Destination \"/var/cache/strata\"}}{{.Source}}{{end}}{{end}}",
    );
    assert!(!volume.is_empty(), "no volume at /var/cache/strata");
    let blobs = Path::new(&volume).join("store/blobs/sha256");
    let stored: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap_or_else(|e| panic!("{}: {e}", blobs.display()))
        .map(|e| e.unwrap())
        .collect();
    assert!(!stored.is_empty(), "nothing stored in {}", blobs.display());
    use std::os::unix::fs::MetadataExt;
    for e in &stored {
        assert_eq!(
            e.metadata().unwrap().uid().to_string(),
            SERVICE_ID,
            "{:?}",
            e.path()
        );
    }
}
