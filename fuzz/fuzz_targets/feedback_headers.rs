//! Fuzz target `feedback_headers`; the body is `pacer_fuzz::feedback_headers` (src/lib.rs), shared with the
//! stable corpus replay in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pacer_fuzz::feedback_headers(data));
