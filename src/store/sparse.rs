//! Reading a directory store's file without reading its holes. Runs of zeros (a cold squash's
//! padding) are stored as holes (`fs.rs`), and the first read of a hole costs the kernel about what
//! reading data costs (a 1 GiB hole took 3.1 s of system time on the first `cat`, 0.13 s once
//! cached, on this project's machines); found with `SEEK_DATA`/`SEEK_HOLE` and filled with zeros
//! here, it costs a `memset`.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// `range` of `file`, holes produced as zeros without reading them.
pub(super) struct SparseReader {
    file: File,
    pos: u64,
    end: u64,
    /// The region `pos` is in ends here; past it, it is looked up again.
    region_end: u64,
    in_hole: bool,
}

impl SparseReader {
    pub(super) fn new(file: File, range: Range<u64>) -> SparseReader {
        SparseReader {
            file,
            pos: range.start,
            end: range.end,
            region_end: range.start,
            in_hole: false,
        }
    }

    fn seek(&self, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this reader owns; it reads with pread, so moving the file
        // offset disturbs nothing.
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), self.pos as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or past pos: a hole to the end.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    /// Finds the region (data or hole) `pos` is in.
    fn locate(&mut self) {
        let (in_hole, region_end) = match self.seek(libc::SEEK_DATA) {
            Ok(None) => (true, self.end),
            Ok(Some(data)) if data > self.pos => (true, data),
            Ok(Some(_)) => match self.seek(libc::SEEK_HOLE) {
                Ok(Some(hole)) if hole > self.pos => (false, hole),
                _ => (false, self.end),
            },
            // A file system that cannot tell: all of it read as data.
            Err(_) => (false, self.end),
        };
        self.in_hole = in_hole;
        self.region_end = region_end.min(self.end);
    }
}

impl Read for SparseReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.region_end {
            self.locate();
        }
        let want = buf.len().min((self.region_end - self.pos) as usize);
        let n = if self.in_hole {
            buf[..want].fill(0);
            want
        } else {
            match self.file.read_at(&mut buf[..want], self.pos)? {
                // Shorter than it was: what it holds is all there is.
                0 => return Ok(0),
                n => n,
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_read_as_zeros_and_data_as_written_at_any_range() {
        let mut file = tempfile::tempfile().unwrap();
        let mut want = vec![0u8; 3 << 20];
        // data, a 1 MiB hole, data, a hole to the end
        for (at, len) in [(0usize, 100_000usize), (1_200_000, 300_000)] {
            for (i, b) in want[at..at + len].iter_mut().enumerate() {
                *b = (i % 251) as u8 + 1;
            }
            file.seek(SeekFrom::Start(at as u64)).unwrap();
            file.write_all(&want[at..at + len]).unwrap();
        }
        file.set_len(want.len() as u64).unwrap();
        for range in [
            0..want.len(),
            5..99_999,
            90_000..1_250_000,
            2_000_000..want.len(),
        ] {
            let mut got = Vec::new();
            let mut r = SparseReader::new(
                file.try_clone().unwrap(),
                range.start as u64..range.end as u64,
            );
            // small reads, so regions are crossed mid-read
            let mut buf = [0u8; 4096 + 17];
            loop {
                match r.read(&mut buf).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            assert!(got == want[range.clone()], "range {range:?}");
        }
        // And the hole is found as one, not read (a file system that cannot tell fails here).
        let mut r = SparseReader::new(file, 150_000..want.len() as u64);
        r.locate();
        assert!(
            r.in_hole && r.region_end >= 1_196_032,
            "{} {}",
            r.in_hole,
            r.region_end
        );
    }
}
