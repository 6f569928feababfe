//! `ssh://` and `ssh-ng://` store URLs, parsed the way Nix parses them.
//!
//! # Grammar
//!
//! `scheme://[user@]host[:port][?name=value&...]` where
//!
//! * `scheme` is `ssh` (serve protocol, `nix-store --serve --write`, Nix's `LegacySSHStore`) or
//!   `ssh-ng` (worker protocol, `nix-daemon --stdio`, Nix's `SSHStore`);
//! * `host` is a name, an IPv4 address, or an IPv6 address in brackets (`[::1]:2222`, with an
//!   optional zone `[fe80::1%25eth0]`). Like Nix >= 2.2x (`StoreReference::parse`'s
//!   "back-compatibility shim", src/libstore/store-reference.cc) an *unbracketed* IPv6 address
//!   is accepted too, but then no port can be given;
//! * user and host are percent-decoded, as Nix >= 2.2x does with boost.url
//!   (`ParsedURL::Authority::parse`, src/libutil/url.cc). Nix 2.8 passed the authority to ssh
//!   undecoded, and passed `host:port` to ssh as a host name (it has no port support at all);
//! * query parameters are split on `&`, each `name=value` with both sides percent-decoded (`+`
//!   stays `+`); a part without `=` is ignored (Nix warns "dubious URI query"), and for a
//!   repeated name the first occurrence wins (`std::map::emplace` in Nix's `decodeQuery`).
//!   Spaces and `"` are allowed unescaped, as in Nix's lenient query parsing.
//!
//! Like Nix (`checkValidAuthority`, src/libstore/ssh.cc) user and host must not be empty or
//! start with `-`. A path (`ssh://host/x`) is refused, as Nix >= 2.2x refuses it; so are
//! passwords and fragments, which Nix would silently drop.
//!
//! A string without `://` gets `ssh://` prepended when Nix's machines parser would do so
//! ([`effective_store_uri`]); this is how `user@host` and `host:port` mean `ssh://`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;

use super::error::{StoreUrlError, StoreUrlProblem};
use crate::Protocol;

/// A parsed `ssh://` or `ssh-ng://` store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `ssh://` → [`Protocol::Serve`], `ssh-ng://` → [`Protocol::Worker`].
    pub protocol: Protocol,
    /// Remote user (percent-decoded), if the URL names one.
    pub user: Option<String>,
    /// Host name or address (percent-decoded; IPv6 without brackets, zone after `%`).
    pub host: String,
    /// Port, if the URL names one.
    pub port: Option<u16>,
    /// Query parameters, decoded; the first occurrence of a name wins.
    pub params: BTreeMap<String, String>,
    /// Query parts without `=`, which Nix ignores with a warning.
    pub ignored_query_parts: Vec<String>,
}

/// What kind of store a machines-file URI names, decided the way Nix decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `ssh://` or `ssh-ng://`.
    Ssh(Protocol),
    /// Anything else; the string describes it ("the local store", "scheme `unix`", ...).
    Other(String),
}

/// The store URI Nix uses for field 1 of a machines line.
///
/// Nix's `Machine` constructor (src/libstore/machines.cc, unchanged from 2.8 to 2.35) prepends
/// `ssh://` "for backwards compatibility" unless the string contains `://` or `/`, or is
/// `auto`, `daemon`, `local`, or starts with `auto?`, `daemon?`, `local?` or `?`. So
/// `nix@host` and `host:2222` become `ssh://nix@host` and `ssh://host:2222`.
pub fn effective_store_uri(field: &str) -> Cow<'_, str> {
    let keep = field.contains("://")
        || field.contains('/')
        || matches!(field, "auto" | "daemon" | "local")
        || ["auto?", "daemon?", "local?", "?"]
            .iter()
            .any(|p| field.starts_with(p));
    if keep {
        Cow::Borrowed(field)
    } else {
        Cow::Owned(format!("ssh://{field}"))
    }
}

/// Classifies an (effective) store URI. Only `ssh://` and `ssh-ng://` are SSH builders;
/// `mounted-ssh-ng://` and every local, daemon or HTTP store is something else.
pub fn store_kind(uri: &str) -> StoreKind {
    let base = uri.split('?').next().unwrap_or(uri);
    if let Some((scheme, _)) = base.split_once("://") {
        return match protocol_for_scheme(scheme) {
            Some(p) => StoreKind::Ssh(p),
            None => StoreKind::Other(match scheme {
                "unix" => "the local Nix daemon (unix://)".to_owned(),
                "local" => "a local store (local://)".to_owned(),
                "file" => "a binary cache directory (file://)".to_owned(),
                "mounted-ssh-ng" => "mounted-ssh-ng://, which nixmux does not support".to_owned(),
                other => format!("a `{other}://` store"),
            }),
        };
    }
    StoreKind::Other(match base {
        "" | "auto" => "the local store (auto)".to_owned(),
        "daemon" => "the local Nix daemon (daemon)".to_owned(),
        "local" => "the local store (local)".to_owned(),
        _ if base.contains('/') => format!("a local store at `{base}`"),
        _ => format!("an unrecognised store `{uri}`"),
    })
}

/// `ssh` → Serve, `ssh-ng` → Worker.
pub(crate) fn protocol_for_scheme(scheme: &str) -> Option<Protocol> {
    match scheme {
        "ssh" => Some(Protocol::Serve),
        "ssh-ng" => Some(Protocol::Worker),
        _ => None,
    }
}

impl StoreUrl {
    /// Parses `ssh://...`, `ssh-ng://...`, or a string without scheme that Nix would turn into
    /// `ssh://...` (see [`effective_store_uri`]).
    pub fn parse(url: &str) -> Result<StoreUrl, StoreUrlError> {
        let err = |problem| StoreUrlError {
            url: url.to_owned(),
            problem,
        };
        let effective = effective_store_uri(url);
        let Some((scheme, rest)) = effective.split_once("://") else {
            return Err(err(StoreUrlProblem::NotSsh(match store_kind(&effective) {
                StoreKind::Other(d) => d,
                StoreKind::Ssh(p) => p.scheme().to_owned(),
            })));
        };
        let protocol = protocol_for_scheme(scheme)
            .ok_or_else(|| err(StoreUrlProblem::NotSsh(scheme.into())))?;
        let (rest, fragment) = match rest.split_once('#') {
            Some((r, f)) => (r, Some(f)),
            None => (rest, None),
        };
        if let Some(f) = fragment {
            return Err(err(StoreUrlProblem::Fragment(f.to_owned())));
        }
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if let Some(i) = authority.find('/') {
            return Err(err(StoreUrlProblem::UnexpectedPath(
                authority[i..].to_owned(),
            )));
        }
        let (user, host, port) = parse_authority(authority).map_err(err)?;
        let mut params = BTreeMap::new();
        let mut ignored_query_parts = Vec::new();
        if let Some(q) = query {
            for part in q.split('&').filter(|p| !p.is_empty()) {
                match part.split_once('=') {
                    Some((k, v)) => {
                        let k = percent_decode(k).map_err(err)?;
                        let v = percent_decode(v).map_err(err)?;
                        params.entry(k).or_insert(v);
                    }
                    None => ignored_query_parts.push(part.to_owned()),
                }
            }
        }
        Ok(StoreUrl {
            protocol,
            user,
            host,
            port,
            params,
            ignored_query_parts,
        })
    }

    /// `[user@]host[:port]` with IPv6 in brackets, percent-encoded where needed.
    pub fn authority(&self) -> String {
        let mut s = String::new();
        if let Some(u) = &self.user {
            s.push_str(&percent_encode(u, ""));
            s.push('@');
        }
        if self.host.contains(':') {
            s.push('[');
            s.push_str(&self.host.replace('%', "%25"));
            s.push(']');
        } else {
            s.push_str(&percent_encode(&self.host, ""));
        }
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreUrl::parse(s)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.protocol.scheme(), self.authority())?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(
                f,
                "{sep}{}={}",
                percent_encode(k, ":@/?"),
                percent_encode(v, ":@/?")
            )?;
        }
        Ok(())
    }
}

/// Splits and decodes `[user@]host[:port]`.
fn parse_authority(
    authority: &str,
) -> Result<(Option<String>, String, Option<u16>), StoreUrlProblem> {
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let user = match userinfo {
        None => None,
        Some(u) => {
            if u.contains('@') {
                return Err(StoreUrlProblem::ManyAts);
            }
            if u.contains(':') {
                return Err(StoreUrlProblem::Password);
            }
            check_chars(u)?;
            let u = percent_decode(u)?;
            if u.is_empty() {
                return Err(StoreUrlProblem::EmptyUser);
            }
            if u.starts_with('-') {
                return Err(StoreUrlProblem::LeadingDash {
                    what: "user name",
                    value: u,
                });
            }
            Some(u)
        }
    };
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err(StoreUrlProblem::BadIpv6(hostport.to_owned()));
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None => {
                    return Err(StoreUrlProblem::BadHostChar(
                        p.chars().next().unwrap_or(']'),
                    ));
                }
            },
        };
        // RFC 6874: the zone's `%` is written `%25` inside brackets.
        let decoded = percent_decode(addr)?;
        (ipv6_host(&decoded)?, port)
    } else if hostport.matches(':').count() >= 2 {
        // Nix's shim for unbracketed IPv6 (no port possible); the zone may be raw or `%25`.
        let decoded = percent_decode(hostport).unwrap_or_else(|_| hostport.to_owned());
        (ipv6_host(&decoded)?, None)
    } else {
        let (h, p) = match hostport.split_once(':') {
            Some((h, p)) => (h, parse_port(p)?),
            None => (hostport, None),
        };
        check_chars(h)?;
        (percent_decode(h)?, p)
    };
    if host.is_empty() {
        return Err(StoreUrlProblem::EmptyHost);
    }
    if host.starts_with('-') {
        return Err(StoreUrlProblem::LeadingDash {
            what: "host name",
            value: host,
        });
    }
    Ok((user, host, port))
}

/// Validates `addr[%zone]` as an IPv6 literal and returns it unchanged.
fn ipv6_host(s: &str) -> Result<String, StoreUrlProblem> {
    let addr = s.split_once('%').map_or(s, |(a, _)| a);
    addr.parse::<Ipv6Addr>()
        .map(|_| s.to_owned())
        .map_err(|_| StoreUrlProblem::BadIpv6(s.to_owned()))
}

/// `""` → no port (boost.url treats `host:` as having no port); else 1..=65535.
fn parse_port(p: &str) -> Result<Option<u16>, StoreUrlProblem> {
    if p.is_empty() {
        return Ok(None);
    }
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreUrlProblem::BadPort(p.to_owned()));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(StoreUrlProblem::BadPort(p.to_owned())),
        Ok(n) => Ok(Some(n)),
    }
}

/// RFC 3986 reg-name / userinfo characters: unreserved, sub-delims and `%` escapes.
fn check_chars(s: &str) -> Result<(), StoreUrlProblem> {
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=%".contains(*c)))
    {
        Some(c) => Err(StoreUrlProblem::BadHostChar(c)),
        None => Ok(()),
    }
}

/// Decodes `%XY` escapes (two hex digits required, result must be UTF-8), as Nix's
/// `percentDecode` does (boost.url's pct-decoding since 2.2x).
pub fn percent_decode(s: &str) -> Result<String, StoreUrlProblem> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bad = || StoreUrlProblem::BadPercentEncoding(s.to_owned());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Escapes everything but unreserved characters and those in `keep`.
fn percent_encode(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "-._~".contains(c) || keep.contains(c) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes `s` for a POSIX shell exactly as Nix's `shellEscape` (src/libutil/util.cc in 2.8):
/// always single quotes, each `'` written as `'\''`.
pub fn shell_escape(s: &str) -> String {
    let mut r = String::with_capacity(s.len() + 2);
    r.push('\'');
    for c in s.chars() {
        if c == '\'' {
            r.push_str("'\\''");
        } else {
            r.push(c);
        }
    }
    r.push('\'');
    r
}
