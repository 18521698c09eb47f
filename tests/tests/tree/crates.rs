//! The crate graph enforces "the edge never touches PostgreSQL": a database
//! driver reachable from an edge, router or presence build fails here.

use std::collections::HashSet;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Crates that speak to PostgreSQL; none may be linked by a service that
/// asks the persister instead.
const DATABASE_DRIVERS: &[&str] = &["tokio-postgres", "postgres-protocol", "deadpool-postgres"];

/// Every package a workspace member links on this platform (normal and
/// build dependencies, transitively; dev-dependencies are left out, tests
/// may use a driver). `cargo tree` resolves features and platforms as a
/// build does, and works offline.
fn linked_packages(member: &str) -> Result<HashSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--locked", "--offline", "--prefix", "none"])
        .args(["-e", "normal,build", "-f", "{p}", "-p", member])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[test]
fn services_that_ask_the_persister_link_no_database_driver() -> Result<()> {
    for member in ["chat-edge", "chat-router", "chat-presence", "chat-shared"] {
        let linked = linked_packages(member)?;
        assert!(
            linked.contains("async-nats"),
            "{member}: the walk found too little: {linked:?}"
        );
        for driver in DATABASE_DRIVERS {
            assert!(
                !linked.contains(*driver),
                "{member} links {driver}: it must reach PostgreSQL through the persister"
            );
        }
    }
    // The check can fail: the persister does link the driver.
    assert!(linked_packages("chat-persister")?.contains("tokio-postgres"));
    Ok(())
}
