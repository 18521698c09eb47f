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

use crate::config::Config;
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
    by_kid: HashMap<String, Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl Verifier {
    /// Builds the verifier from the configured secret and/or JWK set.
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let secret = match &config.jwt_secret {
            Some(secret) => Some(secret.clone()),
            None => read_secret_file(&config.jwt_secret_file)?,
        };
        let mut by_kid = HashMap::new();
        if let Some(path) = &config.jwt_jwks_file {
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
        }
        if secret.is_none() && by_kid.is_empty() {
            return Err(KeyError::NoKeys);
        }
        Ok(Self {
            shared_secret: secret.map(|s| Key {
                key: DecodingKey::from_secret(s.as_bytes()),
                algorithm: Algorithm::HS256,
            }),
            by_kid,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: config.jwt_leeway,
        })
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

/// The configured HS256 secret, for tools that mint dev tokens.
pub fn dev_secret(config: &Config) -> Result<String, KeyError> {
    match &config.jwt_secret {
        Some(secret) => Ok(secret.clone()),
        None => read_secret_file(&config.jwt_secret_file)?.ok_or(KeyError::NoKeys),
    }
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
            jwt_secret_file: dir.join(format!("{tag}.no-such-secret")),
            jwt_jwks_file: Some(jwks.clone()),
            jwt_leeway: Duration::from_secs(0),
            ..Config::default()
        };
        let verifier = Verifier::from_config(&config);
        let _ = std::fs::remove_file(&jwks);
        verifier.unwrap()
    }

    #[test]
    fn an_ed25519_token_verifies_with_its_configured_key() {
        let v = eddsa_verifier();
        let token = eddsa(Some("ed-1"), &claims("alice", 600), &ed_key(ED25519_KEY));
        let identity = v.verify(&token).unwrap();
        assert_eq!(identity.user, UserId::parse("alice").unwrap());
        // Expiry is checked for EdDSA as for HS256.
        let expired = eddsa(Some("ed-1"), &claims("alice", -10), &ed_key(ED25519_KEY));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn an_ed25519_token_signed_by_another_key_is_refused() {
        let v = eddsa_verifier();
        let good = eddsa(Some("ed-1"), &claims("alice", 600), &ed_key(ED25519_KEY));
        assert!(v.verify(&good).is_ok(), "the control token must verify");
        let other_key = eddsa(
            Some("ed-1"),
            &claims("alice", 600),
            &ed_key(OTHER_ED25519_KEY),
        );
        let tampered = {
            let other = eddsa(Some("ed-1"), &claims("mallory", 600), &ed_key(ED25519_KEY));
            let parts: Vec<_> = good.split('.').collect();
            let payload = other.split('.').nth(1).unwrap();
            format!("{}.{}.{}", parts[0], payload, parts[2])
        };
        let no_kid = eddsa(None, &claims("alice", 600), &ed_key(ED25519_KEY));
        let unknown_kid = eddsa(Some("ed-2"), &claims("alice", 600), &ed_key(ED25519_KEY));
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
}
