//! Lowercase hex, the one encoding of digests, MACs and ids made of bytes
//! (KV keys, media ids, signatures, `Nats-Msg-Id` details).

/// `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bytes = bytes.as_ref();
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn two_lowercase_digits_per_byte() {
        assert_eq!(encode([]), "");
        assert_eq!(encode([0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(encode("hi"), "6869");
    }
}
