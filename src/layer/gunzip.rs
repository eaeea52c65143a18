//! gzip decoding with ISA-L's inflate (`isal-sys`, the library built from its vendored source).
//!
//! Inflating is what a conversion spends most of its time on, on one thread (docs/PERFORMANCE.md):
//! ISA-L's assembly inflate is about twice zlib's speed on layer data (`igzip -dc` against `pigz -dc`)
//! and 1.1 to 1.4 times zlib-rs's (`benches/inflate.rs` over real layers). isal-rs's own
//! `read::GzipDecoder` is not used: it spins on a truncated stream instead of failing, and this
//! reader must tell truncation, corruption and a wrong CRC or ISIZE apart from the end of a layer.
//!
//! Every member is decoded, one after the other, as flate2's `MultiGzDecoder` does: ISA-L checks
//! each member's trailer (CRC-32 and ISIZE) and stops reading exactly at its end, so what follows
//! is the next member's header.

use std::io::{self, BufRead, Read};

use isal_sys::igzip_lib as isal;

/// A gzip stream of one or more members, decoded.
pub struct Gunzip<R> {
    input: R,
    state: Box<isal::inflate_state>,
    /// A member's header has been started and its trailer not yet checked.
    in_member: bool,
    /// A member has been begun: an input with none is not a gzip stream.
    begun: bool,
}

// SAFETY: the state's raw pointers point into buffers lent for one `isal_inflate` call only; between
// calls they dangle unused, and the state is owned by this reader alone.
unsafe impl<R: Send> Send for Gunzip<R> {}

impl<R: BufRead> Gunzip<R> {
    pub fn new(input: R) -> Gunzip<R> {
        // SAFETY: the state is plain data (integers, arrays, null pointers), which
        // `isal_inflate_init` then sets up.
        let mut state = Box::new(unsafe { std::mem::zeroed::<isal::inflate_state>() });
        unsafe { isal::isal_inflate_init(&mut *state) };
        Gunzip {
            input,
            state,
            in_member: false,
            begun: false,
        }
    }

    fn start_member(&mut self) {
        // SAFETY: an initialised state, reset for the next member.
        unsafe { isal::isal_inflate_reset(&mut *self.state) };
        self.state.crc_flag = isal::ISAL_GZIP;
        self.in_member = true;
        self.begun = true;
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt gzip stream: {what}"),
    )
}

fn error(code: i32) -> io::Error {
    invalid(match code {
        isal::ISAL_INVALID_BLOCK => "invalid deflate block",
        isal::ISAL_INVALID_SYMBOL => "invalid deflate symbol",
        isal::ISAL_INVALID_LOOKBACK => "distance too far back",
        isal::ISAL_INVALID_WRAPPER => "invalid gzip header",
        isal::ISAL_UNSUPPORTED_METHOD => "not deflate-compressed",
        isal::ISAL_INCORRECT_CHECKSUM => "CRC or length check failed",
        _ => "inflate failed",
    })
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let available = self.input.fill_buf()?;
            if !self.in_member {
                if available.is_empty() {
                    if !self.begun {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "empty gzip stream",
                        ));
                    }
                    return Ok(0);
                }
                self.start_member();
                continue;
            }
            let in_len = available.len().min(u32::MAX as usize);
            let out_len = buf.len().min(u32::MAX as usize);
            let state = &mut *self.state;
            // ISA-L reads through `next_in` and writes through `next_out` during the call only.
            state.next_in = available.as_ptr().cast_mut();
            state.avail_in = in_len as u32;
            state.next_out = buf.as_mut_ptr();
            state.avail_out = out_len as u32;
            // SAFETY: both buffers are valid for the lengths given, for the length of the call.
            let code = unsafe { isal::isal_inflate(state) };
            let consumed = in_len - state.avail_in as usize;
            let produced = out_len - state.avail_out as usize;
            let finished = state.block_state == isal::isal_block_state_ISAL_BLOCK_FINISH;
            state.next_in = std::ptr::null_mut();
            state.next_out = std::ptr::null_mut();
            self.input.consume(consumed);
            if code < 0 {
                return Err(error(code));
            }
            if finished {
                self.in_member = false;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if !finished && consumed == 0 {
                // No progress with room to write: the input ended inside a member.
                return Err(if in_len == 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "truncated gzip stream")
                } else {
                    invalid("inflate made no progress")
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gunzip(data: &[u8], in_cap: usize, out_chunk: usize) -> io::Result<Vec<u8>> {
        let mut r = Gunzip::new(io::BufReader::with_capacity(in_cap, data));
        let mut out = Vec::new();
        let mut buf = vec![0u8; out_chunk];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn sample(n: usize) -> Vec<u8> {
        // Text-like and incompressible parts, so every block type appears.
        let mut x = 0x2545_f491_u32;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if (i / 4096) % 3 == 0 {
                    x as u8
                } else {
                    b"abcdefgh "[(x % 9) as usize]
                }
            })
            .collect()
    }

    #[test]
    fn decodes_every_member_whatever_the_buffer_sizes() {
        let data = sample(300_000);
        let mut two = gz(&data[..100_000], 0);
        two.extend(gz(&data[100_000..], 6));
        two.extend(gz(b"", 1));
        for (cap, chunk) in [(1, 1), (7, 3), (8192, 1000), (1 << 20, 1 << 20)] {
            assert_eq!(
                gunzip(&two, cap, chunk).unwrap(),
                data,
                "cap {cap} chunk {chunk}"
            );
        }
    }

    #[test]
    fn truncation_corruption_and_bad_trailers_are_errors() {
        let good = gz(&sample(50_000), 6);
        for cut in [1, 4, 8, 9, good.len() / 2, good.len() - 1] {
            let e = gunzip(&good[..good.len() - cut], 64, 4096).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}: {e}");
        }
        let mut crc = good.clone();
        let at = crc.len() - 8;
        crc[at] ^= 1;
        assert!(gunzip(&crc, 64, 4096)
            .unwrap_err()
            .to_string()
            .contains("CRC"));
        let mut isize = good.clone();
        let at = isize.len() - 1;
        isize[at] ^= 1;
        assert!(gunzip(&isize, 64, 4096).is_err());
        let mut body = good.clone();
        body[30] ^= 0xff;
        assert!(gunzip(&body, 64, 4096).is_err());
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"not gzip");
        assert!(gunzip(&trailing, 64, 4096).is_err());
        assert!(gunzip(b"", 64, 4096).is_err());
    }
}
