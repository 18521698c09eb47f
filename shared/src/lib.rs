//! The single source of truth shared by every chat service: validated ids,
//! the message-id generator, NATS subjects, stream definitions, wire types,
//! configuration, JWT verification and the shutdown signal.

pub mod auth;
pub mod bin;
pub mod blocks;
pub mod clock;
pub mod config;
pub mod consume;
pub mod delivery;
pub mod direct;
pub mod discovery;
pub mod error;
pub mod hex;
pub mod idgen;
pub mod ids;
pub mod lease;
pub mod lru;
pub mod membership;
pub mod metrics;
pub mod moderation;
pub mod nats;
pub mod netaddr;
pub mod objects;
pub mod partitions;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod rpc;
pub mod schema;
pub mod shards;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod sync;
pub mod telemetry;
pub mod wire;

pub use config::Config;
pub use error::StartError;
