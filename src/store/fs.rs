//! The store on a local directory: each key a file under the root, uploads in `<root>/tmp/`, published
//! by `link(2)` (conditional create: fails if the name exists) or `rename(2)` (atomic replace) after an
//! `fsync`, so a crash leaves either the whole object or none of it.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tempfile::NamedTempFile;

use super::backend::{Backend, Meta, Upload};

/// Where uploads are written before they are published.
const TMP_DIR: &str = "tmp";

/// An upload file nobody has written to for this long is left over from a crash: removed on open.
/// Not zero, because another process may share the directory and be mid-upload; a live upload
/// writes often, which keeps its mtime fresh.
pub const STALE_UPLOAD_AGE: Duration = Duration::from_secs(3600);

/// The store's objects as files under one directory.
pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    /// Opens (creating) the store at `root` and removes stale uploads of crashed writers.
    pub fn open(root: &Path) -> io::Result<FsBackend> {
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp)?;
        let now = SystemTime::now();
        for entry in fs::read_dir(&tmp)? {
            let entry = entry?;
            let modified = entry.metadata()?.modified()?;
            if now.duration_since(modified).unwrap_or_default() >= STALE_UPLOAD_AGE {
                // Another opener may have removed it first.
                match fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(FsBackend {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        // Keys are made by the store from validated names; this is the last line of defence.
        assert!(
            !key.is_empty()
                && key
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
            "store key {key:?} is not a plain relative path"
        );
        self.root.join(key)
    }
}

struct FsUpload {
    file: NamedTempFile,
    root: PathBuf,
    /// Whether the last bytes were skipped (a hole), so the file's length is not yet theirs.
    hole_at_end: bool,
}

/// Runs of zeros at least this long are left as holes: a squash's padding (often hundreds of MB of
/// zeros) then costs neither the page cache's copy nor the disk write and `fsync`.
const HOLE_MIN: usize = 64 << 10;

/// Whether every byte is zero: compared against a static zero page, which `memcmp` does at memory
/// speed.
fn all_zero(buf: &[u8]) -> bool {
    static ZEROS: [u8; 4096] = [0; 4096];
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

impl FsUpload {
    /// Makes the bytes durable and the destination directory exist, before the name appears.
    fn prepare(&mut self, key: &str) -> io::Result<PathBuf> {
        if self.hole_at_end {
            let file = self.file.as_file_mut();
            let len = file.stream_position()?;
            file.set_len(len)?;
            self.hole_at_end = false;
        }
        self.file.as_file().sync_all()?;
        let dest = self.root.join(key);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        Ok(dest)
    }
}

impl Write for FsUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() >= HOLE_MIN && all_zero(buf) {
            self.file.seek(SeekFrom::Current(buf.len() as i64))?;
            self.hole_at_end = true;
            return Ok(buf.len());
        }
        self.hole_at_end = false;
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Upload for FsUpload {
    fn create_if_absent(mut self: Box<Self>, key: &str) -> io::Result<bool> {
        let dest = self.prepare(key)?;
        // persist_noclobber is link + unlink: the name appears complete or not at all, never replaced.
        match self.file.persist_noclobber(&dest) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error),
        }
    }

    fn replace(mut self: Box<Self>, key: &str) -> io::Result<()> {
        let dest = self.prepare(key)?;
        self.file.persist(&dest).map(drop).map_err(|e| e.error)
    }
}

fn not_found_as_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Backend for FsBackend {
    fn upload(&self) -> io::Result<Box<dyn Upload>> {
        let file = NamedTempFile::new_in(self.root.join(TMP_DIR))?;
        Ok(Box::new(FsUpload {
            file,
            root: self.root.clone(),
            hole_at_end: false,
        }))
    }

    fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> io::Result<Option<Box<dyn Read + Send>>> {
        let Some(file) = not_found_as_none(File::open(self.path(key)))? else {
            return Ok(None);
        };
        let range = match range {
            Some(r) => r,
            None => 0..file.metadata()?.len(),
        };
        Ok(Some(Box::new(super::sparse::SparseReader::new(
            file, range,
        ))))
    }

    fn stat(&self, key: &str) -> io::Result<Option<Meta>> {
        not_found_as_none(fs::metadata(self.path(key)))?
            .map(|m| {
                Ok(Meta {
                    size: m.len(),
                    modified: m.modified()?,
                })
            })
            .transpose()
    }

    fn delete(&self, key: &str) -> io::Result<bool> {
        Ok(not_found_as_none(fs::remove_file(self.path(key)))?.is_some())
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let dir = prefix.trim_end_matches('/');
        let mut keys = Vec::new();
        let mut pending = vec![dir.to_string()];
        while let Some(dir) = pending.pop() {
            let Some(entries) = not_found_as_none(fs::read_dir(self.path(&dir)))? else {
                continue;
            };
            for entry in entries {
                let entry = entry?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue; // not a name the store made
                };
                let key = format!("{dir}/{name}");
                if entry.file_type()?.is_dir() {
                    pending.push(key);
                } else {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// The root and its upload directory are there: what every write needs (as root, permissions
    /// are not what fails).
    fn ready(&self) -> io::Result<()> {
        fs::read_dir(&self.root)?;
        if !fs::metadata(self.root.join(TMP_DIR))?.is_dir() {
            return Err(io::Error::other(format!("{TMP_DIR} is not a directory")));
        }
        Ok(())
    }

    fn touch(&self, key: &str) -> io::Result<()> {
        match not_found_as_none(File::options().write(true).open(self.path(key)))? {
            Some(file) => file.set_modified(SystemTime::now()),
            None => Ok(()),
        }
    }
}
