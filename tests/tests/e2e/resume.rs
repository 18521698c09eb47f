//! Resume with a backlog larger than one fetch from JetStream.

use chat_tests::System;
use serde_json::json;

/// Texts of the largest size a send allows (100,000 characters): 60 of them
/// are ~6 MB, more than the 4 MiB one inbox fetch carries, so the replay
/// must go on past a batch the server ends on its byte limit.
#[tokio::test]
async fn a_backlog_larger_than_one_fetch_is_replayed_whole() -> anyhow::Result<()> {
    const MESSAGES: usize = 60;
    let system = System::start_with(|c| {
        c.limits.send_per_connection = 1000;
        c.limits.send_per_user = 1000;
    })
    .await?;
    let mut alice = system.connect("alice", "phone").await?;
    let bob = system.connect("bob", "phone").await?;
    let start = bob.synced["cursor"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("synced without a cursor: {}", bob.synced))?;
    drop(bob);
    for i in 0..MESSAGES {
        let text = format!("{i:03}{}", "x".repeat(100_000 - 3));
        let sent = alice
            .send_message(json!({"to":"bob"}), &text, &format!("big-{i}"))
            .await?;
        anyhow::ensure!(sent["type"] == "sent", "send {i}: {sent}");
    }
    let bob = system.connect_from("bob", "phone", Some(&start)).await?;
    anyhow::ensure!(
        bob.welcome["resumed"] == true,
        "not resumed: {}",
        bob.welcome
    );
    let prefixes: Vec<String> = bob
        .backlog
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| {
            f["text"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(3)
                .collect()
        })
        .collect();
    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("{i:03}")).collect();
    assert_eq!(prefixes, expected, "the backlog before synced");
    Ok(())
}
