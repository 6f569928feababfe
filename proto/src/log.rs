//! One log vocabulary for both protocols.
//!
//! The serve protocol's log is the remote's stderr: plain text, no structure. The worker
//! protocol sends structured frames (`STDERR_NEXT`, activities, results). Both become
//! [`LogEvent`]s so a scheduler handles them the same way: serve only ever produces
//! [`LogEvent::Line`], the worker protocol adds phases, progress and activities.

use crate::worker::{ActivityResult, Field, StartActivity, StderrMsg};

/// Activity type of a build (`actBuild`).
pub const ACTIVITY_BUILD: u64 = 105;
/// Result type carrying one build log line (`resBuildLogLine`).
pub const RESULT_BUILD_LOG_LINE: u64 = 101;
/// Result type announcing a build phase (`resSetPhase`).
pub const RESULT_SET_PHASE: u64 = 104;
/// Result type with progress counters (`resProgress`).
pub const RESULT_PROGRESS: u64 = 105;
/// Result type with an expected count (`resSetExpected`).
pub const RESULT_SET_EXPECTED: u64 = 106;
/// Result type of a post-build-hook log line (`resPostBuildLogLine`).
pub const RESULT_POST_BUILD_LOG_LINE: u64 = 107;

/// A log event from a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// One line of text, without its newline: a build log line, or a message from the
    /// builder's Nix. `activity` is the build activity it belongs to, when the protocol says.
    Line {
        /// Activity id (worker protocol only).
        activity: Option<u64>,
        /// The text.
        text: String,
    },
    /// A build entered a phase (`unpackPhase`, `buildPhase`...).
    Phase {
        /// Activity id.
        activity: u64,
        /// Phase name.
        phase: String,
    },
    /// Progress counters of an activity.
    Progress {
        /// Activity id.
        activity: u64,
        /// Done.
        done: u64,
        /// Expected.
        expected: u64,
        /// Running.
        running: u64,
        /// Failed.
        failed: u64,
    },
    /// An activity started.
    Start {
        /// Activity id.
        id: u64,
        /// Activity type (105 = build, 100 = copy path...).
        kind: u64,
        /// Description.
        text: String,
        /// Parent activity.
        parent: Option<u64>,
        /// For builds: the derivation path, as the daemon printed it.
        drv_path: Option<String>,
    },
    /// An activity stopped.
    Stop {
        /// Activity id.
        id: u64,
    },
}

fn field_str(fields: &[Field], i: usize) -> Option<&str> {
    match fields.get(i) {
        Some(Field::Str(s)) => Some(s),
        _ => None,
    }
}

fn field_int(fields: &[Field], i: usize) -> u64 {
    match fields.get(i) {
        Some(Field::Int(v)) => *v,
        _ => 0,
    }
}

impl LogEvent {
    /// The event a worker stderr message carries, if any (`LAST`, `ERROR`, `READ` and `WRITE`
    /// are protocol control, not log). Unknown result types are dropped, not errors: newer
    /// daemons add types and a log must never fail an operation.
    pub fn from_worker(msg: &StderrMsg) -> Option<LogEvent> {
        match msg {
            StderrMsg::Next(text) => Some(LogEvent::Line {
                activity: None,
                text: text.strip_suffix('\n').unwrap_or(text).to_owned(),
            }),
            StderrMsg::StartActivity(StartActivity {
                id,
                kind,
                text,
                fields,
                parent,
                ..
            }) => Some(LogEvent::Start {
                id: *id,
                kind: *kind,
                text: text.clone(),
                parent: (*parent != 0).then_some(*parent),
                drv_path: if *kind == ACTIVITY_BUILD {
                    field_str(fields, 0).map(str::to_owned)
                } else {
                    None
                },
            }),
            StderrMsg::StopActivity(id) => Some(LogEvent::Stop { id: *id }),
            StderrMsg::Result(ActivityResult { id, kind, fields }) => match *kind {
                RESULT_BUILD_LOG_LINE | RESULT_POST_BUILD_LOG_LINE => {
                    field_str(fields, 0).map(|line| LogEvent::Line {
                        activity: Some(*id),
                        text: line.to_owned(),
                    })
                }
                RESULT_SET_PHASE => field_str(fields, 0).map(|p| LogEvent::Phase {
                    activity: *id,
                    phase: p.to_owned(),
                }),
                RESULT_PROGRESS => Some(LogEvent::Progress {
                    activity: *id,
                    done: field_int(fields, 0),
                    expected: field_int(fields, 1),
                    running: field_int(fields, 2),
                    failed: field_int(fields, 3),
                }),
                _ => None,
            },
            StderrMsg::Last | StderrMsg::Error(_) | StderrMsg::Read(_) | StderrMsg::Write(_) => {
                None
            }
        }
    }
}

/// Splits a byte stream (the serve protocol's stderr) into lines. A line longer than `max`
/// bytes is cut into pieces of `max` bytes rather than buffered without bound; invalid UTF-8
/// is replaced, because a log must never fail an operation.
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
    /// After a gap in the stream: the bytes up to the next newline are the end of a line
    /// whose start was lost.
    skipping: bool,
}

impl LineSplitter {
    /// A splitter cutting lines at `max` bytes.
    pub fn new(max: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            max: max.max(1),
            skipping: false,
        }
    }

    /// Some bytes of the stream were lost here: the line in progress and the line the next
    /// bytes belong to are incomplete, so neither is returned (the caller counts them as
    /// lost). Never returns a fragment as if it were a line.
    pub fn gap(&mut self) {
        self.partial.clear();
        self.skipping = true;
    }

    /// Feeds bytes; returns the complete lines (without newline, `\r` stripped).
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        if self.skipping {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.skipping = false;
                    data = &data[i + 1..];
                }
                None => return lines,
            }
        }
        while let Some(&first) = data.first() {
            if self.partial.len() >= self.max {
                // Cut only once more data arrives, so a newline right at the limit ends the
                // line instead of producing an empty one.
                if first == b'\n' {
                    data = &data[1..];
                }
                lines.push(self.take());
                continue;
            }
            let room = self.max - self.partial.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&window[..i]);
                    lines.push(self.take());
                    data = &data[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(window);
                    data = &data[window.len()..];
                }
            }
        }
        lines
    }

    /// The last unterminated line, at end of stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.partial);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_drops_the_lines_it_cut() {
        let mut s = LineSplitter::new(64);
        assert_eq!(s.feed(b"one\ntw"), vec!["one"]);
        s.gap();
        assert_eq!(s.feed(b"ree\nfour\nfi"), vec!["four"]);
        assert_eq!(s.finish(), Some("fi".to_owned()));
        s.gap();
        assert_eq!(s.feed(b"no newline yet"), Vec::<String>::new());
        assert_eq!(s.feed(b"\nsix\n"), vec!["six"]);
    }

    #[test]
    fn splitter_handles_partial_and_long_lines() {
        let mut s = LineSplitter::new(4);
        assert_eq!(s.feed(b"ab"), Vec::<String>::new());
        assert_eq!(s.feed(b"c\r\nxyzzy\n"), vec!["abc", "xyzz", "y"]);
        assert_eq!(s.feed(b"tail"), Vec::<String>::new());
        assert_eq!(s.feed(b"!"), vec!["tail"]);
        assert_eq!(s.finish(), Some("!".to_owned()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn worker_build_log_line_becomes_a_line() {
        let msg = StderrMsg::Result(ActivityResult {
            id: 7,
            kind: RESULT_BUILD_LOG_LINE,
            fields: vec![Field::Str("hello".into())],
        });
        assert_eq!(
            LogEvent::from_worker(&msg),
            Some(LogEvent::Line {
                activity: Some(7),
                text: "hello".into()
            })
        );
        assert_eq!(
            LogEvent::from_worker(&StderrMsg::Next("warning: x\n".into())),
            Some(LogEvent::Line {
                activity: None,
                text: "warning: x".into()
            })
        );
    }
}
