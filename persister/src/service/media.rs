//! `media_stored` and `media_access`: what edges need to know of media
//! (they never touch PostgreSQL). An upload is recorded with its uploader
//! and, for an image, queued for a thumbnail; access is decided here at
//! the time of each request, so a member removed from a group stops
//! seeing its media at once.

use async_nats::HeaderMap;
use chat_shared::ids::{MediaId, UserId};
use chat_shared::rpc::{self, MediaInfo, RpcError};
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, MAX_ATTACHMENTS};
use deadpool_postgres::GenericClient;

use super::{begin, column, corrupt, now_ms, unavailable, Service};

/// A media row as `media_info` reads it: media, size, content_type, width,
/// height.
const MEDIA_COLUMNS: &str = "m.media, m.size, m.content_type, m.width, m.height";

fn media_info(row: &tokio_postgres::Row) -> Result<MediaInfo, RpcError> {
    let dimension = |index| -> Result<Option<u32>, RpcError> {
        Ok(column::<Option<i32>>(row, index)?.and_then(|v| u32::try_from(v).ok()))
    };
    Ok(MediaInfo {
        media: MediaId::parse(column::<String>(row, 0)?).map_err(|_| corrupt("media id"))?,
        size: u64::try_from(column::<i64>(row, 1)?).map_err(|_| corrupt("media size"))?,
        content_type: column(row, 2)?,
        width: dimension(3)?,
        height: dimension(4)?,
    })
}

impl Service {
    pub(super) async fn media_stored(
        &self,
        request: rpc::MediaStoredRequest,
    ) -> Result<MediaInfo, RpcError> {
        let media = request.media;
        let size = i64::try_from(media.size)
            .map_err(|_| RpcError::new(ErrorCode::BadRequest, "size out of range"))?;
        let dimension = |v: Option<u32>| v.and_then(|v| i32::try_from(v).ok());
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        // The first upload's type stays (the same bytes are the same
        // media); dimensions fill in what was not known.
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO media AS m (media, size, content_type, width, height, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (media) DO UPDATE
                       SET width = COALESCE(m.width, EXCLUDED.width),
                           height = COALESCE(m.height, EXCLUDED.height)
                     RETURNING {MEDIA_COLUMNS}, m.thumb"
                ),
                &[
                    &media.media.as_str(),
                    &size,
                    &media.content_type,
                    &dimension(media.width),
                    &dimension(media.height),
                    &now_ms(),
                ],
            )
            .await
            .map_err(unavailable("insert media"))?;
        tx.execute(
            "INSERT INTO media_uploaders (media, user_id, uploaded_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&media.media.as_str(), &request.user.as_str(), &now_ms()],
        )
        .await
        .map_err(unavailable("insert media_uploaders"))?;
        tx.commit().await.map_err(unavailable("commit media"))?;
        let stored = media_info(&row)?;
        let has_thumb: bool = column(&row, 5)?;
        if stored.is_image() && !has_thumb {
            self.queue_thumbnail(&stored.media).await?;
        }
        Ok(stored)
    }

    /// Queues the thumbnail job of an image; a repeated upload within the
    /// duplicate window queues none.
    async fn queue_thumbnail(&self, media: &MediaId) -> Result<(), RpcError> {
        let mut headers = HeaderMap::new();
        headers.insert(subjects::MSG_ID_HEADER, format!("thumb:{media}").as_str());
        let queued = async {
            self.js
                .publish_with_headers(subjects::thumb_job(media), headers, bytes::Bytes::new())
                .await?
                .await
        };
        queued.await.map(|_| ()).map_err(|e| {
            tracing::warn!(error = %e, "cannot queue a thumbnail");
            RpcError::new(
                ErrorCode::Unavailable,
                "media store unavailable, retry later",
            )
        })
    }

    pub(super) async fn media_access(
        &self,
        request: rpc::MediaAccessRequest,
    ) -> Result<Vec<MediaInfo>, RpcError> {
        if request.media.len() > MAX_ATTACHMENTS {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                format!("at most {MAX_ATTACHMENTS} media"),
            ));
        }
        visible_media(&self.shards, &request.user, &request.media).await
    }

    /// Whether `avatar` is an image `user` uploaded (`profile.set`).
    pub(super) async fn uploaded_image(
        &self,
        db: &impl GenericClient,
        user: &UserId,
        avatar: &MediaId,
    ) -> Result<bool, RpcError> {
        let row = db
            .query_opt(
                "SELECT 1 FROM media m
                 JOIN media_uploaders u ON u.media = m.media AND u.user_id = $2
                 WHERE m.media = $1 AND m.content_type LIKE 'image/%'",
                &[&avatar.as_str(), &user.as_str()],
            )
            .await
            .map_err(unavailable("read media"))?;
        Ok(row.is_some())
    }
}

/// The metadata of those of `media` that `user` may see, in the order
/// asked: their uploader, anyone for a media that is someone's current
/// avatar (profiles are public, and so is their picture), both read on the
/// home shard with the media's own row; else a current member of a
/// conversation in which a message that is not deleted carries them, asked
/// of every shard until each media is settled (the attachment is on its
/// conversation's shard, with the group's members; a DM's members are in
/// its id).
async fn visible_media(
    shards: &crate::shards::Shards,
    user: &UserId,
    media: &[MediaId],
) -> Result<Vec<MediaInfo>, RpcError> {
    let ids: Vec<&str> = media.iter().map(MediaId::as_str).collect();
    let rows = super::connect(shards.home())
        .await?
        .query(
            &format!(
                "SELECT {MEDIA_COLUMNS},
                        EXISTS (SELECT 1 FROM media_uploaders u
                                WHERE u.media = m.media AND u.user_id = $2)
                        OR EXISTS (SELECT 1 FROM profiles p WHERE p.avatar = m.media)
                 FROM unnest($1::text[]) WITH ORDINALITY AS asked (media, n)
                 JOIN media m ON m.media = asked.media
                 ORDER BY asked.n"
            ),
            &[&ids, &user.as_str()],
        )
        .await
        .map_err(unavailable("read media access"))?;
    let mut known: Vec<(MediaInfo, bool)> = Vec::with_capacity(rows.len());
    for row in &rows {
        let info = media_info(row)?;
        // A media named twice is answered once.
        if !known.iter().any(|(k, _)| k.media == info.media) {
            known.push((info, column(row, 5)?));
        }
    }
    for (_, pool) in shards.all() {
        let unsettled: Vec<&str> = known
            .iter()
            .filter(|(_, allowed)| !allowed)
            .map(|(info, _)| info.media.as_str())
            .collect();
        if unsettled.is_empty() {
            break;
        }
        let attached = super::connect(pool)
            .await?
            .query(
                "SELECT DISTINCT a.media FROM message_attachments a
                 JOIN messages msg ON msg.conversation = a.conversation
                                  AND msg.id = a.message_id AND NOT msg.deleted
                 WHERE a.media = ANY($1::text[])
                   AND CASE split_part(a.conversation, ':', 1)
                         WHEN 'dm' THEN $2 IN (split_part(a.conversation, ':', 2),
                                               split_part(a.conversation, ':', 3))
                         ELSE EXISTS (SELECT 1 FROM group_members g
                                      WHERE g.group_id = substr(a.conversation, 7)
                                        AND g.user_id = $2)
                       END",
                &[&unsettled, &user.as_str()],
            )
            .await
            .map_err(unavailable("read media access"))?;
        for row in &attached {
            let id: &str = column(row, 0)?;
            for (info, allowed) in known.iter_mut() {
                *allowed |= info.media.as_str() == id;
            }
        }
    }
    Ok(known
        .into_iter()
        .filter_map(|(info, allowed)| allowed.then_some(info))
        .collect())
}
