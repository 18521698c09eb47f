//! Embedded schema migrations, applied in order at start under an advisory
//! lock, so several persisters starting at once apply each one exactly once.

use deadpool_postgres::Pool;

use crate::PersisterError;

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_outbox_order.sql")),
    (3, include_str!("../migrations/0003_push_tokens.sql")),
    (4, include_str!("../migrations/0004_friendships.sql")),
];
/// Any constant shared by all persisters; it names the advisory lock.
const LOCK_KEY: i64 = 0x6368_6174;

pub async fn run(pool: &Pool) -> Result<(), PersisterError> {
    let db = |e: &dyn std::fmt::Display| PersisterError::Database(e.to_string());
    let mut client = pool.get().await.map_err(|e| db(&e))?;
    let tx = client.transaction().await.map_err(|e| db(&e))?;
    // Everything, the bookkeeping table included, under the lock: two
    // persisters starting together must not race on it.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| db(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| db(&e))?;
    for (version, sql) in MIGRATIONS {
        let applied = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(|e| db(&e))?
            .is_some();
        if !applied {
            tx.batch_execute(sql).await.map_err(|e| db(&e))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(|e| db(&e))?;
            tracing::info!(version, "migration applied");
        }
    }
    tx.commit().await.map_err(|e| db(&e))
}
