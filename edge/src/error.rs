use chat_shared::{auth, lease};

/// Why the edge could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Start(#[from] chat_shared::StartError),
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error("invalid edge id: {0}")]
    EdgeId(#[from] chat_shared::ids::InvalidId),
    #[error(
        "CHAT_DEV_TOKENS=true lets anyone who reaches {addr} sign in as any user; listen on a \
         loopback address, or set CHAT_DEV_TOKENS_PUBLIC=true to mean it"
    )]
    PublicDevTokens { addr: std::net::SocketAddr },
    #[error(transparent)]
    LiveLink(#[from] crate::livelink::LinkError),
    #[error("reading the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
}
