//! A thin main: everything is in the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_shared::bin::serve("presence", chat_presence::run_with).await
}
