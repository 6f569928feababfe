//! Keys for in-process servers and their clients: generated host keys, client key files
//! (optionally encrypted with a passphrase), and the forms the transport's configuration
//! takes them in (a key file path, a machines-file host key field).

use std::io;
use std::path::PathBuf;

use data_encoding::BASE64;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey, PublicKey};

/// A fresh Ed25519 key.
pub fn ed25519() -> PrivateKey {
    // ThreadRng is a CSPRNG seeded from the OS; generating an Ed25519 key cannot fail
    // otherwise (ssh-key only errors for algorithms it was built without).
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .expect("Ed25519 key generation is infallible with the OS RNG")
}

/// The `ssh-ed25519 AAAA...` line of a public key (no comment).
pub fn openssh_line(key: &PublicKey) -> String {
    let mut line = key.to_openssh().unwrap_or_default();
    // `to_openssh` appends the comment, if any; the transport's parsers accept it either
    // way, but tests compare lines.
    if let Some((alg, rest)) = line.split_once(' ')
        && let Some((b64, _comment)) = rest.split_once(' ')
    {
        line = format!("{alg} {b64}");
    }
    line
}

/// Field 8 of a Nix machines file for `key`: base64 of its `.pub` line.
pub fn machines_field(key: &PublicKey) -> String {
    BASE64.encode(openssh_line(key).as_bytes())
}

/// A client private key written to a file in a temporary directory (removed on drop), in
/// OpenSSH format, optionally encrypted with a passphrase.
#[derive(Debug)]
pub struct KeyFile {
    _dir: tempfile::TempDir,
    /// The key file.
    pub path: PathBuf,
    /// The passphrase it is encrypted with, if any.
    pub passphrase: Option<String>,
    /// Its public half.
    pub public: PublicKey,
    /// The file's exact contents (PEM-armoured OpenSSH private key).
    pub contents: String,
    /// The unencrypted OpenSSH encoding of the private key (what must never be logged),
    /// whatever the file holds.
    pub plain_pem: String,
}

impl KeyFile {
    /// Writes `key` to a new temporary file, encrypted with `passphrase` if one is given
    /// (OpenSSH's format: bcrypt-pbkdf KDF, AES-256-CTR).
    pub fn write(key: &PrivateKey, passphrase: Option<&str>) -> io::Result<KeyFile> {
        let to_io = |e: russh::keys::ssh_key::Error| io::Error::other(e.to_string());
        let plain_pem = key.to_openssh(LineEnding::LF).map_err(to_io)?.to_string();
        let contents = match passphrase {
            Some(p) => key
                .encrypt(&mut rand::rng(), p)
                .map_err(to_io)?
                .to_openssh(LineEnding::LF)
                .map_err(to_io)?
                .to_string(),
            None => plain_pem.clone(),
        };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("id_ed25519");
        write_private(&path, contents.as_bytes())?;
        Ok(KeyFile {
            _dir: dir,
            path,
            passphrase: passphrase.map(String::from),
            public: key.public_key().clone(),
            contents,
            plain_pem,
        })
    }
}

/// Writes a file readable by its owner only, as OpenSSH expects of private keys.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
