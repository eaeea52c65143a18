//! Uncompressed layers (strata::fuzzing::split_layers) through guard, sizing scan, merge and docker archive.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata::fuzzing::merge(data);
});
