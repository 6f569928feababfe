//! The machines file that points an unmodified Nix or Lix at the agent.
//!
//! Nix runs a builder's `remote-program` itself, without ssh, when the store URI's host is
//! `localhost` (Nix's `SSHMaster`, `fakeSSH`; Lix the same in `lix/libstore/ssh.cc`),
//! appending `--stdio` (ssh-ng://) or `--serve --write` (ssh://). So each builder line
//! becomes `ssh-ng://localhost?remote-program=<nixmux>%20connect%20<name>` (or `ssh://`),
//! with the original systems, max jobs, speed factor and features. The SSH key and host key
//! fields are empty: the agent holds those.

use nixmux::config::BuilderSpec;

use crate::builders::builder_names;

/// Percent-encodes everything but the characters that are safe in a URL query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/@:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(",")
    }
}

fn speed(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

/// The machines file for Nix: one line per builder of `specs`, running `program connect`
/// (with `--socket socket` when it is not the default). Nix splits `remote-program` at
/// whitespace, so neither may contain any.
pub fn render(
    specs: &[BuilderSpec],
    program: &str,
    socket: Option<&str>,
) -> Result<String, String> {
    for (what, v) in [
        ("the nixmux program path", Some(program)),
        ("the socket path", socket),
    ] {
        if let Some(v) = v
            && v.chars().any(char::is_whitespace)
        {
            return Err(format!(
                "{what} {v:?} contains whitespace, which Nix's remote-program cannot carry"
            ));
        }
    }
    let names = builder_names(specs);
    let mut out = String::from(
        "# Written by `nixmux agent machines`: every builder goes through the nixmux agent.\n# Use it with `builders = @<this file>` in nix.conf.\n",
    );
    for (spec, name) in specs.iter().zip(names) {
        let mut words = vec![program.to_owned(), "connect".to_owned()];
        if let Some(s) = socket {
            words.push("--socket".to_owned());
            words.push(s.to_owned());
        }
        words.push(name);
        let scheme = spec.protocol.scheme();
        out.push_str(&format!(
            "{scheme}://localhost?remote-program={} {} - {} {} {} {} -\n",
            encode(&words.join(" ")),
            list(spec.systems.iter().cloned()),
            spec.max_jobs,
            speed(spec.speed_factor),
            list(spec.supported_features.iter().cloned()),
            list(spec.mandatory_features.iter().cloned()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixmux::config::{Origin, parse_builders};

    #[test]
    fn lines_keep_the_scheduling_fields_and_point_at_connect() {
        let m = parse_builders(
            "ssh-ng://nix@build1:2222 x86_64-linux,i686-linux /k 8 2 kvm,big-parallel big-parallel\nbuild2 aarch64-linux - 4 1.5\n",
            Origin::Text("test".into()),
            "x86_64-linux",
        )
        .expect("parse");
        let specs: Vec<BuilderSpec> = m.builders().cloned().collect();
        assert!(render(&specs, "/usr/bin/nixmux", Some("/tmp/a b.sock")).is_err());
        let text = render(&specs, "/usr/bin/nixmux", Some("/tmp/agent.sock")).expect("render");
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "ssh-ng://localhost?remote-program=/usr/bin/nixmux%20connect%20--socket%20/tmp/agent.sock%20nix@build1:2222 x86_64-linux,i686-linux - 8 2 big-parallel,kvm big-parallel -",
                "ssh://localhost?remote-program=/usr/bin/nixmux%20connect%20--socket%20/tmp/agent.sock%20build2 aarch64-linux - 4 1.5 - - -",
            ]
        );
        // Nix reads it back as the same scheduling data, and as the agent's own lines.
        let back =
            parse_builders(&text, Origin::Text("test".into()), "x86_64-linux").expect("reparse");
        let specs2: Vec<&BuilderSpec> = back.builders().collect();
        assert_eq!(specs2[0].max_jobs, 8);
        assert_eq!(specs2[1].speed_factor, 1.5);
        assert_eq!(
            specs2[0].remote_program,
            [
                "/usr/bin/nixmux",
                "connect",
                "--socket",
                "/tmp/agent.sock",
                "nix@build1:2222"
            ]
        );
        assert!(crate::builders::is_agent_line(specs2[0]));
    }
}
