//! Embedded schema migrations, applied in order at start under an advisory
//! lock, so several persisters starting at once apply each one exactly once.

use deadpool_postgres::Pool;

use crate::PersisterError;

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_outbox_order.sql")),
    (3, include_str!("../migrations/0003_push_tokens.sql")),
    (4, include_str!("../migrations/0004_friendships.sql")),
    (5, include_str!("../migrations/0005_message_changes.sql")),
    (6, include_str!("../migrations/0006_receipts.sql")),
    (7, include_str!("../migrations/0007_privacy.sql")),
    (8, include_str!("../migrations/0008_search_profiles.sql")),
    (9, include_str!("../migrations/0009_media.sql")),
    // 10 and 12 were never used (numbers held for a branch that landed as
    // 14 and 15, after 11 and 13, so every database applies one order).
    (11, include_str!("../migrations/0011_search_any_script.sql")),
    (13, include_str!("../migrations/0013_public_avatars.sql")),
    (14, include_str!("../migrations/0014_shard_ready.sql")),
    (15, include_str!("../migrations/0015_message_months.sql")),
    (16, include_str!("../migrations/0016_bucket_moves.sql")),
];
/// Any constant shared by all persisters; it names the advisory lock.
const LOCK_KEY: i64 = 0x6368_6174;

/// Applies every migration to each shard: all shards have every table.
pub async fn run_all(shards: &crate::shards::Shards) -> Result<(), PersisterError> {
    for (_, pool) in shards.all() {
        run(pool).await?;
    }
    Ok(())
}

async fn run(pool: &Pool) -> Result<(), PersisterError> {
    let db = |what| move |source| PersisterError::Database { what, source };
    let mut client = pool.get().await?;
    let tx = client.transaction().await.map_err(db("begin migrations"))?;
    // Everything, the bookkeeping table included, under the lock: two
    // persisters starting together must not race on it.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db("lock migrations"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db("create schema_migrations"))?;
    for (version, sql) in MIGRATIONS {
        let applied = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(db("read schema_migrations"))?
            .is_some();
        if !applied {
            tx.batch_execute(sql)
                .await
                .map_err(db("apply a migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(db("record a migration"))?;
            tracing::info!(version, "migration applied");
        }
    }
    tx.commit().await.map_err(db("commit migrations"))
}

#[cfg(test)]
mod tests {
    use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};

    fn migration(version: i32) -> &'static str {
        super::MIGRATIONS
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, sql)| *sql)
            .unwrap_or_default()
    }

    /// 0014 turns a join time into an id floor, and 0015 the oldest id into
    /// its month, with the id layout's constants written out.
    #[test]
    fn migrations_use_the_id_layout() {
        let shift = NODE_BITS + SEQUENCE_BITS;
        let floor = format!("GREATEST(joined_at - {EPOCH_MS}, 0) << {shift}");
        assert!(migration(14).contains(&floor), "0014 lacks {floor}");
        let oldest = format!("(min(id) >> {shift}) + {EPOCH_MS}");
        assert!(migration(15).contains(&oldest), "0015 lacks {oldest}");
        assert!(migration(15).contains(&format!("{EPOCH_MS}, {shift});")));
    }

    /// The fence's shared lock is the one a move takes exclusively.
    #[test]
    fn the_fence_and_the_move_take_one_lock() {
        let shared = format!("pg_advisory_xact_lock_shared({})", crate::moves::MOVE_LOCK);
        assert!(migration(16).contains(&shared), "0016 lacks {shared}");
    }
}
