//! Fuzz target: see `nixmux_fuzz::nar`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nixmux_fuzz::nar(data);
});
