//! Push token registration. A token belongs to the device that registered
//! it last: registering it elsewhere (another account on the same phone)
//! moves it, so the old account's notifications stop reaching that phone.

use chat_shared::rpc::{self, RpcError};
use chat_shared::wire::ErrorCode;

use super::{now_ms, unavailable, Service};

impl Service {
    pub(super) async fn push_register(
        &self,
        request: rpc::PushTokenRequest,
    ) -> Result<(), RpcError> {
        request
            .platform
            .validate_token(&request.token)
            .map_err(|reason| RpcError::new(ErrorCode::BadRequest, reason))?;
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(unavailable)?;
        let platform = request.platform.as_str();
        tx.execute(
            "DELETE FROM push_tokens WHERE platform = $1 AND token = $2 \
             AND NOT (user_id = $3 AND device = $4)",
            &[
                &platform,
                &request.token,
                &request.user.as_str(),
                &request.device.as_str(),
            ],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            "INSERT INTO push_tokens (user_id, device, platform, token, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (user_id, device, platform) \
             DO UPDATE SET token = EXCLUDED.token, updated_at = EXCLUDED.updated_at",
            &[
                &request.user.as_str(),
                &request.device.as_str(),
                &platform,
                &request.token,
                &now_ms(),
            ],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    /// Removes the token if this user holds it; `ok` either way, so a client
    /// may unregister without remembering what it registered.
    pub(super) async fn push_unregister(
        &self,
        request: rpc::PushTokenRequest,
    ) -> Result<(), RpcError> {
        let db = self.client().await?;
        db.execute(
            "DELETE FROM push_tokens WHERE user_id = $1 AND platform = $2 AND token = $3",
            &[
                &request.user.as_str(),
                &request.platform.as_str(),
                &request.token,
            ],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}
