//! Base64 decoding with Nix's leniency.

/// Decodes base64 the way Nix's `base64Decode` does (src/libutil/util.cc in 2.8,
/// src/libutil/base-n.cc today; the behaviour is unchanged): decoding stops at the first `=`
/// (so padding is optional and anything after it is ignored), `\n` is skipped, and any other
/// character outside the standard alphabet is an error. Trailing bits that do not make a byte
/// are dropped.
pub(crate) fn nix_base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in s.chars() {
        let digit = match c {
            '=' => break,
            '\n' => continue,
            'A'..='Z' => c as u32 - 'A' as u32,
            'a'..='z' => c as u32 - 'a' as u32 + 26,
            '0'..='9' => c as u32 - '0' as u32 + 52,
            '+' => 62,
            '/' => 63,
            _ => return Err(format!("invalid character in Base64 string: {c:?}")),
        };
        acc = (acc << 6 | digit) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            #[allow(clippy::cast_possible_truncation)] // masked to 8 bits
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::nix_base64_decode;

    #[test]
    fn decodes_like_nix() {
        assert_eq!(nix_base64_decode("aGVsbG8=").as_deref(), Ok(&b"hello"[..]));
        assert_eq!(nix_base64_decode("aGVsbG8").as_deref(), Ok(&b"hello"[..]));
        assert_eq!(
            nix_base64_decode("aGVs\nbG8=garbage!").as_deref(),
            Ok(&b"hello"[..])
        );
        assert_eq!(nix_base64_decode("").as_deref(), Ok(&b""[..]));
        assert!(nix_base64_decode("aGVs bG8").is_err());
        assert!(nix_base64_decode("a-b_").is_err());
    }
}
