//! What anyone may do without signing in (issue 14, items 3 and 8): list
//! the edges, and connect from behind a load balancer. Listing costs
//! JetStream nothing and is rate-limited per client; a client behind a
//! trusted proxy is limited as itself, and nobody else can choose the
//! address they are limited as.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{ensure, Context, Result};
use chat_shared::subjects;
use chat_tests::{http_get_on, wait_until, System};
use futures::StreamExt;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Error as WsError;

/// The address the test's "load balancer" connects from.
const PROXY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another loopback address, not a trusted proxy: a client that connects
/// directly and forges `X-Forwarded-For`.
const DIRECT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `addr` from local address `from`.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket.connect(addr).await?)
}

/// `GET path` from `from`, with `X-Forwarded-For: forwarded` when given:
/// (status, body).
async fn get(
    from: IpAddr,
    addr: SocketAddr,
    path: &str,
    forwarded: Option<&str>,
) -> Result<(u16, String)> {
    let header = forwarded
        .map(|f| format!("X-Forwarded-For: {f}\r\n"))
        .unwrap_or_default();
    http_get_on(connect_from(from, addr).await?, path, &header).await
}

/// A WebSocket upgrade from `from` (with `X-Forwarded-For` when given):
/// 101 when accepted, else the refusal's status.
async fn upgrade(from: IpAddr, addr: SocketAddr, forwarded: Option<String>) -> Result<u16> {
    let mut request = format!("ws://{addr}/v1/ws").into_client_request()?;
    if let Some(forwarded) = forwarded {
        request
            .headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(&forwarded)?);
    }
    let stream = connect_from(from, addr).await?;
    match tokio_tungstenite::client_async(request, stream).await {
        Ok(_) => Ok(101),
        Err(WsError::Http(response)) => Ok(response.status().as_u16()),
        Err(e) => Err(e.into()),
    }
}

/// The URLs `GET /v1/edges` lists.
fn urls(body: &str) -> Result<Vec<String>> {
    let body: Value = serde_json::from_str(body)?;
    Ok(body["edges"]
        .as_array()
        .context("an edges array")?
        .iter()
        .filter_map(|e| e["url"].as_str().map(str::to_string))
        .collect())
}

/// Waits until `listing`'s `GET /v1/edges` lists exactly `expected`.
async fn wait_listed(listing: SocketAddr, expected: &[String]) -> Result<()> {
    wait_until(|| async {
        match get(PROXY, listing, "/v1/edges", None).await {
            Ok((200, body)) => urls(&body).is_ok_and(|mut urls| {
                urls.sort();
                let mut expected = expected.to_vec();
                expected.sort();
                urls == expected
            }),
            _ => false,
        }
    })
    .await
    .with_context(|| format!("{listing} never listed exactly {expected:?}"))
}

#[tokio::test]
async fn listing_edges_creates_no_consumers_and_follows_edges_joining_and_leaving() -> Result<()> {
    let mut system = System::start().await?;
    let first = system.ws_url();
    wait_listed(system.edge_addr, std::slice::from_ref(&first)).await?;

    // Every consumer-create request on the bucket's stream, as nats-server
    // receives it (the ephemeral and the named form of the API subject).
    let admin = system.admin().await?;
    let create = format!("$JS.API.CONSUMER.CREATE.KV_{}", subjects::EDGES_BUCKET);
    let creates = futures::stream::select(
        admin.subscribe(create.clone()).await?,
        admin.subscribe(format!("{create}.>")).await?,
    );
    tokio::pin!(creates);
    admin.flush().await?;
    let js = async_nats::jetstream::new(admin.clone());
    let stream_name = format!("KV_{}", subjects::EDGES_BUCKET);
    let consumers = || async {
        let mut stream = js.get_stream(&stream_name).await?;
        anyhow::Ok(stream.info().await?.state.consumer_count)
    };
    let before = consumers().await?;

    // The attack: unauthenticated listings as fast as they are answered.
    const LISTINGS: usize = 200;
    for _ in 0..LISTINGS {
        let (status, body) = get(PROXY, system.edge_addr, "/v1/edges", None).await?;
        ensure!(status == 200, "{status} {body}");
        ensure!(urls(&body)? == [first.clone()], "{body}");
    }
    // A marker after the flood: any create request the listings caused
    // reached the server before it (each was answered before its listing).
    admin.publish(create.clone(), "marker".into()).await?;
    admin.flush().await?;
    let mut caused = 0;
    loop {
        let request = tokio::time::timeout(chat_tests::WAIT, creates.next())
            .await
            .context("the marker never arrived")?
            .context("subscription ended")?;
        if request.payload.as_ref() == b"marker" {
            break;
        }
        caused += 1;
    }
    assert_eq!(
        caused, 0,
        "{LISTINGS} listings asked JetStream for consumers"
    );
    assert_eq!(consumers().await?, before, "no consumer was left behind");
    // The probe sees what a bucket listing costs: `chatctl edges` reads
    // the bucket afresh, and that takes a consumer.
    let listed = chatctl::edges::list(&js, system.config.edge_ttl).await?;
    assert_eq!(listed.len(), 1);
    tokio::time::timeout(chat_tests::WAIT, creates.next())
        .await
        .context("a bucket listing's consumer was not seen")?;

    // An edge joins: both list both. It leaves: it is gone at once (its
    // delete reaches the watcher; no TTL to wait out).
    let (trigger, stopped) = tokio::sync::oneshot::channel::<()>();
    let (second_addr, second) = system
        .start_edge_task(Box::pin(async move {
            let _ = stopped.await;
        }))
        .await?;
    let both = [first.clone(), format!("ws://{second_addr}/v1/ws")];
    wait_listed(system.edge_addr, &both).await?;
    wait_listed(second_addr, &both).await?;
    let _ = trigger.send(());
    tokio::time::timeout(chat_tests::WAIT, second).await???;
    wait_listed(system.edge_addr, std::slice::from_ref(&first)).await?;

    // NATS goes away and comes back: the watcher follows again (an edge
    // joining afterwards is listed).
    system.nats.restart().await?;
    system.wait_edge_ready().await?;
    let third = system.start_edge().await?;
    wait_listed(
        system.edge_addr,
        &[first.clone(), format!("ws://{third}/v1/ws")],
    )
    .await?;
    Ok(())
}

/// Makes up to ten `attempt`s in a row (at 1 per second with a burst of 2,
/// ten can only all pass if they take 8 s); returns how many passed before
/// the first refusal, and that refusal's status.
async fn until_refused<F, Fut>(mut attempt: F) -> Result<(usize, Option<u16>)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<u16>>,
{
    for i in 0..10 {
        let status = attempt(i).await?;
        if status != 101 && status != 200 {
            return Ok((i, Some(status)));
        }
    }
    Ok((10, None))
}

#[tokio::test]
async fn behind_a_trusted_proxy_clients_are_limited_apart_and_forged_addresses_are_not(
) -> Result<()> {
    let system = System::start_with(|c| {
        c.limits.connects_per_ip = 1;
        c.edge_net.discovery_per_ip = 1;
        c.edge_net.trusted_proxies = vec![PROXY.to_string().parse().expect("an address")];
    })
    .await?;
    let addr = system.edge_addr;
    let list = |from: IpAddr, forwarded: Option<String>| async move {
        let (status, _) = get(from, addr, "/v1/edges", forwarded.as_deref()).await?;
        anyhow::Ok(status)
    };

    // Upgrades and listings alike. One client behind the load balancer
    // uses up its own budget...
    let (passed, refusal) =
        until_refused(|_| upgrade(PROXY, addr, Some("203.0.113.1".into()))).await?;
    assert!(passed >= 2 && refusal == Some(429), "{passed} {refusal:?}");
    let (passed, refusal) = until_refused(|_| list(PROXY, Some("203.0.113.1".into()))).await?;
    assert!(passed >= 2 && refusal == Some(429), "{passed} {refusal:?}");
    // ...and another behind the same one is not locked out by it. (The
    // proxy appends what it saw to what the client sent: the right-most
    // address is the client.)
    assert_eq!(
        upgrade(PROXY, addr, Some("6.6.6.6, 203.0.113.2".into())).await?,
        101
    );
    assert_eq!(list(PROXY, Some("203.0.113.2".into())).await?, 200);

    // IPv6 clients count per /64: new addresses in one /64 do not help.
    let (passed, refusal) =
        until_refused(|i| list(PROXY, Some(format!("2001:db8:0:1::{:x}", i + 1)))).await?;
    assert!(passed >= 2 && refusal == Some(429), "{passed} {refusal:?}");
    assert_eq!(list(PROXY, Some("2001:db8:0:2::1".into())).await?, 200);

    // A client that is not a trusted proxy forges a new address each time:
    // ignored, it is limited as the address it connects from.
    let (passed, refusal) =
        until_refused(|i| upgrade(DIRECT, addr, Some(format!("198.51.100.{}", i + 1)))).await?;
    assert!(passed >= 2 && refusal == Some(429), "{passed} {refusal:?}");
    let (passed, refusal) =
        until_refused(|i| list(DIRECT, Some(format!("198.51.100.{}", i + 1)))).await?;
    assert!(passed >= 2 && refusal == Some(429), "{passed} {refusal:?}");
    Ok(())
}
