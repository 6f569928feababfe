//! Bounds applied to every length read from the wire.
//!
//! A Nix peer announces lengths before data: strings, lists, NAR entries, log lines. A hostile
//! or broken peer can announce 2^63 bytes; without a bound we would try to allocate it. Every
//! decoder in this crate takes its bound from one [`Limits`] value so that a deployment can
//! tune them in one place (the scheduler's builder configuration).

/// Upper bounds for length-prefixed values. The defaults are generous for real Nix traffic and
/// small enough that a single message cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest general string: store paths, settings, hashes, derivation fields, error texts.
    pub max_string: u64,
    /// Longest single log line or `STDERR_NEXT` text.
    pub max_log_line: u64,
    /// Most elements in one list, set or map (path sets in QueryValidPaths, references...).
    pub max_list: u64,
    /// Longest file name inside a NAR directory.
    pub max_nar_name: u64,
    /// Longest symlink target inside a NAR.
    pub max_nar_target: u64,
    /// Deepest directory nesting inside a NAR.
    pub max_nar_depth: u32,
    /// Largest single regular file inside a NAR (and largest narSize we accept).
    pub max_nar_file: u64,
    /// Largest frame in a framed stream (worker protocol uploads).
    pub max_frame: u64,
    /// Most fields attached to one activity or result message.
    pub max_fields: u64,
}

impl Limits {
    /// Defaults: 1 MiB strings (derivation environments can be large), 64 KiB log lines,
    /// 1 million list entries, 4 KiB names, 64 KiB symlink targets, depth 256, 1 TiB files.
    pub const DEFAULT: Limits = Limits {
        max_string: 1 << 20,
        max_log_line: 64 << 10,
        max_list: 1 << 20,
        max_nar_name: 4 << 10,
        max_nar_target: 64 << 10,
        max_nar_depth: 256,
        max_nar_file: 1 << 40,
        max_frame: 16 << 20,
        max_fields: 1 << 10,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}
