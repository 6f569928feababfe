//! Exit codes of `nixmux`, documented in docs/exit-codes.md. Scripts rely on them: change
//! them only together with that file.

/// Everything succeeded.
pub(crate) const OK: i32 = 0;
/// Something failed that has no more specific code (including internal errors).
pub(crate) const FAILURE: i32 = 1;
/// Bad command line or unusable configuration (machines file, URL, key file).
pub(crate) const CONFIG: i32 = 2;
/// No builder to work on (empty machines file, no `builders` configured).
pub(crate) const NO_BUILDERS: i32 = 3;
/// The builder could not be reached (name resolution, TCP, timeout before SSH).
pub(crate) const CONNECT: i32 = 10;
/// The builder's host key is unknown, does not match, or is revoked.
pub(crate) const HOST_KEY: i32 = 11;
/// The builder refused our keys.
pub(crate) const AUTH: i32 = 12;
/// The remote program (`nix-store`, `nix-daemon`) is missing on the builder.
pub(crate) const REMOTE_COMMAND_MISSING: i32 = 13;
/// The builder speaks something we cannot use, or the session broke mid-way.
pub(crate) const PROTOCOL: i32 = 14;
/// The builder's Nix does not trust the remote user for what was asked.
pub(crate) const NOT_TRUSTED: i32 = 15;
/// A build ran and failed (or timed out, or exceeded its log limit).
pub(crate) const BUILD_FAILED: i32 = 16;

/// The exit code for an error kind.
pub(crate) fn for_kind(kind: nixmux::ErrorKind) -> i32 {
    use nixmux::ErrorKind as K;
    match kind {
        K::Config | K::InvalidInput => CONFIG,
        K::NoSuitableBuilder => NO_BUILDERS,
        K::Connect | K::TimedOut | K::Disconnected => CONNECT,
        K::HostKey => HOST_KEY,
        K::Auth => AUTH,
        K::RemoteCommandMissing => REMOTE_COMMAND_MISSING,
        K::Protocol | K::Unsupported | K::Verification => PROTOCOL,
        K::NotTrusted => NOT_TRUSTED,
        K::BuildFailed => BUILD_FAILED,
        _ => FAILURE,
    }
}
