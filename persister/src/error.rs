/// Why the persister could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum PersisterError {
    #[error(transparent)]
    Nats(#[from] chat_shared::nats::ConnectError),
    #[error(transparent)]
    Provision(#[from] chat_shared::streams::ProvisionError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("PostgreSQL: {0}")]
    Database(String),
}
