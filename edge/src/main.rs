use chat_shared::{shutdown, telemetry, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(64);
        }
    };
    telemetry::init(config.log_json);
    let listener = match tokio::net::TcpListener::bind(config.edge_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.edge_addr, error = %e, "cannot bind");
            return std::process::ExitCode::FAILURE;
        }
    };
    match chat_edge::run(config, listener, shutdown::signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "edge failed");
            std::process::ExitCode::FAILURE
        }
    }
}
