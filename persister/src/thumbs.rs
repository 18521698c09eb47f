//! The thumbnailer: MEDIA_JOBS (one job per stored image, queued by
//! `media_stored`) -> a JPEG or PNG of at most [`THUMB_SIDE`] px on its
//! longest side, stored as the object `<media>.thumb`, and the image's
//! width and height in `media`. Every persister process pulls the one
//! durable consumer, so the jobs are shared out like a queue group's.
//!
//! Never in a request: decoding is slow and its cost is the uploader's
//! choice. Decoding is bounded: the source's bytes
//! ([`MAX_SOURCE_BYTES`]), its pixels (`CHAT_MEDIA_MAX_PIXELS`, read from
//! the header before anything is decoded) and the decoder's allocations.
//! An image past a bound or that does not decode gets no thumbnail; the
//! job is acked and never retried (a bomb is not tried three times).

use std::collections::HashMap;
use std::io::Cursor;

use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chat_shared::consume;
use chat_shared::ids::MediaId;
use chat_shared::shutdown;
use chat_shared::subjects;
use deadpool_postgres::Pool;
use image::{ImageFormat, ImageReader, Limits};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// The longest side of a thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 320;
/// The largest source read into memory to decode.
const MAX_SOURCE_BYTES: usize = 64 * 1024 * 1024;
/// Jobs pulled at a time; they are made one after another.
const BATCH: usize = 4;
/// The formats uploads may declare as images (the edge checks the bytes).
const FORMATS: [ImageFormat; 4] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Gif,
    ImageFormat::WebP,
];

/// Why a job made no thumbnail.
#[derive(Debug, thiserror::Error)]
enum ThumbError {
    /// Worth another try (the store or the database was away).
    #[error("{0}")]
    Transient(String),
    /// Never worth another try.
    #[error("{0}")]
    Refused(String),
}

/// A made thumbnail and the source's size.
struct Thumb {
    bytes: Vec<u8>,
    content_type: &'static str,
}

pub async fn make_thumbnails(
    pool: Pool,
    store: ObjectStore,
    consumer: PullConsumer,
    max_pixels: u64,
    stop: watch::Receiver<bool>,
) {
    let stopped = shutdown::wait(stop);
    tokio::pin!(stopped);
    consume::batches(&consumer, BATCH, &mut stopped, |batch| {
        let (pool, store) = (&pool, &store);
        async move {
            for job in batch {
                handle(pool, store, max_pixels, job).await;
            }
        }
    })
    .await;
}

async fn handle(pool: &Pool, store: &ObjectStore, max_pixels: u64, job: jetstream::Message) {
    let Some(media) = subjects::parse_thumb_job(&job.subject) else {
        tracing::warn!(subject = %job.subject, "not a thumbnail job");
        acknowledge(&job, AckKind::Ack).await;
        return;
    };
    let outcome = thumbnail(pool, store, max_pixels, &media).await;
    let ack = match outcome {
        Ok(()) => AckKind::Ack,
        Err(ThumbError::Refused(reason)) => {
            tracing::info!(%media, %reason, "no thumbnail");
            AckKind::Ack
        }
        Err(ThumbError::Transient(reason)) => {
            tracing::warn!(%media, %reason, "thumbnail failed; retrying later");
            AckKind::Nak(Some(std::time::Duration::from_secs(5)))
        }
    };
    acknowledge(&job, ack).await;
}

async fn acknowledge(job: &jetstream::Message, kind: AckKind) {
    if let Err(e) = job.ack_with(kind).await {
        tracing::warn!(error = %e, "cannot ack a thumbnail job");
    }
}

async fn thumbnail(
    pool: &Pool,
    store: &ObjectStore,
    max_pixels: u64,
    media: &MediaId,
) -> Result<(), ThumbError> {
    let transient = |what: &str| {
        let what = what.to_string();
        move |e: String| ThumbError::Transient(format!("{what}: {e}"))
    };
    let name = subjects::media_object(media);
    let info = match chat_shared::objects::live(store, &name).await {
        Ok(Some(info)) => info,
        Ok(None) => return Err(ThumbError::Refused("no such object".into())),
        Err(e) => return Err(transient("reading the object info")(e.to_string())),
    };
    if info.size > MAX_SOURCE_BYTES {
        return Err(ThumbError::Refused(format!(
            "{} bytes is more than {MAX_SOURCE_BYTES}",
            info.size
        )));
    }
    let mut source = Vec::with_capacity(info.size);
    let mut object = store
        .get(&name)
        .await
        .map_err(|e| transient("opening the object")(e.to_string()))?;
    (&mut object)
        .take(MAX_SOURCE_BYTES as u64)
        .read_to_end(&mut source)
        .await
        .map_err(|e| transient("reading the object")(e.to_string()))?;
    // Decoding is CPU work: off the runtime's threads.
    let (dimensions, made) = tokio::task::spawn_blocking(move || render(&source, max_pixels))
        .await
        .map_err(|e| ThumbError::Refused(format!("the decoder failed: {e}")))?;
    if let Some((width, height)) = dimensions {
        record(pool, media, width, height, false).await?;
    }
    let thumb = made?;
    store
        .put(
            ObjectMetadata {
                name: subjects::thumb_object(media),
                metadata: HashMap::from([(
                    subjects::MEDIA_CONTENT_TYPE_KEY.to_string(),
                    thumb.content_type.to_string(),
                )]),
                ..Default::default()
            },
            &mut Cursor::new(thumb.bytes),
        )
        .await
        .map_err(|e| transient("storing the thumbnail")(e.to_string()))?;
    if let Some((width, height)) = dimensions {
        record(pool, media, width, height, true).await?;
    }
    Ok(())
}

/// Stores an image's dimensions where they were unknown, and that its
/// thumbnail exists.
async fn record(
    pool: &Pool,
    media: &MediaId,
    width: u32,
    height: u32,
    thumb: bool,
) -> Result<(), ThumbError> {
    let transient = |e: String| ThumbError::Transient(format!("recording the thumbnail: {e}"));
    let db = pool.get().await.map_err(|e| transient(e.to_string()))?;
    let side = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    db.execute(
        "UPDATE media SET width = COALESCE(width, $2), height = COALESCE(height, $3),
                          thumb = thumb OR $4
         WHERE media = $1",
        &[&media.as_str(), &side(width), &side(height), &thumb],
    )
    .await
    .map_err(|e| transient(e.to_string()))?;
    Ok(())
}

/// The image's dimensions (when its header reads) and its thumbnail: a
/// PNG when it has transparency, else a JPEG.
fn render(source: &[u8], max_pixels: u64) -> (Option<(u32, u32)>, Result<Thumb, ThumbError>) {
    let refused = |e: &dyn std::fmt::Display| ThumbError::Refused(e.to_string());
    let format = match image::guess_format(source) {
        Ok(format) if FORMATS.contains(&format) => format,
        Ok(other) => return (None, Err(refused(&format!("{other:?} is not taken")))),
        Err(e) => return (None, Err(refused(&e))),
    };
    let reader = || ImageReader::with_format(Cursor::new(source), format);
    let (width, height) = match reader().into_dimensions() {
        Ok(dimensions) => dimensions,
        Err(e) => return (None, Err(refused(&e))),
    };
    let dimensions = Some((width, height));
    if u64::from(width) * u64::from(height) > max_pixels {
        let why = format!("{width}x{height} is more than {max_pixels} pixels");
        return (dimensions, Err(ThumbError::Refused(why)));
    }
    // The decoder may allocate the pixels (4 bytes each at most for these
    // formats) and a frame's worth more, never what a lying header asks.
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    let mut decoder = reader();
    decoder.limits(limits);
    let decoded = match decoder.decode() {
        Ok(decoded) => decoded,
        Err(e) => return (dimensions, Err(refused(&e))),
    };
    let small = decoded.thumbnail(THUMB_SIDE, THUMB_SIDE);
    let mut bytes = Vec::new();
    let encoded = if small.color().has_alpha() {
        small
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .map(|()| "image/png")
    } else {
        small
            .to_rgb8()
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .map(|()| "image/jpeg")
    };
    match encoded {
        Ok(content_type) => (
            dimensions,
            Ok(Thumb {
                bytes,
                content_type,
            }),
        ),
        Err(e) => (dimensions, Err(refused(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn a_thumbnail_fits_the_longest_side() {
        let (dimensions, thumb) = render(&png(1000, 400), 1_000_000);
        assert_eq!(dimensions, Some((1000, 400)));
        let thumb = thumb.unwrap();
        assert_eq!(thumb.content_type, "image/jpeg");
        let decoded = image::load_from_memory(&thumb.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 128));
    }

    #[test]
    fn too_many_pixels_or_garbage_make_none() {
        let (dimensions, thumb) = render(&png(2000, 2000), 1_000_000);
        assert_eq!(dimensions, Some((2000, 2000)));
        assert!(matches!(thumb, Err(ThumbError::Refused(_))));
        let mut cut = png(50, 50);
        cut.truncate(cut.len() / 2);
        assert!(matches!(
            render(&cut, 1_000_000).1,
            Err(ThumbError::Refused(_))
        ));
        assert!(matches!(
            render(b"plain text", 1_000_000).1,
            Err(ThumbError::Refused(_))
        ));
    }
}
