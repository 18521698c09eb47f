//! One end-to-end test binary (compiled once), against real servers.

mod handshake;
mod messaging;
mod operators;
mod presence;
mod push;
