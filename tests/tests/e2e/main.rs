//! One end-to-end test binary (compiled once), against real servers.

mod abuse;
mod bench;
mod deadletter;
mod edges;
mod handshake;
mod messaging;
mod metrics;
mod operators;
mod presence;
mod push;
mod resume;
mod security;
mod web;
