/// Why the persister could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum PersisterError {
    #[error(transparent)]
    Start(#[from] chat_shared::StartError),
    #[error("PostgreSQL: {0}")]
    Database(String),
}
