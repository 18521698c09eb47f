//! Operators' moderation of one user (`chatctl user ban|unban|kick|revoke`),
//! as the NATS `admin` user.
//!
//! Each action writes the `chat_moderation` bucket first (the record every
//! edge reloads after a restart), then tells every edge at once on
//! `chat.mod.<user>` (core NATS; an edge that misses it catches up from its
//! bucket watcher), then leaves an [`AuditEvent`] on the AUDIT stream. See
//! `shared::moderation` for the records and what the edges do with them.

use anyhow::{ensure, Context};
use async_nats::jetstream::{self, kv};
use chat_shared::clock::now_secs;
use chat_shared::ids::UserId;
use chat_shared::moderation::{Action, AuditEvent, Ban, Notice, Revocation};
use chat_shared::subjects;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Who acts, and the connection they act over.
pub struct Moderator {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: kv::Store,
    operator: String,
}

impl Moderator {
    /// `client` should be the admin user's: no other may write the bucket or
    /// publish notices.
    pub async fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        operator: String,
    ) -> anyhow::Result<Self> {
        let bucket = js
            .get_key_value(subjects::MODERATION_BUCKET)
            .await
            .context("the moderation bucket (chatctl streams apply creates it)")?;
        Ok(Self {
            client,
            js,
            bucket,
            operator,
        })
    }

    /// Bans `user` until `until` (seconds since the epoch; forever without
    /// it): their sessions close with 4001 on every edge and `hello` is
    /// refused. A ban again replaces the previous one.
    pub async fn ban(
        &self,
        user: &UserId,
        until: Option<u64>,
        reason: Option<String>,
    ) -> anyhow::Result<AuditEvent> {
        let at = now_secs();
        if let Some(until) = until {
            // A ban that is over before it starts is a typo (a past year),
            // not an action.
            ensure!(until > at, "--until is not in the future");
        }
        let ban = Ban { at, until };
        let revision = self.put(&subjects::ban_key(user), &ban).await?;
        self.notify(user, &Notice::Ban { revision, ban }).await?;
        self.audit(Action::Ban, user, reason, at, until).await
    }

    /// Lifts `user`'s ban. Edges learn it from their bucket watchers.
    pub async fn unban(&self, user: &UserId, reason: Option<String>) -> anyhow::Result<AuditEvent> {
        let at = now_secs();
        self.bucket
            .delete(subjects::ban_key(user))
            .await
            .context("deleting the ban")?;
        self.audit(Action::Unban, user, reason, at, None).await
    }

    /// Closes `user`'s sessions on every edge; they may connect again.
    pub async fn kick(&self, user: &UserId, reason: Option<String>) -> anyhow::Result<AuditEvent> {
        let at = now_secs();
        self.notify(user, &Notice::Kick).await?;
        self.audit(Action::Kick, user, reason, at, None).await
    }

    /// Refuses every token of `user` issued up to now (at `hello` and
    /// `refresh`) and closes their sessions; tokens issued from the next
    /// second on are accepted.
    pub async fn revoke(
        &self,
        user: &UserId,
        reason: Option<String>,
    ) -> anyhow::Result<AuditEvent> {
        let at = now_secs();
        let revocation = Revocation { at };
        let revision = self.put(&subjects::revoke_key(user), &revocation).await?;
        self.notify(
            user,
            &Notice::Revoke {
                revision,
                revocation,
            },
        )
        .await?;
        self.audit(Action::Revoke, user, reason, at, None).await
    }

    async fn put<T: serde::Serialize>(&self, key: &str, record: &T) -> anyhow::Result<u64> {
        self.bucket
            .put(key, serde_json::to_vec(record)?.into())
            .await
            .with_context(|| format!("writing {key}"))
    }

    /// Publishes the notice and waits until the server has it.
    async fn notify(&self, user: &UserId, notice: &Notice) -> anyhow::Result<()> {
        self.client
            .publish(
                subjects::moderation_notice(user),
                serde_json::to_vec(notice)?.into(),
            )
            .await
            .context("publishing the notice")?;
        self.client.flush().await.context("flushing the notice")?;
        Ok(())
    }

    async fn audit(
        &self,
        action: Action,
        user: &UserId,
        reason: Option<String>,
        at: u64,
        until: Option<u64>,
    ) -> anyhow::Result<AuditEvent> {
        let event = AuditEvent {
            action,
            user: user.clone(),
            by: self.operator.clone(),
            reason,
            at,
            until,
        };
        self.js
            .publish(subjects::audit(action), serde_json::to_vec(&event)?.into())
            .await
            .context("publishing the audit event")?
            .await
            .context("storing the audit event")?;
        Ok(event)
    }
}

/// Reads a ban's end: RFC 3339 (`2026-01-31T12:00:00Z`) or a time from
/// `now` (`90s`, `10m`, `2h`, `7d`), as seconds since the epoch.
pub fn parse_until(text: &str, now: OffsetDateTime) -> Result<u64, String> {
    let until = match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(instant) => instant,
        Err(_) => {
            let ahead = crate::client::parse_duration(text)
                .map_err(|_| format!("{text:?}: expected RFC 3339 or a time like 10m, 2h, 7d"))?;
            now.checked_add(time::Duration::try_from(ahead).map_err(|e| e.to_string())?)
                .ok_or_else(|| format!("{text:?} is too far ahead"))?
        }
    };
    u64::try_from(until.unix_timestamp()).map_err(|_| format!("{text:?} is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_ends_at_an_instant_or_after_a_while() {
        let now = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        assert_eq!(parse_until("2h", now), Ok(1_000_000 + 7200));
        assert_eq!(parse_until("1970-01-02T00:00:00Z", now), Ok(86_400));
        assert!(parse_until("1969-12-31T00:00:00Z", now).is_err());
        assert!(parse_until("soon", now).is_err());
    }
}
