//! One end-to-end test binary (compiled once), against real servers.

mod abuse;
mod bench;
mod caches;
mod changes;
mod deadletter;
mod discovery;
mod edges;
mod handshake;
mod messaging;
mod metrics;
mod moderation;
mod operators;
mod partitions;
mod presence;
mod privacy;
mod privilege;
mod provisioning;
mod push;
mod push_devices;
mod receipts;
mod replies;
mod resume;
mod retries;
mod search;
mod security;
mod web;
