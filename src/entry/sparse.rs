//! GNU sparse files in PAX form (`GNU.sparse.*` records, versions 0.0, 0.1 and 1.0, as GNU tar
//! `--sparse --format=pax` writes them): the map of the stored data regions, and the reader that
//! expands them to the file's whole content, holes as zeros. docker pull expands them the same way
//! (Go's archive/tar reads every version); the old GNU type `S` entries it refuses, and so does
//! strata (see `crate::limits`).

use std::io::{self, Read};

/// Regions one map may list: real maps list one per data run; this bounds what a hostile map makes
/// strata hold (16 bytes a region).
const MAX_REGIONS: u64 = 1 << 16;
/// Bytes of a version 1.0 map at the head of the data: room for the numbers of `MAX_REGIONS` regions.
const MAX_MAP_BYTES: usize = 3 << 20;
/// The map of version 1.0 is read a tar block at a time, as Go's reader does.
const BLOCK: usize = 512;

/// The records that make a PAX entry sparse.
#[derive(Debug, Default)]
pub(super) struct Records {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    size: Option<Vec<u8>>,
    realsize: Option<Vec<u8>>,
    numblocks: Option<Vec<u8>>,
    /// `GNU.sparse.map` (0.1), or the repeated `offset`/`numbytes` records of 0.0, joined the same way.
    map: Option<Vec<u8>>,
}

impl Records {
    /// Keeps the record if it is one of these; false if it is not.
    pub(super) fn take(&mut self, key: &[u8], value: &[u8]) -> bool {
        let Some(key) = key.strip_prefix(b"GNU.sparse.") else {
            return false;
        };
        let slot = match key {
            b"major" => &mut self.major,
            b"minor" => &mut self.minor,
            b"name" => &mut self.name,
            b"size" => &mut self.size,
            b"realsize" => &mut self.realsize,
            b"numblocks" => &mut self.numblocks,
            b"map" => &mut self.map,
            b"offset" | b"numbytes" => {
                let map = self.map.get_or_insert_with(Vec::new);
                if !map.is_empty() {
                    map.push(b',');
                }
                map.extend_from_slice(value);
                return true;
            }
            _ => return false,
        };
        *slot = Some(value.to_vec());
        true
    }

    /// Which version the records describe (Go's `readGNUSparsePAXHeaders`): `None` if the entry is
    /// not sparse, or of a version Go does not know (then it is a plain file).
    pub(super) fn version(&self) -> Option<Version> {
        match (self.major.as_deref(), self.minor.as_deref()) {
            (Some(b"1"), Some(b"0")) => Some(Version::V1),
            (Some(b"0"), Some(b"0" | b"1")) => Some(Version::V0),
            (None, None) if self.map.as_ref().is_some_and(|m| !m.is_empty()) => Some(Version::V0),
            _ => None,
        }
    }

    /// The file's real name, which the entry's own stands in for (`…/GNUSparseFile.0/<name>`).
    pub(super) fn name(&self) -> Option<&[u8]> {
        self.name.as_deref().filter(|n| !n.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    /// 0.0 and 0.1: the map in the records.
    V0,
    /// 1.0: the map at the head of the data.
    V1,
}

/// A sparse file's map: the data regions (offset, length) of a file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse {
    regions: Vec<(u64, u64)>,
    pub size: u64,
}

fn number(text: &[u8]) -> Result<u64, &'static str> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return Err("bad number in the sparse map");
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or("bad number in the sparse map")
}

/// Reads the map (from the records, or for 1.0 from the head of `data`, `stored` bytes in all) and
/// checks it as Go's reader does: regions in order, not overlapping, inside the file, and the stored
/// bytes exactly the regions' (anything else docker fails on while extracting).
pub(super) fn read_map<R: Read>(
    records: &Records,
    version: Version,
    data: &mut R,
    stored: u64,
) -> Result<Sparse, &'static str> {
    let size = match records.size.as_deref().or(records.realsize.as_deref()) {
        Some(s) => number(s)?,
        None => stored,
    };
    let (numbers, map_bytes) = match version {
        Version::V0 => {
            let map = records.map.as_deref().unwrap_or_default();
            let numbers = map
                .split(|&b| b == b',')
                .map(number)
                .collect::<Result<Vec<u64>, _>>()?;
            let blocks = number(
                records
                    .numblocks
                    .as_deref()
                    .ok_or("sparse map without GNU.sparse.numblocks")?,
            )?;
            if numbers.len() as u64 != blocks.saturating_mul(2) || blocks > MAX_REGIONS {
                return Err("sparse map does not hold GNU.sparse.numblocks regions");
            }
            (numbers, 0)
        }
        Version::V1 => read_map_1_0(data)?,
    };
    let mut regions = Vec::with_capacity(numbers.len() / 2);
    let mut end = 0u64;
    let mut total = 0u64;
    for pair in numbers.chunks_exact(2) {
        let (offset, len) = (pair[0], pair[1]);
        let stop = offset
            .checked_add(len)
            .ok_or("sparse region past the end of the file")?;
        if offset < end || stop > size {
            return Err("sparse regions overlap or lie past the end of the file");
        }
        end = stop;
        total += len;
        if len > 0 {
            regions.push((offset, len));
        }
    }
    if stored.checked_sub(map_bytes) != Some(total) {
        return Err("sparse map does not match the data stored");
    }
    Ok(Sparse { regions, size })
}

/// The 1.0 map: newline-ended decimal numbers (the count, then offset and length of each region), in
/// whole tar blocks at the head of the data. Returns the numbers after the count, and the map's bytes.
fn read_map_1_0<R: Read>(data: &mut R) -> Result<(Vec<u64>, u64), &'static str> {
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut next = |buf: &mut Vec<u8>| -> Result<u64, &'static str> {
        loop {
            if let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
                let n = number(&buf[pos..pos + nl]);
                pos += nl + 1;
                return n;
            }
            if buf.len() >= MAX_MAP_BYTES {
                return Err("sparse map too large");
            }
            let start = buf.len();
            buf.resize(start + BLOCK, 0);
            data.read_exact(&mut buf[start..])
                .map_err(|_| "sparse map cut short")?;
        }
    };
    let count = next(&mut buf)?;
    if count > MAX_REGIONS {
        return Err("sparse map lists too many regions");
    }
    let mut numbers = Vec::with_capacity(2 * count as usize);
    for _ in 0..2 * count {
        numbers.push(next(&mut buf)?);
    }
    Ok((numbers, buf.len() as u64))
}

impl Sparse {
    /// The whole content, from the stored regions that follow in `data`.
    pub fn expand<'a, R: Read>(&'a self, data: &'a mut R) -> Expand<'a, R> {
        Expand {
            data,
            sparse: self,
            next: 0,
            pos: 0,
        }
    }
}

/// Reads a sparse file's whole content: holes as zeros, regions from the stored data.
pub struct Expand<'a, R> {
    data: &'a mut R,
    sparse: &'a Sparse,
    /// The first region not wholly read.
    next: usize,
    pos: u64,
}

impl<R: Read> Read for Expand<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let regions = &self.sparse.regions;
        if buf.is_empty() || self.pos >= self.sparse.size {
            return Ok(0);
        }
        while regions
            .get(self.next)
            .is_some_and(|&(o, l)| o + l <= self.pos)
        {
            self.next += 1;
        }
        match regions.get(self.next) {
            Some(&(offset, len)) if offset <= self.pos => {
                let want = (offset + len - self.pos).min(buf.len() as u64) as usize;
                let got = self.data.read(&mut buf[..want])?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sparse file data cut short",
                    ));
                }
                self.pos += got as u64;
                Ok(got)
            }
            next => {
                let hole_end = next.map_or(self.sparse.size, |&(o, _)| o);
                let n = (hole_end - self.pos).min(buf.len() as u64) as usize;
                buf[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}
