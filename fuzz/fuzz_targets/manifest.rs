//! Registry JSON as a manifest endpoint's answer, an image manifest and an image config.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| strata::fuzzing::manifest(data));
