//! Start-up failures common to every service; each crate's own error enum
//! wraps this one and adds what only it can hit.

use crate::nats;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Nats(#[from] nats::ConnectError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("listening on {addr}: {reason}")]
    Listen {
        addr: std::net::SocketAddr,
        reason: String,
    },
}
