//! Start-up failures common to every service; each crate's own error enum
//! wraps this one and adds what only it can hit.

use crate::nats;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Nats(#[from] nats::ConnectError),
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        subject: &'static str,
        source: async_nats::SubscribeError,
    },
    #[error("stream {name}: {source}")]
    Stream {
        name: String,
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("object store {name}: {source}")]
    ObjectStore {
        name: &'static str,
        source: async_nats::jetstream::context::ObjectStoreError,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}
