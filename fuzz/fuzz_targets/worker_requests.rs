//! Fuzz target: see `nixmux_fuzz::worker_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::worker_requests(data);
});
