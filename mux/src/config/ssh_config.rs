//! OpenSSH client configuration (ssh_config(5)), the keywords that decide where and how we
//! connect.
//!
//! Semantics follow OpenSSH's readconf.c and ssh.c (openssh-portable):
//!
//! * **Files.** With no `-F`, `~/.ssh/config` then `/etc/ssh/ssh_config`, both optional
//!   ([`SshConfig::load_default`]). With `-F file`, only that file, which must exist
//!   ([`SshConfig::load_file`]).
//! * **Lines.** `Keyword args` or `Keyword=args` (one `=`, whitespace around it allowed);
//!   keywords are case-insensitive. Arguments are split like OpenSSH's `argv_split`: spaces
//!   and tabs separate, `"..."` and `'...'` quote, `\` escapes a quote, a backslash or (outside
//!   quotes) a space, and an unquoted `#` at the start of a word starts a comment. A known
//!   keyword with a bad value is an error (OpenSSH refuses to run); unknown keywords are
//!   ignored (we implement a subset; OpenSSH's other keywords do not change where we connect).
//! * **First obtained value wins.** For each option the first value found in an applicable
//!   block, in file order (user file before system file), is used. `IdentityFile` accumulates
//!   instead. `UserKnownHostsFile` and `GlobalKnownHostsFile` take the whole list of the first
//!   line that sets them.
//! * **`Host` patterns** are matched against the host name as given (the URL's host, before
//!   `HostName`), case-sensitively: `*` matches any string, `?` one character; several
//!   patterns on one line match if any does, but a matching `!pattern` excludes the block no
//!   matter what else matches. Lines before the first `Host` apply to every host.
//! * **`Match`** is not evaluated, except `Match all`: any other `Match` block is skipped (as if
//!   it did not match) and reported in [`HostOptions::warnings`].
//! * **`Include`** takes one or more paths; a relative path is taken relative to `~/.ssh` in a
//!   user file and to `/etc/ssh` in the system file; `~` is expanded (user files only);
//!   `*`, `?` and `[...]` glob, with matches sorted; paths that match nothing are skipped. An
//!   included file starts in the including block's state, `Host` lines inside it can switch
//!   blocks, and after it the including block's state is restored; an `Include` inside a block
//!   that does not apply contributes nothing. Nesting deeper than 16 is an error. `%` tokens
//!   and `${VAR}` in Include paths are not expanded.
//! * **`ProxyJump`** takes a comma-separated list of `[user@]host[:port]` or
//!   `ssh://[user@]host[:port]` (IPv6 in brackets), or `none`. It and `ProxyCommand` share one
//!   slot: whichever comes first wins.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::command_line::SshCommandLine;
use super::error::{ConfigError, Location, Origin};
use super::local_env::LocalEnv;

/// How deep `Include` may nest (OpenSSH's `READCONF_MAX_DEPTH`).
const MAX_INCLUDE_DEPTH: usize = 16;

/// OpenSSH's `StrictHostKeyChecking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrictPolicy {
    /// `yes`: unknown and changed keys are refused.
    Yes,
    /// `accept-new`: an unknown host's key is added to the first user known_hosts file; a
    /// changed key is refused.
    AcceptNew,
    /// `ask` (OpenSSH's default): ssh would prompt for unknown keys. nixmux never prompts, so
    /// this must be treated as [`StrictPolicy::Yes`] (which is what ssh does in BatchMode).
    Ask,
    /// `no` / `off`: any key is accepted. Insecure; callers must warn loudly.
    No,
}

impl StrictPolicy {
    /// Whether an unknown or changed key would be accepted without any check.
    pub fn is_insecure(self) -> bool {
        self == StrictPolicy::No
    }

    fn parse(s: &str) -> Option<StrictPolicy> {
        // readconf.c `multistate_strict_hostkey` (values are case-insensitive).
        Some(match s.to_ascii_lowercase().as_str() {
            "yes" | "true" => StrictPolicy::Yes,
            "accept-new" => StrictPolicy::AcceptNew,
            "ask" => StrictPolicy::Ask,
            "no" | "off" | "false" => StrictPolicy::No,
            _ => return None,
        })
    }
}

/// One hop of a ProxyJump chain as written: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JumpSpec {
    /// User, if given.
    pub user: Option<String>,
    /// Host (an alias that ssh_config may map, or a real name); IPv6 without brackets.
    pub host: String,
    /// Port, if given.
    pub port: Option<u16>,
}

impl JumpSpec {
    /// Parses one element of a ProxyJump list (OpenSSH `parse_ssh_uri` /
    /// `parse_user_host_port`).
    pub fn parse(s: &str) -> Result<JumpSpec, String> {
        let s = s.trim();
        let rest = s.strip_prefix("ssh://").unwrap_or(s);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some(("", _)) => return Err(format!("empty user name in `{s}`")),
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("unclosed `[` in `{s}`"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("bad port in `{s}`"))?,
                    ),
                ),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("empty host name in `{s}`"));
        }
        let port = match port {
            None | Some("") => None,
            Some(p) => Some(parse_port(p).ok_or_else(|| format!("bad port `{p}` in `{s}`"))?),
        };
        Ok(JumpSpec {
            user,
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for JumpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A value and the line that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was set.
    pub location: Location,
}

/// How ssh_config says to reach a host (the ProxyJump / ProxyCommand slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    /// `ProxyJump none` or `ProxyCommand none`: connect directly.
    Direct,
    /// `ProxyJump a,b,c`: through a, then b, then c.
    Jump(Vec<JumpSpec>),
    /// `ProxyCommand ...` (not supported by nixmux).
    Command(String),
}

/// The options ssh_config gives one host, unexpanded (`~` and `%` tokens are expanded when
/// resolving, once user and port are known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOptions {
    /// `HostName`.
    pub hostname: Option<Located<String>>,
    /// `User`.
    pub user: Option<Located<String>>,
    /// `Port`.
    pub port: Option<Located<u16>>,
    /// Every applicable `IdentityFile`, in order.
    pub identity_files: Vec<Located<String>>,
    /// `IdentitiesOnly`.
    pub identities_only: Option<bool>,
    /// `UserKnownHostsFile` (the whole list of the first line).
    pub user_known_hosts_files: Option<Located<Vec<String>>>,
    /// `GlobalKnownHostsFile`.
    pub global_known_hosts_files: Option<Located<Vec<String>>>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<Located<StrictPolicy>>,
    /// `ProxyJump` / `ProxyCommand`, whichever came first.
    pub proxy: Option<Located<ProxySetting>>,
    /// `ConnectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `ServerAliveInterval` (zero: off).
    pub server_alive_interval: Option<Duration>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<u32>,
    /// `HostKeyAlias`.
    pub host_key_alias: Option<Located<String>>,
    /// `Compression` (ssh `-C`).
    pub compression: Option<bool>,
    /// Things we skipped that may matter (`Match` blocks).
    pub warnings: Vec<String>,
}

/// A parsed setting line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Setting {
    HostName(String),
    User(String),
    Port(u16),
    IdentityFile(String),
    IdentitiesOnly(bool),
    UserKnownHostsFile(Vec<String>),
    GlobalKnownHostsFile(Vec<String>),
    StrictHostKeyChecking(StrictPolicy),
    ProxyJump(Option<Vec<JumpSpec>>),
    ProxyCommand(String),
    /// `None`: the value `none`, which sets nothing (OpenSSH stores -1, i.e. "unset").
    ConnectTimeout(Option<Duration>),
    ServerAliveInterval(Option<Duration>),
    ServerAliveCountMax(u32),
    HostKeyAlias(String),
    Compression(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Match(String),
    Negated(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Host(Vec<HostPattern>),
    /// `Match all` is `true`; anything else is unsupported and never matches.
    Match {
        all: bool,
        text: String,
    },
    Include(Vec<ConfigFile>),
    Set(Setting),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ConfigFile {
    path: PathBuf,
    items: Vec<(Location, Item)>,
    /// Command-line options (they do not reach the ssh that ProxyJump runs for a hop).
    command_line: bool,
}

/// Whether a file is a user or the system configuration (it decides how `Include` resolves
/// relative paths and whether `~` is allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// `~/.ssh/config` or a `-F` file: relative includes are under `~/.ssh`.
    User,
    /// `/etc/ssh/ssh_config`: relative includes are under `/etc/ssh`.
    System,
}

/// Parsed ssh_config files, ready to answer "which options apply to this host".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshConfig {
    files: Vec<ConfigFile>,
}

impl SshConfig {
    /// No configuration at all (`ssh -F none`).
    pub fn empty() -> SshConfig {
        SshConfig::default()
    }

    /// `~/.ssh/config` then `/etc/ssh/ssh_config`, each skipped when it does not exist.
    pub fn load_default(env: &LocalEnv) -> Result<SshConfig, ConfigError> {
        let mut config = SshConfig::default();
        config.add_file(&env.home.join(".ssh/config"), ConfigKind::User, env, true)?;
        config.add_file(
            Path::new("/etc/ssh/ssh_config"),
            ConfigKind::System,
            env,
            true,
        )?;
        Ok(config)
    }

    /// Only `path`, which must exist (`ssh -F path`).
    pub fn load_file(path: &Path, env: &LocalEnv) -> Result<SshConfig, ConfigError> {
        let mut config = SshConfig::default();
        config.add_file(path, ConfigKind::User, env, false)?;
        Ok(config)
    }

    /// What ssh reads when run with the command-line options `cmd` (e.g. from `NIX_SSHOPTS`):
    /// the options themselves first (they win), then the `-F` file if given (which must exist),
    /// else the default files.
    pub fn load(cmd: &SshCommandLine, env: &LocalEnv) -> Result<SshConfig, ConfigError> {
        let mut config = SshConfig::default();
        let origin = Arc::new(Origin::Text("ssh command-line options".to_owned()));
        let mut items = Vec::new();
        for (i, line) in cmd.options.iter().enumerate() {
            let location = Location {
                origin: origin.clone(),
                line: i + 1,
            };
            if let Some(item) = parse_line(
                line,
                &location,
                ConfigKind::User,
                env,
                &mut Vec::new(),
                true,
            )? {
                items.push((location, item));
            }
        }
        config.files.push(ConfigFile {
            path: PathBuf::new(),
            items,
            command_line: true,
        });
        let rest = match &cmd.config_file {
            Some(p) if p.as_os_str() == "none" => SshConfig::empty(),
            Some(p) => SshConfig::load_file(p, env)?,
            None => SshConfig::load_default(env)?,
        };
        config.files.extend(rest.files);
        Ok(config)
    }

    /// Parses `text` as the content of the file `path` (which is only used for messages and
    /// nothing is read from it; `Include`s are read).
    pub fn parse_str(
        text: &str,
        path: &Path,
        kind: ConfigKind,
        env: &LocalEnv,
    ) -> Result<SshConfig, ConfigError> {
        let file = parse_file(text, path, kind, env, &mut vec![path.to_owned()])?;
        Ok(SshConfig { files: vec![file] })
    }

    /// Appends a file, read after (so with lower priority than) those already added.
    pub fn add_file(
        &mut self,
        path: &Path,
        kind: ConfigKind,
        env: &LocalEnv,
        skip_missing: bool,
    ) -> Result<(), ConfigError> {
        let text = match fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if skip_missing && e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(ConfigError::Read {
                    location: None,
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let file = parse_file(&text, path, kind, env, &mut vec![canonical])?;
        self.files.push(file);
        Ok(())
    }

    /// The options that apply to `host` (the name as given, before `HostName`).
    pub fn host_options(&self, host: &str) -> HostOptions {
        self.options_for(host, true)
    }

    /// The options that apply to a ProxyJump hop: ssh runs `ssh [-l user] [-p port] [-J
    /// earlier,hops] [-F file] -W ... hop` (ssh.c), so the files apply but not the other
    /// command-line options of the outer ssh.
    pub(crate) fn jump_host_options(&self, host: &str) -> HostOptions {
        self.options_for(host, false)
    }

    fn options_for(&self, host: &str, with_command_line: bool) -> HostOptions {
        let mut opts = HostOptions::default();
        // jump_host / proxy_command are separate slots in OpenSSH; see `apply`.
        let mut slots = ProxySlots::default();
        for file in self
            .files
            .iter()
            .filter(|f| with_command_line || !f.command_line)
        {
            let mut active = true;
            walk(file, host, &mut active, false, &mut opts, &mut slots);
        }
        opts.proxy = slots.finish();
        opts
    }
}

/// OpenSSH keeps `jump_host` and `proxy_command` apart: `ProxyJump none` sets only the
/// former (so a later `ProxyCommand` still applies), a real `ProxyJump` sets both (the command
/// to "none"), `ProxyCommand` sets only the latter (so a later `ProxyJump` is ignored).
#[derive(Default)]
struct ProxySlots {
    jump: Option<Located<Option<Vec<JumpSpec>>>>,
    command: Option<Located<String>>,
}

impl ProxySlots {
    fn finish(self) -> Option<Located<ProxySetting>> {
        match (self.jump, self.command) {
            (
                Some(Located {
                    value: Some(chain),
                    location,
                }),
                _,
            ) => Some(Located {
                value: ProxySetting::Jump(chain),
                location,
            }),
            (_, Some(Located { value, location })) if !value.eq_ignore_ascii_case("none") => {
                Some(Located {
                    value: ProxySetting::Command(value),
                    location,
                })
            }
            (Some(Located { location, .. }), _) | (None, Some(Located { location, .. })) => {
                Some(Located {
                    value: ProxySetting::Direct,
                    location,
                })
            }
            (None, None) => None,
        }
    }
}

fn walk(
    file: &ConfigFile,
    host: &str,
    active: &mut bool,
    never_match: bool,
    opts: &mut HostOptions,
    slots: &mut ProxySlots,
) {
    for (location, item) in &file.items {
        match item {
            Item::Host(patterns) => {
                *active = !never_match && host_matches(host, patterns);
            }
            Item::Match { all, text } => {
                *active = !never_match && *all;
                if !never_match && !*all {
                    opts.warnings.push(format!(
                        "{location}: `Match {text}` is not supported by nixmux; its block was \
                         skipped"
                    ));
                }
            }
            Item::Include(files) => {
                let outer = *active;
                for f in files {
                    walk(f, host, active, never_match || !outer, opts, slots);
                    *active = outer;
                }
            }
            Item::Set(setting) => {
                if *active {
                    apply(setting, location, opts, slots);
                }
            }
        }
    }
}

fn apply(setting: &Setting, location: &Location, o: &mut HostOptions, slots: &mut ProxySlots) {
    fn first<T: Clone>(slot: &mut Option<Located<T>>, value: &T, location: &Location) {
        if slot.is_none() {
            *slot = Some(Located {
                value: value.clone(),
                location: location.clone(),
            });
        }
    }
    match setting {
        Setting::HostName(v) => first(&mut o.hostname, v, location),
        Setting::User(v) => first(&mut o.user, v, location),
        Setting::Port(v) => first(&mut o.port, v, location),
        Setting::IdentityFile(v) => o.identity_files.push(Located {
            value: v.clone(),
            location: location.clone(),
        }),
        Setting::IdentitiesOnly(v) => {
            o.identities_only.get_or_insert(*v);
        }
        Setting::UserKnownHostsFile(v) => first(&mut o.user_known_hosts_files, v, location),
        Setting::GlobalKnownHostsFile(v) => first(&mut o.global_known_hosts_files, v, location),
        Setting::StrictHostKeyChecking(v) => first(&mut o.strict_host_key_checking, v, location),
        Setting::ProxyJump(v) => {
            // readconf.c parse_jump: `active &= proxy_command == NULL && jump_host == NULL`.
            if slots.jump.is_none() && slots.command.is_none() {
                slots.jump = Some(Located {
                    value: v.clone(),
                    location: location.clone(),
                });
                if v.is_some() {
                    slots.command = Some(Located {
                        value: "none".to_owned(),
                        location: location.clone(),
                    });
                }
            }
        }
        Setting::ProxyCommand(v) => first(&mut slots.command, v, location),
        Setting::ConnectTimeout(Some(v)) => {
            o.connect_timeout.get_or_insert(*v);
        }
        Setting::ServerAliveInterval(Some(v)) => {
            o.server_alive_interval.get_or_insert(*v);
        }
        Setting::ConnectTimeout(None) | Setting::ServerAliveInterval(None) => {}
        Setting::ServerAliveCountMax(v) => {
            o.server_alive_count_max.get_or_insert(*v);
        }
        Setting::HostKeyAlias(v) => first(&mut o.host_key_alias, v, location),
        Setting::Compression(v) => {
            o.compression.get_or_insert(*v);
        }
    }
}

/// `Host` line semantics (readconf.c `oHost`): a matching negated pattern wins.
fn host_matches(host: &str, patterns: &[HostPattern]) -> bool {
    let mut matched = false;
    for p in patterns {
        match p {
            HostPattern::Negated(p) if match_pattern(host, p) => return false,
            HostPattern::Match(p) if match_pattern(host, p) => matched = true,
            _ => {}
        }
    }
    matched
}

/// OpenSSH's `match_pattern`: `*` any string, `?` any one character, everything else literal.
pub fn match_pattern(s: &str, pattern: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            si += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Parses one file (and reads its includes).
fn parse_file(
    text: &str,
    path: &Path,
    kind: ConfigKind,
    env: &LocalEnv,
    stack: &mut Vec<PathBuf>,
) -> Result<ConfigFile, ConfigError> {
    let mut items = Vec::new();
    let origin = Arc::new(Origin::File(path.to_owned()));
    for (i, line) in text.split('\n').enumerate() {
        let location = Location {
            origin: origin.clone(),
            line: i + 1,
        };
        if let Some(item) = parse_line(line, &location, kind, env, stack, false)? {
            items.push((location, item));
        }
    }
    Ok(ConfigFile {
        path: path.to_owned(),
        items,
        command_line: false,
    })
}

fn parse_line(
    line: &str,
    location: &Location,
    kind: ConfigKind,
    env: &LocalEnv,
    stack: &mut Vec<PathBuf>,
    cmdline: bool,
) -> Result<Option<Item>, ConfigError> {
    let err = |problem: String| ConfigError::SshConfig {
        location: location.clone(),
        problem,
    };
    let line = line
        .trim_end_matches([' ', '\t', '\r', '\n', '\x0c'])
        .trim_start_matches([' ', '\t', '\r']);
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    // misc.c strdelim: the keyword ends at whitespace or one `=`.
    let end = line.find([' ', '\t', '=']).unwrap_or(line.len());
    let keyword = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start_matches([' ', '\t']);
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start_matches([' ', '\t']);
    }
    if rest.is_empty() {
        return Err(err(format!("no argument after keyword \"{keyword}\"")));
    }
    let args = argv_split(rest).ok_or_else(|| err("invalid quotes".to_owned()))?;
    if cmdline && matches!(keyword.as_str(), "host" | "match" | "include") {
        return Err(err(format!(
            "{keyword} directive not supported as a command-line option"
        )));
    }
    let one = |what: &str| -> Result<String, ConfigError> {
        match args.as_slice() {
            [a] if !a.is_empty() => Ok(a.clone()),
            [] | [_] => Err(err(format!("{what}: missing argument"))),
            _ => Err(err(format!("{what}: extra arguments at end of line"))),
        }
    };
    let list = |what: &str| -> Result<Vec<String>, ConfigError> {
        if args.iter().any(String::is_empty) {
            return Err(err(format!("{what}: empty argument")));
        }
        if args.len() > 1 && args.iter().any(|a| a.eq_ignore_ascii_case("none")) {
            return Err(err(format!("{what}: \"none\" argument must appear alone")));
        }
        Ok(args.clone())
    };
    let setting =
        match keyword.as_str() {
            "host" => {
                let mut patterns = Vec::new();
                for a in &args {
                    if a.is_empty() {
                        return Err(err("Host: empty argument".to_owned()));
                    }
                    patterns.push(match a.strip_prefix('!') {
                        Some(p) => HostPattern::Negated(p.to_owned()),
                        None => HostPattern::Match(a.clone()),
                    });
                }
                return Ok(Some(Item::Host(patterns)));
            }
            "match" => {
                let all = args.len() == 1 && args[0].eq_ignore_ascii_case("all");
                return Ok(Some(Item::Match {
                    all,
                    text: args.join(" "),
                }));
            }
            "include" => {
                let mut files = Vec::new();
                for a in &args {
                    for path in include_paths(a, kind, env).map_err(err)? {
                        files.push(include_file(&path, location, kind, env, stack)?);
                    }
                }
                return Ok(Some(Item::Include(files)));
            }
            "hostname" => Setting::HostName(one("HostName")?),
            "user" => Setting::User(one("User")?),
            "port" => {
                let v = one("Port")?;
                Setting::Port(parse_port(&v).ok_or_else(|| err(format!("Bad port '{v}'")))?)
            }
            "identityfile" => Setting::IdentityFile(one("IdentityFile")?),
            "identitiesonly" => {
                let v = one("IdentitiesOnly")?;
                Setting::IdentitiesOnly(match v.to_ascii_lowercase().as_str() {
                    "yes" | "true" => true,
                    "no" | "false" => false,
                    _ => return Err(err(format!("IdentitiesOnly: unsupported value \"{v}\""))),
                })
            }
            "userknownhostsfile" => Setting::UserKnownHostsFile(list("UserKnownHostsFile")?),
            "globalknownhostsfile" => Setting::GlobalKnownHostsFile(list("GlobalKnownHostsFile")?),
            "stricthostkeychecking" => {
                let v = one("StrictHostKeyChecking")?;
                Setting::StrictHostKeyChecking(StrictPolicy::parse(&v).ok_or_else(|| {
                    err(format!("StrictHostKeyChecking: unsupported value \"{v}\""))
                })?)
            }
            "proxyjump" => {
                // readconf.c: the raw rest of the line, cut at `#`.
                let raw = rest.split('#').next().unwrap_or_default().trim();
                if raw.eq_ignore_ascii_case("none") {
                    Setting::ProxyJump(None)
                } else {
                    let chain = raw
                        .split(',')
                        .map(JumpSpec::parse)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| err(format!("Invalid ProxyJump \"{raw}\": {e}")))?;
                    Setting::ProxyJump(Some(chain))
                }
            }
            "proxycommand" => Setting::ProxyCommand(rest.to_owned()),
            "connecttimeout" => Setting::ConnectTimeout(
                time_arg("ConnectTimeout", &one("ConnectTimeout")?).map_err(err)?,
            ),
            "serveraliveinterval" => Setting::ServerAliveInterval(
                time_arg("ServerAliveInterval", &one("ServerAliveInterval")?).map_err(err)?,
            ),
            "serveralivecountmax" => {
                let v = one("ServerAliveCountMax")?;
                Setting::ServerAliveCountMax(
                    v.parse::<u32>()
                        .ok()
                        .filter(|n| i32::try_from(*n).is_ok())
                        .ok_or_else(|| {
                            err(format!(
                                "ServerAliveCountMax: integer value \"{v}\" is invalid"
                            ))
                        })?,
                )
            }
            "hostkeyalias" => Setting::HostKeyAlias(one("HostKeyAlias")?),
            "compression" => {
                let v = one("Compression")?;
                Setting::Compression(match v.to_ascii_lowercase().as_str() {
                    "yes" | "true" | "delayed" => true,
                    "no" | "false" => false,
                    _ => return Err(err(format!("Compression: unsupported value \"{v}\""))),
                })
            }
            _ => return Ok(None),
        };
    Ok(Some(Item::Set(setting)))
}

/// `none` → `None`; else OpenSSH's `convtime`.
fn time_arg(what: &str, v: &str) -> Result<Option<Duration>, String> {
    if v == "none" {
        return Ok(None);
    }
    convtime(v)
        .map(Some)
        .ok_or_else(|| format!("{what}: invalid time value \"{v}\""))
}

/// OpenSSH's `convtime`: `90`, `90s`, `1m30s`, `1h`, `2d`, `1w` (units case-insensitive; a
/// number without unit is seconds).
pub fn convtime(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            num = Some(
                num.unwrap_or(0)
                    .checked_mul(10)?
                    .checked_add(u64::from(d))?,
            );
            continue;
        }
        let mult = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(num.take()?.checked_mul(mult)?)?;
    }
    if let Some(n) = num {
        total = total.checked_add(n)?;
    }
    (total <= i32::MAX as u64).then(|| Duration::from_secs(total))
}

/// OpenSSH's `a2port` for numbers: 1..=65535.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// OpenSSH's `argv_split(s, terminate_on_comment = 1)`; `None` on an unterminated quote.
fn argv_split(s: &str) -> Option<Vec<String>> {
    let chars: Vec<char> = s.chars().collect();
    let mut args = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ' ' || chars[i] == '\t' {
            i += 1;
            continue;
        }
        if chars[i] == '#' {
            break;
        }
        let mut arg = String::new();
        let mut quote: Option<char> = None;
        while i < chars.len() {
            let c = chars[i];
            if c == '\\' {
                match chars.get(i + 1) {
                    Some(&n @ ('\'' | '"' | '\\')) => {
                        arg.push(n);
                        i += 1;
                    }
                    Some(' ') if quote.is_none() => {
                        arg.push(' ');
                        i += 1;
                    }
                    _ => arg.push('\\'),
                }
            } else if quote.is_none() && (c == ' ' || c == '\t') {
                break;
            } else if quote.is_none() && (c == '"' || c == '\'') {
                quote = Some(c);
            } else if quote == Some(c) {
                quote = None;
            } else {
                arg.push(c);
            }
            i += 1;
        }
        if quote.is_some() {
            return None;
        }
        args.push(arg);
    }
    Some(args)
}

/// Expands one `Include` argument into the existing files it names, sorted.
fn include_paths(arg: &str, kind: ConfigKind, env: &LocalEnv) -> Result<Vec<PathBuf>, String> {
    let full = if let Some(rest) = arg.strip_prefix('~') {
        if kind == ConfigKind::System {
            return Err(format!("bad include path {arg} (no ~ in the system file)"));
        }
        match rest.strip_prefix('/') {
            Some(r) => env.home.join(r),
            None if rest.is_empty() => env.home.clone(),
            None => return Err(format!("bad include path {arg} (~user is not supported)")),
        }
    } else if arg.starts_with('/') {
        PathBuf::from(arg)
    } else {
        match kind {
            ConfigKind::User => env.home.join(".ssh").join(arg),
            ConfigKind::System => Path::new("/etc/ssh").join(arg),
        }
    };
    Ok(glob(&full))
}

fn include_file(
    path: &Path,
    location: &Location,
    kind: ConfigKind,
    env: &LocalEnv,
    stack: &mut Vec<PathBuf>,
) -> Result<ConfigFile, ConfigError> {
    if stack.len() > MAX_INCLUDE_DEPTH {
        return Err(ConfigError::IncludeDepth {
            location: location.clone(),
            max: MAX_INCLUDE_DEPTH,
        });
    }
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(ConfigFile {
                path: path.to_owned(),
                items: Vec::new(),
                command_line: false,
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                location: Some(location.clone()),
                path: path.to_owned(),
                source,
            });
        }
    };
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if stack.contains(&canonical) {
        return Err(ConfigError::IncludeLoop {
            location: location.clone(),
            path: path.to_owned(),
        });
    }
    stack.push(canonical);
    let file = parse_file(&text, path, kind, env, stack);
    stack.pop();
    file
}

/// A small glob(3): `*`, `?` and `[...]` within path components; matches sorted; hidden
/// entries only match a pattern starting with `.`; a path without wildcards is returned if it
/// exists.
fn glob(path: &Path) -> Vec<PathBuf> {
    let mut current = vec![PathBuf::from(if path.is_absolute() { "/" } else { "" })];
    for comp in path.components() {
        let comp = comp.as_os_str().to_string_lossy();
        if comp == "/" {
            continue;
        }
        let mut next = Vec::new();
        if comp.contains(['*', '?', '[']) {
            for dir in &current {
                let Ok(rd) = fs::read_dir(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                }) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        (!n.starts_with('.') || comp.starts_with('.')) && glob_match(&comp, n)
                    })
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            }
        } else {
            next = current.iter().map(|d| d.join(comp.as_ref())).collect();
        }
        current = next;
    }
    current.retain(|p| p.exists());
    current
}

/// fnmatch(3) without flags, for one path component.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn rec(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| rec(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && rec(&p[1..], &n[1..]),
            Some('[') => {
                let Some(c) = n.first() else { return false };
                let Some(close) = p.iter().skip(2).position(|x| *x == ']').map(|i| i + 2) else {
                    return *c == '[' && rec(&p[1..], &n[1..]);
                };
                let mut set = &p[1..close];
                let negate = matches!(set.first(), Some('!' | '^'));
                if negate {
                    set = &set[1..];
                }
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= *c && *c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == *c;
                        i += 1;
                    }
                }
                hit != negate && rec(&p[close + 1..], &n[1..])
            }
            Some(x) => n.first() == Some(x) && rec(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    rec(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(match_pattern("builder1", "builder*"));
        assert!(match_pattern("builder1", "*1"));
        assert!(match_pattern("builder1", "b?ilder?"));
        assert!(match_pattern("a", "*"));
        assert!(match_pattern("", "*"));
        assert!(!match_pattern("builder1", "builder"));
        assert!(!match_pattern("Builder1", "builder*"));
        assert!(match_pattern("abcabc", "*abc"));
        assert!(match_pattern("aXbXc", "a*b*c"));
    }

    #[test]
    fn argv() {
        assert_eq!(
            argv_split(r#"a "b c" 'd e' f\ g # comment"#),
            Some(vec!["a".into(), "b c".into(), "d e".into(), "f g".into()])
        );
        assert_eq!(argv_split(r#""unterminated"#), None);
        assert_eq!(argv_split(r#"a#b"#), Some(vec!["a#b".into()]));
    }

    #[test]
    fn times() {
        assert_eq!(convtime("10"), Some(Duration::from_secs(10)));
        assert_eq!(convtime("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(convtime("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(convtime("s"), None);
        assert_eq!(convtime("5x"), None);
        assert_eq!(convtime(""), None);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.conf", "a.conf"));
        assert!(!glob_match("*.conf", "a.conf.bak"));
        assert!(glob_match("[ab]?", "bx"));
        assert!(!glob_match("[!ab]?", "bx"));
        assert!(glob_match("[a-c]", "b"));
    }
}
