//! The read half: one member of a layer's tar (via the `tar` crate, which resolves PAX and GNU long
//! names) into an [`Item`].

use std::io::Read;

use super::sparse::{self, Sparse};
use super::{
    classify_whiteout, clean_path, lossy, split_parent, EntryError, EntryMeta, Item, Kind,
};

/// The largest size an 11-digit octal ustar size field holds. A PAX `size` above it is the one case
/// in which writers (GNU tar, Go, Python) leave the field zero.
const USTAR_SIZE_MAX: u64 = 0o77777777777;
/// Digits of a PAX time's fraction that fit in nanoseconds; more are dropped, as Go does.
const NANO_DIGITS: usize = 9;

/// The PAX records of one member that matter, before the member's path is known.
#[derive(Default)]
struct Pax {
    uid: Option<Vec<u8>>,
    gid: Option<Vec<u8>>,
    mtime: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: sparse::Records,
}

/// A PAX time, `secs[.fraction]`: seconds and nanoseconds. `None` for what strata does not keep (a
/// negative time, say): the ustar field stands then.
fn pax_time(value: &[u8]) -> Option<(u64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = &frac[..frac.len().min(NANO_DIGITS)];
    let nanos = format!("{digits:0<NANO_DIGITS$}").parse().ok()?;
    Some((secs.parse().ok()?, nanos))
}

/// Reads one member of a layer. `Ok(None)` for members that mean nothing to the file system: the root
/// directory itself, global PAX headers, aufs metadata (`.wh..wh.*` other than the opaque marker).
pub fn read_item<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Item>, EntryError> {
    Ok(read_member(entry)?.map(|(item, _)| item))
}

/// [`read_item`], with the map of a sparse file, whose content is then [`Sparse::expand`] of the
/// entry's remaining data.
pub fn read_member<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<(Item, Option<Sparse>)>, EntryError> {
    // The raw typeflag: the tar crate reads an old V7 NUL as `0`, and a V7 directory differs.
    let typeflag = entry.header().as_old().linkflag[0];
    if typeflag == b'g' {
        return Ok(None);
    }
    let mut pax = Pax::default();
    if let Some(exts) = entry.pax_extensions().map_err(EntryError::Io)? {
        for ext in exts {
            let ext = ext.map_err(EntryError::Io)?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let slot = match key {
                b"uid" => &mut pax.uid,
                b"gid" => &mut pax.gid,
                b"mtime" => &mut pax.mtime,
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        pax.xattrs.push((name.to_vec(), value.to_vec()));
                    } else {
                        pax.sparse.take(key, value);
                    }
                    continue;
                }
            };
            *slot = Some(value.to_vec());
        }
    }
    let regular = matches!(typeflag, b'0' | 0 | b'7');
    let sparse_version = pax.sparse.version().filter(|_| regular);
    let raw_path = match sparse_version.and(pax.sparse.name()) {
        Some(name) => name.to_vec(),
        None => entry.path_bytes().into_owned(),
    };
    let path = clean_path(&raw_path)?;
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(item) = classify_whiteout(&path)? {
        return Ok(Some((item, None)));
    }
    if split_parent(&path).1.starts_with(b".wh..wh.") {
        return Ok(None);
    }
    let kind = match typeflag {
        // Old V7 archives mark directories by the trailing slash alone (Go's archive/tar: TypeRegA).
        0 if raw_path.ends_with(b"/") => Kind::Dir,
        b'0' | 0 | b'7' => Kind::File,
        other => Kind::from_code(other).ok_or_else(|| EntryError::Unsupported {
            path: lossy(&path),
            typeflag: other as char,
        })?,
    };
    let invalid = |what| EntryError::Invalid {
        path: lossy(&path),
        what,
    };
    let header = entry.header();
    // A PAX `size` that disagrees with the header's own size field is the parser differential behind
    // the tar header-desync CVEs: readers that honour one or the other see different next headers.
    // A zero field stands for the PAX size only when that does not fit the field, as writers emit it.
    let field = header.entry_size().map_err(EntryError::Io)?;
    if field != entry.size() && !(field == 0 && entry.size() > USTAR_SIZE_MAX) {
        return Err(invalid("PAX size contradicts the header's size field"));
    }
    let number = |v: &Option<Vec<u8>>, default: u64| -> Result<u64, EntryError> {
        match v {
            None => Ok(default),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(invalid("bad numeric PAX record")),
        }
    };
    let header_mtime = header.mtime().map_err(EntryError::Io)?;
    let (mtime, mtime_nsec) = pax
        .mtime
        .as_deref()
        .and_then(pax_time)
        .unwrap_or((header_mtime, 0));
    let mut meta = EntryMeta {
        kind,
        mode: header.mode().map_err(EntryError::Io)? & 0o7777,
        uid: number(&pax.uid, header.uid().map_err(EntryError::Io)?)?,
        gid: number(&pax.gid, header.gid().map_err(EntryError::Io)?)?,
        mtime,
        mtime_nsec,
        size: if kind == Kind::File { entry.size() } else { 0 },
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: pax.xattrs,
        path: Vec::new(),
    };
    if matches!(kind, Kind::Char | Kind::Block) {
        meta.dev_major = header.device_major().ok().flatten().unwrap_or(0);
        meta.dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
    }
    if matches!(kind, Kind::Symlink | Kind::Hardlink) {
        let target = entry
            .link_name_bytes()
            .ok_or(invalid("link without a target"))?
            .into_owned();
        meta.link = if kind == Kind::Hardlink {
            let t = clean_path(&target)?;
            if t.is_empty() {
                return Err(invalid("hardlink to the root"));
            }
            t
        } else {
            if target.is_empty() || target.contains(&0) {
                return Err(invalid("bad symlink target"));
            }
            target
        };
    }
    let sparse = match sparse_version.filter(|_| kind == Kind::File) {
        Some(version) => {
            let stored = entry.size();
            let map = sparse::read_map(&pax.sparse, version, entry, stored).map_err(invalid)?;
            meta.size = map.size;
            Some(map)
        }
        None => None,
    };
    meta.path = path;
    Ok(Some((Item::Entry(meta), sparse)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{merge_tar, LayerHints, Merger, TarSink};

    /// A PAX header with `records` (none: no PAX header), then a ustar header for `name` with typeflag
    /// `flag` and size field `field`, then `data` padded, then the end of the archive.
    fn member(records: &[(&str, &[u8])], name: &str, flag: u8, field: u64, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        if !records.is_empty() {
            b.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
        }
        let mut out = b.into_inner().unwrap();
        out.truncate(out.len() - 1024);
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(field);
        h.as_old_mut().linkflag = [flag];
        if name.ends_with('/') {
            h.as_old_mut().name[name.len() - 1] = b'/';
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    fn first(tar: &[u8]) -> Result<Option<Item>, EntryError> {
        let mut archive = tar::Archive::new(tar);
        let mut entries = archive.entries().unwrap();
        let mut e = entries.next().unwrap().map_err(EntryError::Io)?;
        read_item(&mut e)
    }

    #[test]
    fn pax_size_must_agree_with_the_size_field() {
        let big = USTAR_SIZE_MAX + 1;
        let cases: [(u64, u64, bool); 6] = [
            (10, 10, true),
            // Zero stands for a PAX size only when that does not fit the field.
            (0, 10, false),
            (USTAR_SIZE_MAX, 10, false),
            (20, 10, false),
            (1, 0, false),
            (0, 0, true),
        ];
        for (field, pax, ok) in cases {
            let data = vec![b'x'; pax as usize];
            let tar = member(
                &[("size", pax.to_string().as_bytes())],
                "f",
                b'0',
                field,
                &data,
            );
            assert_eq!(first(&tar).is_ok(), ok, "field {field}, PAX size {pax}");
        }
        // The one case writers emit; no data follows in this test, the header alone decides.
        let tar = member(&[("size", big.to_string().as_bytes())], "f", b'0', 0, &[]);
        let mut archive = tar::Archive::new(&tar[..]);
        let mut e = archive.entries().unwrap().next().unwrap().unwrap();
        let Some(Item::Entry(m)) = read_item(&mut e).unwrap() else {
            panic!("not an entry")
        };
        assert_eq!(m.size, big);
    }

    #[test]
    fn v7_entries_ending_in_a_slash_are_directories() {
        let Some(Item::Entry(m)) = first(&member(&[], "v7dir/", 0, 0, b"")).unwrap() else {
            panic!("not an entry")
        };
        assert_eq!((m.kind, &m.path[..]), (Kind::Dir, &b"v7dir"[..]));
        let Some(Item::Entry(m)) = first(&member(&[], "v7file", 0, 1, b"x")).unwrap() else {
            panic!("not an entry")
        };
        assert_eq!(m.kind, Kind::File);
        // Only the old NUL typeflag means a directory this way, as in Go's archive/tar.
        let Some(Item::Entry(m)) = first(&member(&[], "reg/", b'0', 0, b"")).unwrap() else {
            panic!("not an entry")
        };
        assert_eq!(m.kind, Kind::File);
    }

    #[test]
    fn fractional_pax_mtimes_keep_their_nanoseconds() {
        for (record, want) in [
            ("1700000000.123456789", (1_700_000_000, 123_456_789)),
            ("1700000000.5", (1_700_000_000, 500_000_000)),
            ("1700000000.1234567891", (1_700_000_000, 123_456_789)),
            ("1700000000", (1_700_000_000, 0)),
        ] {
            let tar = member(&[("mtime", record.as_bytes())], "f", b'0', 0, b"");
            let Some(Item::Entry(m)) = first(&tar).unwrap() else {
                panic!("not an entry")
            };
            assert_eq!((m.mtime, m.mtime_nsec), want, "{record}");
        }
    }

    /// Merges one layer and returns the output's first member: meta and content.
    fn merged(layer: &[u8]) -> (EntryMeta, Vec<u8>) {
        let items = crate::summary::scan(layer).unwrap();
        let mut merger = Merger::new();
        merger.begin_layer(0, LayerHints::from_items(&items));
        let mut sink = TarSink(Vec::new());
        merge_tar(&mut merger, layer, &mut sink).unwrap();
        merger.finish(&mut sink).unwrap();
        let mut out = sink.0;
        super::super::write_end(&mut out).unwrap();
        let refs = [&items[..]];
        assert_eq!(
            crate::summary::merged_size(&refs).unwrap(),
            out.len() as u64
        );
        let mut archive = tar::Archive::new(&out[..]);
        let mut e = archive.entries().unwrap().next().unwrap().unwrap();
        let Some(Item::Entry(m)) = read_item(&mut e).unwrap() else {
            panic!("not an entry")
        };
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        (m, content)
    }

    #[test]
    fn pax_sparse_files_are_expanded() {
        let mut want = vec![0u8; 5000];
        want[0..4].copy_from_slice(b"head");
        want[3000..3003].copy_from_slice(b"mid");
        // 1.0: the map leads the data, padded to a block.
        let mut data = b"2\n0\n4\n3000\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"headmid");
        let v10 = member(
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"dir/sparse"),
                ("GNU.sparse.realsize", b"5000"),
            ],
            "dir/GNUSparseFile.0/sparse",
            b'0',
            data.len() as u64,
            &data,
        );
        // 0.1: the map in a record.
        let v01 = member(
            &[
                ("GNU.sparse.name", b"dir/sparse"),
                ("GNU.sparse.size", b"5000"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"0,4,3000,3"),
            ],
            "dir/GNUSparseFile.0/sparse",
            b'0',
            7,
            b"headmid",
        );
        for tar in [v10, v01] {
            let (m, content) = merged(&tar);
            assert_eq!(
                (&m.path[..], m.kind, m.size),
                (&b"dir/sparse"[..], Kind::File, 5000)
            );
            assert!(content == want);
        }
        // A map that contradicts the data is refused.
        let bad = member(
            &[
                ("GNU.sparse.name", b"s"),
                ("GNU.sparse.size", b"5000"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"0,4,3000,30"),
            ],
            "GNUSparseFile.0/s",
            b'0',
            7,
            b"headmid",
        );
        assert!(crate::summary::scan(&bad[..]).is_err());
        let overlapping = member(
            &[
                ("GNU.sparse.name", b"s"),
                ("GNU.sparse.size", b"5000"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"0,4,2,3"),
            ],
            "GNUSparseFile.0/s",
            b'0',
            7,
            b"headmid",
        );
        assert!(crate::summary::scan(&overlapping[..]).is_err());
    }
}
