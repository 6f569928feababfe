//! Fuzz target: see `nixmux_fuzz::serve_replies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::serve_replies(data);
});
