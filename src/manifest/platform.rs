//! Platforms (`os/arch[/variant]`) as requests name them and images declare them, and which image
//! serves which request.

use std::fmt;

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Architecture spellings normalised as containerd does.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "armhf" | "armel" => "arm",
        "i386" => "386",
        other => other,
    };
    let variant = match (arch, variant) {
        ("arm64", Some("8") | Some("v8")) | ("arm64", None) => Some("v8"),
        ("arm", None) | ("arm", Some("7")) => Some("v7"),
        ("arm", Some("6")) => Some("v6"),
        (_, v) => v,
    };
    (arch.to_string(), variant.map(str::to_string))
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        match parts[..] {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: Some(v.into()),
            }),
            _ => Err(format!(
                "invalid platform {s:?}: expected os/arch[/variant]"
            )),
        }
    }

    /// Whether an image for `other` serves a request for `self`: os and architecture equal, and the
    /// variant too when the request names one.
    pub fn matches(&self, other: &Platform) -> bool {
        let (a, av) = normalize_arch(&self.architecture, self.variant.as_deref());
        let (b, bv) = normalize_arch(&other.architecture, other.variant.as_deref());
        self.os == other.os && a == b && (self.variant.is_none() || av == bv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_matching_table() {
        let p = |s: &str| Platform::parse(s).unwrap();
        let cases = [
            ("linux/amd64", "linux/amd64", true),
            ("linux/amd64", "linux/arm64", false),
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/arm/v7", "linux/arm", true),
            ("linux/arm/v6", "linux/arm/v7", false),
            ("linux/arm", "linux/arm/v6", true),
            ("linux/amd64", "windows/amd64", false),
            ("linux/amd64", "linux/x86_64", true),
        ];
        for (want, have, ok) in cases {
            assert_eq!(p(want).matches(&p(have)), ok, "{want} vs {have}");
        }
        for bad in [
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }
}
