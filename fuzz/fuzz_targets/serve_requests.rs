//! Fuzz target: see `nixmux_fuzz::serve_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::serve_requests(data);
});
