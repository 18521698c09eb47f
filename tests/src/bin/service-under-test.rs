//! One service as a separate process, for tests that kill it: `kill -9`
//! leaves no close frames, no disconnect reports and no acks, which an
//! in-process service cannot imitate. The first argument names the service
//! (`edge`, `router`, `persister`, `presence`, `pushd`); the configuration
//! comes from the environment like the real binaries. It prints
//! `listening <addr>`: the edge's address, or where the others serve
//! `/metrics` (the readiness probe of the harness).

use std::io::Write;
use std::process::ExitCode;

use chat_shared::{bin, shutdown};

#[tokio::main]
async fn main() -> ExitCode {
    let service = std::env::args().nth(1).unwrap_or_default();
    let mut config = match bin::start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let bind = if service == "edge" {
        config.edge_addr
    } else {
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    };
    let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
        return ExitCode::FAILURE;
    };
    let Ok(addr) = listener.local_addr() else {
        return ExitCode::FAILURE;
    };
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    let stop = shutdown::signal();
    match service.as_str() {
        "edge" => bin::finish("edge", chat_edge::run(config, listener, stop).await),
        "router" => bin::finish(
            "router",
            chat_router::run_with(config, Some(listener), stop).await,
        ),
        "persister" => bin::finish(
            "persister",
            chat_persister::run_with(config, Some(listener), stop).await,
        ),
        "presence" => bin::finish(
            "presence",
            chat_presence::run_with(config, Some(listener), stop).await,
        ),
        "pushd" => {
            // pushd binds its metrics listener itself, from the
            // configuration: hand it the port just found free.
            config.metrics_addr = Some(addr);
            drop(listener);
            bin::finish("pushd", chat_pushd::run(config, stop).await)
        }
        other => {
            eprintln!("unknown service {other:?}: edge, router, persister, presence or pushd");
            ExitCode::from(64)
        }
    }
}
