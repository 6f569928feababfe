//! Turning a [`BuilderSpec`] plus ssh_config into plain connection parameters.
//!
//! # Precedence
//!
//! Nix runs `ssh <user@>host -x -a $NIX_SSHOPTS -i <ssh-key> -oUserKnownHostsFile=<pin file>
//! -C -p<port> -- <command>` (src/libstore/ssh.cc; `-p` since 2.2x). For OpenSSH, command-line
//! values come before any configuration file and the first obtained value wins, so:
//!
//! * **user**: the URL's `user@` wins, then ssh_config `User`, then the local user name;
//! * **port**: the URL's `:port` wins, then `Port`, then 22;
//! * **host**: ssh_config `Host` blocks are matched against the URL's host, and `HostName` (if
//!   any) replaces it as the address to connect to (`%h` in it is the URL's host);
//! * **identities**: field 3 / `ssh-key` (ssh `-i`) comes first, then every applicable
//!   `IdentityFile` in order (ssh tries all of them); if neither gives one, OpenSSH's default
//!   key files are listed and flagged with [`ResolvedEndpoint::identities_are_defaults`],
//!   because ssh silently skips those that do not exist;
//! * **host keys**: a pinned key (field 8 / `base64-ssh-public-host-key`) replaces the user
//!   known_hosts files, as Nix's `-oUserKnownHostsFile=` does; the global files are still
//!   listed (ssh still reads them; our transport uses them for `@revoked` only when a key is
//!   pinned). With a pin the policy is [`StrictPolicy::Yes`] whatever ssh_config says: the pin
//!   is an explicit machines-file value and must not be overridden by `StrictHostKeyChecking
//!   no`;
//! * **compression**: on if the URL says `compress=true` (Nix passes `-C`), else as
//!   ssh_config's `Compression` says;
//! * everything else (`IdentitiesOnly`, `StrictHostKeyChecking`, `ProxyJump`, timeouts,
//!   keepalive, `HostKeyAlias`) comes from ssh_config alone, with OpenSSH's defaults.
//!
//! ssh command-line options (`NIX_SSHOPTS`, see [`super::command_line`]) sit between the
//! explicit values and the files: [`SshConfig::load`] puts them first.
//!
//! # ProxyJump
//!
//! `ProxyJump a,b` makes ssh run `ssh -J a -W '[%h]:%p' b` as the proxy (ssh.c): the last hop
//! is reached through the earlier ones, and each hop is itself resolved through ssh_config
//! (`Host a` blocks apply to `a`), with the user and port written in the ProxyJump element
//! winning. Only the *first* hop is started without `-J`, so only its own `ProxyJump` is
//! honoured (and prepended); the other hops' `ProxyJump` lines are overridden by `-J`. The
//! outer ssh's command-line options other than `-F` are not passed on, so they do not apply
//! to hops. The chain is returned flattened, in connection order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command_line::SshCommandLine;
use super::error::{ConfigError, Location};
use super::local_env::LocalEnv;
use super::machines::{BuilderSpec, PinnedHostKey};
use super::ssh_config::{HostOptions, JumpSpec, ProxySetting, SshConfig, StrictPolicy};

/// How long a ProxyJump chain may get (after following first hops' own ProxyJump) before we
/// call it a loop.
const MAX_JUMPS: usize = 8;

/// OpenSSH's default `ServerAliveCountMax`.
const DEFAULT_ALIVE_COUNT_MAX: u32 = 3;

/// SSH keepalive settings (`ServerAliveInterval`, `ServerAliveCountMax`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Probe interval; `None` when off (OpenSSH's default, or `ServerAliveInterval 0`).
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is declared dead (default 3).
    pub count_max: u32,
}

/// One hop on the way to a builder.
#[derive(Debug, Clone, PartialEq)]
pub struct JumpHost {
    /// The ProxyJump element as written.
    pub spec: JumpSpec,
    /// How to reach this hop (its own `proxy_jump` is empty: the chain is flattened into the
    /// target's).
    pub endpoint: ResolvedEndpoint,
}

/// Everything needed to open the SSH connection to one host, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedEndpoint {
    /// The name ssh_config `Host` patterns were matched against (the URL's host).
    pub host_alias: String,
    /// The address to connect to: `HostName` if set, else `host_alias`; lower-cased unless it
    /// is an IP address (as ssh does).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Remote user.
    pub user: String,
    /// Private key files to try, in order, `~` and `%` tokens expanded.
    pub identities: Vec<PathBuf>,
    /// `identities` are OpenSSH's default key names, not configured ones: skip missing files.
    pub identities_are_defaults: bool,
    /// `IdentitiesOnly yes`: offer only `identities`, not other agent keys.
    pub identities_only: bool,
    /// known_hosts files to consult, user files first, then global ones.
    pub known_hosts_files: Vec<PathBuf>,
    /// Where `accept-new` records a new key: the first user known_hosts file (none when a key
    /// is pinned or `UserKnownHostsFile none`).
    pub learn_known_hosts_file: Option<PathBuf>,
    /// `HostKeyAlias` (lower-cased): the name to look up in known_hosts instead of `host`.
    pub host_key_alias: Option<String>,
    /// The key pinned by the machines file; when set, only it is accepted.
    pub pinned_host_key: Option<PinnedHostKey>,
    /// Host-key policy. [`StrictPolicy::No`] must be surfaced loudly; [`StrictPolicy::Ask`]
    /// must be treated as [`StrictPolicy::Yes`].
    pub strict: StrictPolicy,
    /// Hops to go through, in connection order (first hop first).
    pub proxy_jump: Vec<JumpHost>,
    /// `ConnectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// Keepalive.
    pub keepalive: Keepalive,
    /// The `compress` store parameter.
    pub compress: bool,
    /// Things skipped that the user may want to know about (unsupported `Match` blocks).
    pub warnings: Vec<String>,
}

impl ResolvedEndpoint {
    /// The name under which the host key is looked up: `HostKeyAlias` or `host`.
    pub fn host_key_name(&self) -> &str {
        self.host_key_alias.as_deref().unwrap_or(&self.host)
    }
}

/// Values given explicitly (on ssh's command line, in Nix's terms).
#[derive(Default)]
struct Explicit<'a> {
    user: Option<&'a str>,
    port: Option<u16>,
    identity: Option<&'a Path>,
    pin: Option<&'a PinnedHostKey>,
    compress: bool,
}

impl SshConfig {
    /// Resolves `spec` against this configuration (see the module docs for precedence).
    pub fn resolve(
        &self,
        spec: &BuilderSpec,
        env: &LocalEnv,
    ) -> Result<ResolvedEndpoint, ConfigError> {
        let explicit = Explicit {
            user: spec.user.as_deref(),
            port: spec.port,
            identity: spec.identity.as_deref(),
            pin: spec.host_key.as_ref(),
            compress: spec.compress,
        };
        let opts = self.host_options(&spec.host);
        let chain = match proxy_chain(&opts, &spec.host)? {
            Some(chain) => self.resolve_chain(&chain, env, 0)?,
            None => Vec::new(),
        };
        let jump_name = chain.last().map(|j| j.spec.host.as_str()).unwrap_or("");
        let mut ep = endpoint(&opts, &spec.host, &explicit, env, jump_name)?;
        for hop in &chain {
            for w in &hop.endpoint.warnings {
                if !ep.warnings.contains(w) {
                    ep.warnings.push(w.clone());
                }
            }
        }
        ep.proxy_jump = chain;
        Ok(ep)
    }

    /// Resolves a ProxyJump chain; `depth` counts first-hop recursions.
    fn resolve_chain(
        &self,
        chain: &[JumpSpec],
        env: &LocalEnv,
        depth: usize,
    ) -> Result<Vec<JumpHost>, ConfigError> {
        let mut out: Vec<JumpHost> = Vec::new();
        for (i, hop) in chain.iter().enumerate() {
            let opts = self.jump_host_options(&hop.host);
            let before = if i == 0 {
                proxy_chain(&opts, &hop.host)?
            } else {
                None
            };
            if let Some(before) = before {
                if depth + chain.len() + before.len() > MAX_JUMPS {
                    return Err(ConfigError::Resolve {
                        host: hop.host.clone(),
                        problem: format!(
                            "ProxyJump chain longer than {MAX_JUMPS} hops (does it loop?)"
                        ),
                    });
                }
                out.extend(self.resolve_chain(&before, env, depth + 1)?);
            }
            let explicit = Explicit {
                user: hop.user.as_deref(),
                port: hop.port,
                ..Explicit::default()
            };
            let jump_name = out.last().map(|j| j.spec.host.clone()).unwrap_or_default();
            let endpoint = endpoint(&opts, &hop.host, &explicit, env, &jump_name)?;
            out.push(JumpHost {
                spec: hop.clone(),
                endpoint,
            });
        }
        Ok(out)
    }
}

/// Resolves `spec` with the ssh_config at `ssh_config` (like `ssh -F`; it must exist), or
/// with `~/.ssh/config` and `/etc/ssh/ssh_config` when `None`, for the current local user.
pub fn resolve_endpoint(
    spec: &BuilderSpec,
    ssh_config: Option<&Path>,
) -> Result<ResolvedEndpoint, ConfigError> {
    let cmd = SshCommandLine {
        config_file: ssh_config.map(Path::to_path_buf),
        ..SshCommandLine::default()
    };
    resolve_endpoint_with(spec, &cmd)
}

/// Resolves `spec` as ssh would when given the options `cmd` (e.g.
/// `SshCommandLine::from_nix_sshopts(&std::env::var("NIX_SSHOPTS")...)`): the options first,
/// then their `-F` file or the default files. Explicit machines-file values still win.
pub fn resolve_endpoint_with(
    spec: &BuilderSpec,
    cmd: &SshCommandLine,
) -> Result<ResolvedEndpoint, ConfigError> {
    let env = LocalEnv::current()?;
    SshConfig::load(cmd, &env)?.resolve(spec, &env)
}

/// The ProxyJump chain ssh_config gives `host`, refusing ProxyCommand.
fn proxy_chain(opts: &HostOptions, host: &str) -> Result<Option<Vec<JumpSpec>>, ConfigError> {
    match &opts.proxy {
        None => Ok(None),
        Some(p) => match &p.value {
            ProxySetting::Direct => Ok(None),
            ProxySetting::Jump(chain) => Ok(Some(chain.clone())),
            ProxySetting::Command(cmd) => Err(ConfigError::Resolve {
                host: host.to_owned(),
                problem: format!(
                    "{}: ProxyCommand `{cmd}` is not supported by nixmux (use ProxyJump)",
                    p.location
                ),
            }),
        },
    }
}

/// One host's endpoint, without proxies.
fn endpoint(
    opts: &HostOptions,
    host_arg: &str,
    explicit: &Explicit<'_>,
    env: &LocalEnv,
    jump_host: &str,
) -> Result<ResolvedEndpoint, ConfigError> {
    let fail = |location: Option<&Location>, problem: String| ConfigError::Resolve {
        host: host_arg.to_owned(),
        problem: match location {
            Some(l) => format!("{l}: {problem}"),
            None => problem,
        },
    };
    // ssh.c: HostName knows only %h (the name as given) and %%.
    let host = match &opts.hostname {
        Some(h) => expand_tokens(&h.value, |c| (c == 'h').then(|| host_arg.to_owned()))
            .map_err(|e| fail(Some(&h.location), format!("HostName: {e}")))?,
        None => host_arg.to_owned(),
    };
    let host = if is_ip_address(&host) {
        host
    } else {
        host.to_ascii_lowercase()
    };
    let port = explicit
        .port
        .or(opts.port.as_ref().map(|p| p.value))
        .unwrap_or(22);
    let host_key_alias = opts
        .host_key_alias
        .as_ref()
        .map(|a| a.value.to_ascii_lowercase());
    // User from ssh_config may hold tokens (not %r, itself).
    let user = match (explicit.user, &opts.user) {
        (Some(u), _) => u.to_owned(),
        (None, Some(u)) => expand_all(
            &u.value,
            &Tokens::new(
                env,
                host_arg,
                &host,
                port,
                "",
                host_key_alias.as_deref(),
                jump_host,
            ),
            false,
        )
        .map_err(|e| fail(Some(&u.location), format!("User: {e}")))?,
        (None, None) => env.user.clone(),
    };
    let tokens = Tokens::new(
        env,
        host_arg,
        &host,
        port,
        &user,
        host_key_alias.as_deref(),
        jump_host,
    );

    let mut identities: Vec<PathBuf> = Vec::new();
    let mut push_identity = |p: PathBuf| {
        if !identities.contains(&p) {
            identities.push(p);
        }
    };
    if let Some(id) = explicit.identity {
        let s = id.to_string_lossy();
        push_identity(PathBuf::from(
            expand_all(&s, &tokens, true).map_err(|e| fail(None, format!("ssh-key `{s}`: {e}")))?,
        ));
    }
    for id in &opts.identity_files {
        if id.value.eq_ignore_ascii_case("none") {
            continue;
        }
        push_identity(PathBuf::from(
            expand_all(&id.value, &tokens, true)
                .map_err(|e| fail(Some(&id.location), format!("IdentityFile: {e}")))?,
        ));
    }
    let identities_are_defaults = explicit.identity.is_none() && opts.identity_files.is_empty();
    if identities_are_defaults {
        // readconf.c fill_default_options.
        for name in [
            "id_rsa",
            "id_ecdsa",
            "id_ecdsa_sk",
            "id_ed25519",
            "id_ed25519_sk",
        ] {
            identities.push(env.home.join(".ssh").join(name));
        }
    }

    let expand_files = |files: &Option<super::ssh_config::Located<Vec<String>>>,
                        defaults: &[&str],
                        what: &str|
     -> Result<Vec<PathBuf>, ConfigError> {
        match files {
            None => defaults
                .iter()
                .map(|d| expand_all(d, &tokens, true).map(PathBuf::from))
                .collect::<Result<_, _>>()
                .map_err(|e| fail(None, e)),
            Some(l) if l.value.len() == 1 && l.value[0].eq_ignore_ascii_case("none") => {
                Ok(Vec::new())
            }
            Some(l) => l
                .value
                .iter()
                .map(|f| expand_all(f, &tokens, true).map(PathBuf::from))
                .collect::<Result<_, _>>()
                .map_err(|e| fail(Some(&l.location), format!("{what}: {e}"))),
        }
    };
    let user_files = if explicit.pin.is_some() {
        Vec::new()
    } else {
        expand_files(
            &opts.user_known_hosts_files,
            &["~/.ssh/known_hosts", "~/.ssh/known_hosts2"],
            "UserKnownHostsFile",
        )?
    };
    let global_files = expand_files(
        &opts.global_known_hosts_files,
        &["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"],
        "GlobalKnownHostsFile",
    )?;
    let learn_known_hosts_file = user_files.first().cloned();
    let known_hosts_files = user_files.into_iter().chain(global_files).collect();

    let strict = if explicit.pin.is_some() {
        StrictPolicy::Yes
    } else {
        opts.strict_host_key_checking
            .as_ref()
            .map_or(StrictPolicy::Ask, |s| s.value)
    };

    Ok(ResolvedEndpoint {
        host_alias: host_arg.to_owned(),
        host,
        port,
        user,
        identities,
        identities_are_defaults,
        identities_only: opts.identities_only.unwrap_or(false),
        known_hosts_files,
        learn_known_hosts_file,
        host_key_alias,
        pinned_host_key: explicit.pin.cloned(),
        strict,
        proxy_jump: Vec::new(),
        connect_timeout: opts.connect_timeout,
        keepalive: Keepalive {
            interval: opts.server_alive_interval.filter(|d| !d.is_zero()),
            count_max: opts
                .server_alive_count_max
                .unwrap_or(DEFAULT_ALIVE_COUNT_MAX),
        },
        compress: explicit.compress || opts.compression.unwrap_or(false),
        warnings: opts.warnings.clone(),
    })
}

fn is_ip_address(s: &str) -> bool {
    let addr = s.split_once('%').map_or(s, |(a, _)| a);
    addr.parse::<std::net::IpAddr>().is_ok()
}

/// The values of ssh's `%` tokens (ssh.c `DEFAULT_CLIENT_PERCENT_EXPAND_ARGS`).
struct Tokens {
    home: String,
    host: String,
    uid: String,
    key_alias: String,
    local_host: String,
    host_arg: String,
    port: String,
    user: String,
    local_user: String,
    jump_host: String,
}

impl Tokens {
    fn new(
        env: &LocalEnv,
        host_arg: &str,
        host: &str,
        port: u16,
        user: &str,
        alias: Option<&str>,
        jump_host: &str,
    ) -> Tokens {
        Tokens {
            home: env.home.to_string_lossy().into_owned(),
            host: host.to_owned(),
            uid: env.uid.to_string(),
            key_alias: alias.unwrap_or(host_arg).to_owned(),
            local_host: env.hostname.clone(),
            host_arg: host_arg.to_owned(),
            port: port.to_string(),
            user: user.to_owned(),
            local_user: env.user.clone(),
            jump_host: jump_host.to_owned(),
        }
    }

    fn get(&self, c: char) -> Option<String> {
        Some(match c {
            'd' => self.home.clone(),
            'h' => self.host.clone(),
            'i' => self.uid.clone(),
            'j' => self.jump_host.clone(),
            'k' => self.key_alias.clone(),
            'L' => self
                .local_host
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
            'l' => self.local_host.clone(),
            'n' => self.host_arg.clone(),
            'p' => self.port.clone(),
            'r' if !self.user.is_empty() => self.user.clone(),
            'u' => self.local_user.clone(),
            _ => return None,
        })
    }
}

/// `~` (when `tilde`), then `%` tokens and `${VAR}`, in ssh's order (`tilde_expand_filename`,
/// then `percent_dollar_expand`).
fn expand_all(s: &str, tokens: &Tokens, tilde: bool) -> Result<String, String> {
    let s = if tilde {
        match s.strip_prefix('~') {
            Some("") => tokens.home.clone(),
            Some(rest) if rest.starts_with('/') => format!("{}{rest}", tokens.home),
            Some(_) => return Err(format!("`{s}`: ~user is not supported")),
            None => s.to_owned(),
        }
    } else {
        s.to_owned()
    };
    let s = expand_tokens(&s, |c| tokens.get(c))?;
    expand_env(&s)
}

/// Expands `%x` with `lookup` and `%%` to `%`; an unknown token is an error, as in ssh.
fn expand_tokens(s: &str, lookup: impl Fn(char) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(t) => match lookup(t) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("`{s}`: unknown or unsupported token %{t}")),
            },
            None => return Err(format!("`{s}`: `%` at the end")),
        }
    }
    Ok(out)
}

/// Expands `${VAR}`; an unset variable is an error, as in ssh.
fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{s}`: unterminated ${{"))?;
        let name = &after[..end];
        let value = std::env::var(name)
            .map_err(|_| format!("`{s}`: environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
