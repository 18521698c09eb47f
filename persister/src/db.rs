//! A PostgreSQL pool (one per shard, `shards`) of the services that own tables (persister, pushd).
//! It lives in the persister's library, not in `chat-shared`, so the crate
//! graph keeps the database driver out of every edge, router and presence
//! build: they reach PostgreSQL only through the persister's request/reply
//! service.

use std::time::Duration;

use chat_shared::Config;

pub use deadpool_postgres::{CreatePoolError, Pool};

/// A lazily connecting pool: it opens connections on demand and replaces
/// broken ones, so a database restart needs no service restart. Every wait
/// is bounded, so an outage surfaces as an error instead of a hang.
pub fn connect_pool(config: &Config, url: &str) -> Result<Pool, CreatePoolError> {
    let mut pg = deadpool_postgres::Config::new();
    pg.url = Some(url.to_string());
    pg.pool = Some(deadpool_postgres::PoolConfig {
        max_size: config.database_pool_size,
        timeouts: deadpool_postgres::Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        },
        ..Default::default()
    });
    pg.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )
}
