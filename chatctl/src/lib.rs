//! `chatctl`'s operations, as a library so the end-to-end tests run exactly
//! what the operator runs: stream and consumer state ([`status`]), replaying
//! the log of record ([`replay`]), load ([`bench`], what every scenario shares in
//! [`bench::common`], what a run cost the broker in [`bench::broker`] and
//! in CPU in [`bench::cpu`], and one module per further scenario: [`presence_bench`], [`raw_bench`], [`group_bench`],
//! [`resume_bench`], [`connect_bench`], [`search_bench`], [`media_bench`] over the small
//! HTTP client [`http`]) and a tiny WebSocket client ([`client`]), the
//! discovery view and drain requests ([`edges`]), operators' bans, kicks
//! and token revocations ([`moderation`]). The command line is in
//! `main.rs`. For comparison, the same `dm` and `group` loads against an
//! ejabberd of its own ([`peer_bench`], over the minimal XMPP client
//! [`xmpp`], the server started by [`ejabberd`]).

pub mod bench;
pub mod client;
pub mod connect_bench;
pub mod conversations_bench;
pub mod edges;
pub mod ejabberd;
pub mod group_bench;
pub mod http;
pub mod media_bench;
pub mod memory;
pub mod moderation;
pub mod peer_bench;
pub mod presence_bench;
pub mod raw_bench;
pub mod replay;
pub mod resume_bench;
pub mod search_bench;
pub mod shards;
pub mod status;
pub mod xmpp;
