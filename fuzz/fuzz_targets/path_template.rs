//! Fuzz target `path_template`; the body is `pacer_fuzz::path_template` (src/lib.rs), shared with the
//! stable corpus replay in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pacer_fuzz::path_template(data));
