//! The build settings a scheduler chooses, and how each protocol carries them: the serve
//! protocol in the options block of every build, the worker protocol in `SetOptions`. A leaf:
//! it imports nothing from the crate.

use std::collections::BTreeMap;
use std::time::Duration;

use nixmux_proto::serve;
use nixmux_proto::worker::ClientOptions;

/// Build settings that reach the builder on both protocols (serve: the options block of each
/// build; worker: `SetOptions` before the build).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Kill the build after this long without log output.
    pub max_silent_time: Option<Duration>,
    /// Kill the build after this long.
    pub timeout: Option<Duration>,
    /// Kill the build after this many bytes of log.
    pub max_log_size: Option<u64>,
    /// Keep the build directory of a failed build on the builder.
    pub keep_failed: bool,
    /// `cores` for the build (worker protocol only; serve builds use the builder's setting).
    pub cores: Option<u64>,
    /// Let the builder substitute inputs from its own caches (`builders-use-substitutes`).
    pub substitute: bool,
    /// Do not store the build's whole log in the local store (by default nixmux does, where
    /// `nix log` finds it, as Nix's build hook does for remote builds). Not sent to builders.
    pub no_local_log: bool,
}

fn secs(d: Option<Duration>) -> u64 {
    d.map(|d| d.as_secs().max(1)).unwrap_or(0)
}

/// The serve protocol's options block, sent with every build.
pub(crate) fn serve_options(o: &BuildOptions) -> serve::BuildOptions {
    serve::BuildOptions {
        max_silent_time: secs(o.max_silent_time),
        build_timeout: secs(o.timeout),
        max_log_size: o.max_log_size.unwrap_or(0),
        keep_failed: o.keep_failed,
    }
}

/// The worker protocol's `SetOptions`, sent before every build.
pub(crate) fn client_options(o: &BuildOptions) -> ClientOptions {
    let mut overrides = BTreeMap::new();
    // `timeout` is one of the few overrides an untrusted client may set; max-build-log-size
    // is honoured for trusted clients (and ignored, at debug level, for untrusted ones).
    overrides.insert("timeout".to_owned(), secs(o.timeout).to_string());
    if let Some(n) = o.max_log_size {
        overrides.insert("max-build-log-size".to_owned(), n.to_string());
    }
    ClientOptions {
        keep_failed: o.keep_failed,
        max_silent_time: secs(o.max_silent_time),
        build_cores: o.cores.unwrap_or(0),
        use_substitutes: o.substitute,
        verbosity: 3,
        overrides,
        ..ClientOptions::default()
    }
}
