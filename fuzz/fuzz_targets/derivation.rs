//! Fuzz target: see `nixmux_fuzz::derivation`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::derivation(data);
});
