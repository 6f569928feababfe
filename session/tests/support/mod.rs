//! Test support shared by the fake-peer test binaries. Not every binary uses every helper.
#![allow(dead_code, unreachable_pub)]

pub mod fake;
