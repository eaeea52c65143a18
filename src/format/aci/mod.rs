//! The appc ACI (spec 0.8.11, docs/FORMATS.md §5): an explicit `rootfs` directory, the merged tree under
//! `rootfs/`, then the `manifest` member, rendered last because the user and group it names are resolved
//! against the merged `/etc/passwd` and `/etc/group`, which [`RootfsSink`] keeps as they pass.
//! Nothing in it depends on time or map order, so the same image gives the same bytes, which is what
//! a detached signature computed once can vouch for.

pub mod manifest;
pub mod names;
pub mod user;

use std::io::{self, Read, Write};

use crate::entry::{write_end, write_entry, EntryMeta, Kind};
use crate::merge::Sink;
pub use manifest::{Identity, ManifestPlan};

/// The one top-level directory besides the manifest.
const ROOTFS: &[u8] = b"rootfs";
/// Largest `/etc/passwd` or `/etc/group` kept to resolve the user; larger ones (none are) are ignored.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Writes the ACI around the merge.
#[derive(Debug, Clone)]
pub struct AciArchive {
    plan: ManifestPlan,
}

impl AciArchive {
    pub fn new(plan: ManifestPlan) -> Self {
        AciArchive { plan }
    }

    /// The `rootfs` directory entry; the merged tree follows through [`RootfsSink`].
    pub fn write_head<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        write_entry(
            out,
            &EntryMeta::synthetic(ROOTFS, Kind::Dir, 0o755, 0),
            &mut io::empty(),
        )
    }

    /// The manifest and the end of the archive.
    pub fn write_tail<W: Write + ?Sized>(
        &self,
        out: &mut W,
        accounts: &Accounts,
    ) -> io::Result<()> {
        let manifest = self
            .plan
            .render(accounts.passwd.as_deref(), accounts.group.as_deref());
        write_entry(
            out,
            &EntryMeta::synthetic(b"manifest", Kind::File, 0o644, manifest.len() as u64),
            &mut &manifest[..],
        )?;
        write_end(out)
    }
}

/// The merged `/etc/passwd` and `/etc/group`, as regular files of the final tree.
#[derive(Debug, Default)]
pub struct Accounts {
    pub passwd: Option<Vec<u8>>,
    pub group: Option<Vec<u8>>,
}

/// A [`Sink`] that puts every merged entry (and every hardlink target) under `rootfs/`, keeping the
/// account files on the way.
pub struct RootfsSink<S> {
    inner: S,
    pub accounts: Accounts,
}

impl<S: Sink> RootfsSink<S> {
    pub fn new(inner: S) -> Self {
        RootfsSink {
            inner,
            accounts: Accounts::default(),
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn under_rootfs(path: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(ROOTFS.len() + 1 + path.len());
    p.extend_from_slice(ROOTFS);
    p.push(b'/');
    p.extend_from_slice(path);
    p
}

impl<S: Sink> Sink for RootfsSink<S> {
    fn entry(&mut self, meta: &EntryMeta, content: &mut dyn Read) -> io::Result<()> {
        let mut moved = meta.clone();
        moved.path = under_rootfs(&meta.path);
        if meta.kind == Kind::Hardlink {
            moved.link = under_rootfs(&meta.link);
        }
        let slot = match &meta.path[..] {
            b"etc/passwd" => Some(&mut self.accounts.passwd),
            b"etc/group" => Some(&mut self.accounts.group),
            _ => None,
        };
        match slot {
            Some(slot) if meta.kind == Kind::File && meta.size <= MAX_ACCOUNT_FILE => {
                let mut data = Vec::with_capacity(meta.size as usize);
                content.take(meta.size).read_to_end(&mut data)?;
                let result = self.inner.entry(&moved, &mut &data[..]);
                *slot = Some(data);
                result
            }
            Some(slot) => {
                // Anything else at that path (a link, a directory) replaces a file seen before.
                *slot = None;
                self.inner.entry(&moved, content)
            }
            None => self.inner.entry(&moved, content),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::TarSink;
    use serde_json::{json, Value};

    fn plan() -> ManifestPlan {
        let identity = Identity {
            name: "example.com/app".into(),
            version: "1".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            registry: "r".into(),
            repository: "app".into(),
            manifest_digest: "sha256:00".into(),
            config_digest: "sha256:11".into(),
        };
        ManifestPlan::new(&json!({"config": {"User": "app"}}), identity).unwrap()
    }

    #[test]
    fn layout_prefixes_and_accounts() {
        let aci = AciArchive::new(plan());
        let mut out = Vec::new();
        aci.write_head(&mut out).unwrap();
        let mut sink = RootfsSink::new(TarSink(&mut out));
        let passwd = b"app:x:7:8::/:/bin/sh\n";
        let mut file = EntryMeta::synthetic(b"etc/passwd", Kind::File, 0o644, passwd.len() as u64);
        sink.entry(
            &EntryMeta::synthetic(b"etc", Kind::Dir, 0o755, 0),
            &mut io::empty(),
        )
        .unwrap();
        sink.entry(&file, &mut &passwd[..]).unwrap();
        file.path = b"bin/x".to_vec();
        file.kind = Kind::Hardlink;
        file.size = 0;
        file.link = b"etc/passwd".to_vec();
        sink.entry(&file, &mut io::empty()).unwrap();
        let accounts = std::mem::take(&mut sink.accounts);
        drop(sink);
        aci.write_tail(&mut out, &accounts).unwrap();

        let mut listing = Vec::new();
        let mut manifest = Value::Null;
        for e in tar::Archive::new(&out[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            if path == "manifest" {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                manifest = serde_json::from_slice(&data).unwrap();
            }
            listing.push((path, link));
        }
        let s = |p: &str, l: Option<&str>| (p.to_string(), l.map(str::to_string));
        assert_eq!(
            listing,
            [
                s("rootfs", None),
                s("rootfs/etc", None),
                s("rootfs/etc/passwd", None),
                s("rootfs/bin/x", Some("rootfs/etc/passwd")),
                s("manifest", None),
            ]
        );
        assert_eq!(
            (
                manifest["app"]["user"].as_str(),
                manifest["app"]["group"].as_str()
            ),
            (Some("7"), Some("8"))
        );
    }
}
