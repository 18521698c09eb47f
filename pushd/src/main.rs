//! A thin main: everything is in the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_shared::bin::run("pushd", chat_pushd::run).await
}
