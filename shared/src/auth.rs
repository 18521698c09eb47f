//! JWT verification.
//!
//! Two kinds of keys: an HS256 shared secret for local/dev, and public keys
//! (RS256, ES256, EdDSA) from a JWK set, chosen by the token's `kid`, for
//! production issuers. The algorithm is always pinned by the key, never taken
//! from the token: a token whose header names another algorithm than its key
//! is refused, which closes `alg: none` and the HS256-with-a-public-key trick.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, DEFAULT_JWT_SECRET_FILE};
use crate::ids::UserId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no JWT key configured: set CHAT_JWT_SECRET, CHAT_JWT_SECRET_FILE or CHAT_JWT_JWKS_FILE"
    )]
    NoKeys,
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("JWK set {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error(
        "the HS256 secret from {origin} is {bytes} bytes; at least {MIN_SECRET_BYTES} are required \
         (e.g. `openssl rand -hex 32`)"
    )]
    ShortSecret { origin: String, bytes: usize },
    #[error(
        "CHAT_JWT_JWKS_FILE needs CHAT_JWT_AUDIENCE: tokens of a shared issuer must name this service"
    )]
    NoAudience,
}

/// The shortest HS256 secret accepted: RFC 7518 asks for a key at least as
/// long as the hash (256 bits); a shorter one can be brute-forced offline
/// from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The configured HS256 secret and where it came from, by the rules of
/// [`Config::jwt_secret_file`]: `CHAT_JWT_SECRET`, else the named file
/// (which must exist), else the default file of a local run, but only when
/// no JWK set is configured. A secret under [`MIN_SECRET_BYTES`] is refused.
fn shared_secret(config: &Config) -> Result<Option<(String, String)>, KeyError> {
    shared_secret_or(config, std::path::Path::new(DEFAULT_JWT_SECRET_FILE))
}

/// [`shared_secret`] with `default` standing for the default file (tests).
fn shared_secret_or(
    config: &Config,
    default: &std::path::Path,
) -> Result<Option<(String, String)>, KeyError> {
    let found = match (&config.jwt_secret, &config.jwt_secret_file) {
        (Some(secret), _) => Some((secret.clone(), "CHAT_JWT_SECRET".to_string())),
        (None, Some(path)) => {
            let secret = read_secret_file(path)?.ok_or_else(|| KeyError::Read {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "missing or empty (CHAT_JWT_SECRET_FILE names it)",
                ),
            })?;
            Some((secret, format!("{} (CHAT_JWT_SECRET_FILE)", path.display())))
        }
        (None, None) if config.jwt_jwks_file.is_none() => {
            read_secret_file(default)?.map(|secret| {
                let source = format!("{} (the default file; no JWK set)", default.display());
                (secret, source)
            })
        }
        (None, None) => None,
    };
    if let Some((secret, source)) = &found {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret {
                origin: source.clone(),
                bytes: secret.len(),
            });
        }
    }
    Ok(found)
}

/// The claims this system reads. Unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings (RFC 7519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// A verified token: who it is for, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// The token's `exp` plus the allowed clock skew, in seconds since the
    /// epoch: a connection authenticated by it ends then unless refreshed.
    pub valid_until: u64,
    /// The token's `iat`, if it has one: an operator's revocation refuses
    /// tokens issued before it (`moderation::Revocation`).
    pub issued_at: Option<u64>,
}

struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

pub struct Verifier {
    shared_secret: Option<Key>,
    /// Where the keys came from, for the start-up log.
    sources: Vec<String>,
    by_kid: HashMap<String, Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl Verifier {
    /// Builds the verifier from the configured secret and/or JWK set.
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let secret = shared_secret(config)?;
        let mut sources = Vec::new();
        if let Some((_, source)) = &secret {
            sources.push(format!("HS256 secret from {source}"));
        }
        let mut by_kid = HashMap::new();
        if let Some(path) = &config.jwt_jwks_file {
            if config.jwt_audience.is_none() {
                return Err(KeyError::NoAudience);
            }
            let display = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: display.clone(),
                source,
            })?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| KeyError::Jwks {
                path: display.clone(),
                reason: e.to_string(),
            })?;
            for jwk in &set.keys {
                let bad = |reason: &str| KeyError::Jwks {
                    path: display.clone(),
                    reason: reason.to_string(),
                };
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| bad("a key has no kid"))?;
                let algorithm = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| Algorithm::try_from(a).ok())
                    .ok_or_else(|| bad("every key needs an alg (RS256, ES256 or EdDSA)"))?;
                if !matches!(
                    algorithm,
                    Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
                ) {
                    return Err(bad("only RS256, ES256 and EdDSA keys are accepted"));
                }
                let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(&e.to_string()))?;
                by_kid.insert(kid, Key { key, algorithm });
            }
            let mut kids: Vec<&str> = by_kid.keys().map(String::as_str).collect();
            kids.sort_unstable();
            sources.push(format!("JWK set {display} (kids {})", kids.join(", ")));
        }
        if secret.is_none() && by_kid.is_empty() {
            return Err(KeyError::NoKeys);
        }
        Ok(Self {
            shared_secret: secret.map(|(s, _)| Key {
                key: DecodingKey::from_secret(s.as_bytes()),
                algorithm: Algorithm::HS256,
            }),
            sources,
            by_kid,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: config.jwt_leeway,
        })
    }

    /// Where this verifier's keys came from (`HS256 secret from …`,
    /// `JWK set … (kids …)`), for the start-up log.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .ok_or_else(|| AuthError::Invalid(format!("unknown kid {kid:?}")))?,
            None => self
                .shared_secret
                .as_ref()
                .ok_or_else(|| AuthError::Invalid("a kid is required".into()))?,
        };
        if header.alg != key.algorithm {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} does not match the key",
                header.alg
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid(e.to_string()),
                }
            })?;
        let user =
            UserId::parse(data.claims.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok(Identity {
            user,
            valid_until: data.claims.exp.saturating_add(self.leeway.as_secs()),
            issued_at: data.claims.iat,
        })
    }
}

fn read_secret_file(path: &std::path::Path) -> Result<Option<String>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The configured HS256 secret, for tools that mint dev tokens (the one an
/// edge of the same settings verifies with).
pub fn dev_secret(config: &Config) -> Result<String, KeyError> {
    shared_secret(config)?
        .map(|(secret, _)| secret)
        .ok_or(KeyError::NoKeys)
}

pub use crate::clock::now_secs;

/// Signs an HS256 token for `user`, valid for `ttl` (dev tools and tests).
pub fn mint_hs256(secret: &str, user: &UserId, ttl: Duration) -> Result<String, AuthError> {
    let now = now_secs();
    let claims = Claims {
        sub: user.to_string(),
        exp: now + ttl.as_secs(),
        nbf: None,
        iat: Some(now),
        iss: None,
        aud: None,
    };
    sign(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Signs arbitrary claims (tests of the verifier use this for bad tokens).
pub fn sign<T: Serialize>(
    header: &Header,
    claims: &T,
    key: &EncodingKey,
) -> Result<String, AuthError> {
    jsonwebtoken::encode(header, claims, key).map_err(|e| AuthError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-test-secret-test-secret";

    fn verifier() -> Verifier {
        let config = Config {
            jwt_secret: Some(SECRET.into()),
            jwt_leeway: Duration::from_secs(0),
            ..Config::default()
        };
        Verifier::from_config(&config).unwrap()
    }

    fn claims(sub: &str, exp_offset: i64) -> Claims {
        Claims {
            sub: sub.into(),
            exp: (now_secs() as i64 + exp_offset) as u64,
            nbf: None,
            iat: None,
            iss: None,
            aud: None,
        }
    }

    fn hs(claims: &Claims) -> String {
        sign(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies() {
        let alice = UserId::parse("alice").unwrap();
        let token = mint_hs256(SECRET, &alice, Duration::from_secs(60)).unwrap();
        assert_eq!(verifier().verify(&token).unwrap().user, alice);
    }

    #[test]
    fn expired_tokens_say_so() {
        assert_eq!(
            verifier().verify(&hs(&claims("alice", -10))),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn refused_tokens() {
        let v = verifier();
        let mut future = claims("alice", 600);
        future.nbf = Some(now_secs() + 300);
        let wrong_key = sign(
            &Header::new(Algorithm::HS256),
            &claims("alice", 600),
            &EncodingKey::from_secret(b"another-secret"),
        )
        .unwrap();
        // alg none: header {"alg":"none"} and an empty signature.
        let none = {
            let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
            let good = hs(&claims("alice", 600));
            let payload = good.split('.').nth(1).unwrap().to_string();
            format!("{header}.{payload}.")
        };
        let tampered = {
            let good = hs(&claims("alice", 600));
            let other = hs(&claims("mallory", 600));
            let parts: Vec<_> = good.split('.').collect();
            let payload = other.split('.').nth(1).unwrap();
            format!("{}.{}.{}", parts[0], payload, parts[2])
        };
        let mut with_kid = Header::new(Algorithm::HS256);
        with_kid.kid = Some("unknown".into());
        let unknown_kid = sign(
            &with_kid,
            &claims("alice", 600),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        for (what, token) in [
            ("future nbf", hs(&future)),
            ("bad sub", hs(&claims("al.ice", 600))),
            ("wrong key", wrong_key),
            ("alg none", none),
            ("tampered", tampered),
            ("unknown kid", unknown_kid),
            ("garbage", "not.a.jwt".to_string()),
        ] {
            assert!(
                matches!(v.verify(&token), Err(AuthError::Invalid(_))),
                "{what} accepted"
            );
        }
    }

    /// Ed25519 test keys made for this test (`openssl genpkey -algorithm
    /// ed25519`); they sign nothing outside it.
    const ED25519_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIN24vUwpLSbDSLyhozcDCCJxCGNjOg6cUVjlxS4aZXOw
-----END PRIVATE KEY-----
";
    const OTHER_ED25519_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIEtQpJxeYUVy3Ul6ArqE7OmBkKv1KOO1EwwZUEnv7lii
-----END PRIVATE KEY-----
";

    fn ed_key(pem: &str) -> EncodingKey {
        EncodingKey::from_ed_pem(pem.as_bytes()).unwrap()
    }

    fn eddsa(kid: Option<&str>, claims: &Claims, key: &EncodingKey) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_string);
        sign(&header, claims, key).unwrap()
    }

    /// A verifier that trusts only a JWK set holding the public half of
    /// `ED25519_KEY` as `kid` "ed-1" (no shared secret).
    fn eddsa_verifier() -> Verifier {
        use jsonwebtoken::jwk::Jwk;
        let mut jwk = Jwk::from_encoding_key(&ed_key(ED25519_KEY), Algorithm::EdDSA).unwrap();
        jwk.common.key_id = Some("ed-1".into());
        let dir = std::env::temp_dir();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("chat-auth-eddsa-{}-{n}", std::process::id());
        let jwks = dir.join(format!("{tag}.json"));
        std::fs::write(
            &jwks,
            serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
        )
        .unwrap();
        let config = Config {
            jwt_secret: None,
            jwt_jwks_file: Some(jwks.clone()),
            jwt_audience: Some("chat".into()),
            jwt_leeway: Duration::from_secs(0),
            ..Config::default()
        };
        let verifier = Verifier::from_config(&config);
        let _ = std::fs::remove_file(&jwks);
        verifier.unwrap()
    }

    /// [`claims`] for this service's audience, as a JWK set requires.
    fn for_chat(sub: &str, exp_offset: i64) -> Claims {
        Claims {
            aud: Some(serde_json::json!("chat")),
            ..claims(sub, exp_offset)
        }
    }

    #[test]
    fn an_ed25519_token_verifies_with_its_configured_key() {
        let v = eddsa_verifier();
        let token = eddsa(Some("ed-1"), &for_chat("alice", 600), &ed_key(ED25519_KEY));
        let identity = v.verify(&token).unwrap();
        assert_eq!(identity.user, UserId::parse("alice").unwrap());
        // Expiry is checked for EdDSA as for HS256.
        let expired = eddsa(Some("ed-1"), &for_chat("alice", -10), &ed_key(ED25519_KEY));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn an_ed25519_token_signed_by_another_key_is_refused() {
        let v = eddsa_verifier();
        let good = eddsa(Some("ed-1"), &for_chat("alice", 600), &ed_key(ED25519_KEY));
        assert!(v.verify(&good).is_ok(), "the control token must verify");
        let other_key = eddsa(
            Some("ed-1"),
            &for_chat("alice", 600),
            &ed_key(OTHER_ED25519_KEY),
        );
        let tampered = {
            let other = eddsa(
                Some("ed-1"),
                &for_chat("mallory", 600),
                &ed_key(ED25519_KEY),
            );
            let parts: Vec<_> = good.split('.').collect();
            let payload = other.split('.').nth(1).unwrap();
            format!("{}.{}.{}", parts[0], payload, parts[2])
        };
        let no_kid = eddsa(None, &for_chat("alice", 600), &ed_key(ED25519_KEY));
        let unknown_kid = eddsa(Some("ed-2"), &for_chat("alice", 600), &ed_key(ED25519_KEY));
        for (what, token) in [
            ("signed by another key", other_key),
            ("tampered payload", tampered),
            ("no kid and no shared secret", no_kid),
            ("unknown kid", unknown_kid),
        ] {
            assert!(
                matches!(v.verify(&token), Err(AuthError::Invalid(_))),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let config = Config {
            jwt_secret: Some(SECRET.into()),
            jwt_issuer: Some("https://issuer".into()),
            jwt_audience: Some("chat".into()),
            ..Config::default()
        };
        let v = Verifier::from_config(&config).unwrap();
        let mut good = claims("alice", 600);
        good.iss = Some("https://issuer".into());
        good.aud = Some(serde_json::json!(["other", "chat"]));
        assert!(v.verify(&hs(&good)).is_ok());
        let mut wrong_aud = good.clone();
        wrong_aud.aud = Some(serde_json::json!("other"));
        assert!(v.verify(&hs(&wrong_aud)).is_err());
        let mut no_iss = good.clone();
        no_iss.iss = None;
        assert!(v.verify(&hs(&no_iss)).is_err());
    }

    #[test]
    fn a_jwk_set_needs_an_audience_and_tokens_must_carry_it() {
        let v = eddsa_verifier();
        let key = ed_key(ED25519_KEY);
        assert!(v
            .verify(&eddsa(Some("ed-1"), &for_chat("alice", 600), &key))
            .is_ok());
        let no_aud = eddsa(Some("ed-1"), &claims("alice", 600), &key);
        let mut other = for_chat("alice", 600);
        other.aud = Some(serde_json::json!("billing"));
        let other_aud = eddsa(Some("ed-1"), &other, &key);
        for (what, token) in [("no aud", no_aud), ("another aud", other_aud)] {
            assert!(
                matches!(v.verify(&token), Err(AuthError::Invalid(_))),
                "{what} accepted"
            );
        }
        // Configured without an audience, the edge does not start.
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("empty.json");
        std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
        let config = Config {
            jwt_jwks_file: Some(jwks),
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        };
        assert!(matches!(
            Verifier::from_config(&config),
            Err(KeyError::NoAudience)
        ));
    }

    #[test]
    fn secrets_under_32_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("short");
        std::fs::write(&file, "0123456789abcdef0123456789abcde\n").unwrap();
        for config in [
            Config {
                jwt_secret: Some("secret".into()),
                ..Config::default()
            },
            Config {
                jwt_secret_file: Some(file),
                ..Config::default()
            },
        ] {
            let refused = Verifier::from_config(&config).err();
            assert!(
                matches!(refused, Some(KeyError::ShortSecret { bytes, .. }) if bytes < 32),
                "{refused:?}"
            );
            assert!(dev_secret(&config).is_err());
        }
        let config = Config {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Config::default()
        };
        assert!(Verifier::from_config(&config).is_ok());
    }

    #[test]
    fn the_default_secret_file_is_read_only_without_a_jwk_set() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("jwt_secret");
        std::fs::write(&default, format!("{SECRET}\n")).unwrap();
        let plain = Config::default();
        let (secret, source) = shared_secret_or(&plain, &default).unwrap().unwrap();
        assert_eq!(secret, SECRET);
        assert!(source.contains("default file"), "{source}");
        let with_jwks = Config {
            jwt_jwks_file: Some(dir.path().join("jwks.json")),
            ..Config::default()
        };
        assert!(shared_secret_or(&with_jwks, &default).unwrap().is_none());
        // Named, it is read with a JWK set too; a named file that is missing
        // is an error, not a silent fallback.
        let named = Config {
            jwt_secret_file: Some(default.clone()),
            ..with_jwks.clone()
        };
        let (_, source) = shared_secret_or(&named, &default).unwrap().unwrap();
        assert!(source.contains("CHAT_JWT_SECRET_FILE"), "{source}");
        let missing = Config {
            jwt_secret_file: Some(dir.path().join("nope")),
            ..Config::default()
        };
        assert!(matches!(
            shared_secret_or(&missing, &default),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn the_verifier_names_its_key_sources() {
        let v = eddsa_verifier();
        assert_eq!(v.sources().len(), 1);
        assert!(v.sources()[0].starts_with("JWK set "), "{:?}", v.sources());
        assert!(v.sources()[0].contains("ed-1"), "{:?}", v.sources());
        assert_eq!(verifier().sources(), ["HS256 secret from CHAT_JWT_SECRET"]);
    }
}
