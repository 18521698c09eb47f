//! The edge's HTTP/1.1 server: what `axum::serve` does, with explicit bounds.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never
//! runs: a connection that sends nothing, or a header byte a minute, is kept
//! forever, and a request head may grow hyper's read buffer to ~400 KiB. Here
//! every connection gets a deadline for each request head and a small buffer
//! cap (hyper answers 431 beyond it). WebSocket upgrades leave hyper at the
//! upgrade, so neither bound applies to an upgraded connection.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use chat_shared::shutdown;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A request head (request line and headers) must arrive within this, on a
/// new connection and between keep-alive requests alike.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted; hyper answers 431 beyond it.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long stopping waits for HTTP requests in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` turns true.
pub(crate) async fn serve(listener: TcpListener, app: Router, stop: watch::Receiver<bool>) {
    let stopped = shutdown::wait(stop.clone());
    tokio::pin!(stopped);
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Frames are small and latency matters: no Nagle delay (it combines
        // with the client's delayed ACK into 40 ms stalls).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(tcp, peer, app.clone(), stop.clone()));
    }
    let closing = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE, closing).await.is_err() {
        tracing::debug!("http connections still open at stop");
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    stop: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(app.map_request(
        move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.map(axum::body::Body::new)
        },
    ));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::trace!(%peer, error = %e, "http connection ended");
            }
            return;
        }
        _ = &mut stopped => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::trace!(%peer, error = %e, "http connection ended");
    }
}
