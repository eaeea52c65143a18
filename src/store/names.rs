//! Repository names and tags as the distribution spec's grammar allows them: checked before they
//! become store keys, so no name reaches the backend that could leave its directory or collide with
//! the layout's `_manifests`/`_tags`.

use super::StoreError;

/// distribution-spec: a repository name is at most 255 bytes.
const MAX_REPOSITORY_BYTES: usize = 255;
/// distribution-spec: a tag is at most 128 characters.
const MAX_TAG_BYTES: usize = 128;

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut sep = String::new();
    for &b in bytes {
        if alnum(b) {
            if !(sep.is_empty()
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.bytes().all(|s| s == b'-'))
            {
                return false;
            }
            sep.clear();
        } else if matches!(b, b'.' | b'_' | b'-') {
            sep.push(b as char);
        } else {
            return false;
        }
    }
    true
}

pub fn check_repository(name: &str) -> Result<(), StoreError> {
    if name.len() <= MAX_REPOSITORY_BYTES && name.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(StoreError::InvalidRepository(name.to_string()))
    }
}

pub fn check_tag(tag: &str) -> Result<(), StoreError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    if !b.is_empty()
        && b.len() <= MAX_TAG_BYTES
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
    {
        Ok(())
    } else {
        Err(StoreError::InvalidTag(tag.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        for good in [
            "a",
            "library/alpine",
            "a.b_c__d---e/f0",
            "quay.io/ns/app",
            "x/y/z",
        ] {
            check_repository(good).unwrap();
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "a/_tags", "a/..", ".a", "a-", "a..b", "a___b", "a/b c",
        ] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
        for good in ["latest", "3.20", "_x", "A-b.C_9"] {
            check_tag(good).unwrap();
        }
        let long = "a".repeat(129);
        for bad in ["", ".x", "-x", "a/b", "a:b", long.as_str()] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }
}
