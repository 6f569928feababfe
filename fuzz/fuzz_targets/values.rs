//! Fuzz target: see `nixmux_fuzz::values`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::values(data);
});
