//! The edge as a separate process, for tests that kill it (`kill -9` leaves
//! no close frames and no disconnect reports, which an in-process edge
//! cannot imitate). Reads its configuration from the environment like
//! `chat-edge`, binds `CHAT_EDGE_ADDR` and prints the bound address.

use std::io::Write;

use chat_shared::{bin, shutdown};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match bin::start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Ok(listener) = tokio::net::TcpListener::bind(config.edge_addr).await else {
        return std::process::ExitCode::FAILURE;
    };
    let Ok(addr) = listener.local_addr() else {
        return std::process::ExitCode::FAILURE;
    };
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    bin::finish(
        "edge",
        chat_edge::run(config, listener, shutdown::signal()).await,
    )
}
