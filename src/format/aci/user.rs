//! `User` of an image config resolved the way `docker run` resolves it (runc's `GetExecUser` against the
//! container's `/etc/passwd` and `/etc/group`), so the ACI runs as the same uid, gid and supplementary
//! groups. Pure functions over the two files' bytes, captured from the merged tree.

/// What the app runs as, in appc's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppUser {
    pub user: String,
    pub group: String,
    pub supplementary_gids: Vec<u64>,
}

struct PasswdLine<'a> {
    name: &'a str,
    uid: u64,
    gid: u64,
}

struct GroupLine<'a> {
    name: &'a str,
    gid: u64,
    members: Vec<&'a str>,
}

/// Fields of non-empty lines; a number that does not parse counts as 0, as in runc.
fn lines(file: &str) -> impl Iterator<Item = Vec<&str>> {
    file.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').collect())
}

fn number(s: Option<&&str>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn passwd(file: &str) -> Vec<PasswdLine<'_>> {
    lines(file)
        .map(|f| PasswdLine {
            name: f[0],
            uid: number(f.get(2)),
            gid: number(f.get(3)),
        })
        .collect()
}

fn groups(file: &str) -> Vec<GroupLine<'_>> {
    lines(file)
        .map(|f| GroupLine {
            name: f[0],
            gid: number(f.get(2)),
            members: f
                .get(3)
                .map(|m| m.split(',').filter(|m| !m.is_empty()).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`, … or empty for root). A name the files do
/// not hold stays a name: appc resolves names itself when the app starts, and fails there as
/// `docker run` would.
pub fn resolve(spec: &str, passwd_file: Option<&[u8]>, group_file: Option<&[u8]>) -> AppUser {
    let passwd_text = passwd_file.map(String::from_utf8_lossy);
    let group_text = group_file.map(String::from_utf8_lossy);
    let users = passwd_text.as_deref().map(passwd).unwrap_or_default();
    let group_lines = group_text.as_deref().map(groups).unwrap_or_default();

    let mut parts = spec.splitn(3, ':');
    let user_arg = parts.next().unwrap_or("");
    let group_arg = parts.next().unwrap_or("");
    let uid_arg: Option<u64> = user_arg.parse().ok();
    let gid_arg: Option<u64> = group_arg.parse().ok();

    // The first matching line wins; an empty spec means uid 0.
    let matched = users.iter().find(|u| match (user_arg, uid_arg) {
        ("", _) => u.uid == 0,
        (_, Some(uid)) => u.uid == uid,
        (name, None) => u.name == name,
    });
    let (mut user, mut gid) = match (matched, uid_arg) {
        (Some(u), _) => (u.uid.to_string(), Some(u.gid)),
        (None, Some(uid)) => (uid.to_string(), Some(0)),
        (None, None) if user_arg.is_empty() => ("0".to_string(), Some(0)),
        (None, None) => (user_arg.to_string(), None),
    };
    let mut supplementary_gids = Vec::new();
    let mut group = None;
    if !group_arg.is_empty() {
        let found = group_lines.iter().find(|g| match gid_arg {
            Some(gid) => g.gid == gid,
            None => g.name == group_arg,
        });
        match (found, gid_arg) {
            (Some(g), _) => gid = Some(g.gid),
            (None, Some(n)) => gid = Some(n),
            (None, None) => group = Some(group_arg.to_string()),
        }
    } else if let Some(u) = matched {
        // Only the implicit form adds the groups that list the user as a member.
        supplementary_gids = group_lines
            .iter()
            .filter(|g| g.members.contains(&u.name))
            .map(|g| g.gid)
            .collect();
    }
    if user.is_empty() {
        user = "0".into();
    }
    let group = group.unwrap_or_else(|| gid.map_or_else(|| "0".to_string(), |g| g.to_string()));
    AppUser {
        user,
        group,
        supplementary_gids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1::/:/bin/false\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        dup:x:1000:5::/:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:root,app\napp:x:1001:\naudio:x:29:app\nstaff:x:50:\n";

    fn r(spec: &str) -> (String, String, Vec<u64>) {
        let u = resolve(spec, Some(PASSWD.as_bytes()), Some(GROUP.as_bytes()));
        (u.user, u.group, u.supplementary_gids)
    }

    #[test]
    fn docker_run_table() {
        let s = |a: &str, b: &str, c: &[u64]| (a.to_string(), b.to_string(), c.to_vec());
        assert_eq!(r(""), s("0", "0", &[10]));
        assert_eq!(r("root"), s("0", "0", &[10]));
        assert_eq!(r("app"), s("1000", "1001", &[10, 29]));
        // A uid found in passwd takes that user's primary group and memberships.
        assert_eq!(r("1000"), s("1000", "1001", &[10, 29]));
        // An unknown numeric uid runs with gid 0.
        assert_eq!(r("4242"), s("4242", "0", &[]));
        assert_eq!(r("app:staff"), s("1000", "50", &[]));
        assert_eq!(r("app:77"), s("1000", "77", &[]));
        assert_eq!(r("1000:wheel"), s("1000", "10", &[]));
        assert_eq!(r("4242:4343"), s("4242", "4343", &[]));
        // Names the files do not hold are left for appc to resolve (and fail on) at run time.
        assert_eq!(r("ghost"), s("ghost", "0", &[]));
        assert_eq!(r("app:ghosts"), s("1000", "ghosts", &[]));
    }

    #[test]
    fn without_files() {
        let u = resolve("", None, None);
        assert_eq!((u.user.as_str(), u.group.as_str()), ("0", "0"));
        let u = resolve("1:2", None, None);
        assert_eq!((u.user.as_str(), u.group.as_str()), ("1", "2"));
        let u = resolve("nobody", None, None);
        assert_eq!((u.user.as_str(), u.group.as_str()), ("nobody", "0"));
    }
}
