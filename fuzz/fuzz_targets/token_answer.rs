//! Fuzz target `token_answer`; the body is `pacer_fuzz::token_answer` (src/lib.rs), shared with the
//! stable corpus replay in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pacer_fuzz::token_answer(data));
