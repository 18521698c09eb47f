//! `chatctl bench media`: uploads of a given size (`POST /v1/media`,
//! distinct bytes each round, so nothing is de-duplicated) and their
//! downloads (`GET /v1/media/<id>`), one at a time; MB/s of each, and a
//! check that every download has the upload's SHA-256.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::Config;
use sha2::{Digest, Sha256};

use crate::client::token;
use crate::http::{self, Noise};

#[derive(Debug, Clone, clap::Args)]
pub struct MediaOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    /// Bytes per upload, in MiB.
    #[arg(long, default_value_t = 50)]
    pub size_mib: u64,
    /// Uploads (each then downloaded).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct MediaReport {
    pub size_bytes: u64,
    pub rounds: u32,
    /// MB (10^6 bytes) per second over all rounds.
    pub upload_mb_per_second: f64,
    pub download_mb_per_second: f64,
    /// The slowest round of each, in seconds.
    pub slowest_upload_seconds: f64,
    pub slowest_download_seconds: f64,
}

pub async fn media(config: &Config, options: MediaOptions) -> anyhow::Result<MediaReport> {
    let addr = http::edge_addr(&options.edge)?;
    let user = format!("bench-media-{:08x}", rand::random::<u32>());
    let token = token(config, &user, Duration::from_secs(3600))?;
    let size = options.size_mib * 1024 * 1024;
    let authorization = format!("Bearer {token}");
    let (mut uploading, mut downloading) = (Duration::ZERO, Duration::ZERO);
    let (mut slowest_up, mut slowest_down) = (Duration::ZERO, Duration::ZERO);
    for round in 0..options.rounds {
        let seed = rand::random::<u64>() ^ u64::from(round);
        let started = Instant::now();
        let reply = http::upload(
            addr,
            &token,
            "application/octet-stream",
            size,
            &mut Noise::new(seed, size),
        )
        .await?;
        let took = started.elapsed();
        if reply.status != 201 {
            bail!(
                "upload: status {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let media = reply.json()?["media"]
            .as_str()
            .context("no media id")?
            .to_string();
        uploading += took;
        slowest_up = slowest_up.max(took);
        let started = Instant::now();
        let mut hash = Sha256::new();
        let mut received = 0u64;
        let response = http::request::<tokio::io::Empty, _>(
            addr,
            "GET",
            &format!("/v1/media/{media}"),
            &[("Authorization", &authorization)],
            None,
            |bytes| {
                received += bytes.len() as u64;
                hash.update(bytes);
            },
        )
        .await?;
        let took = started.elapsed();
        let digest = chat_shared::hex::encode(hash.finalize());
        if response.status != 200 || received != size || digest != media {
            bail!(
                "download: status {}, {received} bytes, sha256 {digest}",
                response.status
            );
        }
        downloading += took;
        slowest_down = slowest_down.max(took);
    }
    let megabytes = (size * u64::from(options.rounds)) as f64 / 1e6;
    Ok(MediaReport {
        size_bytes: size,
        rounds: options.rounds,
        upload_mb_per_second: megabytes / uploading.as_secs_f64().max(1e-9),
        download_mb_per_second: megabytes / downloading.as_secs_f64().max(1e-9),
        slowest_upload_seconds: slowest_up.as_secs_f64(),
        slowest_download_seconds: slowest_down.as_secs_f64(),
    })
}

pub fn print(report: &MediaReport) {
    println!(
        "media: {} rounds of {} MiB: upload {:.1} MB/s (slowest {:.2} s), download {:.1} MB/s (slowest {:.2} s)",
        report.rounds,
        report.size_bytes / (1024 * 1024),
        report.upload_mb_per_second,
        report.slowest_upload_seconds,
        report.download_mb_per_second,
        report.slowest_download_seconds,
    );
}
