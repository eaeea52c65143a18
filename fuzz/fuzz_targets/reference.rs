//! References, request paths, queries and platforms as a request names them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| strata::fuzzing::reference(data));
