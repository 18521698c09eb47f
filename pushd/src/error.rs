/// Why pushd could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum PushdError {
    #[error(transparent)]
    Start(#[from] chat_shared::StartError),
    #[error("PostgreSQL shards: {0}")]
    Database(#[from] chat_persister::shards::ShardsError),
    /// A provider's settings or key files are unusable.
    #[error("{provider}: {reason}")]
    Provider {
        provider: &'static str,
        reason: String,
    },
}

impl PushdError {
    pub(crate) fn provider(provider: &'static str, reason: impl ToString) -> Self {
        Self::Provider {
            provider,
            reason: reason.to_string(),
        }
    }
}
