//! `push_tokens`: the devices to notify, and removing the ones a provider
//! called invalid.

use chat_shared::ids::{DeviceId, UserId};
use chat_shared::push::Platform;
use deadpool_postgres::Pool;

use crate::providers::Token;

/// Why the tokens could not be read or removed; the worker retries or
/// leaves the token for the next notification.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

const ROW: &str = "reading a push_tokens row";

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> TokenError {
    move |source| TokenError::Query { what, source }
}

/// The `most` recently registered tokens of `user` on `devices` (all
/// their devices for `None`): the persister keeps no more than that, and
/// rows from before the cap (or a lowered cap) do not turn one message into
/// more notifications. A platform the database knows but this build does
/// not (its CHECK allows only ours) is skipped.
pub async fn of_user(
    pool: &Pool,
    user: &UserId,
    devices: Option<&[DeviceId]>,
    most: usize,
) -> Result<Vec<Token>, TokenError> {
    let client = pool.get().await?;
    let devices: Option<Vec<&str>> = devices.map(|d| d.iter().map(DeviceId::as_str).collect());
    let rows = client
        .query(
            "SELECT platform, token, updated_at FROM push_tokens
             WHERE user_id = $1 AND ($3::text[] IS NULL OR device = ANY($3))
             ORDER BY updated_at DESC LIMIT $2",
            &[&user.as_str(), &(most as i64), &devices],
        )
        .await
        .map_err(query("reading push tokens"))?;
    let mut tokens = Vec::with_capacity(rows.len());
    for row in &rows {
        let platform: &str = row.try_get(0).map_err(query(ROW))?;
        let Some(platform) = Platform::parse(platform) else {
            continue;
        };
        tokens.push(Token {
            platform,
            token: row.try_get(1).map_err(query(ROW))?,
            updated_at: row.try_get(2).map_err(query(ROW))?,
        });
    }
    Ok(tokens)
}

/// Deletes `token` unless it was registered again after we read it (a
/// reinstalled app may get the same token back, valid again).
pub async fn remove(pool: &Pool, token: &Token) -> Result<bool, TokenError> {
    let client = pool.get().await?;
    let deleted = client
        .execute(
            "DELETE FROM push_tokens WHERE platform = $1 AND token = $2 AND updated_at <= $3",
            &[&token.platform.as_str(), &token.token, &token.updated_at],
        )
        .await
        .map_err(query("deleting a push token"))?;
    Ok(deleted > 0)
}
