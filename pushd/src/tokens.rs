//! `push_tokens`: the devices to notify, and removing the ones a provider
//! called invalid.

use chat_shared::ids::UserId;
use chat_shared::push::Platform;
use deadpool_postgres::Pool;

use crate::providers::Token;

/// The `most` recently registered tokens of `user`: the persister keeps
/// no more than that, and rows from before the cap (or a lowered cap) do
/// not turn one message into more notifications. A platform the database
/// knows but this build does not (its CHECK allows only ours) is skipped.
pub async fn of_user(pool: &Pool, user: &UserId, most: usize) -> Result<Vec<Token>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT platform, token, updated_at FROM push_tokens WHERE user_id = $1
             ORDER BY updated_at DESC LIMIT $2",
            &[&user.as_str(), &(most as i64)],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(Token {
                platform: Platform::parse(row.get::<_, &str>(0))?,
                token: row.get(1),
                updated_at: row.get(2),
            })
        })
        .collect())
}

/// Deletes `token` unless it was registered again after we read it (a
/// reinstalled app may get the same token back, valid again).
pub async fn remove(pool: &Pool, token: &Token) -> Result<bool, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let deleted = client
        .execute(
            "DELETE FROM push_tokens WHERE platform = $1 AND token = $2 AND updated_at <= $3",
            &[&token.platform.as_str(), &token.token, &token.updated_at],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(deleted > 0)
}
