/// Why the persister could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum PersisterError {
    #[error(transparent)]
    Start(#[from] chat_shared::StartError),
    #[error("PostgreSQL shards: {0}")]
    Shards(#[from] crate::shards::ShardsError),
    #[error("no PostgreSQL connection: {0}")]
    Connection(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL, {what}: {source}")]
    Database {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}
