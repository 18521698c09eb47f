//! `chatctl`: tokens, streams, replay, schemas, and a tiny client to watch
//! messages flow. The operations live in the library (`src/lib.rs`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_shared::ids::{ConversationId, Cursor, UserId};
use chat_shared::{schema, streams, Config};
use chatctl::client::{self, parse_duration, token, Target};
use chatctl::moderation::{self, Moderator};
use chatctl::replay::{self, Entry, Replay, ReplayName, ReplayOptions, Republisher, Start};
use chatctl::{bench, status};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chatctl", about = "Operate and try the chat backend", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a JWT for USER signed with the local HS256 secret.
    Token {
        user: String,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Show the state of every stream and consumer (no action), or manage
    /// JetStream streams and KV buckets.
    #[command(args_conflicts_with_subcommands = true)]
    Streams {
        #[command(subcommand)]
        action: Option<StreamsAction>,
        #[command(flatten)]
        status: StatusArgs,
    },
    /// Print MESSAGES events (the log of record) as JSON lines, by sequence
    /// or time range, for one conversation or all; optionally re-publish
    /// them into the stream REPLAY_<name>.
    Replay(ReplayArgs),
    /// The edges in discovery: id, connections, live or draining, URL.
    Edges {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The PostgreSQL shard map: which shard holds each run of hash
    /// buckets, or where one conversation's or user's rows live; `move`
    /// moves buckets to another shard while everything runs.
    #[command(args_conflicts_with_subcommands = true)]
    Shards {
        #[command(subcommand)]
        action: Option<ShardsAction>,
        /// A conversation (dm:a:b, group:id) or a user to locate.
        key: Option<String>,
        /// Print the map as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain EDGE as SIGTERM would: its clients are told to reconnect
    /// elsewhere, then it exits.
    Drain { edge: String },
    /// Ban, unban, kick a user or revoke their tokens, on every edge (as
    /// the NATS admin user: set CHAT_NATS_USER=admin and its password).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Write the JSON Schemas of every wire type into DIR.
    Schemas { dir: std::path::PathBuf },
    /// Send one message as USER.
    Send {
        /// Sender.
        #[arg(long = "as")]
        user: String,
        /// Recipient of a DM.
        #[arg(long, conflicts_with = "conversation")]
        to: Option<String>,
        /// A conversation id (dm:a:b or group:id).
        #[arg(long)]
        conversation: Option<String>,
        text: String,
        #[command(flatten)]
        edge: EdgeArg,
    },
    /// Load a running system and measure it.
    Bench {
        /// Print the report as JSON (before or after the scenario).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Connect as USER and print every frame as a JSON line.
    Tail {
        #[arg(long = "as")]
        user: String,
        #[arg(long, default_value = "chatctl")]
        device: String,
        /// Resume after this cursor.
        #[arg(long)]
        cursor: Option<u64>,
        #[command(flatten)]
        edge: EdgeArg,
    },
}

#[derive(Subcommand)]
enum BenchScenario {
    /// One user with many online friends goes online and offline; fan-out
    /// latency and presence frames per second.
    Presence(chatctl::presence_bench::PresenceOptions),
    /// The ceiling on this box: async JetStream publishes into a temporary
    /// R1 stream (BENCH_RAW, deleted after) and core NATS pub -> sub.
    Raw(chatctl::raw_bench::RawOptions),
    /// Groups made with group.create, every member connected, a few
    /// senders per group; deliveries per second and latency.
    Group {
        #[command(flatten)]
        options: chatctl::group_bench::GroupOptions,
        /// Also run the same load against this server (started here, on
        /// loopback) and report ours as a ratio to it.
        #[arg(long, value_enum)]
        peer: Option<chatctl::peer_bench::Peer>,
        /// The peer's message archive (ejabberd mod_mam): on (Mnesia), off,
        /// or sql (PostgreSQL: a database of its own on CHAT_DATABASE_URL's
        /// server).
        #[arg(long, value_enum, default_value = "on", requires = "peer")]
        mam: chatctl::peer_bench::Mam,
    },
    /// An offline user accumulates a backlog, then resumes; hello -> synced.
    Resume(chatctl::resume_bench::ResumeOptions),
    /// Uploads and downloads of media (`POST`/`GET /v1/media`); MB/s.
    Media(chatctl::media_bench::MediaOptions),
    /// `search` latency over a big history (1 M messages by default),
    /// written straight into PostgreSQL (CHAT_DATABASE_URL) with COPY.
    Search(chatctl::search_bench::SearchOptions),
    /// A user in many conversations asks for their first page, again and
    /// again; the latency of `conversations`.
    Conversations(chatctl::conversations_bench::ConversationsOptions),
    /// N authenticated idle connections opened at a given rate; connects
    /// per second and the edge's memory per connection.
    Connect {
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// New connections per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Source addresses 127.0.0.1 ..= 127.0.0.<sources> (ephemeral ports).
        #[arg(long, default_value_t = 4)]
        sources: u8,
        /// The edge's pid (default: `pgrep -f chat-edge`).
        #[arg(long)]
        edge_pid: Option<u32>,
        /// Seconds the edge's CPU is measured with every connection idle.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        /// Keep the connections open this many seconds after the report
        /// (for several processes holding connections at once).
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        #[command(flatten)]
        edge: EdgeArg,
    },
    /// Pairs of users sending direct messages; rates and latencies.
    Dm {
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        /// Messages per pair.
        #[arg(long, default_value_t = 500)]
        messages: usize,
        /// Sends in flight per sender.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Offered load in messages per second over all pairs (paced;
        /// latencies count from each message's scheduled time). Without
        /// it, senders go flat out.
        #[arg(long)]
        rate: Option<f64>,
        /// A soak: sample the resident memory of the system's processes on
        /// this machine every N seconds (with --rate and enough --messages
        /// for the minutes wanted).
        #[arg(long, value_name = "SECONDS")]
        rss_every: Option<u64>,
        /// nats-server's HTTP monitor (`http://host:port`), for the
        /// messages the broker took in and handed out per DM.
        #[arg(long, env = "CHAT_NATS_MONITOR_URL")]
        nats_monitor: Option<String>,
        /// Measure the CPU time of this process of the system and its
        /// descendants (e.g. postgres=<postmaster pid>), per DM; repeat
        /// for every process. The load generator is always included.
        #[arg(long, value_name = "NAME=PID")]
        cpu_of: Vec<chatctl::bench::cpu::Watched>,
        /// Also run the same load against this server (started here, on
        /// loopback) and report ours as a ratio to it.
        #[arg(long, value_enum)]
        peer: Option<chatctl::peer_bench::Peer>,
        /// The peer's message archive (ejabberd mod_mam): on (Mnesia), off,
        /// or sql (PostgreSQL: a database of its own on CHAT_DATABASE_URL's
        /// server).
        #[arg(long, value_enum, default_value = "on", requires = "peer")]
        mam: chatctl::peer_bench::Mam,
        #[command(flatten)]
        edge: EdgeArg,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Close USER's sessions with 4001 and refuse their hello until
    /// --until (forever without it).
    Ban {
        user: String,
        /// RFC 3339, or a time from now: 90s, 30m, 2h, 7d.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        why: Why,
    },
    /// Lift USER's ban.
    Unban {
        user: String,
        #[command(flatten)]
        why: Why,
    },
    /// Close USER's sessions with 4001; they may connect again.
    Kick {
        user: String,
        #[command(flatten)]
        why: Why,
    },
    /// Refuse every token of USER issued up to now and close their sessions.
    Revoke {
        user: String,
        #[command(flatten)]
        why: Why,
    },
}

/// What the audit event says about an operator action.
#[derive(Args)]
struct Why {
    /// Why, for the audit record.
    #[arg(long)]
    reason: Option<String>,
    /// Who acts, for the audit record.
    #[arg(long, env = "USER", default_value = "unknown")]
    operator: String,
}

#[derive(Subcommand)]
enum ShardsAction {
    /// Moves BUCKETS (`17`, `256-511`) to shard TO while writes continue:
    /// fence, copy, flip the map, clean (persister/src/moves.rs). Run it
    /// again to finish a move that stopped half-way.
    Move {
        buckets: String,
        to: usize,
        /// How long the old copies stay after the flip, for every service
        /// to follow the new map first.
        #[arg(long, default_value_t = 5000)]
        grace_ms: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StreamsAction {
    /// Every stream (messages, bytes, first/last sequence and time) and
    /// every consumer on it (delivered, ack floor, pending = lag, ...).
    Status(StatusArgs),
    /// Create or update every stream and bucket.
    Apply,
    /// List streams with their message counts.
    Ls,
}

/// The edge a client command connects to.
#[derive(Args)]
struct EdgeArg {
    #[arg(
        long = "edge",
        value_name = "EDGE",
        env = "CHAT_EDGE_URL",
        default_value = chatctl::client::DEFAULT_EDGE
    )]
    url: String,
}

#[derive(Args)]
struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// Only this conversation (dm:<a>:<b> or group:<id>); default all.
    #[arg(long)]
    conversation: Option<String>,
    /// First stream sequence (inclusive).
    #[arg(long, conflicts_with = "since")]
    from_seq: Option<u64>,
    /// Last stream sequence (inclusive); default the last one now.
    #[arg(long)]
    to_seq: Option<u64>,
    /// Stored at or after: RFC 3339 or a time ago (90s, 10m, 2h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Stored at or before: RFC 3339 or a time ago.
    #[arg(long)]
    until: Option<String>,
    /// Also copy the events into the stream REPLAY_<NAME> (subjects
    /// replay.<NAME>.<original subject>, Nats-Msg-Id kept), created if
    /// missing, for a consumer to reprocess. Kept 7 days.
    #[arg(long, value_name = "NAME")]
    republish: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    match cli.command {
        Command::Token { user, ttl } => {
            println!("{}", token(&config, &user, parse_duration(&ttl)?)?);
        }
        Command::Streams { action, status } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client, &config);
            match action.unwrap_or(StreamsAction::Status(status)) {
                StreamsAction::Status(StatusArgs { json }) => {
                    let states = status::collect(&js).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&states)?);
                    } else {
                        print!("{}", status::render(&states));
                    }
                }
                StreamsAction::Apply => {
                    streams::apply(&js, &config).await?;
                    println!("streams and buckets applied");
                }
                StreamsAction::Ls => {
                    print!("{}", status::render_list(&status::collect(&js).await?))
                }
            }
        }
        Command::Replay(args) => replay(&config, args).await?,
        Command::Edges { json } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client, &config);
            let edges = chatctl::edges::list(&js, config.edge_ttl).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&edges)?);
            } else {
                print!("{}", chatctl::edges::render(&edges));
            }
        }
        Command::Shards {
            action:
                Some(ShardsAction::Move {
                    buckets,
                    to,
                    grace_ms,
                    json,
                }),
            ..
        } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client, &config);
            let buckets = chatctl::shards::parse_buckets(&buckets)?;
            let grace = std::time::Duration::from_millis(grace_ms);
            let report =
                chat_persister::moves::move_buckets(&config, &js, buckets, to, grace).await?;
            show(&report, json, chatctl::shards::render_move)?;
        }
        Command::Shards { key, json, .. } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client, &config);
            let map = chatctl::shards::map(&js).await?;
            match key {
                Some(key) => println!("{}", chatctl::shards::locate(&map, &key)?),
                None if json => println!("{}", serde_json::to_string_pretty(&map)?),
                None => print!("{}", chatctl::shards::render(&map)),
            }
        }
        Command::Drain { edge } => {
            let client = chat_shared::nats::connect(&config, "chatctl").await?;
            let js = chat_shared::nats::jetstream(client.clone(), &config);
            chatctl::edges::drain(&client, &js, config.edge_ttl, &edge).await?;
            println!("drain requested: {edge}");
        }
        Command::User { action } => user(&config, action).await?,
        Command::Schemas { dir } => {
            schema::write_all(&dir).with_context(|| format!("writing {}", dir.display()))?;
            println!("schemas written to {}", dir.display());
        }
        Command::Send {
            user,
            to,
            conversation,
            text,
            edge,
        } => {
            let target = match (to, conversation) {
                (Some(to), None) => Target::User(UserId::parse(to)?),
                (None, Some(c)) => Target::Conversation(ConversationId::parse(&c)?),
                _ => bail!("give exactly one of --to and --conversation"),
            };
            let sent = client::send(&config, &edge.url, &user, target, text, |frame| {
                eprintln!("{frame}")
            })
            .await?;
            println!("{}", sent.to_json());
        }
        Command::Bench { json, scenario } => bench(&config, scenario, json).await?,
        Command::Tail {
            user,
            device,
            cursor,
            edge,
        } => {
            let cursor = cursor.map(Cursor);
            let closed = client::tail(&config, &edge.url, &user, &device, cursor, |frame| {
                println!("{frame}")
            })
            .await?;
            eprintln!("closed: {closed:?}");
        }
    }
    Ok(())
}

/// Runs one bench scenario and shows its report.
async fn bench(config: &Config, scenario: BenchScenario, json: bool) -> anyhow::Result<()> {
    match scenario {
        BenchScenario::Dm {
            pairs,
            messages,
            window,
            rate,
            rss_every,
            nats_monitor,
            cpu_of,
            peer,
            mam,
            edge,
        } => {
            let options = bench::DmOptions {
                edge: edge.url,
                pairs,
                messages,
                window,
                rate,
                rss_every: rss_every.map(Duration::from_secs),
                nats_monitor,
                cpu_of,
            };
            let report = bench::dm(config, options.clone()).await?;
            match peer {
                None => show(&report, json, bench::print)?,
                Some(chatctl::peer_bench::Peer::Ejabberd) => {
                    let comparison = chatctl::peer_bench::compare_dm(
                        report,
                        &options,
                        mam,
                        config.home_database_url(),
                    )
                    .await?;
                    show(&comparison, json, chatctl::peer_bench::print_dm)?;
                }
            }
        }
        BenchScenario::Presence(options) => {
            let report = chatctl::presence_bench::presence(config, options).await?;
            show(&report, json, chatctl::presence_bench::print)?;
        }
        BenchScenario::Raw(options) => {
            let report = chatctl::raw_bench::raw(config, options).await?;
            show(&report, json, chatctl::raw_bench::print)?;
        }
        BenchScenario::Group { options, peer, mam } => {
            let report = chatctl::group_bench::group(config, options.clone()).await?;
            match peer {
                None => show(&report, json, chatctl::group_bench::print)?,
                Some(chatctl::peer_bench::Peer::Ejabberd) => {
                    let comparison = chatctl::peer_bench::compare_group(
                        report,
                        &options,
                        mam,
                        config.home_database_url(),
                    )
                    .await?;
                    show(&comparison, json, chatctl::peer_bench::print_group)?;
                }
            }
        }
        BenchScenario::Conversations(options) => {
            let report = chatctl::conversations_bench::conversations(config, options).await?;
            show(&report, json, chatctl::conversations_bench::print)?;
        }
        BenchScenario::Resume(options) => {
            let report = chatctl::resume_bench::resume(config, options).await?;
            show(&report, json, chatctl::resume_bench::print)?;
        }
        BenchScenario::Media(options) => {
            let report = chatctl::media_bench::media(config, options).await?;
            show(&report, json, chatctl::media_bench::print)?;
        }
        BenchScenario::Search(options) => {
            let report = chatctl::search_bench::search(config, options).await?;
            show(&report, json, chatctl::search_bench::print)?;
        }
        BenchScenario::Connect {
            connections,
            rate,
            sources,
            edge_pid,
            idle_secs,
            hold_secs,
            edge,
        } => {
            let options = chatctl::connect_bench::ConnectOptions {
                edge: edge.url,
                connections,
                rate,
                sources,
                edge_pid,
                idle: Duration::from_secs(idle_secs),
            };
            let (report, held) = chatctl::connect_bench::connect(config, options).await?;
            show(&report, json, chatctl::connect_bench::print)?;
            tokio::time::sleep(Duration::from_secs(hold_secs)).await;
            drop(held);
        }
    }
    Ok(())
}

/// Runs one moderation action and prints its audit event.
async fn user(config: &Config, action: UserAction) -> anyhow::Result<()> {
    let (user, why) = match &action {
        UserAction::Ban { user, why, .. }
        | UserAction::Unban { user, why }
        | UserAction::Kick { user, why }
        | UserAction::Revoke { user, why } => (UserId::parse(user.clone())?, why),
    };
    let client = chat_shared::nats::connect(config, "chatctl").await?;
    let js = chat_shared::nats::jetstream(client.clone(), config);
    let moderator = Moderator::new(client, js, why.operator.clone()).await?;
    let reason = why.reason.clone();
    let event = match action {
        UserAction::Ban { until, .. } => {
            let until = until
                .map(|t| moderation::parse_until(&t, time::OffsetDateTime::now_utc()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            moderator.ban(&user, until, reason).await?
        }
        UserAction::Unban { .. } => moderator.unban(&user, reason).await?,
        UserAction::Kick { .. } => moderator.kick(&user, reason).await?,
        UserAction::Revoke { .. } => moderator.revoke(&user, reason).await?,
    };
    println!("{}", serde_json::to_string(&event)?);
    Ok(())
}

/// Prints the range as JSON lines on stdout (and re-publishes it when
/// asked); a summary and any stored message that is not an event go to stderr.
async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let instant = |text: Option<String>| {
        text.map(|t| replay::parse_instant(&t, now))
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let start = match (args.from_seq, instant(args.since)?) {
        (Some(seq), _) => Start::Sequence(seq),
        (None, Some(since)) => Start::Time(since),
        (None, None) => Start::Oldest,
    };
    let options = ReplayOptions {
        conversation: args
            .conversation
            .map(|c| ConversationId::parse(&c))
            .transpose()?,
        start,
        to_seq: args.to_seq,
        until: instant(args.until)?,
    };
    let republish = args
        .republish
        .map(|name| ReplayName::parse(&name))
        .transpose()?;
    let client = chat_shared::nats::connect(config, "chatctl-replay").await?;
    let js = chat_shared::nats::jetstream(client, config);
    let mut republisher = match republish {
        Some(name) => Some(Republisher::create(&js, name, config).await?),
        None => None,
    };
    let mut replay = Replay::open(&js, &options, config.partitions).await?;
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut events, mut changes, mut malformed) = (0u64, 0u64, 0u64);
    let outcome: anyhow::Result<()> = async {
        while let Some(entry) = replay.next().await? {
            match entry {
                Entry::Event(item) => {
                    serde_json::to_writer(&mut stdout, &item)?;
                    stdout.write_all(b"\n")?;
                    if let Some(republisher) = &mut republisher {
                        republisher.publish(&item).await?;
                    }
                    events += 1;
                }
                Entry::Change {
                    stream,
                    seq,
                    subject,
                    change,
                } => {
                    let line = serde_json::json!({
                        "stream": stream, "seq": seq, "subject": subject, "change": change,
                    });
                    serde_json::to_writer(&mut stdout, &line)?;
                    stdout.write_all(b"\n")?;
                    changes += 1;
                }
                Entry::Malformed {
                    stream,
                    seq,
                    subject,
                    reason,
                } => {
                    eprintln!("{stream} seq {seq} ({subject}) is not a message event: {reason}");
                    malformed += 1;
                }
            }
        }
        Ok(())
    }
    .await;
    replay.close().await;
    stdout.flush()?;
    outcome?;
    eprintln!("replayed {events} events and {changes} changes ({malformed} malformed)");
    if let Some(republisher) = republisher {
        let stream = republisher.stream();
        let summary = republisher.finish().await?;
        eprintln!(
            "re-published {} events into {stream} ({} were already there)",
            summary.stored, summary.duplicates
        );
    }
    Ok(())
}

/// Prints a bench report as JSON for machines or as a table for people.
fn show<R: serde::Serialize>(report: &R, json: bool, print: fn(&R)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print(report);
    }
    Ok(())
}
