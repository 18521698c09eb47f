//! `chatctl bench search`: `search` latency over a big history. Sending a
//! million messages through the system would take most of an hour on a
//! small box, so the history is written straight into PostgreSQL with COPY,
//! row for row as the persister writes them (`messages` with their `seq`,
//! `conversations`, `groups`, `group_members` on each conversation's shard,
//! `user_conversations` on each member's, as the shard map in KV says; not
//! `message_keys`, the idempotency net search never reads), spread over
//! 90 days, then ANALYZEd. The searches go through a real WebSocket client and the real
//! edge and persister: rare and frequent words in English and Russian and
//! Japanese substrings, over all the searcher's conversations and within
//! one. Every answer is checked: the
//! number of hits the seeding planted, nothing from a conversation the
//! searcher is not in.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use chat_shared::idgen::{EPOCH_MS, NODE_BITS, SEQUENCE_BITS};
use chat_shared::ids::{ConversationId, UserId};
use chat_shared::shards::ShardMap;
use chat_shared::Config;
use futures::SinkExt;
use serde_json::{json, Value};

use crate::bench::common::{request, Percentiles};
use crate::client::connect;

#[derive(clap::Args, Clone)]
pub struct SearchOptions {
    #[arg(long, env = "CHAT_EDGE_URL", default_value = crate::client::DEFAULT_EDGE)]
    pub edge: String,
    /// Messages written into the searcher's conversations.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Conversations the searcher is in (half DMs, half groups of three);
    /// the messages are spread unevenly, the first conversation busiest.
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
    /// Messages with the same words in conversations the searcher is not
    /// in (never to be found).
    #[arg(long, default_value_t = 100_000)]
    pub foreign: usize,
    /// Times each query is asked (after one untimed warm-up round).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// `limit` of each search.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

/// What the searches look for, and how often the seeding plants each in a
/// message of its language. The filler vocabulary contains none of them.
const QUERIES: [Query; 6] = [
    Query {
        name: "English, rare",
        text: "zanzibar",
        language: Language::English,
        one_in: 8_000,
    },
    Query {
        name: "English, frequent",
        text: "meeting",
        language: Language::English,
        one_in: 10,
    },
    Query {
        name: "Russian, rare",
        text: "малиновый",
        language: Language::Russian,
        one_in: 8_000,
    },
    Query {
        name: "Russian, frequent",
        text: "привет",
        language: Language::Russian,
        one_in: 10,
    },
    Query {
        name: "Japanese substring, rare",
        text: "紫陽花",
        language: Language::Japanese,
        one_in: 4_000,
    },
    Query {
        name: "Japanese substring (2 chars), frequent",
        text: "東京",
        language: Language::Japanese,
        one_in: 10,
    },
];

const ENGLISH: &[&str] = &[
    "the", "project", "review", "lunch", "tomorrow", "please", "check", "document", "today",
    "send", "call", "later", "thanks", "office", "plan", "team", "update", "coffee", "weekend",
    "report", "budget", "train", "morning", "evening", "idea", "good", "see", "you", "time",
    "next", "draft", "ticket", "deploy", "server", "happy", "birthday", "photo", "flight",
];
const RUSSIAN: &[&str] = &[
    "когда",
    "завтра",
    "работа",
    "проект",
    "спасибо",
    "вечером",
    "утром",
    "обед",
    "документ",
    "позвони",
    "отчёт",
    "команда",
    "идея",
    "хорошо",
    "увидимся",
    "поезд",
    "кофе",
    "выходные",
    "план",
    "бюджет",
    "сегодня",
    "письмо",
    "встреча",
    "фото",
    "сервер",
    "дом",
];
const JAPANESE: &[&str] = &[
    "今日は",
    "会議",
    "明日",
    "ありがとう",
    "資料",
    "確認",
    "お願いします",
    "昼ご飯",
    "電車",
    "週末",
    "コーヒー",
    "予定",
    "了解",
    "大丈夫",
    "よろしく",
    "写真",
    "駅",
    "新しい",
    "仕事",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Language {
    English,
    Russian,
    Japanese,
}

struct Query {
    name: &'static str,
    text: &'static str,
    language: Language,
    one_in: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct QueryReport {
    pub name: String,
    pub query: String,
    /// Whether the search named one conversation (the busiest).
    pub scoped: bool,
    /// Messages the seeding planted that match (all of them, not a page).
    pub planted: u64,
    /// Items in the first page.
    pub items: usize,
    pub more: bool,
    /// Searches answered with an error (a timeout: `unavailable`).
    pub failed: usize,
    /// Milliseconds from sending `search` to its reply.
    pub latency: Percentiles,
}

#[derive(Debug, serde::Serialize)]
pub struct SearchReport {
    /// Who searched, and the conversation the scoped searches name.
    pub searcher: String,
    pub busiest: String,
    /// Messages in the searcher's conversations.
    pub messages: usize,
    pub conversations: usize,
    /// Messages in conversations the searcher is not in.
    pub foreign: usize,
    pub rounds: usize,
    pub limit: usize,
    /// Seconds spent writing the rows (COPY, with every index in place).
    pub seed_seconds: f64,
    /// Seconds spent in ANALYZE.
    pub analyze_seconds: f64,
    /// Every timed search, all queries together (ms).
    pub latency: Percentiles,
    pub queries: Vec<QueryReport>,
    /// Queries answered wrongly: a page of the wrong size, an item from a
    /// conversation the searcher is not in, or one without the query's
    /// text, or never answered at all.
    pub wrong: usize,
    /// Searches answered with an error, all queries together.
    pub failed: usize,
}

/// A small deterministic generator (splitmix64): the same history every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A message body in `language`, with each query of that language planted
/// with its odds; returns the body and which queries it carries.
fn body(random: &mut Random, language: Language) -> (String, Vec<usize>) {
    let (words, separator): (&[&str], &str) = match language {
        Language::English => (ENGLISH, " "),
        Language::Russian => (RUSSIAN, " "),
        Language::Japanese => (JAPANESE, ""),
    };
    let mut parts: Vec<&str> = (0..4 + random.below(9))
        .map(|_| words[random.below(words.len() as u64) as usize])
        .collect();
    let mut planted = Vec::new();
    for (index, query) in QUERIES.iter().enumerate() {
        if query.language == language && random.below(query.one_in) == 0 {
            let at = random.below(parts.len() as u64 + 1) as usize;
            parts.insert(at, query.text);
            planted.push(index);
        }
    }
    let mut text = parts.join(separator);
    if language == Language::Japanese {
        text.push('。');
    }
    (text, planted)
}

/// The searcher's conversations and the foreign ones, as the persister
/// and group.create store them.
struct Layout {
    searcher: String,
    mine: Vec<Conversation>,
    foreign: Vec<Conversation>,
}

struct Conversation {
    id: String,
    /// The PostgreSQL shard of its rows.
    shard: usize,
    /// Messages written to it so far: the last one's `seq`.
    seq: i64,
    /// Who may send in it (the searcher first, when it is theirs).
    members: Vec<String>,
    /// The group id, for a group.
    group: Option<String>,
    last_id: Option<i64>,
}

impl Layout {
    fn new(run: u64, conversations: usize) -> anyhow::Result<Self> {
        let searcher = format!("bench{run}s");
        let mut mine = Vec::with_capacity(conversations);
        for index in 0..conversations {
            let peer = format!("bench{run}p{index}");
            if index % 2 == 0 {
                let id = ConversationId::dm(UserId::parse(&searcher)?, UserId::parse(&peer)?)?;
                mine.push(Conversation {
                    id: id.to_string(),
                    members: vec![searcher.clone(), peer],
                    group: None,
                    last_id: None,
                    shard: 0,
                    seq: 0,
                });
            } else {
                let group = format!("bench{run}g{index}");
                mine.push(Conversation {
                    id: format!("group:{group}"),
                    members: vec![searcher.clone(), peer, format!("bench{run}q{index}")],
                    group: Some(group),
                    last_id: None,
                    shard: 0,
                    seq: 0,
                });
            }
        }
        let foreign = (0..10)
            .map(|index| {
                let (a, b) = (format!("bench{run}x{index}"), format!("bench{run}y{index}"));
                let id = ConversationId::dm(UserId::parse(&a)?, UserId::parse(&b)?)?;
                Ok(Conversation {
                    id: id.to_string(),
                    members: vec![a, b],
                    group: None,
                    last_id: None,
                    shard: 0,
                    seq: 0,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            searcher,
            mine,
            foreign,
        })
    }

    /// Places each conversation on the shard `map` names.
    fn place(&mut self, map: &ShardMap) -> anyhow::Result<()> {
        for conversation in self.mine.iter_mut().chain(&mut self.foreign) {
            conversation.shard = map.of_conversation(&ConversationId::parse(&conversation.id)?);
        }
        Ok(())
    }
}

/// How many messages of each query were planted: everywhere the searcher
/// is, and in the busiest conversation (index 0).
struct Planted {
    all: [u64; QUERIES.len()],
    busiest: [u64; QUERIES.len()],
}

/// How far back the history goes.
const HISTORY_MS: u64 = 90 * 86_400_000;

/// COPY chunks of about this many bytes.
const COPY_CHUNK: usize = 1 << 22;

/// Writes the history, each conversation's on its shard (`dbs`, in shard
/// order); returns what was planted where.
async fn seed(
    dbs: &[tokio_postgres::Client],
    map: &ShardMap,
    layout: &mut Layout,
    options: &SearchOptions,
    run: u64,
) -> anyhow::Result<Planted> {
    let total = options.messages + options.foreign;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Spread evenly over the last 90 days (a search reads the newest day
    // first, then the month, then all), ids as the generator makes them
    // (the highest node id, which no service leases in a small system).
    let step_ms = (HISTORY_MS / total as u64).max(1);
    let first_ms = now.saturating_sub(total as u64 * step_ms).max(EPOCH_MS);
    let node = (1u64 << NODE_BITS) - 1;
    let mut planted = Planted {
        all: [0; QUERIES.len()],
        busiest: [0; QUERIES.len()],
    };
    let mut random = Random(run);
    let mut sinks = Vec::with_capacity(dbs.len());
    for db in dbs {
        let sink = db
            .copy_in(
                "COPY messages (conversation, id, sender, body, ts, client_msg_id, seq) FROM STDIN",
            )
            .await
            .context("COPY messages")?;
        sinks.push((Box::pin(sink), String::with_capacity(COPY_CHUNK + 1024)));
    }
    for index in 0..total {
        // Exactly `foreign` of the `total` are foreign, evenly spread.
        let foreign = (index + 1) * options.foreign / total > index * options.foreign / total;
        let (conversation, position) = if foreign {
            let at = random.below(layout.foreign.len() as u64) as usize;
            (&mut layout.foreign[at], None)
        } else {
            // Skewed: the first conversations get the most messages.
            let u = random.unit();
            let at = ((u * u) * layout.mine.len() as f64) as usize;
            let at = at.min(layout.mine.len() - 1);
            (&mut layout.mine[at], Some(at))
        };
        let language = match random.below(10) {
            0..=3 => Language::English,
            4..=7 => Language::Russian,
            _ => Language::Japanese,
        };
        let (text, hits) = body(&mut random, language);
        if let Some(at) = position {
            for hit in hits {
                planted.all[hit] += 1;
                if at == 0 {
                    planted.busiest[hit] += 1;
                }
            }
        }
        let ts = first_ms + index as u64 * step_ms;
        let id = ((ts - EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS))
            | (node << SEQUENCE_BITS)
            | (index as u64 & ((1 << SEQUENCE_BITS) - 1));
        let id = id as i64;
        let sender =
            &conversation.members[random.below(conversation.members.len() as u64) as usize];
        conversation.last_id = Some(conversation.last_id.map_or(id, |last| last.max(id)));
        conversation.seq += 1;
        let (sink, chunk) = &mut sinks[conversation.shard];
        // COPY's text format: the bodies hold no tab, newline or backslash.
        chunk.push_str(&format!(
            "{}\t{id}\t{sender}\t{text}\t{ts}\tbench{run}-{index}\t{}\n",
            conversation.id, conversation.seq
        ));
        if chunk.len() >= COPY_CHUNK {
            sink.send(Bytes::from(std::mem::take(chunk))).await?;
            if index % 100_000 < 10_000 {
                eprintln!("  {index} of {total} messages written");
            }
        }
    }
    for (mut sink, chunk) in sinks {
        if !chunk.is_empty() {
            sink.send(Bytes::from(chunk)).await?;
        }
        sink.as_mut().finish().await.context("COPY messages")?;
    }
    write_conversations(dbs, map, layout, first_ms).await?;
    Ok(planted)
}

/// The rows besides the messages: conversations (newest message, activity
/// and seq) and groups with their members on the conversation's shard,
/// each member's list entry (everything counted, nothing unread) on the
/// member's.
async fn write_conversations(
    dbs: &[tokio_postgres::Client],
    map: &ShardMap,
    layout: &Layout,
    created_ms: u64,
) -> anyhow::Result<()> {
    let created = created_ms as i64;
    for conversation in layout.mine.iter().chain(&layout.foreign) {
        let Some(last) = conversation.last_id else {
            continue;
        };
        let db = &dbs[conversation.shard];
        db.execute(
            "INSERT INTO conversations (conversation, last_id, activity, seq) VALUES ($1, $2, $2, $3)",
            &[&conversation.id, &last, &conversation.seq],
        )
        .await?;
        for user in &conversation.members {
            dbs[map.of_user(&UserId::parse(user)?)]
                .execute(
                    "INSERT INTO user_conversations (user_id, conversation, activity, last_id, counted_seq)
                     VALUES ($1, $2, $3, $3, $4)",
                    &[user, &conversation.id, &last, &conversation.seq],
                )
                .await?;
        }
        match &conversation.group {
            None => {}
            Some(group) => {
                db.execute(
                    "INSERT INTO groups (id, name, owner, created_at) VALUES ($1, $2, $3, $4)",
                    &[group, group, &layout.searcher, &created],
                )
                .await?;
                db.execute(
                    "INSERT INTO group_members (group_id, user_id, joined_at)
                     SELECT $1, u, $2 FROM UNNEST($3::text[]) AS u",
                    &[group, &created, &conversation.members],
                )
                .await?;
            }
        }
    }
    Ok(())
}

pub async fn search(config: &Config, options: SearchOptions) -> anyhow::Result<SearchReport> {
    if options.messages == 0 || options.conversations == 0 || options.rounds == 0 {
        bail!("messages, conversations and rounds must be positive");
    }
    if !(1..=100).contains(&options.limit) {
        bail!("limit must be 1..=100");
    }
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let client = chat_shared::nats::connect(config, "chatctl").await?;
    let map = crate::shards::map(&chat_shared::nats::jetstream(client, config)).await?;
    let mut dbs = Vec::with_capacity(config.database_urls.len());
    let mut connections = Vec::with_capacity(config.database_urls.len());
    for url in &config.database_urls {
        let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL (CHAT_DATABASE_URLS)")?;
        dbs.push(db);
        connections.push(tokio::spawn(connection));
    }
    map.check(dbs.len())?;
    let mut layout = Layout::new(run, options.conversations)?;
    layout.place(&map)?;
    eprintln!(
        "writing {} messages in {} conversations of {} and {} elsewhere (COPY)",
        options.messages, options.conversations, layout.searcher, options.foreign
    );
    let seeding = Instant::now();
    let planted = seed(&dbs, &map, &mut layout, &options, run).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    let analyzing = Instant::now();
    for db in &dbs {
        db.batch_execute(
            "ANALYZE messages, conversations, user_conversations, groups, group_members",
        )
        .await?;
    }
    let analyze_seconds = analyzing.elapsed().as_secs_f64();
    drop(dbs);
    for connection in connections {
        let _ = connection.await;
    }
    eprintln!("written in {seed_seconds:.1} s, analyzed in {analyze_seconds:.1} s; searching");

    let (mut socket, _) = connect(config, &options.edge, &layout.searcher, "bench", None).await?;
    let mine: HashSet<&str> = layout.mine.iter().map(|c| c.id.as_str()).collect();
    let busiest = layout.mine[0].id.clone();
    let mut reports = Vec::new();
    let mut everything = Vec::new();
    let mut wrong = 0;
    let mut sequence = 0u64;
    for (index, query) in QUERIES.iter().enumerate() {
        for scoped in [false, true] {
            let planted = if scoped {
                planted.busiest[index]
            } else {
                planted.all[index]
            };
            let mut frame = json!({"type": "search", "query": query.text, "limit": options.limit});
            if scoped {
                frame["conversation"] = json!(busiest);
            }
            let mut micros = Vec::with_capacity(options.rounds);
            let mut last = Value::Null;
            let mut failed = 0;
            for round in 0..=options.rounds {
                sequence += 1;
                let started = Instant::now();
                let reply = request(&mut socket, frame.clone(), &format!("s{sequence}")).await?;
                if round > 0 {
                    micros.push(started.elapsed().as_micros() as u64);
                }
                if reply["type"] == "search" {
                    last = reply;
                } else {
                    // Timed out or refused: counted (its time too), not fatal,
                    // so one slow query does not hide the others' numbers.
                    eprintln!("search {:?} (scoped: {scoped}) failed: {reply}", query.text);
                    failed += 1;
                }
            }
            let items = last["items"].as_array().map_or(&[][..], Vec::as_slice);
            let more = last["more"].as_bool().unwrap_or(false);
            let expected = (planted as usize).min(options.limit);
            let bad_items = items
                .iter()
                .filter(|item| {
                    let conversation = item["conversation"].as_str().unwrap_or("");
                    let text = item["text"].as_str().unwrap_or("").to_lowercase();
                    !mine.contains(conversation)
                        || (scoped && conversation != busiest)
                        || !text.contains(query.text)
                })
                .count();
            if items.len() != expected
                || more != (planted as usize > options.limit)
                || bad_items > 0
            {
                eprintln!(
                    "wrong answer to {:?} (scoped: {scoped}): {} items (expected {expected}), more {more}, {bad_items} not matching",
                    query.text,
                    items.len()
                );
                wrong += 1;
            }
            everything.extend_from_slice(&micros);
            reports.push(QueryReport {
                name: query.name.to_string(),
                query: query.text.to_string(),
                scoped,
                planted,
                items: items.len(),
                more,
                failed,
                latency: Percentiles::of(micros),
            });
        }
    }
    let _ =
        tokio::time::timeout(Duration::from_secs(2), futures::SinkExt::close(&mut socket)).await;
    Ok(SearchReport {
        searcher: layout.searcher.clone(),
        busiest,
        messages: options.messages,
        conversations: options.conversations,
        foreign: options.foreign,
        rounds: options.rounds,
        limit: options.limit,
        seed_seconds,
        analyze_seconds,
        latency: Percentiles::of(everything),
        failed: reports.iter().map(|q| q.failed).sum(),
        queries: reports,
        wrong,
    })
}

pub fn print(report: &SearchReport) {
    println!(
        "search: {} messages in {} conversations (+{} elsewhere), written in {:.1} s, analyzed in {:.1} s",
        report.messages,
        report.conversations,
        report.foreign,
        report.seed_seconds,
        report.analyze_seconds
    );
    let l = &report.latency;
    println!(
        "all {} searches (limit {}): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.queries.len() * report.rounds,
        report.limit,
        l.p50,
        l.p90,
        l.p99,
        l.max
    );
    for q in &report.queries {
        let l = &q.latency;
        println!(
            "  {:<40} {:<6} {:>7} planted, {:>3} items: p50 {:>7.1} ms, p99 {:>7.1} ms, max {:>7.1} ms{}",
            q.name,
            if q.scoped { "in one" } else { "in all" },
            q.planted,
            q.items,
            l.p50,
            l.p99,
            l.max,
            if q.failed > 0 {
                format!(", {} FAILED", q.failed)
            } else {
                String::new()
            }
        );
    }
    if report.wrong > 0 {
        println!("WRONG ANSWERS: {}", report.wrong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filler_never_contains_a_query() {
        for query in &QUERIES {
            for word in ENGLISH.iter().chain(RUSSIAN).chain(JAPANESE) {
                assert!(!word.contains(query.text), "{word} holds {}", query.text);
            }
        }
        // Nor does a Japanese body made of filler alone (words run together).
        let mut random = Random(7);
        for _ in 0..10_000 {
            let (text, planted) = body(&mut random, Language::Japanese);
            for (index, query) in QUERIES.iter().enumerate() {
                assert_eq!(
                    text.contains(query.text),
                    planted.contains(&index),
                    "{text}"
                );
            }
        }
    }
}
