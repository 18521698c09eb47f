//! Checks on the source tree itself, not on a running system: what the crate
//! graph allows and that docs/architecture.md names what exists. They need
//! no servers, so they live apart from the end-to-end binary.

mod codemap;
mod crates;
