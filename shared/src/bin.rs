//! The start and end of every service binary, so each `main.rs` stays thin.

use std::future::Future;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::shutdown::{self, Shutdown};
use crate::{metrics, telemetry, Config, StartError};

/// Reads the configuration and sets up logging. Bad configuration prints
/// every problem and exits 64 (EX_USAGE).
pub fn start() -> Result<Config, ExitCode> {
    match Config::from_env() {
        Ok(config) => {
            telemetry::init(&service_name(), config.log_json);
            Ok(config)
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::from(64))
        }
    }
}

/// The service a binary runs, for its logs: the executable's name without
/// the `chat-` prefix (`chat-router` logs as `router`).
fn service_name() -> String {
    let executable = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&executable)
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_prefix("chat-") {
        Some(service) => service.to_string(),
        None => name,
    }
}

/// The whole `main` of a service that binds its metrics listener and
/// nothing else: configuration, the listener (`CHAT_METRICS_ADDR`), the run
/// until SIGINT/SIGTERM, the exit code.
pub async fn serve<E, F, Fut>(service: &str, run_with: F) -> ExitCode
where
    F: FnOnce(Config, Option<TcpListener>, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display + From<StartError>,
{
    run(service, |config, shutdown| async move {
        let listener = metrics::bind(&config).await?;
        run_with(config, listener, shutdown).await
    })
    .await
}

/// The whole `main` of a service that binds what it needs itself.
pub async fn run<E, F, Fut>(service: &str, run: F) -> ExitCode
where
    F: FnOnce(Config, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let config = match start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    finish(service, run(config, shutdown::signal()).await)
}

/// The exit code for a service's result.
pub fn finish<E: std::fmt::Display>(service: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{service} failed");
            ExitCode::FAILURE
        }
    }
}
