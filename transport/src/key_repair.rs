//! Loading the OpenSSH ECDSA P-256 private keys that ssh-key refuses.
//!
//! OpenSSH writes an ECDSA key's secret scalar as an SSH `mpint` (RFC 4251 §5), which has no
//! leading zero bytes, so about one P-256 key in 256 stores a 31-byte scalar (OpenSSH's
//! sshkey.c `sshkey_private_serialize_opt`). ssh-key 0.7.0-rc.11, under russh, refuses any
//! scalar shorter than 32 bytes ("length invalid", `EcdsaPrivateKey::decode`), so such a key,
//! perfectly valid for OpenSSH, would not load. For an unencrypted key file the scalar is
//! padded back to 32 bytes here and the file decoded again. An encrypted file cannot be
//! mended before it is decrypted, which happens inside ssh-key: its load error stays.
//!
//! The file format is OpenSSH's PROTOCOL.key: `openssh-key-v1\0`, cipher, KDF, KDF options,
//! the number of keys (1), the public key, then the private section (two check integers, the
//! key type, the curve, the public point, the scalar, the comment, padding to the cipher's
//! block size: 8 for `none`).

use data_encoding::BASE64;

const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
const END: &str = "-----END OPENSSH PRIVATE KEY-----";
const MAGIC: &[u8] = b"openssh-key-v1\0";
const P256: &[u8] = b"ecdsa-sha2-nistp256";
const SCALAR: usize = 32;

/// The key file `text` with a short P-256 scalar padded to 32 bytes, or `None` when it is not
/// an unencrypted OpenSSH P-256 key with a short scalar (nothing to mend, or nothing we can).
pub(crate) fn pad_short_p256_scalar(text: &str) -> Option<String> {
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != BEGIN)
        .skip(1)
        .take_while(|l| *l != END)
        .collect();
    let blob = BASE64.decode(body.as_bytes()).ok()?;
    let mut r = Reader(&blob);
    if r.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let cipher = r.string()?;
    if cipher != b"none" {
        return None;
    }
    let kdf = r.string()?;
    let kdf_options = r.string()?;
    if r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let private = r.string()?;

    let mut p = Reader(private);
    let checks = p.take(8)?;
    let key_type = p.string()?;
    if key_type != P256 {
        return None;
    }
    let curve = p.string()?;
    let point = p.string()?;
    let scalar = p.string()?;
    let comment = p.string()?;
    if scalar.is_empty() || scalar.len() >= SCALAR {
        return None;
    }

    let mut padded = vec![0u8; SCALAR - scalar.len()];
    padded.extend_from_slice(scalar);
    let mut section = checks.to_vec();
    for field in [key_type, curve, point, &padded, comment] {
        put_string(&mut section, field);
    }
    let mut pad = 1u8;
    while section.len() % 8 != 0 {
        section.push(pad);
        pad += 1;
    }

    let mut out = MAGIC.to_vec();
    for field in [cipher, kdf, kdf_options] {
        put_string(&mut out, field);
    }
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, public);
    put_string(&mut out, &section);
    let encoded = BASE64.encode(&out);
    let mut pem = String::from(BEGIN);
    pem.push('\n');
    for line in encoded.as_bytes().chunks(70) {
        pem.push_str(std::str::from_utf8(line).ok()?);
        pem.push('\n');
    }
    pem.push_str(END);
    pem.push('\n');
    Some(pem)
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s);
}

/// Bounded reads from a key blob: every length is checked against what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar of an unencrypted P-256 key file, as stored.
    fn scalar_len(text: &str) -> usize {
        let body: String = text
            .lines()
            .skip_while(|l| *l != BEGIN)
            .skip(1)
            .take_while(|l| *l != END)
            .collect();
        let blob = BASE64.decode(body.as_bytes()).expect("base64");
        let mut r = Reader(&blob[MAGIC.len()..]);
        for _ in 0..3 {
            r.string().expect("header");
        }
        r.u32().expect("nkeys");
        r.string().expect("public");
        let mut p = Reader(r.string().expect("private"));
        p.take(8).expect("checks");
        for _ in 0..3 {
            p.string().expect("field");
        }
        p.string().expect("scalar").len()
    }

    /// ssh-keygen until a key with a 31-byte scalar comes out (one in 256 on average; the
    /// chance of none in 4000 tries is below 2e-7), then: ssh-key refuses the file as
    /// written, and loads the mended one with the same public key.
    #[test]
    fn a_p256_key_with_a_short_scalar_loads_once_padded() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("id");
        let mut found = None;
        for _ in 0..4000 {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("pub"));
            let ok = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f"])
                .arg(&path)
                .status()
                .expect("ssh-keygen")
                .success();
            assert!(ok);
            let text = std::fs::read_to_string(&path).expect("key");
            if scalar_len(&text) < SCALAR {
                found = Some(text);
                break;
            }
        }
        let text = found.expect("a short scalar within 4000 keys");
        assert!(russh::keys::decode_secret_key(&text, None).is_err());
        let mended = pad_short_p256_scalar(&text).expect("mended");
        let key = russh::keys::decode_secret_key(&mended, None).expect("loads");
        let public = std::fs::read_to_string(path.with_extension("pub")).expect("pub");
        let expected = public.split_whitespace().nth(1).expect("base64 part");
        assert_eq!(
            key.public_key()
                .to_openssh()
                .expect("openssh")
                .split_whitespace()
                .nth(1),
            Some(expected)
        );
    }

    #[test]
    fn other_keys_are_left_alone() {
        assert_eq!(pad_short_p256_scalar("not a key"), None);
        assert_eq!(
            pad_short_p256_scalar(&format!("{BEGIN}\n!!!\n{END}\n")),
            None
        );
    }
}
