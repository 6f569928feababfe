//! Fuzz target: see `nixmux_fuzz::worker_replies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::worker_replies(data);
});
