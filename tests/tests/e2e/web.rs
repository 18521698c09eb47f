//! The web client: served by the edge with a CSP, the dev-only token
//! endpoint, and a real browser (Debian's chromium driven by playwright-core,
//! `web/tests/browser.mjs`) chatting through a whole system.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chat_tests::{http_get, wait_until, System};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// One HTTP/1.1 request (`Connection: close`), read to the end.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP response: {response}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

async fn dev_token(system: &System, body: &str) -> Result<Reply> {
    http(
        system.edge_addr,
        "POST",
        "/v1/dev/token",
        &[("Content-Type", "application/json")],
        body,
    )
    .await
}

#[tokio::test]
async fn dev_tokens_are_off_by_default() -> Result<()> {
    let system = System::start().await?;
    assert!(!system.config.dev_tokens);
    let reply = dev_token(&system, r#"{"user":"alice"}"#).await?;
    assert_eq!(reply.status, 404, "{}", reply.body);
    // The client itself is always served; it then offers token sign-in.
    assert_eq!(http_get(system.edge_addr, "/").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn dev_tokens_sign_in_by_name_and_refuse_bad_input() -> Result<()> {
    let system = System::start_with(|c| c.dev_tokens = true).await?;
    let reply = dev_token(&system, r#"{"user":"alice"}"#).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let body = reply.json()?;
    assert_eq!(body["user"], "alice");
    assert_eq!(body["expires_in"], 3600);
    let token = body["token"].as_str().context("token")?;
    let client = system
        .connect_url(&system.ws_url(), token, "web-1", None)
        .await?;
    assert_eq!(client.welcome["user"], "alice");

    let short = dev_token(&system, r#"{"user":"bob","ttl_secs":30}"#)
        .await?
        .json()?;
    assert_eq!(short["expires_in"], 30);

    for bad in [
        r#"{"user":"a.b"}"#,
        r#"{"user":""}"#,
        r#"{"user":"chat.>"}"#,
        &format!(r#"{{"user":"{}"}}"#, "x".repeat(65)),
        r#"{"user":"alice","ttl_secs":1}"#,
        r#"{"user":"alice","ttl_secs":999999999}"#,
        r#"{"user":"alice","admin":true}"#,
        r#"{"name":"alice"}"#,
        "alice",
        "",
    ] {
        let reply = dev_token(&system, bad).await?;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert!(reply.json()?["error"].is_string(), "{bad}");
    }
    let huge = format!(r#"{{"user":"alice","pad":"{}"}}"#, "x".repeat(4096));
    assert_eq!(dev_token(&system, &huge).await?.status, 413);
    let get = http(system.edge_addr, "GET", "/v1/dev/token", &[], "").await?;
    assert_eq!(get.status, 405);
    Ok(())
}

#[tokio::test]
async fn dev_tokens_on_a_public_address_need_the_override() -> Result<()> {
    let system = System::start().await?;
    let public_edge = |override_set: bool| {
        let mut config = system.config_for("edge");
        config.dev_tokens = true;
        config.dev_tokens_public = override_set;
        async move {
            // Every interface: reachable from other hosts.
            let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
            let port = listener.local_addr()?.port();
            let running = tokio::spawn(chat_edge::run(
                config,
                listener,
                Box::pin(std::future::pending()),
            ));
            anyhow::Ok((port, running))
        }
    };
    let (_, refused) = public_edge(false).await?;
    let refused = tokio::time::timeout(chat_tests::WAIT, refused).await??;
    match refused {
        Err(chat_edge::EdgeError::PublicDevTokens { addr }) => {
            assert!(addr.ip().is_unspecified(), "{addr}");
        }
        other => bail!("the edge started with public dev tokens: {other:?}"),
    }
    // With the override it serves them (here reached over loopback).
    let (port, running) = public_edge(true).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(|| async { http_get(addr, "/readyz").await.is_ok_and(|(s, _)| s == 200) }).await?;
    let reply = http(
        addr,
        "POST",
        "/v1/dev/token",
        &[("Content-Type", "application/json")],
        r#"{"user":"alice"}"#,
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    running.abort();
    Ok(())
}

#[tokio::test]
async fn the_web_client_is_served_with_types_a_csp_and_etags() -> Result<()> {
    let system = System::start().await?;
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/client.js", "text/javascript; charset=utf-8"),
        ("/ui.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/icon.svg", "image/svg+xml"),
    ] {
        let reply = http(system.edge_addr, "GET", path, &[], "").await?;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), Some(content_type), "{path}");
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        let csp = reply.header("content-security-policy").context("CSP")?;
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        let etag = reply.header("etag").context("etag")?.to_string();
        let again = http(
            system.edge_addr,
            "GET",
            path,
            &[("If-None-Match", &etag)],
            "",
        )
        .await?;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
    }
    let index = http(system.edge_addr, "GET", "/", &[], "").await?;
    assert!(index
        .body
        .contains(r#"<script type="module" src="/app.js">"#));
    assert_eq!(http_get(system.edge_addr, "/nope.js").await?.0, 404);
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// What the browser test needs, or why it cannot run. Missing tools fail
/// the test: a browser test that silently passes proves nothing.
fn browser_prerequisites(web: &Path) -> Result<PathBuf> {
    let chromium = std::env::var_os("CHAT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        missing.push("node (Node.js 20 or later)".to_string());
    }
    if !web
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push("web/node_modules (npm ci in web/)".to_string());
    }
    if !chromium.exists() {
        missing.push(format!("{} (Debian package chromium)", chromium.display()));
    }
    if !missing.is_empty() {
        bail!(
            "the browser test cannot run, missing: {}. Run ./scripts/test, which installs them",
            missing.join(", ")
        );
    }
    Ok(chromium)
}

/// Two people (and a third on a phone-sized screen) chat 1:1 and in a group
/// in real browsers: friends and presence, typing, receipts, a reload that
/// loses nothing and shows nothing twice, token refresh, and a drain of the
/// edge that served the page. Screenshots: `target/web-artifacts/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_chats_reloads_and_follows_a_drain() -> Result<()> {
    let root = repo_root();
    let web = root.join("web");
    let chromium = browser_prerequisites(&web)?;
    let artifacts = root.join("target").join("web-artifacts");
    let system = System::start_with(|c| {
        c.dev_tokens = true;
        // Bob's 5 s tokens must be refreshed in time, not saved by leeway.
        c.jwt_leeway = Duration::ZERO;
    })
    .await?;
    // The page comes from a second edge, which the test drains at the end:
    // its clients must follow `reconnect` to the first.
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let (page_edge, page_edge_run) = system
        .start_edge_task(Box::pin(async move {
            let _ = drained.await;
        }))
        .await?;
    wait_until(|| async {
        let Ok((200, body)) = http_get(page_edge, "/v1/edges").await else {
            return false;
        };
        serde_json::from_str::<Value>(&body)
            .is_ok_and(|v| v["edges"].as_array().is_some_and(|e| e.len() == 2))
    })
    .await
    .context("both edges in discovery")?;

    let mut node = tokio::process::Command::new("node")
        .arg("tests/browser.mjs")
        .current_dir(&web)
        .env("CHAT_WEB_URL", format!("http://{page_edge}/"))
        .env("CHAT_WEB_ARTIFACTS", &artifacts)
        .env("CHAT_CHROMIUM", &chromium)
        .env("CHAT_WEB_DRAIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node web/tests/browser.mjs")?;
    let mut stdin = node.stdin.take().context("node stdin")?;
    let stdout = node.stdout.take().context("node stdout")?;
    let mut drain = Some(drain);
    let run = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            println!("{line}");
            if line == "@@drain" {
                if let Some(drain) = drain.take() {
                    let _ = drain.send(());
                }
                stdin.write_all(b"drained\n").await?;
                stdin.flush().await?;
            }
        }
        anyhow::Ok(node.wait().await?)
    };
    let status = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .context("web/tests/browser.mjs still running after 240 s")??;
    println!("screenshots: {}", artifacts.display());
    if !status.success() {
        bail!(
            "web/tests/browser.mjs failed ({status}); see its output above and the screenshots in {}",
            artifacts.display()
        );
    }
    // The drained edge finished cleanly once its clients had left.
    let ended = tokio::time::timeout(Duration::from_secs(30), page_edge_run)
        .await
        .context("the drained edge did not stop")??;
    ended.map_err(|e| anyhow!("the drained edge failed: {e}"))?;
    Ok(())
}
