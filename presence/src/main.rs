use chat_shared::{bin, shutdown};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match bin::start() {
        Ok(config) => config,
        Err(code) => return code,
    };
    bin::finish(
        "presence",
        chat_presence::run(config, shutdown::signal()).await,
    )
}
