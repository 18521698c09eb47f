//! One end-to-end test binary (compiled once), against real servers.

mod bench;
mod deadletter;
mod edges;
mod handshake;
mod messaging;
mod metrics;
mod operators;
mod presence;
mod privilege;
mod push;
mod resume;
mod security;
mod web;
