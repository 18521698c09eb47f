//! Short-lived signed media URLs (`media.url`): an HMAC-SHA256 over the
//! media id and the expiry, so an `<img>` tag can load a media without the
//! `Authorization` header. Access is checked when a URL is issued; the URL
//! itself is a bearer capability until it expires.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use chat_shared::ids::MediaId;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks media URLs with one key.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// The configured key, or (unset) a random one for this process.
    pub fn new(key: Option<&str>) -> Self {
        let key = match key {
            Some(key) => key.as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "CHAT_MEDIA_URL_KEY is not set: signed media URLs work only on this edge \
                     until it restarts; set the same key on every edge"
                );
                rand::random::<[u8; 32]>().to_vec()
            }
        };
        Self { key }
    }

    fn mac(&self, media: &MediaId, expires_ms: u64) -> HmacSha256 {
        // `new_from_slice` takes a key of any length.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(b"chat media url\n");
        mac.update(media.as_str().as_bytes());
        mac.update(b"\n");
        mac.update(expires_ms.to_string().as_bytes());
        mac
    }

    /// The signature (hex) of `media` until `expires_ms`.
    pub fn sign(&self, media: &MediaId, expires_ms: u64) -> String {
        chat_shared::hex::encode(self.mac(media, expires_ms).finalize().into_bytes())
    }

    /// Whether `signature` is ours for `media` and `expires_ms` is not past
    /// `now_ms` (compared in constant time).
    pub fn verify(&self, media: &MediaId, expires_ms: u64, signature: &str, now_ms: u64) -> bool {
        if expires_ms < now_ms {
            return false;
        }
        let Some(bytes) = from_hex(signature) else {
            return false;
        };
        self.mac(media, expires_ms).verify_slice(&bytes).is_ok()
    }
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_media_until_it_expires() {
        let signer = Signer::new(Some("0123456789abcdef0123456789abcdef"));
        let media = MediaId::of_digest(&[1; 32]);
        let other = MediaId::of_digest(&[2; 32]);
        let sig = signer.sign(&media, 1_000);
        assert!(signer.verify(&media, 1_000, &sig, 999));
        assert!(signer.verify(&media, 1_000, &sig, 1_000));
        assert!(!signer.verify(&media, 1_000, &sig, 1_001), "expired");
        assert!(!signer.verify(&media, 2_000, &sig, 999), "another expiry");
        assert!(!signer.verify(&other, 1_000, &sig, 999), "another media");
        let mut tampered = sig.clone().into_bytes();
        tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(!signer.verify(&media, 1_000, &tampered, 999));
        assert!(!signer.verify(&media, 1_000, "zz", 999));
        let stranger = Signer::new(Some("another key another key another k"));
        assert!(!stranger.verify(&media, 1_000, &sig, 999));
    }
}
