//! appc's names (spec 0.8.11, `schema/types`): ACIdentifiers (image names, labels, annotations), ACNames
//! (ports, mount points), and the appc spelling of os/arch next to the OCI platform it means.

use crate::manifest::Platform;

/// What appc's own check accepts in an ACIdentifier: `[a-z0-9]` and the separators `-._~/`, not at
/// either end (`acidentifier.go`: `invalidACIdentifierChars`, `invalidACIdentifierEdges`).
pub fn is_ac_identifier(s: &str) -> bool {
    let sep = |b: u8| b"-._~/".contains(&b);
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || sep(b))
        && !sep(s.as_bytes()[0])
        && !sep(s.as_bytes()[s.len() - 1])
}

/// An ACIdentifier for `s` the way appc's `SanitizeACIdentifier` suggests one: lower case, other
/// characters as `_`, separators trimmed from the ends. `None` when nothing is left.
pub fn sanitize_ac_identifier(s: &str) -> Option<String> {
    let sep = |c: char| "-._~/".contains(c);
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || sep(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(sep);
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// An ACName (`^[a-z0-9]+(-[a-z0-9]+)*$`) for `s`: lower case, every run of other characters one `-`.
/// `None` when `s` holds no letter or digit.
pub fn ac_name(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// `environment` names appc accepts: `^[A-Za-z_][A-Za-z_0-9.-]*$` (`environment.go`).
pub fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// (appc arch, OCI architecture, OCI variant) on linux, the pairs appc's `ValidOSArch` allows that
/// images exist for. Docker's `arm64` is appc's `aarch64`; 32-bit arm carries its variant in the name.
const LINUX_ARCHES: &[(&str, &str, Option<&str>)] = &[
    ("amd64", "amd64", None),
    ("i386", "386", None),
    ("aarch64", "arm64", None),
    ("armv7l", "arm", Some("v7")),
    ("armv6l", "arm", Some("v6")),
    ("ppc64le", "ppc64le", None),
    ("ppc64", "ppc64", None),
    ("s390x", "s390x", None),
];

/// The OCI platform an appc `os`/`arch` pair asks for.
pub fn platform_from_appc(os: &str, arch: &str) -> Result<Platform, String> {
    if os != "linux" {
        return Err(format!(
            "appc os {os:?} is not served: only linux images are converted"
        ));
    }
    LINUX_ARCHES
        .iter()
        .find(|(appc, _, _)| *appc == arch)
        .map(|(_, oci, variant)| Platform {
            os: os.to_string(),
            architecture: oci.to_string(),
            variant: variant.map(str::to_string),
        })
        .ok_or_else(|| {
            let known: Vec<&str> = LINUX_ARCHES.iter().map(|(a, _, _)| *a).collect();
            format!("appc arch {arch:?} is not one of {}", known.join(", "))
        })
}

/// The appc `arch` label for an image's OCI architecture and variant; 32-bit arm without a variant is
/// v7, as containerd assumes.
pub fn appc_arch(architecture: &str, variant: Option<&str>) -> Option<&'static str> {
    let variant = match (architecture, variant) {
        ("arm", None) => Some("v7"),
        ("arm64", _) => None,
        (_, v) => v,
    };
    LINUX_ARCHES
        .iter()
        .find(|(_, oci, v)| *oci == architecture && *v == variant)
        .map(|(appc, _, _)| *appc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for good in ["a", "example.com/ns/app", "127.0.0.1/a_b/c--d", "a~b"] {
            assert!(is_ac_identifier(good), "{good}");
        }
        for bad in ["", "A", "a:1", "/a", "a/", "a b", "é"] {
            assert!(!is_ac_identifier(bad), "{bad}");
        }
        assert_eq!(
            sanitize_ac_identifier("Host:8080/Ns/app").as_deref(),
            Some("host_8080/ns/app")
        );
        assert_eq!(sanitize_ac_identifier("//").as_deref(), None);
        assert_eq!(sanitize_ac_identifier("-x-").as_deref(), Some("x"));
    }

    #[test]
    fn names() {
        assert_eq!(ac_name("/data1").as_deref(), Some("data1"));
        assert_eq!(
            ac_name("/var/lib/My_Data/").as_deref(),
            Some("var-lib-my-data")
        );
        assert_eq!(ac_name("/").as_deref(), None);
        assert!(is_env_name("PATH") && is_env_name("_a.b-c") && is_env_name("x1"));
        assert!(
            !is_env_name("1x") && !is_env_name("") && !is_env_name("A B") && !is_env_name("a=b")
        );
    }

    #[test]
    fn arches_both_ways() {
        let p = platform_from_appc("linux", "aarch64").unwrap();
        assert_eq!((p.architecture.as_str(), p.variant), ("arm64", None));
        let p = platform_from_appc("linux", "armv7l").unwrap();
        assert_eq!(
            (p.architecture.as_str(), p.variant.as_deref()),
            ("arm", Some("v7"))
        );
        assert!(platform_from_appc("linux", "arm64").is_err());
        assert!(platform_from_appc("darwin", "x86_64").is_err());
        assert_eq!(appc_arch("amd64", None), Some("amd64"));
        assert_eq!(appc_arch("arm64", Some("v8")), Some("aarch64"));
        assert_eq!(appc_arch("arm", None), Some("armv7l"));
        assert_eq!(appc_arch("arm", Some("v6")), Some("armv6l"));
        assert_eq!(appc_arch("386", None), Some("i386"));
        assert_eq!(appc_arch("riscv64", None), None);
    }
}
