//! A minimal HTTP/1.1 client for the edge's media endpoints: one request
//! per connection (`Connection: close`), a body streamed from a reader,
//! and a response body handed over as it arrives, so a bench or a test can
//! move gigabytes without holding them. The edge sets `Content-Length` on
//! every media response; bodies are read to the end of the connection.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head read.
const MAX_HEAD: usize = 64 * 1024;

/// A response's status, headers and (unless streamed elsewhere) body.
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    /// Names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {}: not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `method path` with `headers` and a body of `length` bytes from
/// `body` (none when `length` is `None`); the response body goes to
/// `on_body` chunk by chunk. A response that comes before the body is
/// sent (a refusal on the headers) ends the upload.
pub async fn request<R, F>(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(u64, &mut R)>,
    mut on_body: F,
) -> anyhow::Result<Response>
where
    R: AsyncRead + Unpin,
    F: FnMut(&[u8]),
{
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some((length, _)) = &body {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes()).await?;
    let send = async {
        if let Some((length, body)) = body {
            let sent = tokio::io::copy(&mut body.take(length), &mut writer).await?;
            if sent != length {
                bail!("the body ended after {sent} of {length} bytes");
            }
        }
        writer.flush().await?;
        Ok::<_, anyhow::Error>(())
    };
    let receive = read_response(&mut reader, &mut on_body);
    tokio::pin!(receive);
    tokio::select! {
        sent = send => {
            // A server that refused early may have closed its side while
            // the body was on its way: its answer still counts.
            if let Err(e) = sent {
                tracing::debug!(error = %e, "request body not fully sent");
            }
            receive.await
        }
        response = &mut receive => response,
    }
}

async fn read_response<F: FnMut(&[u8])>(
    reader: &mut (impl AsyncRead + Unpin),
    on_body: &mut F,
) -> anyhow::Result<Response> {
    let mut buffer = Vec::with_capacity(8 * 1024);
    let mut chunk = vec![0; 64 * 1024];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > MAX_HEAD {
            bail!("response head too large");
        }
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            bail!("connection closed before a response");
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = std::str::from_utf8(&buffer[..head_end]).context("response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    on_body(&buffer[head_end + 4..]);
    loop {
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        on_body(&chunk[..read]);
    }
    Ok(Response {
        status,
        headers,
        body: Vec::new(),
    })
}

/// [`request`] with the response body collected (small bodies only).
pub async fn collect<R: AsyncRead + Unpin>(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(u64, &mut R)>,
) -> anyhow::Result<Response> {
    let mut collected = Vec::new();
    let mut response = request(addr, method, path, headers, body, |bytes| {
        collected.extend_from_slice(bytes)
    })
    .await?;
    response.body = collected;
    Ok(response)
}

/// `POST /v1/media` of `length` bytes from `body` as `user`'s `token`.
pub async fn upload<R: AsyncRead + Unpin>(
    addr: SocketAddr,
    token: &str,
    content_type: &str,
    length: u64,
    body: &mut R,
) -> anyhow::Result<Response> {
    let authorization = format!("Bearer {token}");
    collect(
        addr,
        "POST",
        "/v1/media",
        &[
            ("Authorization", &authorization),
            ("Content-Type", content_type),
        ],
        Some((length, body)),
    )
    .await
}

/// `GET path` with `headers`, the body collected.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    collect::<tokio::io::Empty>(addr, "GET", path, headers, None).await
}

/// Deterministic pseudo-random bytes (xorshift), `length` of them, made as
/// they are read: an upload of any size from constant memory. The bytes
/// are the same however they are read.
pub struct Noise {
    state: u64,
    /// Bytes of the current word not yet handed out (its last ones).
    word: [u8; 8],
    used: usize,
    left: u64,
}

impl Noise {
    pub fn new(seed: u64, length: u64) -> Self {
        Self {
            state: seed | 1,
            word: [0; 8],
            used: 8,
            left: length,
        }
    }
}

impl AsyncRead for Noise {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while buf.remaining() > 0 && self.left > 0 {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.used = 0;
            }
            let take = (8 - self.used)
                .min(buf.remaining())
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            let from = self.used;
            buf.put_slice(&self.word[from..from + take]);
            self.used += take;
            self.left -= take as u64;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// The address of an edge's WebSocket URL (`ws://host:port/...`).
pub fn edge_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let host = rest.split('/').next().unwrap_or_default();
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {host}"))
}
