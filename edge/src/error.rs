use chat_shared::{auth, lease, nats};

/// Why the edge could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Nats(#[from] nats::ConnectError),
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error("invalid edge id: {0}")]
    EdgeId(#[from] chat_shared::ids::InvalidId),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}
