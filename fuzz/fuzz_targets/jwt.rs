//! `auth::Verifier::verify` on arbitrary tokens, with both kinds of keys: an
//! HS256 secret, and a JWK set (RS256, ES256, EdDSA public keys chosen by
//! `kid`) with an issuer and an audience to check.
//!
//! Invariant: nobody without a private key can produce a valid token, so
//! every input is refused with an `Err`, never a panic.
//!
//! The first byte picks the input's form: even, the rest is the token as
//! text; odd, the rest is split at NUL bytes into header, claims and
//! signature, each base64url-encoded here, so the fuzzer mutates the JSON
//! inside a token instead of having to discover base64.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chat_shared::auth::Verifier;
use chat_shared::Config;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret";

/// Public keys from RFC 7517 (appendix A.1) and RFC 8037 (appendix A.2).
const JWKS: &str = r#"{"keys":[
  {"kty":"RSA","kid":"rs","alg":"RS256","e":"AQAB",
   "n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"},
  {"kty":"EC","kid":"ec","alg":"ES256","crv":"P-256",
   "x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
   "y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
  {"kty":"OKP","kid":"ed","alg":"EdDSA","crv":"Ed25519",
   "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
]}"#;

static VERIFIERS: LazyLock<[Verifier; 2]> = LazyLock::new(|| {
    let secret_only = Config {
        jwt_secret: Some(SECRET.into()),
        jwt_leeway: Duration::from_secs(0),
        ..Config::default()
    };
    let path = std::env::temp_dir().join(format!("chat-fuzz-jwks-{}.json", std::process::id()));
    std::fs::write(&path, JWKS).expect("write the JWK set");
    let with_jwks = Config {
        jwt_secret: Some(SECRET.into()),
        jwt_jwks_file: Some(path.clone()),
        jwt_issuer: Some("https://issuer.example".into()),
        jwt_audience: Some("chat".into()),
        ..Config::default()
    };
    let verifiers = [
        Verifier::from_config(&secret_only).expect("HS256 verifier"),
        Verifier::from_config(&with_jwks).expect("JWK set verifier"),
    ];
    let _ = std::fs::remove_file(path);
    verifiers
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        rest.splitn(3, |b| *b == 0)
            .map(|part| URL_SAFE_NO_PAD.encode(part))
            .collect::<Vec<_>>()
            .join(".")
    };
    for verifier in VERIFIERS.iter() {
        if let Ok(identity) = verifier.verify(&token) {
            panic!("{token:?} verified as {identity:?}");
        }
    }
});
