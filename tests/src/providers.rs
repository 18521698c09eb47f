//! Stand-ins for the push providers, for pushd's end-to-end tests.
//!
//! Each [`FakeProvider`] is a local HTTP server (HTTP/1.1, and HTTP/2 over
//! cleartext with prior knowledge, as pushd speaks to APNs) that records
//! every request and answers from a script, then with a default answer.
//! Answers can be held back ([`FakeProvider::hold_answers`]): the request is
//! recorded at once, its answer leaves only when released, so a test can
//! look at what pushd does while a provider has not accepted yet.
//! The FCM stand-in also serves Google's OAuth token endpoint at `/token`:
//! it checks the RS256 assertion against the test service account's public
//! key and hands out `ya29.fake-<n>` access tokens.
//!
//! The keys below are test keys made for this file (`openssl genpkey`);
//! they sign nothing outside these tests.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chat_shared::Config;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{oneshot, watch};

pub const FCM_PROJECT: &str = "chat-test";
pub const FCM_CLIENT_EMAIL: &str = "pushd@chat-test.iam.gserviceaccount.com";
pub const FCM_KEY_ID: &str = "fcm-test-key-1";
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const APNS_KEY_ID: &str = "ABC123DEFG";
pub const APNS_TEAM_ID: &str = "DEF123GHIJ";
pub const APNS_TOPIC: &str = "com.example.chat";
pub const WEBHOOK_SECRET: &str = "webhook-test-secret";

/// RSA 2048, PKCS#8, as in a Google service-account key file.
pub const FCM_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCUAonfNyNzzQsu
LXmaEvWUWbfhv6q+JLVA4ZrWkMWwnwF4cU990mMyV30Jkkz9eF37n4FCg9BJ4dMG
BAOTUeeLl/nzjdNWA8LAmVBkAdqvTMV6iunv0nm/IPBhHhc9nyGVEpYVskcTQGi2
qszrct9b9HtQOh0FOuxKlyM1W/a/0BMZRrvpdCvdSIfbaUV1HIJ12MalXyFcaKeU
D7/eaOogJURfH+umI7U/CvW97KcmHJlvijxczRCjQc1FHIOcCpco74AHcvlGuoHy
ITfYVV51tmDnwLq7li4k64BH/jdRihKmZxDWwKzR3R3Z9wEmUg/5TbTM4wNs+vkr
xJqJcVj5AgMBAAECggEAJ6aqct8do0c6CIvsOMd9fNmwNk0Xm8rPt+r4hSTRoShn
x3Frn0R+iJ0BhU/pSjo1y1QG19/iK/jQhJsMrinSAwaa0pGbHT7yrJAmBjSs9it1
+AdA9puHPBnB6/KYvUxlPb9176gL/G9T3iPRs/3ZMpRDeNGotp77cFwe9YuGhgn6
vV2GBjSFEvbMHNiCBIHRfiocz7gss6WDKuZUdqjxMb092OZr3m31yZTRC85X12dD
TZ7lsQIOyEacYxEXQJNJHymLDdTN16auzFtr8p6dtnvKHF8TUBFwBub8e7VFsmi0
Z2LzStioGVITkl7Q97Mvcw3AdZdukw06SmYQmLePdQKBgQDLlBIFX+MPaLnDAbAj
HUn6sdpBmeq64CDkmwU4nBKPscXSmPTzVu57zip+zM5tzIbWDLRvt78PkjzYgQvu
qJt6nmohJiCEW/pRi9mUeBYQi2xzJd3fmnWh8iolbH+GkOUCmn2x7gDu0yh+H32D
wGs6pCGnBqXr4b1DcB4dum7pUwKBgQC6H2Hk5QLtTsA2VxjJu86m2ktgfg/qfZbp
ETHZJYilQFWBk/Ja4TI3ruzR+h+dRxv4xOPWH7MnC5qixD9S+fVg5AKLyNA5KDeH
VNK1RC9ggS5Y5ZPyoctR4jHT5j6k+cSAkUAaip1COyf59tWm42YYRVz+uMCyyBc9
cc57xsxPAwKBgQDFC7strJQQdCNplxavxke2+bLx0FMdMpdj7pBtLNPidgWuRBLD
/h6zgugq933PVSolwQJdKBMstTVjsfSkulpTo0XCdC8BLi3qBF1DkcB5nxoHkl1h
cxXs/ILC2nPNAi5ICNUlBeOtRoFpIn3QqsyfZAKWsp6i5ErXHYxo5e04tQKBgDm6
WButqF3Aaj+wfgC8HpmD5ZM1JmydrXv2mFZ4nMxciujY4Xesl23L9KogAUQ/9P4Q
23XjeSaoI7tOUTHEU4ZM0jlW/LZtseNovL36OxOcnap28o9z/WMVXE0UAeQbkAYs
hwx0Z9hODtUp6RSNPXJTuUdMOIB7LTIipV+gxmfPAoGBAIfhL5D1wGGD3LnyCil4
F9cNaU3xhfHT/xjh3SrkhnxaRRNxhjVIcAygp12mdQTxdm7O98yXwy2ClRLYzTeZ
Mt1HR6/u24ni6YC+uzi27f3GxmmDEznjaNVXzZWD+DSG7ntbfVpPqK0t0Z1LtJbE
jhnv+2q8rdoMD+vtNe9aCuu2
-----END PRIVATE KEY-----
";

pub const FCM_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAlAKJ3zcjc80LLi15mhL1
lFm34b+qviS1QOGa1pDFsJ8BeHFPfdJjMld9CZJM/Xhd+5+BQoPQSeHTBgQDk1Hn
i5f5843TVgPCwJlQZAHar0zFeorp79J5vyDwYR4XPZ8hlRKWFbJHE0BotqrM63Lf
W/R7UDodBTrsSpcjNVv2v9ATGUa76XQr3UiH22lFdRyCddjGpV8hXGinlA+/3mjq
ICVEXx/rpiO1Pwr1veynJhyZb4o8XM0Qo0HNRRyDnAqXKO+AB3L5RrqB8iE32FVe
dbZg58C6u5YuJOuAR/43UYoSpmcQ1sCs0d0d2fcBJlIP+U20zOMDbPr5K8SaiXFY
+QIDAQAB
-----END PUBLIC KEY-----
";

/// P-256, PKCS#8: the form of Apple's `.p8` keys.
pub const APNS_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgcAvmBu/uY0EFunxW
Hetd3qORwh5gdE/K+VkiOiJMqTqhRANCAATohk6047gH9I1vGVyd+Ql7tou33ai6
REwvYmp9uPo2UTrfimJ4pVYc1NBf2YS55fg0aZboOdHvYJiQiTrTOJe6
-----END PRIVATE KEY-----
";

const APNS_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE6IZOtOO4B/SNbxlcnfkJe7aLt92o
ukRML2Jqfbj6NlE634pieKVWHNTQX9mEueX4NGmW6DnR72CYkIk60ziXug==
-----END PUBLIC KEY-----
";

/// One request a fake received, with what it answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).context("request body is not JSON")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub fn ok() -> Self {
        Self::status(200)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = body.to_string();
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, self.body).into_response();
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (
                axum::http::HeaderName::try_from(name),
                axum::http::HeaderValue::try_from(value),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

struct Script {
    requests: Vec<Recorded>,
    oauth: Vec<Recorded>,
    replies: VecDeque<Reply>,
    default: Reply,
    /// `true` while provider answers are held back.
    held: watch::Receiver<bool>,
}

type Shared = Arc<Mutex<Script>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Script> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A local HTTP server standing in for one provider; stopped on drop.
pub struct FakeProvider {
    pub addr: SocketAddr,
    script: Shared,
    hold: watch::Sender<bool>,
    _stop: oneshot::Sender<()>,
}

impl FakeProvider {
    /// Answers 200 with `default_body` unless scripted otherwise.
    pub async fn start(default_body: Value) -> Result<Self> {
        let (hold, held) = watch::channel(false);
        let script: Shared = Arc::new(Mutex::new(Script {
            requests: Vec::new(),
            oauth: Vec::new(),
            replies: VecDeque::new(),
            default: Reply::ok().json(default_body),
            held,
        }));
        let app = Router::new()
            .route("/token", post(oauth_token))
            .fallback(record)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            script,
            hold,
            _stop: stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OAuth token endpoint this fake serves.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.url())
    }

    /// Answers the next requests with `replies`, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.script).replies.extend(replies);
    }

    /// The answer once the script is used up.
    pub fn answer_by_default(&self, reply: Reply) {
        lock(&self.script).default = reply;
    }

    /// From now on, provider requests are recorded (with the status they
    /// will get) but not answered until [`FakeProvider::release_answers`].
    /// OAuth token requests are answered regardless.
    pub fn hold_answers(&self) {
        self.hold.send_replace(true);
    }

    /// Lets every held answer, and every later one, go out.
    pub fn release_answers(&self) {
        self.hold.send_replace(false);
    }

    /// Every provider request so far (OAuth requests excluded).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.script).requests.clone()
    }

    /// Every request to the OAuth token endpoint so far.
    pub fn oauth_requests(&self) -> Vec<Recorded> {
        lock(&self.script).oauth.clone()
    }
}

async fn read(request: Request) -> Result<(Recorded, HeaderMap), axum::Error> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1024 * 1024).await?;
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
        status: 0,
        at: Instant::now(),
    };
    Ok((recorded, parts.headers))
}

async fn record(State(script): State<Shared>, request: Request) -> Response {
    let Ok((mut recorded, _)) = read(request).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let (reply, mut held) = {
        let mut script = lock(&script);
        let reply = script
            .replies
            .pop_front()
            .unwrap_or_else(|| script.default.clone());
        recorded.status = reply.status;
        script.requests.push(recorded);
        (reply, script.held.clone())
    };
    // Dropped with the provider: then the answer goes out.
    let _ = held.wait_for(|held| !*held).await;
    reply.into_response()
}

/// Google's token endpoint: a JWT-bearer grant whose assertion must verify.
async fn oauth_token(State(script): State<Shared>, request: Request) -> Response {
    let Ok((mut recorded, headers)) = read(request).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let token_uri = format!("http://{host}/token");
    let checked = verify_oauth_request(&recorded.text(), &token_uri);
    let mut script = lock(&script);
    let reply = match checked {
        Ok(_) => {
            let n = script.oauth.len() + 1;
            Reply::ok().json(json!({
                "access_token": format!("ya29.fake-{n}"),
                "expires_in": 3599,
                "token_type": "Bearer",
            }))
        }
        Err(e) => Reply::status(400).json(json!({
            "error": "invalid_grant",
            "error_description": e.to_string(),
        })),
    };
    recorded.status = reply.status;
    script.oauth.push(recorded);
    reply.into_response()
}

/// Checks a token request (form-encoded) and returns the assertion's
/// claims: grant type, RS256 signature by the test key, `kid`, `iss`,
/// `scope`, `aud` = the token URI, and a one-hour lifetime.
pub fn verify_oauth_request(form: &str, token_uri: &str) -> Result<Value> {
    let fields: HashMap<String, String> =
        form_pairs(form).context("the token request is not a form")?;
    ensure!(
        fields.get("grant_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        "wrong grant_type: {fields:?}"
    );
    let assertion = fields.get("assertion").context("no assertion")?;
    let header = jsonwebtoken::decode_header(assertion)?;
    ensure!(header.alg == Algorithm::RS256, "alg {:?}", header.alg);
    ensure!(
        header.kid.as_deref() == Some(FCM_KEY_ID),
        "kid {:?}",
        header.kid
    );
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[token_uri]);
    validation.set_issuer(&[FCM_CLIENT_EMAIL]);
    let key = DecodingKey::from_rsa_pem(FCM_PUBLIC_KEY.as_bytes())?;
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)?.claims;
    ensure!(claims["scope"] == FCM_SCOPE, "scope {}", claims["scope"]);
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    ensure!(
        matches!((iat, exp), (Some(iat), Some(exp)) if exp == iat + 3600),
        "lifetime: iat {iat:?}, exp {exp:?}"
    );
    Ok(claims)
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_pairs(form: &str) -> Result<HashMap<String, String>> {
    form.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex)?;
                out.push(u8::from_str_radix(hex, 16).context("bad %-escape")?);
            }
            b => out.push(b),
        }
    }
    Ok(String::from_utf8(out)?)
}

/// Checks an APNs `authorization: bearer <JWT>` header: ES256 by the test
/// key, `kid` = key id, `iss` = team id, an `iat` within a minute of now.
/// Returns the claims.
pub fn verify_apns_authorization(value: &str) -> Result<Value> {
    let jwt = value
        .strip_prefix("bearer ")
        .ok_or_else(|| anyhow!("not a bearer token: {value}"))?;
    let header = jsonwebtoken::decode_header(jwt)?;
    ensure!(header.alg == Algorithm::ES256, "alg {:?}", header.alg);
    ensure!(
        header.kid.as_deref() == Some(APNS_KEY_ID),
        "kid {:?}",
        header.kid
    );
    let mut validation = Validation::new(Algorithm::ES256);
    // Apple's provider tokens carry no `exp`: they expire an hour after `iat`.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.set_issuer(&[APNS_TEAM_ID]);
    let key = DecodingKey::from_ec_pem(APNS_PUBLIC_KEY.as_bytes())?;
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)?.claims;
    let iat = claims["iat"].as_u64().context("no iat")?;
    ensure!(now().abs_diff(iat) < 60, "iat {iat} is not now");
    Ok(claims)
}

/// Checks a webhook's `X-Chat-Signature` against `secret` over
/// `<X-Chat-Timestamp>.<body>`, and that the timestamp is recent.
pub fn verify_webhook_signature(request: &Recorded, secret: &str) -> Result<()> {
    let timestamp = request
        .header("x-chat-timestamp")
        .context("no X-Chat-Timestamp")?;
    let signature = request
        .header("x-chat-signature")
        .context("no X-Chat-Signature")?;
    let hex = signature
        .strip_prefix("sha256=")
        .context("the signature is not sha256=<hex>")?;
    let expected = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .context("the signature is not hex")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    if mac.verify_slice(&expected).is_err() {
        bail!("the signature does not verify");
    }
    let sent: u64 = timestamp.parse().context("the timestamp is not a number")?;
    ensure!(now().abs_diff(sent) < 300, "timestamp {sent} is not recent");
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// FCM, APNs and a webhook receiver, with the key files pushd reads.
pub struct Fakes {
    pub fcm: FakeProvider,
    pub apns: FakeProvider,
    pub webhook: FakeProvider,
    dir: tempfile::TempDir,
}

impl Fakes {
    pub async fn start() -> Result<Self> {
        let fakes = Self {
            fcm: FakeProvider::start(json!({
                "name": format!("projects/{FCM_PROJECT}/messages/0:1")
            }))
            .await?,
            apns: FakeProvider::start(json!({})).await?,
            webhook: FakeProvider::start(json!({})).await?,
            dir: tempfile::tempdir()?,
        };
        let account = json!({
            "type": "service_account",
            "project_id": FCM_PROJECT,
            "private_key_id": FCM_KEY_ID,
            "private_key": FCM_PRIVATE_KEY,
            "client_email": FCM_CLIENT_EMAIL,
            "token_uri": fakes.fcm.token_uri(),
        });
        std::fs::write(fakes.fcm_credentials(), account.to_string())?;
        std::fs::write(fakes.apns_key(), APNS_PRIVATE_KEY)?;
        Ok(fakes)
    }

    fn fcm_credentials(&self) -> PathBuf {
        self.dir.path().join("service-account.json")
    }

    fn apns_key(&self) -> PathBuf {
        self.dir.path().join(format!("AuthKey_{APNS_KEY_ID}.p8"))
    }

    /// Points every provider of `config` at these fakes.
    pub fn configure(&self, config: &mut Config) {
        let push = &mut config.push;
        push.fcm_url = self.fcm.url();
        push.fcm_credentials = Some(self.fcm_credentials());
        push.apns_url = self.apns.url();
        push.apns_key_file = Some(self.apns_key());
        push.apns_key_id = Some(APNS_KEY_ID.into());
        push.apns_team_id = Some(APNS_TEAM_ID.into());
        push.apns_topic = Some(APNS_TOPIC.into());
        push.webhook_url = Some(format!("{}/hook", self.webhook.url()));
        push.webhook_secret = Some(WEBHOOK_SECRET.into());
    }

    /// Every provider request so far (OAuth requests excluded).
    pub fn all_requests(&self) -> Vec<Recorded> {
        let mut all = self.fcm.requests();
        all.extend(self.apns.requests());
        all.extend(self.webhook.requests());
        all
    }
}
