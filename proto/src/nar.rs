//! NAR (Nix ARchive): a streaming parser that finds the end of an archive and hashes it on the
//! fly, and writers that produce archives from memory or one large file in chunks.
//!
//! NARs travel *without* a length prefix in the serve `DumpStorePath` reply, the worker
//! `NarFromPath` reply, export streams and `AddMultipleToStore`: the only way to know where one
//! ends is to parse it (`nix-protocols.md` §1.5). [`NarParser`] is a push parser: hand it
//! whatever bytes arrived, it consumes them up to the `)` that closes the root node and not a
//! byte further, so what follows belongs to the next message. It never holds file contents:
//! tokens are short and buffered up to their [`Limits`], `contents` blobs pass straight through
//! (and out through [`NarEvent::Contents`] for consumers that unpack).
//!
//! The grammar (NixOS/nix `src/libutil/archive.cc`, `parseDump`):
//!
//! ```text
//! nar   = str("nix-archive-1") node
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" u64(n) <n bytes> <pad>
//!                    | "symlink" "target" str(target)
//!                    | "directory" { "entry" "(" "name" str(name) "node" node ")" } ) ")"
//! ```
//!
//! We accept exactly the canonical form `dumpPath` writes, which is also what current Nix
//! accepts. Nix 2.8.0's reader is looser in ways no writer exercises, and we do not copy them:
//!
//! * its directory sort check never fires across entries, because `prevName` is declared inside
//!   the per-entry block (fixed upstream in 495d32e1b8, "NAR parser: Fix check for duplicate /
//!   incorrectly sorted entries", 2024); we require strictly increasing names;
//! * it takes the fields of a node in any order, allows a regular file without `contents`, and
//!   `( )` without a type;
//! * it accepts empty symlink targets and targets containing NUL (current Nix rejects both, and
//!   no Unix file system can hold them).
//!
//! Padding after every string and after `contents` must be zero, as Nix's `readPadding` checks.

use std::collections::BTreeMap;

use bytes::BufMut;

use crate::error::{Malformed, ProtoError};
use crate::hash::{Hash, Sha256};
use crate::limits::Limits;
use crate::wire::{WireWrite, padding};

/// The magic string that opens every NAR (`narVersionMagic1`).
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest keyword the grammar has (`executable` is 10); a longer token is rejected before it
/// is buffered. Current Nix uses 32 (`narMaxTag`); anything above 10 is corrupt either way.
const MAX_TAG: u64 = 16;

/// What a consumer that unpacks sees, in archive order.
///
/// The root node's event comes first. Inside a directory, every child is announced by
/// [`NarEvent::Entry`] and followed by that child's own events; the directory ends with
/// [`NarEvent::DirectoryEnd`]. A consumer tracks its position with a stack of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// The next node is the child `name` of the current directory. Names are raw bytes: Nix does
    /// not require UTF-8.
    Entry {
        /// File name, already validated (not empty, `.`, `..`, no `/` or NUL, sorted).
        name: &'a [u8],
    },
    /// The current node is a directory.
    Directory,
    /// The current directory has no more entries.
    DirectoryEnd,
    /// The current node is a regular file of `size` bytes; its contents follow as
    /// [`NarEvent::Contents`] pieces, then [`NarEvent::FileEnd`].
    File {
        /// Whether the executable marker was present.
        executable: bool,
        /// Exact size of the contents.
        size: u64,
    },
    /// A piece of the current file's contents, borrowed from the input (never copied).
    Contents(&'a [u8]),
    /// All contents of the current file were delivered.
    FileEnd,
    /// The current node is a symlink.
    Symlink {
        /// Link target, raw bytes (not empty, no NUL).
        target: &'a [u8],
    },
}

/// Where in the grammar the parser is: which token comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    TypeKw,
    TypeVal,
    /// `executable` or `contents`.
    RegularNext,
    ExecutableVal,
    ContentsKw,
    ContentsSize,
    NodeClose,
    TargetKw,
    TargetVal,
    /// `entry` or `)`.
    DirNext,
    EntryOpen,
    NameKw,
    NameVal,
    NodeKw,
    EntryClose,
    Done,
}

impl Expect {
    /// Field name for errors.
    fn field(self) -> &'static str {
        match self {
            Expect::Magic => "NAR magic",
            Expect::ExecutableVal => "NAR executable marker",
            Expect::ContentsSize => "NAR file size",
            Expect::TargetVal => "NAR symlink target",
            Expect::NameVal => "NAR entry name",
            _ => "NAR tag",
        }
    }

    /// Longest acceptable string for this token.
    fn max_len(self, limits: &Limits) -> u64 {
        match self {
            Expect::Magic => NAR_MAGIC.len() as u64,
            Expect::ExecutableVal => 0,
            Expect::TargetVal => limits.max_nar_target,
            Expect::NameVal => limits.max_nar_name,
            _ => MAX_TAG,
        }
    }
}

/// What happens once padding has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterPad {
    /// The token in `tok` is complete.
    Token,
    /// The current file's contents are complete.
    FileEnd,
}

/// Lexical phase: which bytes the parser is collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// The 8-byte little-endian word, `word_fill` bytes of it so far.
    Word,
    /// `left` more bytes of the current string token.
    Bytes { left: usize },
    /// `left` more zero padding bytes.
    Pad { left: u8, then: AfterPad },
    /// `left` more bytes of file contents.
    Stream { left: u64 },
}

/// Streaming NAR parser: validates, finds the end, counts and hashes.
///
/// ```
/// use nixmux_proto::{Limits, nar::{NarNode, NarParser}};
/// let nar = NarNode::File { executable: false, contents: b"hi\n".to_vec() }.to_nar();
/// let mut input = nar.clone();
/// input.extend_from_slice(b"next message");
/// let mut p = NarParser::new(Limits::DEFAULT);
/// let used = p.feed(&input).expect("valid");
/// assert_eq!(used, nar.len());
/// assert!(p.is_done());
/// assert_eq!(p.nar_size(), nar.len() as u64);
/// ```
#[derive(Debug, Clone)]
pub struct NarParser {
    limits: Limits,
    expect: Expect,
    lex: Lex,
    word: [u8; 8],
    word_fill: usize,
    /// Bytes of the current string token.
    tok: Vec<u8>,
    /// Length of the current string token (for its padding).
    tok_len: u64,
    /// Size of the current file (for its padding).
    file_size: u64,
    executable: bool,
    /// One entry per open directory: the last entry name seen in it.
    dirs: Vec<Vec<u8>>,
    /// `None` for a parser that only delimits and checks ([`NarParser::without_hash`]).
    hasher: Option<Sha256>,
    size: u64,
    error: Option<ProtoError>,
}

impl NarParser {
    /// A parser at the start of an archive, hashing what it consumes.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            expect: Expect::Magic,
            lex: Lex::Word,
            word: [0; 8],
            word_fill: 0,
            tok: Vec::new(),
            tok_len: 0,
            file_size: 0,
            executable: false,
            dirs: Vec::new(),
            hasher: Some(Sha256::new()),
            size: 0,
            error: None,
        }
    }

    /// A parser that delimits and checks an archive without hashing it: for a NAR whose
    /// receiver hashes it anyway (a local Nix store checks `narHash` before registering a
    /// path), where hashing it here too would double the CPU a transfer costs.
    pub fn without_hash(limits: Limits) -> Self {
        Self {
            hasher: None,
            ..Self::new(limits)
        }
    }

    /// True once the `)` closing the root node (and its padding) has been consumed.
    pub fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// Bytes consumed so far; once [`is_done`](Self::is_done), the archive's `narSize`.
    pub fn nar_size(&self) -> u64 {
        self.size
    }

    /// SHA-256 of the bytes consumed so far; once [`is_done`](Self::is_done), the archive's
    /// `narHash`. `None` for a parser made [`without_hash`](Self::without_hash).
    pub fn nar_hash(&self) -> Option<Hash> {
        self.hasher.as_ref().map(Sha256::current)
    }

    /// Current directory nesting (0 at the root).
    pub fn depth(&self) -> usize {
        self.dirs.len()
    }

    /// Consumes a prefix of `input`. See [`feed_with`](Self::feed_with).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ProtoError> {
        self.feed_with(input, |_| {})
    }

    /// Consumes a prefix of `input`, reporting what it contains to `on_event`.
    ///
    /// Returns how many bytes were consumed: all of them, unless the archive ended inside
    /// `input`, in which case the rest belongs to whatever follows the NAR. A truncated archive
    /// is not an error: feed the rest when it arrives. After an error the parser is poisoned
    /// and returns the same error forever; after the end it consumes nothing.
    pub fn feed_with<F>(&mut self, input: &[u8], mut on_event: F) -> Result<usize, ProtoError>
    where
        F: FnMut(NarEvent<'_>),
    {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = self.run(input, &mut on_event);
        match result {
            Ok(used) => {
                // Hash in one call per feed: contents are never touched byte by byte.
                let consumed = input.get(..used).unwrap_or(input);
                if let Some(h) = &mut self.hasher {
                    h.update(consumed);
                }
                self.size = self.size.saturating_add(consumed.len() as u64);
                Ok(used)
            }
            Err(e) => {
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn run<F>(&mut self, input: &[u8], on_event: &mut F) -> Result<usize, ProtoError>
    where
        F: FnMut(NarEvent<'_>),
    {
        let mut pos = 0usize;
        while self.expect != Expect::Done {
            let rest = input.get(pos..).unwrap_or_default();
            match self.lex {
                Lex::Word => {
                    let want = 8 - self.word_fill;
                    let take = want.min(rest.len());
                    if take == 0 {
                        break;
                    }
                    let (src, dst) = (
                        rest.get(..take).unwrap_or_default(),
                        self.word.get_mut(self.word_fill..self.word_fill + take),
                    );
                    if let Some(dst) = dst {
                        dst.copy_from_slice(src);
                    }
                    self.word_fill += take;
                    pos += take;
                    if self.word_fill == 8 {
                        self.word_fill = 0;
                        self.on_word(u64::from_le_bytes(self.word), on_event)?;
                    }
                }
                Lex::Bytes { left } => {
                    let take = left.min(rest.len());
                    if take == 0 {
                        break;
                    }
                    self.tok
                        .extend_from_slice(rest.get(..take).unwrap_or_default());
                    pos += take;
                    let left = left - take;
                    self.lex = if left == 0 {
                        Lex::Pad {
                            left: pad_len(self.tok_len),
                            then: AfterPad::Token,
                        }
                    } else {
                        Lex::Bytes { left }
                    };
                }
                Lex::Pad { left: 0, then } => match then {
                    AfterPad::Token => self.on_token(on_event)?,
                    AfterPad::FileEnd => {
                        on_event(NarEvent::FileEnd);
                        self.expect = Expect::NodeClose;
                        self.lex = Lex::Word;
                    }
                },
                Lex::Pad { left, then } => {
                    let take = usize::from(left).min(rest.len());
                    if take == 0 {
                        break;
                    }
                    let bytes = rest.get(..take).unwrap_or_default();
                    if bytes.iter().any(|&b| b != 0) {
                        let field = match then {
                            AfterPad::Token => self.expect.field(),
                            AfterPad::FileEnd => "NAR file contents",
                        };
                        return Err(ProtoError::Malformed {
                            field,
                            kind: Malformed::NonZeroPadding,
                        });
                    }
                    pos += take;
                    // `take <= left`, a u8.
                    let took = u8::try_from(take).unwrap_or(left);
                    self.lex = Lex::Pad {
                        left: left - took,
                        then,
                    };
                }
                Lex::Stream { left: 0 } => {
                    self.lex = Lex::Pad {
                        left: pad_len(self.file_size),
                        then: AfterPad::FileEnd,
                    };
                }
                Lex::Stream { left } => {
                    // Take as much as is there in one slice; `min` with a usize bound keeps the
                    // conversion lossless on every target.
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    if take == 0 {
                        break;
                    }
                    on_event(NarEvent::Contents(rest.get(..take).unwrap_or_default()));
                    pos += take;
                    self.lex = Lex::Stream {
                        left: left - take as u64,
                    };
                }
            }
        }
        Ok(pos)
    }

    /// A length word arrived: either a file size or a string length.
    fn on_word<F>(&mut self, w: u64, on_event: &mut F) -> Result<(), ProtoError>
    where
        F: FnMut(NarEvent<'_>),
    {
        if self.expect == Expect::ContentsSize {
            let max = self.limits.max_nar_file;
            if w > max {
                return Err(ProtoError::Malformed {
                    field: "NAR file size",
                    kind: Malformed::TooLong { len: w, max },
                });
            }
            on_event(NarEvent::File {
                executable: self.executable,
                size: w,
            });
            self.file_size = w;
            self.lex = Lex::Stream { left: w };
            return Ok(());
        }
        let max = self.expect.max_len(&self.limits);
        let too_long = || ProtoError::Malformed {
            field: self.expect.field(),
            kind: Malformed::TooLong { len: w, max },
        };
        if w > max {
            return Err(too_long());
        }
        let n = usize::try_from(w).map_err(|_| too_long())?;
        self.tok.clear();
        self.tok.reserve(n);
        self.tok_len = w;
        self.lex = if n == 0 {
            Lex::Pad {
                left: 0,
                then: AfterPad::Token,
            }
        } else {
            Lex::Bytes { left: n }
        };
        Ok(())
    }

    /// A complete string token (with its padding) arrived in `tok`.
    fn on_token<F>(&mut self, on_event: &mut F) -> Result<(), ProtoError>
    where
        F: FnMut(NarEvent<'_>),
    {
        let tok = std::mem::take(&mut self.tok);
        let r = self.dispatch(&tok, on_event);
        self.tok = tok;
        self.lex = Lex::Word;
        r
    }

    fn dispatch<F>(&mut self, tok: &[u8], on_event: &mut F) -> Result<(), ProtoError>
    where
        F: FnMut(NarEvent<'_>),
    {
        let unexpected = |wanted: &str| {
            ProtoError::invalid(
                "NAR",
                format!("expected {wanted}, got {:?}", String::from_utf8_lossy(tok)),
            )
        };
        self.expect = match (self.expect, tok) {
            (Expect::Magic, NAR_MAGIC) => Expect::NodeOpen,
            (Expect::Magic, _) => {
                return Err(ProtoError::invalid(
                    "NAR magic",
                    "input doesn't look like a Nix archive",
                ));
            }
            (Expect::NodeOpen, b"(") => Expect::TypeKw,
            (Expect::NodeOpen, _) => return Err(unexpected("'('")),
            (Expect::TypeKw, b"type") => Expect::TypeVal,
            (Expect::TypeKw, _) => return Err(unexpected("'type'")),
            (Expect::TypeVal, b"regular") => {
                self.executable = false;
                Expect::RegularNext
            }
            (Expect::TypeVal, b"symlink") => Expect::TargetKw,
            (Expect::TypeVal, b"directory") => {
                let max = self.limits.max_nar_depth;
                if u32::try_from(self.dirs.len()).unwrap_or(u32::MAX) >= max {
                    return Err(ProtoError::invalid(
                        "NAR",
                        format!("directories nested deeper than {max}"),
                    ));
                }
                self.dirs.push(Vec::new());
                on_event(NarEvent::Directory);
                Expect::DirNext
            }
            (Expect::TypeVal, _) => return Err(unexpected("a file type")),
            (Expect::RegularNext, b"executable") => Expect::ExecutableVal,
            (Expect::RegularNext, b"contents") => Expect::ContentsSize,
            (Expect::RegularNext, _) => return Err(unexpected("'executable' or 'contents'")),
            // The value is bounded to length 0 in `on_word`, so it is the empty string here.
            (Expect::ExecutableVal, _) => {
                self.executable = true;
                Expect::ContentsKw
            }
            (Expect::ContentsKw, b"contents") => Expect::ContentsSize,
            (Expect::ContentsKw, _) => return Err(unexpected("'contents'")),
            (Expect::TargetKw, b"target") => Expect::TargetVal,
            (Expect::TargetKw, _) => return Err(unexpected("'target'")),
            (Expect::TargetVal, target) => {
                if target.is_empty() || target.contains(&0) {
                    return Err(ProtoError::invalid(
                        "NAR symlink target",
                        "empty or contains NUL",
                    ));
                }
                on_event(NarEvent::Symlink { target });
                Expect::NodeClose
            }
            (Expect::NodeClose, b")") => self.node_closed(),
            (Expect::NodeClose, _) => return Err(unexpected("')'")),
            (Expect::DirNext, b"entry") => Expect::EntryOpen,
            (Expect::DirNext, b")") => {
                self.dirs.pop();
                on_event(NarEvent::DirectoryEnd);
                self.node_closed()
            }
            (Expect::DirNext, _) => return Err(unexpected("'entry' or ')'")),
            (Expect::EntryOpen, b"(") => Expect::NameKw,
            (Expect::EntryOpen, _) => return Err(unexpected("'('")),
            (Expect::NameKw, b"name") => Expect::NameVal,
            (Expect::NameKw, _) => return Err(unexpected("'name'")),
            (Expect::NameVal, name) => {
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(ProtoError::invalid(
                        "NAR entry name",
                        format!("invalid file name {:?}", String::from_utf8_lossy(name)),
                    ));
                }
                let prev = self
                    .dirs
                    .last_mut()
                    .ok_or_else(|| ProtoError::invalid("NAR", "entry outside a directory"))?;
                if name <= prev.as_slice() {
                    return Err(ProtoError::invalid(
                        "NAR entry name",
                        format!(
                            "directory is not sorted: {:?} after {:?}",
                            String::from_utf8_lossy(name),
                            String::from_utf8_lossy(prev)
                        ),
                    ));
                }
                prev.clear();
                prev.extend_from_slice(name);
                on_event(NarEvent::Entry { name });
                Expect::NodeKw
            }
            (Expect::NodeKw, b"node") => Expect::NodeOpen,
            (Expect::NodeKw, _) => return Err(unexpected("'node'")),
            (Expect::EntryClose, b")") => Expect::DirNext,
            (Expect::EntryClose, _) => return Err(unexpected("')'")),
            (Expect::ContentsSize | Expect::Done, _) => {
                return Err(ProtoError::invalid("NAR", "internal parser state"));
            }
        };
        Ok(())
    }

    /// A node ended: the archive is complete at the root, otherwise its entry closes next.
    fn node_closed(&self) -> Expect {
        if self.dirs.is_empty() {
            Expect::Done
        } else {
            Expect::EntryClose
        }
    }
}

/// Padding after `len` bytes, as a `u8` (always below 8).
fn pad_len(len: u64) -> u8 {
    // `padding` returns 0..=7.
    u8::try_from(padding(len)).unwrap_or(0)
}

/// Summary of a complete archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarInfo {
    /// Total size in bytes (`narSize`).
    pub size: u64,
    /// SHA-256 of the archive (`narHash`).
    pub hash: Hash,
}

/// Parses one complete archive from the start of `input`. Returns its size and hash, or `None`
/// when `input` ends before the archive does. Bytes after the archive are ignored (compare
/// [`NarInfo::size`] with `input.len()` to detect them).
pub fn parse_nar(input: &[u8], limits: Limits) -> Result<Option<NarInfo>, ProtoError> {
    let mut p = NarParser::new(limits);
    p.feed(input)?;
    // `new` hashes, so the hash is there once the archive is complete.
    Ok(p.nar_hash().filter(|_| p.is_done()).map(|hash| NarInfo {
        size: p.nar_size(),
        hash,
    }))
}

/// A file system tree held in memory, for producing archives in tests, fake peers and
/// benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarNode {
    /// A regular file.
    File {
        /// Executable bit.
        executable: bool,
        /// Contents.
        contents: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Link target (raw bytes).
        target: Vec<u8>,
    },
    /// A directory; the map's byte order is the order NAR requires.
    Directory(BTreeMap<Vec<u8>, NarNode>),
}

impl NarNode {
    /// Serialises this tree as a complete NAR.
    ///
    /// The writer does not validate names or targets, so tests can produce archives that the
    /// parser must reject.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.nar_size()).unwrap_or(0));
        self.write_nar(&mut out);
        out
    }

    /// Writes this tree as a complete NAR into `out`.
    pub fn write_nar<B: BufMut + ?Sized>(&self, out: &mut B) {
        out.put_bytes_padded(NAR_MAGIC);
        self.write_node(out);
    }

    fn write_node<B: BufMut + ?Sized>(&self, out: &mut B) {
        out.put_bytes_padded(b"(");
        out.put_bytes_padded(b"type");
        match self {
            NarNode::File {
                executable,
                contents,
            } => {
                out.put_bytes_padded(b"regular");
                if *executable {
                    out.put_bytes_padded(b"executable");
                    out.put_bytes_padded(b"");
                }
                out.put_bytes_padded(b"contents");
                out.put_bytes_padded(contents);
            }
            NarNode::Symlink { target } => {
                out.put_bytes_padded(b"symlink");
                out.put_bytes_padded(b"target");
                out.put_bytes_padded(target);
            }
            NarNode::Directory(entries) => {
                out.put_bytes_padded(b"directory");
                for (name, node) in entries {
                    out.put_bytes_padded(b"entry");
                    out.put_bytes_padded(b"(");
                    out.put_bytes_padded(b"name");
                    out.put_bytes_padded(name);
                    out.put_bytes_padded(b"node");
                    node.write_node(out);
                    out.put_bytes_padded(b")");
                }
            }
        }
        out.put_bytes_padded(b")");
    }

    /// Size of the archive [`to_nar`](Self::to_nar) would produce, without producing it.
    pub fn nar_size(&self) -> u64 {
        str_size(NAR_MAGIC.len() as u64) + self.node_size()
    }

    fn node_size(&self) -> u64 {
        // "(", "type", <type>, ..., ")": "(" and ")" are 16 bytes each, "type" 16.
        let frame = 16 + 16 + 16;
        frame
            + match self {
                NarNode::File {
                    executable,
                    contents,
                } => {
                    let exec = if *executable { 24 + 8 } else { 0 };
                    // "regular" 16, "contents" 16.
                    16 + exec + 16 + str_size(contents.len() as u64)
                }
                // "symlink" 16, "target" 16.
                NarNode::Symlink { target } => 16 + 16 + str_size(target.len() as u64),
                NarNode::Directory(entries) => {
                    // "directory" 24; per entry "entry" "(" "name" <name> "node" ... ")".
                    24 + entries
                        .iter()
                        .map(|(name, node)| 16 * 5 + str_size(name.len() as u64) + node.node_size())
                        .sum::<u64>()
                }
            }
    }
}

/// Size of a `str` of `len` bytes on the wire.
const fn str_size(len: u64) -> u64 {
    8 + len + padding(len)
}

/// A NAR holding one regular file, produced in three parts so that the contents can be
/// streamed: [`header`](Self::header), then exactly `size` bytes supplied by the caller in any
/// chunks, then [`trailer`](Self::trailer). Used to push files far larger than memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleFileNar {
    /// Contents size.
    pub size: u64,
    /// Executable bit.
    pub executable: bool,
}

impl SingleFileNar {
    /// Describes a single-file archive.
    pub fn new(size: u64, executable: bool) -> Self {
        Self { size, executable }
    }

    /// Everything before the contents, ending with the contents size word.
    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(136);
        out.put_bytes_padded(NAR_MAGIC);
        out.put_bytes_padded(b"(");
        out.put_bytes_padded(b"type");
        out.put_bytes_padded(b"regular");
        if self.executable {
            out.put_bytes_padded(b"executable");
            out.put_bytes_padded(b"");
        }
        out.put_bytes_padded(b"contents");
        out.put_word(self.size);
        out
    }

    /// Everything after the contents: their padding and the closing `)`.
    pub fn trailer(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.put_bytes(0, usize::from(pad_len(self.size)));
        out.put_bytes_padded(b")");
        out
    }

    /// Total archive size (`narSize`).
    pub fn nar_size(&self) -> u64 {
        NarNode::File {
            executable: self.executable,
            contents: Vec::new(),
        }
        .nar_size()
            + self.size
            + padding(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &[u8]) -> NarNode {
        NarNode::File {
            executable: false,
            contents: contents.to_vec(),
        }
    }

    #[test]
    fn sizes_agree_with_writer() {
        let mut dir = BTreeMap::new();
        dir.insert(b"a".to_vec(), file(b"hello"));
        dir.insert(
            b"b".to_vec(),
            NarNode::File {
                executable: true,
                contents: vec![1; 9],
            },
        );
        dir.insert(
            b"c".to_vec(),
            NarNode::Symlink {
                target: b"a".to_vec(),
            },
        );
        dir.insert(b"d".to_vec(), NarNode::Directory(BTreeMap::new()));
        let tree = NarNode::Directory(dir);
        assert_eq!(tree.nar_size(), tree.to_nar().len() as u64);
        for exec in [false, true] {
            for size in [0u64, 1, 7, 8, 9] {
                let s = SingleFileNar::new(size, exec);
                let mut nar = s.header();
                nar.extend(std::iter::repeat_n(
                    b'x',
                    usize::try_from(size).unwrap_or(0),
                ));
                nar.extend(s.trailer());
                assert_eq!(s.nar_size(), nar.len() as u64);
                let whole = NarNode::File {
                    executable: exec,
                    contents: vec![b'x'; usize::try_from(size).unwrap_or(0)],
                }
                .to_nar();
                assert_eq!(nar, whole);
            }
        }
    }

    #[test]
    fn magic_only_is_incomplete() {
        let mut p = NarParser::new(Limits::DEFAULT);
        let mut buf = Vec::new();
        buf.put_bytes_padded(NAR_MAGIC);
        assert_eq!(p.feed(&buf), Ok(buf.len()));
        assert!(!p.is_done());
    }
}
