//! v1.1 media (PROTOCOL.md "Media"): uploads streamed into the object
//! store with bounded edge memory, the same bytes stored once, content
//! types checked against the bytes, limits and quotas; downloads with
//! ranges, ETags and access only for the uploader and members; signed
//! URLs; thumbnails made by the persister's worker; attachments through
//! live delivery, resume and history.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use chat_shared::hex;
use chat_tests::{Client, System};
use chatctl::http::{self, Noise, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
/// The key signed URLs are made with in these tests.
const URL_KEY: &str = "media-url-key-for-the-e2e-tests-0123";

/// A `width` x `height` PNG of a gradient.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map(|()| bytes)
        .unwrap_or_default()
}

/// `POST /v1/media` of `bytes` as `user`.
pub async fn upload(
    system: &System,
    user: &str,
    content_type: &str,
    bytes: &[u8],
) -> anyhow::Result<Response> {
    http::upload(
        system.edge_addr,
        &system.token(user),
        content_type,
        bytes.len() as u64,
        &mut &bytes[..],
    )
    .await
}

/// The body of a `201` to an upload.
fn created(reply: &Response) -> anyhow::Result<Value> {
    ensure!(
        reply.status == 201,
        "upload: {} {:?}",
        reply.status,
        reply.json()
    );
    reply.json()
}

/// The id of a stored upload of `bytes` by `user`.
pub async fn uploaded(
    system: &System,
    user: &str,
    content_type: &str,
    bytes: &[u8],
) -> anyhow::Result<String> {
    let body = created(&upload(system, user, content_type, bytes).await?)?;
    body["media"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no media in {body}"))
}

/// `GET path` as `user` (or without a token).
async fn get_as(
    system: &System,
    user: Option<&str>,
    path: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let authorization = user.map(|u| format!("Bearer {}", system.token(u)));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(authorization) = &authorization {
        headers.push(("Authorization", authorization));
    }
    http::get(system.edge_addr, path, &headers).await
}

fn system_with_media() -> impl FnOnce(&mut chat_shared::Config) {
    |c| c.media.url_key = Some(URL_KEY.into())
}

/// `GET /v1/media/<id>` with `Range: bytes=<from>-<to>`: hashes the body
/// into `hash` as it arrives; the status and the bytes received.
async fn ranged(
    addr: SocketAddr,
    token: &str,
    media: &str,
    range: &str,
    hash: &mut Sha256,
) -> anyhow::Result<(u16, u64)> {
    let authorization = format!("Bearer {token}");
    let mut received = 0u64;
    let response = http::request::<tokio::io::Empty, _>(
        addr,
        "GET",
        &format!("/v1/media/{media}"),
        &[("Authorization", &authorization), ("Range", range)],
        None,
        |bytes| {
            received += bytes.len() as u64;
            hash.update(bytes);
        },
    )
    .await?;
    Ok((response.status, received))
}

/// The highest resident memory of a process so far (`VmHWM`).
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// The acceptance test of issue 19's uploads: 50 MiB through an edge
/// process whose peak memory grows by less than 8 MiB (the body is never
/// held whole), then read back in two ranges, the second resuming where
/// the first stopped: the same SHA-256.
#[tokio::test]
async fn a_large_upload_streams_and_a_resumed_download_is_identical() -> anyhow::Result<()> {
    const SIZE: u64 = 50 * MIB;
    let system = System::start_with(system_with_media()).await?;
    let edge = system
        .spawn_edge_process(env!("CARGO_BIN_EXE_service-under-test"))
        .await?;
    let pid = edge.pid().context("edge process gone")?;
    let token = system.token("alice");
    // A first small upload warms everything up (connections, buffers).
    let warm = http::upload(edge.addr, &token, "text/plain", 4, &mut &b"warm"[..]).await?;
    ensure!(warm.status == 201, "warm-up: {}", warm.status);
    let before = peak_rss(pid)?;
    let mut expected = Sha256::new();
    let mut source = Noise::new(19, SIZE);
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = tokio::io::AsyncReadExt::read(&mut source, &mut buffer).await?;
        if read == 0 {
            break;
        }
        expected.update(&buffer[..read]);
    }
    let expected = hex::encode(expected.finalize());
    let mut noise = Noise::new(19, SIZE);
    let reply = http::upload(
        edge.addr,
        &token,
        "application/octet-stream",
        SIZE,
        &mut noise,
    )
    .await?;
    let after = peak_rss(pid)?;
    let body = created(&reply)?;
    assert_eq!(body["media"], expected, "the id is the SHA-256");
    assert_eq!(body["sha256"], expected);
    assert_eq!(body["size"], SIZE);
    assert_eq!(body["content_type"], "application/octet-stream");
    let growth = after.saturating_sub(before);
    eprintln!(
        "edge peak RSS {} KiB -> {} KiB over a 50 MiB upload",
        before / 1024,
        after / 1024
    );
    ensure!(
        growth < 8 * MIB,
        "the edge's peak RSS grew by {} KiB for a {} MiB upload",
        growth / 1024,
        SIZE / MIB
    );

    // A download cut short, resumed with a range from where it stopped.
    let half = SIZE / 2 + 12_345;
    let mut hash = Sha256::new();
    let (status, first) = ranged(
        edge.addr,
        &token,
        &expected,
        &format!("bytes=0-{}", half - 1),
        &mut hash,
    )
    .await?;
    assert_eq!((status, first), (206, half));
    let (status, rest) = ranged(
        system.edge_addr,
        &token,
        &expected,
        &format!("bytes={half}-"),
        &mut hash,
    )
    .await?;
    assert_eq!((status, rest), (206, SIZE - half));
    assert_eq!(
        hex::encode(hash.finalize()),
        expected,
        "the resumed download"
    );
    // Past the end: 416 with the size.
    let past = get_as(
        &system,
        Some("alice"),
        &format!("/v1/media/{expected}"),
        &[("Range", &format!("bytes={SIZE}-"))],
    )
    .await?;
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(&*format!("bytes */{SIZE}"))
    );
    Ok(())
}

/// The same bytes uploaded twice (by two users) are one media, stored
/// once; `ETag` and `If-None-Match` answer `304`; no temporary object is
/// left behind by an upload or a refusal.
#[tokio::test]
async fn the_same_bytes_are_one_media_stored_once() -> anyhow::Result<()> {
    let system = System::start_with(system_with_media()).await?;
    let bytes = b"%PDF-1.7 the same document".repeat(1000);
    let first = uploaded(&system, "alice", "application/pdf", &bytes).await?;
    let second = uploaded(&system, "bob", "application/pdf", &bytes).await?;
    assert_eq!(first, second);
    assert_eq!(first, hex::encode(Sha256::digest(&bytes)));
    let lie = upload(&system, "bob", "image/png", b"not a png").await?;
    assert_eq!(lie.status, 415);

    let admin = system.admin().await?;
    let js = async_nats::jetstream::new(admin);
    let store = js
        .get_object_store(chat_shared::subjects::MEDIA_BUCKET)
        .await?;
    let mut names = Vec::new();
    let mut list = store.list().await?;
    while let Some(object) = futures::StreamExt::next(&mut list).await {
        names.push(object?.name);
    }
    assert_eq!(names, vec![first.clone()], "one object, no temporaries");
    // Its chunks are stored once: the stream holds one object's bytes.
    let stream = js
        .get_stream(chat_shared::subjects::object_store_stream(
            chat_shared::subjects::MEDIA_BUCKET,
        ))
        .await?
        .info()
        .await?
        .state
        .bytes;
    ensure!(
        stream < 2 * bytes.len() as u64,
        "{stream} bytes stored for {} bytes",
        bytes.len()
    );

    let path = format!("/v1/media/{first}");
    let whole = get_as(&system, Some("bob"), &path, &[]).await?;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, bytes);
    let etag = format!("\"{first}\"");
    assert_eq!(whole.header("etag"), Some(etag.as_str()));
    assert_eq!(whole.header("content-type"), Some("application/pdf"));
    assert_eq!(whole.header("content-disposition"), Some("attachment"));
    ensure!(
        whole
            .header("cache-control")
            .is_some_and(|c| c.starts_with("private, max-age=")),
        "{:?}",
        whole.headers
    );
    let cached = get_as(&system, Some("bob"), &path, &[("If-None-Match", &etag)]).await?;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());
    Ok(())
}

/// Refusals: no token (401), a declared image that is not one or not a
/// type taken (415), over `CHAT_MEDIA_MAX_BYTES` (413), no length (411),
/// past the daily upload quota (429 with `Retry-After`).
#[tokio::test]
async fn bad_uploads_are_refused_with_clear_errors() -> anyhow::Result<()> {
    let system = System::start_with(|c| {
        c.media.max_bytes = MIB;
        c.quota.media_bytes_per_day = 600 * 1024;
    })
    .await?;
    let addr = system.edge_addr;
    let anonymous = http::collect(
        addr,
        "POST",
        "/v1/media",
        &[("Content-Type", "text/plain")],
        Some((2, &mut &b"hi"[..])),
    )
    .await?;
    assert_eq!(anonymous.status, 401);
    let forged = http::upload(addr, "not-a-token", "text/plain", 2, &mut &b"hi"[..]).await?;
    assert_eq!(forged.status, 401);

    let jpeg_as_png = upload(
        &system,
        "alice",
        "image/png",
        &[0xff, 0xd8, 0xff, 0xe0, 0, 16],
    )
    .await?;
    assert_eq!(jpeg_as_png.status, 415);
    let error = jpeg_as_png.json()?;
    ensure!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a png image")),
        "{error}"
    );
    let svg = upload(&system, "alice", "image/svg+xml", b"<svg onload=alert(1)/>").await?;
    assert_eq!(svg.status, 415);
    let png_as_gif = upload(&system, "alice", "image/gif", &png(4, 4)).await?;
    assert_eq!(png_as_gif.status, 415);

    // Over the limit: refused on the length, before the body.
    let over = http::upload(
        addr,
        &system.token("alice"),
        "application/octet-stream",
        MIB + 1,
        &mut Noise::new(1, MIB + 1),
    )
    .await?;
    assert_eq!(over.status, 413);
    assert!(over.json()?["error"].is_string());
    let no_length = http::collect::<tokio::io::Empty>(
        addr,
        "POST",
        "/v1/media",
        &[
            (
                "Authorization",
                &format!("Bearer {}", system.token("alice")),
            ),
            ("Transfer-Encoding", "chunked"),
        ],
        None,
    )
    .await?;
    assert_eq!(no_length.status, 411);

    // 600 KiB a day: two uploads of 250 KiB pass, a third does not.
    let noise = |user: &'static str, seed: u64| {
        let token = system.token(user);
        async move {
            let size = 250 * 1024;
            http::upload(
                addr,
                &token,
                "application/octet-stream",
                size,
                &mut Noise::new(seed, size),
            )
            .await
        }
    };
    for seed in [10, 11] {
        let ok = noise("alice", seed).await?;
        assert_eq!(ok.status, 201, "{:?}", ok.json());
    }
    let third = noise("alice", 12).await?;
    assert_eq!(third.status, 429, "{:?}", third.json());
    let retry: u64 = third
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .context("no Retry-After")?;
    ensure!((1..=86_400).contains(&retry), "Retry-After {retry}");
    // Another user has a quota of their own.
    assert_eq!(noise("bob", 12).await?.status, 201);
    Ok(())
}

fn group_of(reply: &Value) -> anyhow::Result<String> {
    reply["group"]["id"]
        .as_str()
        .map(|id| format!("group:{id}"))
        .ok_or_else(|| anyhow!("no group in {reply}"))
}

async fn send_attachment(
    client: &mut Client,
    target: Value,
    media: &str,
    name: Option<&str>,
    id: &str,
) -> anyhow::Result<Value> {
    let mut frame = json!({"type":"send","text":"","client_msg_id":id,
                           "attachments":[{"media":media}]});
    if let Some(name) = name {
        frame["attachments"][0]["name"] = json!(name);
    }
    for (k, v) in target.as_object().into_iter().flatten() {
        frame[k] = v.clone();
    }
    client.request(frame).await
}

/// The acceptance test of issue 19's access rules: a non-member gets 404
/// (as for no media at all), a member of a conversation with a message
/// carrying it may download it, and a member removed from the group loses
/// access at once.
#[tokio::test]
async fn only_the_uploader_and_members_see_a_media() -> anyhow::Result<()> {
    let system = System::start_with(system_with_media()).await?;
    let mut alice = system.connect("alice", "phone").await?;
    let mut bob = system.connect("bob", "phone").await?;
    let media = uploaded(&system, "alice", "image/png", &png(40, 30)).await?;
    let path = format!("/v1/media/{media}");
    assert_eq!(
        get_as(&system, Some("alice"), &path, &[]).await?.status,
        200
    );
    let stranger = get_as(&system, Some("bob"), &path, &[]).await?;
    assert_eq!(stranger.status, 404, "a non-member");
    let unknown = get_as(
        &system,
        Some("bob"),
        &format!("/v1/media/{}", "0".repeat(64)),
        &[],
    )
    .await?;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body, stranger.body,
        "the same answer: existence is not told"
    );
    assert_eq!(get_as(&system, None, &path, &[]).await?.status, 401);
    let url = bob
        .request(json!({"type":"media.url","media":media}))
        .await?;
    assert_eq!(
        (url["type"].as_str(), url["code"].as_str()),
        (Some("error"), Some("not_found")),
        "{url}"
    );
    // Bob may not attach what he cannot see.
    let stolen = send_attachment(&mut bob, json!({"to":"alice"}), &media, None, "b1").await?;
    assert_eq!(stolen["code"], "not_found", "{stolen}");

    let group = alice
        .request(json!({"type":"group.create","name":"g","members":["bob"]}))
        .await?;
    let conversation = group_of(&group)?;
    let sent = send_attachment(
        &mut alice,
        json!({"conversation":conversation}),
        &media,
        Some("pic.png"),
        "a1",
    )
    .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    // Stored a moment after delivery: access follows the history store.
    chat_tests::wait_until(|| async {
        get_as(&system, Some("bob"), &path, &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;
    let removed = alice
        .request(json!({"type":"group.remove","group":conversation,"users":["bob"]}))
        .await?;
    ensure!(removed["type"] == "group", "{removed}");
    assert_eq!(
        get_as(&system, Some("bob"), &path, &[]).await?.status,
        404,
        "removed"
    );
    // Profiles are public, and so is the picture one names: a stranger
    // sees alice's avatar while it is her avatar, and no longer after.
    let carol = "carol";
    let avatar = uploaded(&system, "alice", "image/png", &png(20, 20)).await?;
    let avatar_path = format!("/v1/media/{avatar}");
    assert_eq!(
        get_as(&system, Some(carol), &avatar_path, &[])
            .await?
            .status,
        404
    );
    let set = alice
        .request(json!({"type":"profile.set","name":"Alice","avatar":avatar}))
        .await?;
    ensure!(set["type"] == "ok", "{set}");
    assert_eq!(
        get_as(&system, Some(carol), &avatar_path, &[])
            .await?
            .status,
        200,
        "a profile's picture"
    );
    let unset = alice
        .request(json!({"type":"profile.set","name":"Alice","avatar":null}))
        .await?;
    ensure!(unset["type"] == "ok", "{unset}");
    assert_eq!(
        get_as(&system, Some(carol), &avatar_path, &[])
            .await?
            .status,
        404,
        "no longer her avatar"
    );
    Ok(())
}

/// The acceptance test of issue 19's attachments: a picture sent while
/// the recipient is offline reaches it on resume with its metadata, and
/// history returns it; the thumbnailer makes a thumbnail of at most
/// 320 px; a decompression bomb gets none and stops nothing.
#[tokio::test]
async fn an_image_reaches_an_offline_device_and_gets_a_thumbnail() -> anyhow::Result<()> {
    let system = System::start_with(system_with_media()).await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let start = bob.synced["cursor"]
        .as_str()
        .map(str::to_string)
        .context("no cursor")?;
    drop(bob);
    // A bomb first: a PNG header of 30000 x 30000 pixels.
    let bomb = uploaded(&system, "alice", "image/png", &png_header(30_000, 30_000)).await?;
    let picture = png(1000, 600);
    let upload_reply = upload(&system, "alice", "image/png", &picture).await?;
    let stored = upload_reply.json()?;
    assert_eq!(
        (stored["width"].as_u64(), stored["height"].as_u64()),
        (Some(1000), Some(600))
    );
    let media = stored["media"].as_str().context("no media")?.to_string();
    let sent = send_attachment(
        &mut alice,
        json!({"to":"bob"}),
        &media,
        Some("photo.png"),
        "p1",
    )
    .await?;
    ensure!(sent["type"] == "sent", "{sent}");
    let text_too = alice
        .request(
            json!({"type":"send","to":"bob","text":"and a file","client_msg_id":"p2",
                        "attachments":[{"media":bomb,"name":"bomb.png"}]}),
        )
        .await?;
    ensure!(text_too["type"] == "sent", "{text_too}");
    let empty = alice
        .request(json!({"type":"send","to":"bob","text":"","client_msg_id":"p3"}))
        .await?;
    assert_eq!(empty["code"], "bad_request", "no text and no attachment");
    let eleven: Vec<Value> = (0..11).map(|_| json!({"media":media})).collect();
    let too_many = alice
        .request(
            json!({"type":"send","to":"bob","text":"x","client_msg_id":"p4","attachments":eleven}),
        )
        .await?;
    assert_eq!(too_many["code"], "bad_request");

    let expected = json!([{
        "media": media, "name": "photo.png", "size": picture.len(), "sha256": media,
        "content_type": "image/png", "width": 1000, "height": 600,
    }]);
    let bob = system.connect_from("bob", "phone", Some(&start)).await?;
    ensure!(bob.welcome["resumed"] == true, "{}", bob.welcome);
    let messages: Vec<&Value> = bob
        .backlog
        .iter()
        .filter(|f| f["type"] == "message")
        .collect();
    ensure!(messages.len() == 2, "{:?}", bob.backlog);
    assert_eq!(messages[0]["attachments"], expected, "{}", messages[0]);
    ensure!(
        messages[0].get("text").is_none_or(|t| t == ""),
        "{}",
        messages[0]
    );
    assert_eq!(messages[1]["attachments"][0]["width"], 30_000);

    // History (the persister's copy) has them too.
    let mut bob = bob;
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    loop {
        let history = bob
            .request(json!({"type":"history","conversation":"dm:alice:bob"}))
            .await?;
        let items = history["messages"].as_array().cloned().unwrap_or_default();
        if items.len() == 2 {
            assert_eq!(items[1]["attachments"], expected, "{history}");
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "history: {history}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The conversation list's newest message shows its attachment.
    let list = bob.request(json!({"type":"conversations"})).await?;
    assert_eq!(
        list["items"][0]["last"]["attachments"][0]["name"], "bomb.png",
        "{list}"
    );

    // The thumbnail, made by the worker: a picture of at most 320 px.
    let thumb_path = format!("/v1/media/{media}/thumb");
    let deadline = tokio::time::Instant::now() + chat_tests::WAIT;
    let thumb = loop {
        let response = get_as(&system, Some("bob"), &thumb_path, &[]).await?;
        if response.status == 200 {
            break response;
        }
        assert_eq!(response.status, 404, "until it is made");
        ensure!(tokio::time::Instant::now() < deadline, "no thumbnail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let decoded = image::load_from_memory(&thumb.body)?;
    assert_eq!((decoded.width(), decoded.height()), (320, 192));
    assert_eq!(thumb.header("content-type"), Some("image/jpeg"));
    // The bomb got none, and the worker went on (the picture's came after).
    let none = get_as(
        &system,
        Some("bob"),
        &format!("/v1/media/{bomb}/thumb"),
        &[],
    )
    .await?;
    assert_eq!(none.status, 404);
    Ok(())
}

/// A PNG that says it is `width` x `height` and holds almost nothing.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffff_u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Signed URLs (`media.url`) load without a token until they expire; a
/// tampered or expired one is refused (404, as for no media).
#[tokio::test]
async fn signed_urls_work_without_a_token_until_tampered_or_expired() -> anyhow::Result<()> {
    let system = System::start_with(system_with_media()).await?;
    let mut alice = system.connect("alice", "phone").await?;
    let picture = png(64, 64);
    let media = uploaded(&system, "alice", "image/png", &picture).await?;
    let reply = alice
        .request(json!({"type":"media.url","media":media}))
        .await?;
    ensure!(reply["type"] == "media.url", "{reply}");
    let url = reply["url"].as_str().context("no url")?;
    let expires = reply["expires"].as_u64().context("no expires")?;
    let now = chat_shared::clock::now_ms();
    ensure!(
        expires > now && expires <= now + 301_000,
        "expires {expires}"
    );
    let loaded = get_as(&system, None, url, &[]).await?;
    assert_eq!(loaded.status, 200);
    assert_eq!(loaded.body, picture);
    assert_eq!(loaded.header("content-type"), Some("image/png"));
    let thumb_url = reply["thumb"].as_str().context("no thumb url")?;
    chat_tests::wait_until(|| async {
        get_as(&system, None, thumb_url, &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;

    let tampered = url.replace(
        &format!("exp={expires}"),
        &format!("exp={}", expires + 1000),
    );
    assert_eq!(get_as(&system, None, &tampered, &[]).await?.status, 404);
    let other = uploaded(&system, "alice", "text/plain", b"another").await?;
    let moved = url.replace(&media, &other);
    assert_eq!(get_as(&system, None, &moved, &[]).await?.status, 404);
    // Signed with the right key (the URL a minute later works), but
    // expired a moment ago.
    let signed = |expires: u64| -> anyhow::Result<String> {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(URL_KEY.as_bytes())?;
        hmac::Mac::update(
            &mut mac,
            format!("chat media url\n{media}\n{expires}").as_bytes(),
        );
        let signature = hex::encode(hmac::Mac::finalize(mac).into_bytes());
        Ok(format!("/v1/media/{media}?exp={expires}&sig={signature}"))
    };
    assert_eq!(
        get_as(&system, None, &signed(now + 60_000)?, &[])
            .await?
            .status,
        200
    );
    assert_eq!(
        get_as(&system, None, &signed(now - 1)?, &[]).await?.status,
        404
    );
    Ok(())
}
