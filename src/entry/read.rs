//! The read half: one member of a layer's tar (via the `tar` crate, which resolves PAX and GNU long
//! names) into an [`Item`].

use std::io::Read;

use super::{
    classify_whiteout, clean_path, lossy, split_parent, EntryError, EntryMeta, Item, Kind,
};

/// The largest size an 11-digit octal ustar size field holds; writers put it there when the real
/// size goes in a PAX record.
const USTAR_SIZE_MAX: u64 = 0o77777777777;

/// Reads one member of a layer. `Ok(None)` for members that mean nothing to the file system: the root
/// directory itself, global PAX headers, aufs metadata (`.wh..wh.*` other than the opaque marker).
pub fn read_item<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Item>, EntryError> {
    let header = entry.header();
    let typeflag = header.entry_type().as_byte();
    if typeflag == b'g' {
        return Ok(None);
    }
    let raw_path = entry.path_bytes().into_owned();
    let path = clean_path(&raw_path)?;
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(item) = classify_whiteout(&path)? {
        return Ok(Some(item));
    }
    if split_parent(&path).1.starts_with(b".wh..wh.") {
        return Ok(None);
    }
    let kind = match typeflag {
        b'0' | 0 | b'7' => Kind::File,
        other => Kind::from_code(other).ok_or_else(|| EntryError::Unsupported {
            path: lossy(&path),
            typeflag: other as char,
        })?,
    };
    let header = entry.header();
    // A PAX `size` that disagrees with the header's own size field is the parser differential behind
    // the tar header-desync CVEs: readers that honour one or the other see different next headers.
    // Only a zero field, or a saturated one for a file too large for it, may stand for the PAX size.
    let field = header.size().map_err(EntryError::Io)?;
    if field != entry.size() && field != 0 && field != USTAR_SIZE_MAX {
        return Err(EntryError::Invalid {
            path: lossy(&path),
            what: "PAX size contradicts the header's size field",
        });
    }
    let mut meta = EntryMeta {
        kind,
        mode: header.mode().map_err(EntryError::Io)? & 0o7777,
        uid: header.uid().map_err(EntryError::Io)?,
        gid: header.gid().map_err(EntryError::Io)?,
        mtime: header.mtime().map_err(EntryError::Io)?,
        size: if kind == Kind::File { entry.size() } else { 0 },
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        path: Vec::new(),
    };
    if matches!(kind, Kind::Char | Kind::Block) {
        meta.dev_major = header.device_major().ok().flatten().unwrap_or(0);
        meta.dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
    }
    match kind {
        Kind::Symlink | Kind::Hardlink => {
            let target = entry
                .link_name_bytes()
                .ok_or(EntryError::Invalid {
                    path: lossy(&path),
                    what: "link without a target",
                })?
                .into_owned();
            meta.link = if kind == Kind::Hardlink {
                let t = clean_path(&target)?;
                if t.is_empty() {
                    return Err(EntryError::Invalid {
                        path: lossy(&path),
                        what: "hardlink to the root",
                    });
                }
                t
            } else {
                if target.is_empty() || target.contains(&0) {
                    return Err(EntryError::Invalid {
                        path: lossy(&path),
                        what: "bad symlink target",
                    });
                }
                target
            };
        }
        _ => {}
    }
    if let Some(exts) = entry.pax_extensions().map_err(EntryError::Io)? {
        for ext in exts {
            let ext = ext.map_err(EntryError::Io)?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let number = || -> Result<u64, EntryError> {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(EntryError::Invalid {
                        path: lossy(&path),
                        what: "bad numeric PAX record",
                    })
            };
            match key {
                b"uid" => meta.uid = number()?,
                b"gid" => meta.gid = number()?,
                b"mtime" => meta.mtime = number().unwrap_or(meta.mtime),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    meta.path = path;
    Ok(Some(Item::Entry(meta)))
}
