//! `chat-echo-bot`: an example backend service. It reads every accepted
//! message from NATS (stream MESSAGES) and, when one starts with `/echo `,
//! answers in that conversation as its bot user through an edge, over the
//! client WebSocket protocol. See README.md.

use std::process::ExitCode;

use chat_shared::{bin, shutdown};

mod bot;
mod edge;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match bin::start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let settings = match bot::Settings::from_env() {
        Ok(settings) => settings,
        Err(problem) => {
            eprintln!("{problem}");
            return ExitCode::from(64);
        }
    };
    bin::finish(
        "echo-bot",
        bot::run(config, settings, shutdown::signal()).await,
    )
}
