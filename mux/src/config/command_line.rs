//! ssh command-line options, as found in `NIX_SSHOPTS`.
//!
//! Nix runs `ssh <user@>host -x -a $NIX_SSHOPTS -i <ssh-key> ... -p<port> -- <command>`
//! (src/libstore/ssh.cc). Users put `-F file`, `-o Key=Value`, `-i key`, `-p`, `-l`, `-J` or
//! `-C` in `NIX_SSHOPTS` to steer ssh (the rig does `NIX_SSHOPTS="-F <rig>/ssh_config"`).
//! [`SshCommandLine`] reads those so nixmux sees the same configuration. For ssh, options
//! given on the command line come before every configuration file, with the same
//! first-obtained-value-wins rule (ssh.c: `-l` and `-p` only set an unset value, `-o` goes
//! through the config parser, `-i` adds an identity); [`super::SshConfig::load`] applies them
//! that way.
//!
//! One deliberate difference: in Nix's argument order `NIX_SSHOPTS` comes *before* the port
//! (`-p`, Nix >= 2.2x) and the pinned-key file (`-oUserKnownHostsFile=`) that Nix adds itself,
//! so `NIX_SSHOPTS="-p 22"` would override the URL's port and `-oUserKnownHostsFile=...` would
//! silently disable the pin. We keep explicit machines-file / URL values on top, as for
//! ssh_config. The user from `user@host` precedes `NIX_SSHOPTS` in Nix too.
//!
//! Nix 2.8 splits `NIX_SSHOPTS` at whitespace without any quoting (`tokenizeString`); newer
//! Nix splits it like a shell (`shellSplitString`). [`SshCommandLine::from_nix_sshopts`] does
//! the latter, which agrees with the former on every value without quotes or backslashes.

use std::path::PathBuf;

use super::error::ConfigError;

/// ssh flags that take an argument (ssh.c's getopt string).
const WITH_ARGUMENT: &str = "BbcDEeFIiJLlmOoPpQRSWw";

/// Options from an ssh command line, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshCommandLine {
    /// `-F file` (the last one, as in ssh); `none` means no file at all.
    pub config_file: Option<PathBuf>,
    /// The options as ssh_config lines, in command-line order: `-o X` gives `X`, `-l u` gives
    /// `User "u"`, `-p n` gives `Port "n"`, `-i f` gives `IdentityFile "f"`, `-J j` gives
    /// `ProxyJump j`, `-C` gives `Compression yes`.
    pub options: Vec<String>,
    /// Flags that do not change how we connect (`-v`, `-x`, `-4`, `-T`, ...), and flags we do
    /// not support (`-L`, `-R`, `-D`, `-W`, `-S`, ...) with their arguments.
    pub ignored: Vec<String>,
}

impl SshCommandLine {
    /// Parses `NIX_SSHOPTS` (shell-like word splitting; see the module docs).
    pub fn from_nix_sshopts(value: &str) -> Result<SshCommandLine, ConfigError> {
        let words = shell_split(value).ok_or_else(|| ConfigError::SshOptions {
            args: value.to_owned(),
            problem: "unterminated quote".to_owned(),
        })?;
        SshCommandLine::parse_args(&words)
    }

    /// Parses ssh arguments (without the program name, host or command) like ssh's getopt:
    /// clustered flags (`-xa`), attached (`-p2222`, `-oUser=x`) or separate arguments.
    pub fn parse_args(args: &[String]) -> Result<SshCommandLine, ConfigError> {
        let mut cmd = SshCommandLine::default();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
                return Err(ConfigError::SshOptions {
                    args: args.join(" "),
                    problem: format!("unexpected argument `{arg}` (only options are allowed)"),
                });
            };
            if flags == "-" {
                break;
            }
            for (pos, flag) in flags.char_indices() {
                if !WITH_ARGUMENT.contains(flag) {
                    match flag {
                        'C' => cmd.options.push("Compression yes".to_owned()),
                        _ => cmd.ignored.push(format!("-{flag}")),
                    }
                    continue;
                }
                let attached = &flags[pos + flag.len_utf8()..];
                let value = if attached.is_empty() {
                    let v = args
                        .get(i)
                        .cloned()
                        .ok_or_else(|| ConfigError::SshOptions {
                            args: args.join(" "),
                            problem: format!("option -{flag} needs an argument"),
                        })?;
                    i += 1;
                    v
                } else {
                    attached.to_owned()
                };
                match flag {
                    'F' => cmd.config_file = Some(PathBuf::from(value)),
                    'o' => cmd.options.push(value),
                    'l' => cmd.options.push(format!("User {}", quote(&value))),
                    'p' => cmd.options.push(format!("Port {}", quote(&value))),
                    'i' => cmd.options.push(format!("IdentityFile {}", quote(&value))),
                    'J' => cmd.options.push(format!("ProxyJump {value}")),
                    _ => cmd.ignored.push(format!("-{flag} {value}")),
                }
                break;
            }
        }
        Ok(cmd)
    }
}

/// Quotes a value for ssh_config's argument splitter.
fn quote(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// POSIX-shell-like word splitting: whitespace separates, `'...'` is literal, `"..."` allows
/// `\"`, `\\`, `\$` and `` \` ``, a backslash outside quotes escapes the next character.
/// `None` on an unterminated quote.
fn shell_split(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\' | '$' | '`') => w.push(c),
                            c => {
                                w.push('\\');
                                w.push(c);
                            }
                        },
                        c => w.push(c),
                    }
                }
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    word.get_or_insert_with(String::new).push(c);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::shell_split;

    #[test]
    fn splitting() {
        assert_eq!(
            shell_split(r#" -F "/a b" -o'User=x y' c\ d "" "#),
            Some(vec![
                "-F".into(),
                "/a b".into(),
                "-oUser=x y".into(),
                "c d".into(),
                String::new()
            ])
        );
        assert_eq!(shell_split("'open"), None);
        assert_eq!(shell_split(""), Some(vec![]));
    }
}
