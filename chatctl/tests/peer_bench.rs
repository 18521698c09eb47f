//! Smoke test of `chatctl bench dm|group --peer ejabberd`: the bench starts
//! its own ejabberd (Debian's package; scripts/test installs it), runs a
//! tiny `dm` and `group` load over XMPP with MAM on and off, and every
//! message arrives. No timing assertions: this proves the bench works, not
//! how fast anything is.

use chatctl::bench::DmOptions;
use chatctl::ejabberd::{Archive, Ejabberd};
use chatctl::group_bench::{expected_deliveries, GroupOptions};
use chatctl::peer_bench;

async fn tiny_runs(archive: Archive) {
    let server = Ejabberd::start(archive)
        .await
        .expect("ejabberd starts (apt-get install ejabberd; scripts/test does it)");
    let dm = peer_bench::dm(
        server.addr(),
        &DmOptions {
            edge: String::new(),
            pairs: 2,
            messages: 50,
            window: 8,
            rate: None,
            rss_every: None,
            nats_monitor: None,
            cpu_of: Vec::new(),
        },
    )
    .await
    .expect("dm run");
    assert_eq!((dm.messages, dm.delivered), (100, 100));

    let (groups, members, senders, messages) = (2, 5, 2, 20);
    let group = peer_bench::group(
        server.addr(),
        &GroupOptions {
            edge: String::new(),
            groups,
            members,
            senders,
            messages,
            window: 8,
            nats_monitor: None,
        },
    )
    .await
    .expect("group run");
    assert_eq!(group.messages, groups * senders * messages);
    assert_eq!(
        group.deliveries,
        expected_deliveries(groups, members, senders, messages)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_and_group_against_ejabberd_with_mam() {
    tiny_runs(Archive::Mnesia).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_and_group_against_ejabberd_without_mam() {
    tiny_runs(Archive::Off).await;
}
