//! The appc image manifest (spec 0.8.11) generated from an OCI/Docker image config. Everything that
//! depends on the config alone is decided before the first byte ([`ManifestPlan::new`], where appc's
//! refusals become errors); the user and group need the merged `/etc/passwd` and `/etc/group`, so the
//! manifest itself is rendered after `rootfs/` ([`ManifestPlan::render`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::names::{ac_name, is_ac_identifier, is_env_name, sanitize_ac_identifier};
use super::user;

/// The appc version whose schema the manifest follows (the last release).
pub const AC_VERSION: &str = "0.8.11";

/// Annotations whose values appc validates (`annotations.go`); image labels never take these names.
const CHECKED_ANNOTATIONS: &[&str] = &["created", "homepage", "documentation"];

/// What the manifest says besides the config: its identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The ACIdentifier the image is fetched by.
    pub name: String,
    /// `version` label (the tag).
    pub version: String,
    /// appc os and arch labels.
    pub os: String,
    pub arch: String,
    /// Registry host and repository path, for the docker2aci-style annotations.
    pub registry: String,
    pub repository: String,
    /// `sha256:…` of the image manifest and of the config.
    pub manifest_digest: String,
    pub config_digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Port {
    port: u32,
    protocol: String,
    count: u32,
}

/// The manifest, but for the user and group.
#[derive(Debug, Clone)]
pub struct ManifestPlan {
    identity: Identity,
    exec: Vec<String>,
    user: String,
    working_directory: Option<String>,
    environment: Vec<(String, String)>,
    mount_points: Vec<(String, String)>,
    ports: Vec<Port>,
    annotations: Vec<(String, String)>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl ManifestPlan {
    /// Maps the config's `config` section; refuses what appc cannot express instead of writing an
    /// invalid manifest.
    pub fn new(config: &Value, identity: Identity) -> Result<ManifestPlan, String> {
        if !is_ac_identifier(&identity.name) {
            return Err(format!("{:?} is not a valid appc name", identity.name));
        }
        let c = config.get("config").cloned().unwrap_or(Value::Null);
        let entrypoint = strings(c.get("Entrypoint"));
        let cmd = strings(c.get("Cmd"));
        let exec = entrypoint.iter().chain(&cmd).cloned().collect();

        let mut environment: Vec<(String, String)> = Vec::new();
        for var in strings(c.get("Env")) {
            // Only the first `=` separates: `A=b=c` is A with the value `b=c`.
            let (name, value) = var.split_once('=').unwrap_or((&var, ""));
            if !is_env_name(name) {
                return Err(format!(
                    "environment variable {name:?} has a name appc does not allow \
                     (^[A-Za-z_][A-Za-z_0-9.-]*$)"
                ));
            }
            match environment.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value.to_string(),
                None => environment.push((name.to_string(), value.to_string())),
            }
        }

        let working_directory = c
            .get("WorkingDir")
            .and_then(Value::as_str)
            .filter(|w| !w.is_empty())
            .map(|w| {
                if w.starts_with('/') {
                    w.to_string()
                } else {
                    format!("/{w}")
                }
            });

        let ports = ports(&c)?;
        let mount_points = mount_points(&c);
        let annotations = annotations(config, &c, &identity, &entrypoint, &cmd);
        Ok(ManifestPlan {
            identity,
            exec,
            user: c
                .get("User")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            working_directory,
            environment,
            mount_points,
            ports,
            annotations,
        })
    }

    /// The manifest's bytes, the user and group resolved against the merged files.
    pub fn render(&self, passwd: Option<&[u8]>, group: Option<&[u8]>) -> Vec<u8> {
        let who = user::resolve(&self.user, passwd, group);
        let mut app = json!({ "user": who.user, "group": who.group });
        if !self.exec.is_empty() {
            app["exec"] = json!(self.exec);
        }
        if !who.supplementary_gids.is_empty() {
            app["supplementaryGIDs"] = json!(who.supplementary_gids);
        }
        if let Some(w) = &self.working_directory {
            app["workingDirectory"] = json!(w);
        }
        if !self.environment.is_empty() {
            app["environment"] = Value::Array(
                self.environment
                    .iter()
                    .map(|(n, v)| json!({"name": n, "value": v}))
                    .collect(),
            );
        }
        if !self.mount_points.is_empty() {
            app["mountPoints"] = Value::Array(
                self.mount_points
                    .iter()
                    .map(|(n, p)| json!({"name": n, "path": p}))
                    .collect(),
            );
        }
        if !self.ports.is_empty() {
            app["ports"] = Value::Array(
                self.ports
                    .iter()
                    .map(|p| {
                        json!({
                            "name": port_name(p),
                            "protocol": p.protocol,
                            "port": p.port,
                            "count": p.count,
                            "socketActivated": false,
                        })
                    })
                    .collect(),
            );
        }
        let id = &self.identity;
        let mut manifest = json!({
            "acKind": "ImageManifest",
            "acVersion": AC_VERSION,
            "name": id.name,
            "labels": [
                {"name": "version", "value": id.version},
                {"name": "os", "value": id.os},
                {"name": "arch", "value": id.arch},
            ],
            "app": app,
        });
        if !self.annotations.is_empty() {
            manifest["annotations"] = Value::Array(
                self.annotations
                    .iter()
                    .map(|(n, v)| json!({"name": n, "value": v}))
                    .collect(),
            );
        }
        let mut bytes = serde_json::to_vec_pretty(&manifest).expect("a JSON value serialises");
        bytes.push(b'\n');
        bytes
    }
}

fn port_name(p: &Port) -> String {
    if p.count == 1 {
        format!("{}-{}", p.port, p.protocol)
    } else {
        format!("{}-{}-{}", p.port, p.port + p.count - 1, p.protocol)
    }
}

/// `ExposedPorts` keys (`80/tcp`, `53/udp`, `8000-8010/tcp`, `8080`) as appc ports; a range is one port
/// with a `count`.
fn ports(c: &Value) -> Result<Vec<Port>, String> {
    let Some(map) = c.get("ExposedPorts").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    let mut out = BTreeSet::new();
    for key in map.keys() {
        let bad = || format!("exposed port {key:?} is not PORT[-END][/PROTOCOL] within 1-65535");
        let (range, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
        let protocol = protocol.to_ascii_lowercase();
        if ac_name(&protocol).as_deref() != Some(protocol.as_str()) {
            return Err(bad());
        }
        let (start, end) = range.split_once('-').unwrap_or((range, range));
        let start: u32 = start.parse().map_err(|_| bad())?;
        let end: u32 = end.parse().map_err(|_| bad())?;
        if start == 0 || end > 65535 || end < start {
            return Err(bad());
        }
        out.insert(Port {
            port: start,
            protocol,
            count: end - start + 1,
        });
    }
    Ok(out.into_iter().collect())
}

/// `Volumes` as mount points named after their paths; names that would collide (`/Data` and `/data`,
/// `/a-b` and `/a/b`) get `-2`, `-3`, … in path order, so the names never depend on map order.
fn mount_points(c: &Value) -> Vec<(String, String)> {
    let Some(map) = c.get("Volumes").and_then(Value::as_object) else {
        return Vec::new();
    };
    let paths: BTreeSet<&String> = map.keys().collect();
    let mut taken = BTreeSet::new();
    let mut out = Vec::new();
    for path in paths {
        let base = ac_name(path).unwrap_or_else(|| "volume".to_string());
        let mut name = base.clone();
        let mut n = 1;
        while taken.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        taken.insert(name.clone());
        out.push((name, path.clone()));
    }
    out
}

/// `created`, where the image came from (docker2aci's `appc.io/docker/*` names, which rkt tooling
/// knows), and the image's labels under their own names where appc allows them.
fn annotations(
    config: &Value,
    c: &Value,
    id: &Identity,
    entrypoint: &[String],
    cmd: &[String],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(created) = config
        .get("created")
        .and_then(Value::as_str)
        .filter(|s| is_rfc3339(s))
    {
        out.push(("created".into(), created.into()));
    }
    let docker = [
        ("registryurl", id.registry.clone()),
        ("repository", id.repository.clone()),
        ("manifesthash", id.manifest_digest.clone()),
        ("imageid", id.config_digest.clone()),
        (
            "entrypoint",
            serde_json::to_string(entrypoint).expect("JSON"),
        ),
        ("cmd", serde_json::to_string(cmd).expect("JSON")),
    ];
    for (k, v) in docker {
        out.push((format!("appc.io/docker/{k}"), v));
    }
    let labels: BTreeMap<&String, &Value> = c
        .get("Labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    for (key, value) in labels {
        let Some(name) = sanitize_ac_identifier(key) else {
            continue;
        };
        if CHECKED_ANNOTATIONS.contains(&name.as_str()) || out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let value = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_string);
        out.push((name, value));
    }
    out
}

/// What Go's `time.Parse(time.RFC3339, …)` accepts, which appc requires of `created`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(digits(0..4) && at(4, b'-') && digits(5..7) && at(7, b'-') && digits(8..10))
        || !(at(10, b'T') && digits(11..13) && at(13, b':') && digits(14..16))
        || !(at(16, b':') && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && at(i + 3, b':') && digits(i + 4..i + 6)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            name: "example.com/ns/app".into(),
            version: "1.0".into(),
            os: "linux".into(),
            arch: "aarch64".into(),
            registry: "localhost:5000".into(),
            repository: "ns/app".into(),
            manifest_digest: format!("sha256:{}", "a".repeat(64)),
            config_digest: format!("sha256:{}", "b".repeat(64)),
        }
    }

    fn render(config: Value) -> Value {
        let plan = ManifestPlan::new(&config, identity()).unwrap();
        serde_json::from_slice(&plan.render(None, None)).unwrap()
    }

    #[test]
    fn exec_env_dirs() {
        let m = render(json!({
            "created": "2024-01-02T03:04:05.123456789Z",
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo 'a b' \"$X\""],
                "Env": ["PATH=/usr/bin:/bin", "A=b=c", "EMPTY=", "BARE", "A=last"],
                "WorkingDir": "srv",
            }
        }));
        assert_eq!(m["acVersion"], "0.8.11");
        assert_eq!(m["name"], "example.com/ns/app");
        assert_eq!(
            m["labels"],
            json!([{"name":"version","value":"1.0"},{"name":"os","value":"linux"},{"name":"arch","value":"aarch64"}])
        );
        assert_eq!(
            m["app"]["exec"],
            json!(["/bin/sh", "-c", "echo 'a b' \"$X\""])
        );
        assert_eq!(
            m["app"]["environment"],
            json!([
                {"name":"PATH","value":"/usr/bin:/bin"},
                {"name":"A","value":"last"},
                {"name":"EMPTY","value":""},
                {"name":"BARE","value":""},
            ])
        );
        assert_eq!(m["app"]["workingDirectory"], "/srv");
        assert_eq!(
            (m["app"]["user"].as_str(), m["app"]["group"].as_str()),
            (Some("0"), Some("0"))
        );
        let ann = m["annotations"].as_array().unwrap();
        assert_eq!(
            ann[0],
            json!({"name":"created","value":"2024-01-02T03:04:05.123456789Z"})
        );
        assert!(ann
            .iter()
            .any(|a| a["name"] == "appc.io/docker/cmd"
                && a["value"] == "[\"echo 'a b' \\\"$X\\\"\"]"));
    }

    #[test]
    fn ports_and_volumes() {
        let m = render(json!({"config": {
            "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8000-8010/tcp": {}, "9090": {}, "53/tcp": {}},
            "Volumes": {"/data2": {}, "/data1": {}, "/Data1": {}, "/a-b": {}, "/a/b": {}, "/": {}},
        }}));
        let ports: Vec<(String, u64, u64)> = m["app"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().into(),
                    p["port"].as_u64().unwrap(),
                    p["count"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("53-tcp".into(), 53, 1),
                ("53-udp".into(), 53, 1),
                ("80-tcp".into(), 80, 1),
                ("8000-8010-tcp".into(), 8000, 11),
                ("9090-tcp".into(), 9090, 1),
            ]
        );
        assert_eq!(
            m["app"]["mountPoints"],
            json!([
                {"name":"volume","path":"/"},
                {"name":"data1","path":"/Data1"},
                {"name":"a-b","path":"/a-b"},
                {"name":"a-b-2","path":"/a/b"},
                {"name":"data1-2","path":"/data1"},
                {"name":"data2","path":"/data2"},
            ])
        );
    }

    #[test]
    fn refusals() {
        let plan = |c: Value| ManifestPlan::new(&c, identity());
        assert!(plan(json!({"config": {"Env": ["1BAD=x"]}}))
            .unwrap_err()
            .contains("1BAD"));
        assert!(plan(json!({"config": {"Env": ["A B=x"]}})).is_err());
        for bad in ["0/tcp", "70000/tcp", "x/tcp", "90-80/tcp", "80/t cp"] {
            assert!(
                plan(json!({"config": {"ExposedPorts": {bad: {}}}})).is_err(),
                "{bad}"
            );
        }
        let mut id = identity();
        id.name = "Host:1/x".into();
        assert!(ManifestPlan::new(&json!({}), id).is_err());
    }

    #[test]
    fn labels_become_annotations() {
        let m = render(json!({"created": "yesterday", "config": {"Labels": {
            "org.opencontainers.image.title": "App",
            "Maintainer": "me",
            "homepage": "not a url",
            "appc.io/docker/cmd": "clash",
        }}}));
        let ann: BTreeMap<String, String> = m["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().into(),
                    a["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(ann["org.opencontainers.image.title"], "App");
        assert_eq!(ann["maintainer"], "me");
        assert_eq!(ann["appc.io/docker/cmd"], "[]");
        assert!(!ann.contains_key("homepage") && !ann.contains_key("created"));
    }

    #[test]
    fn user_resolved_against_files() {
        let config = json!({"config": {"User": "app"}});
        let plan = ManifestPlan::new(&config, identity()).unwrap();
        let m: Value = serde_json::from_slice(&plan.render(
            Some(b"root:x:0:0::/:/bin/sh\napp:x:100:101::/:/bin/sh\n"),
            Some(b"app:x:101:\nextra:x:7:app\n"),
        ))
        .unwrap();
        assert_eq!(m["app"]["user"], "100");
        assert_eq!(m["app"]["group"], "101");
        assert_eq!(m["app"]["supplementaryGIDs"], json!([7]));
    }

    #[test]
    fn rfc3339() {
        for good in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.5+01:00",
            "2024-01-02T03:04:05-07:30",
        ] {
            assert!(is_rfc3339(good), "{good}");
        }
        for bad in [
            "",
            "2024-01-02",
            "2024-01-02 03:04:05Z",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05.Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
