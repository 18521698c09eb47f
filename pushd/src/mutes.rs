//! `mutes`: conversations a user muted (PROTOCOL.md v1.1 `mute`). A muted
//! conversation still counts unread; only its pushes are held back, unless
//! the user is mentioned.
//!
//! The check lives here, not in the router: pushd already reads
//! PostgreSQL for each window (tokens, the badge), so a mute costs one more
//! query per window instead of a request to the persister per push job, and a
//! mute set while a job waits in PUSH is honoured when it is sent.

use std::collections::HashSet;

use chat_shared::ids::UserId;
use chat_shared::push::PushJob;
use deadpool_postgres::Pool;

/// Whether a job's push is held back: its conversation is muted and the
/// user is not mentioned in its message.
pub fn suppressed(muted: bool, mentioned: bool) -> bool {
    muted && !mentioned
}

/// Which of `conversations` `user` has muted at `now_ms`.
async fn muted(
    pool: &Pool,
    user: &UserId,
    conversations: &[String],
    now_ms: i64,
) -> Result<HashSet<String>, MuteError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT conversation FROM mutes
             WHERE user_id = $1 AND conversation = ANY($2::text[]) AND until > $3",
            &[&user.as_str(), &conversations, &now_ms],
        )
        .await?;
    rows.iter()
        .map(|row| row.try_get::<_, String>(0).map_err(MuteError::from))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum MuteError {
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("reading mutes: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// `jobs` (all of one user) without those their mutes hold back. If the
/// mutes cannot be read every job stays: a needless notification beats a
/// missing one.
pub async fn unmuted(pool: &Pool, user: &UserId, jobs: Vec<PushJob>) -> Vec<PushJob> {
    let conversations: Vec<String> = jobs
        .iter()
        .map(|job| job.conversation.to_string())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let now = i64::try_from(chat_shared::clock::now_ms()).unwrap_or(i64::MAX);
    let muted = match muted(pool, user, &conversations, now).await {
        Ok(muted) => muted,
        Err(e) => {
            tracing::warn!(error = %e, %user, "cannot read mutes; pushing anyway");
            return jobs;
        }
    };
    jobs.into_iter()
        .filter(|job| !suppressed(muted.contains(&job.conversation.to_string()), job.mentioned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mute_holds_back_pushes_unless_mentioned() {
        assert!(suppressed(true, false));
        assert!(!suppressed(true, true), "a mention pushes anyway");
        assert!(!suppressed(false, false));
        assert!(!suppressed(false, true));
    }
}
