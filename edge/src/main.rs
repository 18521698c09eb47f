use chat_shared::{bin, shutdown};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match bin::start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Bind before running, so a taken port fails fast and tests can bind port 0.
    let listener = match tokio::net::TcpListener::bind(config.edge_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.edge_addr, error = %e, "cannot bind");
            return std::process::ExitCode::FAILURE;
        }
    };
    bin::finish(
        "edge",
        chat_edge::run(config, listener, shutdown::signal()).await,
    )
}
