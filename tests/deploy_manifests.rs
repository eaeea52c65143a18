//! deploy/kubernetes/, checked as far as a machine without a cluster allows. `kubectl kustomize`
//! renders the set offline (the kustomization and every file parse as Kubernetes objects, the image
//! substitution applies); `kubernetes-validate --strict` (PyPI, which ships the official OpenAPI
//! schemas as JSON Schema) checks each object against the oldest and the newest Kubernetes it
//! knows, unknown fields refused; and the checks here hold the objects to each other, to the
//! Dockerfile and to strata's flags. Not checked: anything an API server or a controller decides
//! (admission, defaulting, quotas, whether the HPA's metrics exist, scheduling), which
//! `kubectl apply --dry-run=client` cannot do either without a cluster to ask.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run;
use serde_json::Value;

/// The oldest and newest Kubernetes whose schemas kubernetes-validate 1.37 ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// The set as `kubectl apply -k` would send it, as YAML.
fn rendered_yaml() -> String {
    let out = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(manifests_dir()));
    String::from_utf8(out).unwrap()
}

/// YAML documents as JSON values, through PyYAML (a dependency of kubernetes-validate): the crate
/// has no YAML parser, and the tests need none elsewhere.
fn parse_yaml(yaml: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        )
        .arg(&file));
    serde_json::from_slice::<Vec<Value>>(&out).unwrap()
}

fn rendered() -> Vec<Value> {
    parse_yaml(&rendered_yaml())
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, found {}", found.len());
    found[0]
}

/// Every `key: value` of `subset` is in `labels`.
fn selects(subset: &Value, labels: &Value) -> bool {
    let subset = subset.as_object().unwrap();
    !subset.is_empty() && subset.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A line's argument from the Dockerfile (`USER`, `VOLUME`), the runtime stage being the last.
fn dockerfile(instruction: &str) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let prefix = format!("{instruction} ");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"))
        .trim()
        .to_string()
}

/// The module rather than its script: the python3 that scripts/test.sh installed it for, whatever
/// the PATH holds.
fn kubernetes_validate() -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate"]);
    cmd
}

/// `kubernetes-validate --strict`: every object passes for `version`, none unknown to the schemas
/// (an unknown kind or apiVersion is only a warning to the tool, a failure here).
fn validate(file: &Path, version: &str, objects: usize) {
    let out = kubernetes_validate()
        .args(["--strict", "-k", version])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubernetes-validate: {e} (scripts/test.sh installs it from PyPI)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", file.display());
    let passed = text.matches(" passed for resource ").count();
    assert!(
        !text.contains("WARN") && !text.contains("ERROR") && passed == objects,
        "{}: {objects} objects, {passed} passed against {version}:\n{text}",
        file.display()
    );
}

#[test]
fn manifests_pass_the_official_schemas_strictly() {
    let yaml = rendered_yaml();
    let objects = parse_yaml(&yaml).len();
    assert_eq!(objects, 6, "{yaml}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    for version in KUBERNETES_VERSIONS {
        validate(&file, version, objects);
        // The files one by one too: someone applying a single one gets what was checked.
        for entry in std::fs::read_dir(manifests_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                validate(&path, version, 1);
            }
        }
    }
}

/// The schema check cannot fail on what is only wrong in context; this one must, so feed it a
/// field the schema does not know.
#[test]
fn the_schema_check_refuses_an_unknown_field() {
    let yaml = rendered_yaml().replacen("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = kubernetes_validate()
        .args(["--strict", "-k", KUBERNETES_VERSIONS[1]])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("readOnlyRootFileSystem"));
}

#[test]
fn manifests_hang_together() {
    let objects = rendered();
    let deployment = object(&objects, "Deployment");
    let service = object(&objects, "Service");
    let hpa = object(&objects, "HorizontalPodAutoscaler");
    let pdb = object(&objects, "PodDisruptionBudget");
    let config = object(&objects, "ConfigMap");
    let secret = object(&objects, "Secret");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(pdb["apiVersion"], "policy/v1");

    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    let replicas = spec["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "replicas {replicas}");
    assert!(selects(&spec["selector"]["matchLabels"], labels));
    assert!(selects(&service["spec"]["selector"], labels));
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    let min_available = pdb["spec"]["minAvailable"].as_u64().unwrap();
    assert!(min_available >= 1 && min_available < replicas);
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], deployment["metadata"]["name"]);
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() > min_available);

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(
        c["image"].as_str().unwrap().contains(':') && c["image"] != "strata",
        "the kustomization's image was not applied: {}",
        c["image"]
    );

    // Probes and the Service reach the port strata listens on.
    let port = &c["ports"][0];
    let listen = config["data"]["STRATA_LISTEN"].as_str().unwrap();
    assert_eq!(
        listen.rsplit(':').next().unwrap(),
        port["containerPort"].to_string()
    );
    assert!(
        listen.starts_with("0.0.0.0:"),
        "{listen}: unreachable from the pod's IP"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], port["name"], "{probe}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);

    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][kind][r].is_string(), "resources.{kind}.{r}");
        }
    }

    // Non-root, as the image's USER, on a read-only root with the image's VOLUME and /tmp on
    // emptyDirs.
    let user = dockerfile("USER");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        format!(
            "{}:{}",
            pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
        ),
        user
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let volume = dockerfile("VOLUME");
    for path in ["/tmp", volume.as_str()] {
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        let v = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        assert!(v["emptyDir"].is_object(), "{path}: {v}");
    }

    // The environment comes from the ConfigMap and Secret of the set.
    let from = c["envFrom"].as_array().unwrap();
    assert!(from
        .iter()
        .any(|f| f["configMapRef"]["name"] == config["metadata"]["name"]));
    assert!(from
        .iter()
        .any(|f| f["secretRef"]["name"] == secret["metadata"]["name"]));
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(secret["stringData"][key].is_string(), "Secret lacks {key}");
    }

    // Conversions in flight get the shutdown grace before the kubelet's SIGKILL.
    let grace: u64 = config["data"]["STRATA_SHUTDOWN_GRACE"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > grace);

    // The store is object storage every replica shares, in a form strata accepts.
    let store = config["data"]["STRATA_STORE"].as_str().unwrap();
    assert!(matches!(
        strata::store::Location::parse(store),
        Ok(strata::store::Location::S3(_))
    ));
}

/// Each STRATA_* key names a flag of `strata serve` (STRATA_MAX_CONCURRENT is --max-concurrent):
/// a misspelt key would be ignored without a word.
#[test]
fn config_keys_name_serve_flags() {
    let help = String::from_utf8(run(common::strata().args(["serve", "--help"]))).unwrap();
    let config = rendered()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap")
        .unwrap();
    let keys: Vec<String> = config["data"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_prefix("STRATA_").map(str::to_string))
        .collect();
    assert!(keys.len() >= 2, "{keys:?}");
    for key in keys {
        let flag = format!("--{} ", key.to_lowercase().replace('_', "-"));
        assert!(
            help.contains(&flag),
            "STRATA_{key}: `strata serve` has no {flag}"
        );
    }
}
