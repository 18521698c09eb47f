//! Push token registration. A token is held by one user: that user may
//! move it between their devices (re-registering it from another device),
//! but another account registering it is refused (`forbidden`), so nobody
//! can take over the notifications of a token they learned. Each user holds
//! at most `CHAT_PUSH_MAX_TOKENS_PER_USER` tokens on at most
//! `CHAT_PUSH_MAX_DEVICES_PER_USER` devices; a registration past a cap drops
//! the least recently registered ones (see `chat_shared::config::PushTokenLimits` for why).
//!
//! Every change also rewrites the user's record in the push bucket (the
//! devices that hold a token), under the same per-user lock and before the
//! commit, so the router decides whom to push without asking PostgreSQL
//! and two changes cannot write their records out of order. A commit that
//! fails after the write is answered `unavailable`: a registration leaves
//! a device listed without a token (pushd finds none and sends nothing)
//! until the client's retry; an unregistration leaves the token unlisted,
//! which the retry completes. Tokens registered before this record existed
//! have none: the router then pushes the user as before, to every token
//! while no device is connected.

use chat_shared::ids::{DeviceId, UserId};
use chat_shared::push::PushDevices;
use chat_shared::rpc::{self, RpcError};
use chat_shared::subjects;
use chat_shared::wire::ErrorCode;
use deadpool_postgres::tokio_postgres::error::SqlState;

use super::{begin, column, now_ms, unavailable, Service};

fn held_by_another() -> RpcError {
    RpcError::new(
        ErrorCode::Forbidden,
        "this push token is registered to another account; it must unregister it first",
    )
}

impl Service {
    pub(super) async fn push_register(
        &self,
        request: rpc::PushTokenRequest,
    ) -> Result<(), RpcError> {
        request
            .platform
            .validate_token(&request.token)
            .map_err(|reason| RpcError::new(ErrorCode::BadRequest, reason.to_string()))?;
        let user = request.user.as_str();
        let device = request.device.as_str();
        let platform = request.platform.as_str();
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        // One registration of a user at a time, so two at once cannot both
        // stay under a cap.
        lock_user(&tx, &request.user).await?;
        let holder = tx
            .query_opt(
                "SELECT user_id, device FROM push_tokens \
                 WHERE platform = $1 AND token = $2 FOR UPDATE",
                &[&platform, &request.token],
            )
            .await
            .map_err(unavailable("read push_tokens"))?;
        if let Some(holder) = holder {
            let (holder_user, holder_device): (&str, &str) =
                (column(&holder, 0)?, column(&holder, 1)?);
            if holder_user != user {
                return Err(held_by_another());
            }
            if holder_device != device {
                // The same user's other device: the token moves here.
                tx.execute(
                    "DELETE FROM push_tokens WHERE user_id = $1 AND device = $2 AND platform = $3",
                    &[&user, &holder_device, &platform],
                )
                .await
                .map_err(unavailable("delete from push_tokens"))?;
            }
        }
        let inserted = tx
            .execute(
                "INSERT INTO push_tokens (user_id, device, platform, token, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (user_id, device, platform) \
                 DO UPDATE SET token = EXCLUDED.token, updated_at = EXCLUDED.updated_at",
                &[&user, &device, &platform, &request.token, &now_ms()],
            )
            .await;
        match inserted {
            Ok(_) => {}
            // Another account registered the token since we looked.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                return Err(held_by_another())
            }
            Err(e) => return Err(unavailable("insert into push_tokens")(e)),
        }
        self.enforce_caps(&tx, &request).await?;
        self.record_devices(&tx, &request.user).await?;
        tx.commit().await.map_err(unavailable("commit"))
    }

    /// Writes the devices that hold a token after this transaction into the
    /// push bucket; the caller holds the user's lock.
    async fn record_devices(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        user: &UserId,
    ) -> Result<(), RpcError> {
        let rows = tx
            .query(
                "SELECT DISTINCT device FROM push_tokens WHERE user_id = $1 ORDER BY device",
                &[&user.as_str()],
            )
            .await
            .map_err(unavailable("read push_tokens"))?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            let device: &str = column(row, 0)?;
            // Stored through `DeviceId` only; a row that is not one is skipped.
            if let Ok(device) = DeviceId::parse(device) {
                devices.push(device);
            }
        }
        let body = serde_json::to_vec(&PushDevices { devices })
            .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?;
        self.push_devices
            .put(subjects::push_devices_key(user), body.into())
            .await
            .map_err(unavailable("write the push bucket"))?;
        Ok(())
    }

    /// Drops the user's least recently registered devices, then tokens,
    /// beyond the caps; the registration being made always stays.
    async fn enforce_caps(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        request: &rpc::PushTokenRequest,
    ) -> Result<(), RpcError> {
        let caps = &self.push_tokens;
        let (user, device, platform) = (
            request.user.as_str(),
            request.device.as_str(),
            request.platform.as_str(),
        );
        let other_devices = caps.devices_per_user.saturating_sub(1) as i64;
        let devices = tx
            .execute(
                "DELETE FROM push_tokens WHERE user_id = $1 AND device IN (
                     SELECT device FROM push_tokens WHERE user_id = $1 AND device <> $2
                     GROUP BY device ORDER BY max(updated_at) DESC, device DESC OFFSET $3)",
                &[&user, &device, &other_devices],
            )
            .await
            .map_err(unavailable("read push_tokens"))?;
        let other_tokens = caps.per_user.saturating_sub(1) as i64;
        let tokens = tx
            .execute(
                "DELETE FROM push_tokens WHERE user_id = $1 AND (device, platform) IN (
                     SELECT device, platform FROM push_tokens
                     WHERE user_id = $1 AND NOT (device = $2 AND platform = $3)
                     ORDER BY updated_at DESC, device DESC, platform DESC OFFSET $4)",
                &[&user, &device, &platform, &other_tokens],
            )
            .await
            .map_err(unavailable("read push_tokens"))?;
        if devices + tokens > 0 {
            tracing::info!(
                %user,
                dropped = devices + tokens,
                "push tokens past the caps dropped, oldest first"
            );
        }
        Ok(())
    }

    /// Removes the token if this user holds it; `ok` either way, so a client
    /// may unregister without remembering what it registered.
    pub(super) async fn push_unregister(
        &self,
        request: rpc::PushTokenRequest,
    ) -> Result<(), RpcError> {
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        lock_user(&tx, &request.user).await?;
        let deleted = tx
            .execute(
                "DELETE FROM push_tokens WHERE user_id = $1 AND platform = $2 AND token = $3",
                &[
                    &request.user.as_str(),
                    &request.platform.as_str(),
                    &request.token,
                ],
            )
            .await
            .map_err(unavailable("delete from push_tokens"))?;
        if deleted > 0 {
            self.record_devices(&tx, &request.user).await?;
        }
        tx.commit().await.map_err(unavailable("commit"))
    }
}

/// Takes the user's push-token lock for the rest of the transaction.
async fn lock_user(tx: &deadpool_postgres::Transaction<'_>, user: &UserId) -> Result<(), RpcError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("push:{user}")],
    )
    .await
    .map_err(unavailable("lock the user's push tokens"))?;
    Ok(())
}
