//! The clients: senders that retry one `client_msg_id` until `sent`, and
//! devices that record every frame per connection, reconnecting across
//! faults.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use super::history::{millis_since, Attempt, History, Received, Try};
use super::{Deployment, EdgeUrls};

/// What the clients do during a run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Seeds every sender's choice of conversation.
    pub seed: u64,
    /// Users `chaos-0`..: paired into DMs (0-1, 2-3, ...) and all in one
    /// group. Even.
    pub users: usize,
    /// Devices per user; device 0 also sends.
    pub devices: usize,
    /// Pause between one sender's messages.
    pub send_interval: Duration,
    /// How long the senders start new messages.
    pub duration: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            seed: 42,
            users: 4,
            devices: 2,
            send_interval: Duration::from_millis(40),
            duration: Duration::from_secs(20),
        }
    }
}

/// How long a sender keeps retrying its last message after the run, and
/// how long the devices get to catch up.
pub(super) const SETTLE: Duration = Duration::from_secs(90);
/// How long one send waits for its reply before it is retried.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from a sender to its device's connection.
struct Request {
    frame: Value,
    reply: oneshot::Sender<Value>,
    /// When the frame went out on a connection (unset while there is
    /// none): the answer time is measured from here.
    written: Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

/// Runs `workload` against `deployment`'s edges while `faults` runs, then
/// lets everything settle and returns the history. `faults` gets the
/// deployment and must leave it healed.
pub async fn run<F>(deployment: &mut Deployment, workload: &Workload, faults: F) -> Result<History>
where
    F: for<'a> FnOnce(
        &'a mut Deployment,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>,
{
    if workload.users < 2 || workload.users % 2 != 0 || workload.devices == 0 {
        bail!("a workload needs an even number of users and at least one device");
    }
    let users: Vec<String> = (0..workload.users).map(|i| format!("chaos-{i}")).collect();
    let group = create_group(deployment, &users).await?;
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    members.insert(format!("group:{group}"), users.clone());
    for pair in users.chunks(2) {
        members.insert(format!("dm:{}:{}", pair[0], pair[1]), pair.to_vec());
    }

    let (stop_devices, devices_stopped) = watch::channel(false);
    let (stop_senders, senders_stopped) = watch::channel(false);
    let logs: Arc<Mutex<BTreeMap<String, Vec<Received>>>> = Arc::default();
    let connections: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let mut device_tasks = Vec::new();
    let mut senders = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(workload.users * workload.devices);
    for (index, user) in users.iter().enumerate() {
        let token = deployment.token(user)?;
        for device in 0..workload.devices {
            let name = format!("{user}/d{device}");
            if let Ok(mut logs) = logs.lock() {
                logs.insert(name.clone(), Vec::new());
            }
            let (requests_tx, requests_rx) = mpsc::channel(1);
            let connection = DeviceConnection {
                name,
                device: format!("d{device}"),
                token: token.clone(),
                urls: deployment.edge_urls.clone(),
                turn: index + device,
                logs: logs.clone(),
                connections: connections.clone(),
                requests: (device == 0).then_some(requests_rx),
                ready: Some(ready_tx.clone()),
                stop: devices_stopped.clone(),
                epoch: deployment.epoch,
            };
            device_tasks.push(tokio::spawn(connection.run()));
            if device == 0 {
                let partner = users[index ^ 1].clone();
                let (low, high) = if *user < partner {
                    (user.clone(), partner.clone())
                } else {
                    (partner.clone(), user.clone())
                };
                let sender = Sender {
                    user: user.clone(),
                    partner,
                    dm: format!("dm:{low}:{high}"),
                    group: format!("group:{group}"),
                    rng: StdRng::seed_from_u64(workload.seed.wrapping_add(index as u64)),
                    interval: workload.send_interval,
                    requests: requests_tx,
                    stop: senders_stopped.clone(),
                    epoch: deployment.epoch,
                };
                senders.push(sender);
            }
        }
    }
    // Every device has its first `synced` before anyone sends: a device's
    // first hello carries no cursor and starts at the head, so a message
    // sent before it would not be its to receive.
    drop(ready_tx);
    for _ in 0..workload.users * workload.devices {
        tokio::time::timeout(SETTLE, ready_rx.recv())
            .await
            .context("the devices did not all connect")?
            .context("a device stopped before it connected")?;
    }
    let sender_tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| tokio::spawn(sender.run()))
        .collect();

    let duration = workload.duration;
    let stopper = async {
        tokio::time::sleep(duration).await;
        let _ = stop_senders.send(true);
    };
    let (faulted, ()) = tokio::join!(faults(deployment), stopper);
    let mut attempts = Vec::new();
    for task in sender_tasks {
        attempts.extend(task.await.context("a sender task")?);
    }
    let mut history = History {
        attempts,
        received: BTreeMap::new(),
        members,
        connections: BTreeMap::new(),
        marks: Vec::new(),
    };
    // Let every device catch up, then stop them.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        history.received = logs.lock().map(|l| l.clone()).unwrap_or_default();
        if history.complete() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_devices.send(true);
    for task in device_tasks {
        let _ = task.await;
    }
    history.received = logs.lock().map(|l| l.clone()).unwrap_or_default();
    history.connections = connections.lock().map(|c| c.clone()).unwrap_or_default();
    history.marks = deployment
        .marks
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    faulted.context("the fault schedule")?;
    Ok(history)
}

async fn create_group(deployment: &Deployment, users: &[String]) -> Result<String> {
    let mut client = deployment.connect(&users[0], "setup").await?;
    let reply = client
        .request(json!({"type":"group.create","name":"chaos","members":&users[1..]}))
        .await?;
    let id = reply["group"]["id"]
        .as_str()
        .with_context(|| format!("group.create answered {reply}"))?
        .to_string();
    client.close().await?;
    Ok(id)
}

struct Sender {
    user: String,
    partner: String,
    dm: String,
    group: String,
    rng: StdRng,
    interval: Duration,
    requests: mpsc::Sender<Request>,
    stop: watch::Receiver<bool>,
    epoch: tokio::time::Instant,
}

impl Sender {
    async fn run(mut self) -> Vec<Attempt> {
        let mut attempts = Vec::new();
        for seq in 0.. {
            if *self.stop.borrow() {
                break;
            }
            let to_group = self.rng.random_bool(0.5);
            let client_msg_id = format!("{}-{seq}", self.user);
            let mut frame = json!({
                "type": "send",
                "text": format!("chaos {} {seq}", self.user),
                "client_msg_id": client_msg_id,
            });
            let conversation = if to_group {
                frame["conversation"] = json!(self.group);
                self.group.clone()
            } else {
                frame["to"] = json!(self.partner);
                self.dm.clone()
            };
            let mut attempt = Attempt {
                sender: self.user.clone(),
                seq,
                client_msg_id,
                conversation,
                acked: None,
                tries: 0,
                slowest_try_ms: 0,
                refused: None,
                log: Vec::new(),
            };
            self.deliver(&mut attempt, frame).await;
            attempts.push(attempt);
            tokio::time::sleep(self.interval).await;
        }
        attempts
    }

    /// Retries `frame` until `sent`, a refusal, or the settle time after
    /// the run is over.
    async fn deliver(&mut self, attempt: &mut Attempt, frame: Value) {
        let mut give_up = None;
        loop {
            let now = tokio::time::Instant::now();
            if *self.stop.borrow() {
                let at = *give_up.get_or_insert(now + SETTLE);
                if now > at {
                    return;
                }
            }
            attempt.tries += 1;
            let started_ms = millis_since(self.epoch);
            let (reply, answer) = oneshot::channel();
            let written = Arc::new(std::sync::OnceLock::new());
            let request = Request {
                frame: frame.clone(),
                reply,
                written: written.clone(),
            };
            let answered = tokio::time::timeout(SEND_TIMEOUT, async {
                self.requests.send(request).await.ok()?;
                answer.await.ok()
            })
            .await;
            let answered_ms = millis_since(self.epoch);
            let written_ms = written.get().map(|at| {
                let at = at.saturating_duration_since(self.epoch).as_millis();
                u64::try_from(at).unwrap_or(u64::MAX)
            });
            let outcome = match &answered {
                Ok(Some(reply)) if reply["type"] == "sent" => "sent".to_string(),
                Ok(Some(reply)) => reply["code"].as_str().unwrap_or("error").to_string(),
                // The connection took the request and dropped it unwritten.
                Ok(None) => "disconnected".to_string(),
                Err(_) if written_ms.is_some() => "timeout".to_string(),
                Err(_) => "no_connection".to_string(),
            };
            let duplicate = matches!(&answered, Ok(Some(reply)) if reply["duplicate"] == true);
            let try_ = Try {
                started_ms,
                written_ms,
                answered_ms,
                outcome,
                duplicate,
            };
            if let Some(waited) = try_.waited_ms() {
                attempt.slowest_try_ms = attempt.slowest_try_ms.max(waited);
            }
            attempt.log.push(try_);
            let retry_in = match answered {
                Ok(Some(reply)) if reply["type"] == "sent" => {
                    attempt.acked = reply["id"].as_str().and_then(|id| id.parse().ok());
                    return;
                }
                Ok(Some(reply)) => match reply["code"].as_str() {
                    Some("unavailable" | "internal" | "disconnected") => 100,
                    Some("rate_limited") => reply["retry_after_ms"].as_u64().unwrap_or(100),
                    _ => {
                        attempt.refused = Some(reply.to_string());
                        return;
                    }
                },
                // No connection, or no answer in time: the same id again.
                _ => 100,
            };
            tokio::time::sleep(Duration::from_millis(retry_in)).await;
        }
    }
}

/// One device: connects to an edge, resumes from its last cursor after
/// every disconnect, records messages, acks, and carries its sender's
/// requests.
struct DeviceConnection {
    name: String,
    device: String,
    token: String,
    urls: EdgeUrls,
    turn: usize,
    logs: Arc<Mutex<BTreeMap<String, Vec<Received>>>>,
    connections: Arc<Mutex<BTreeMap<String, u32>>>,
    requests: Option<mpsc::Receiver<Request>>,
    /// Told once, at the first `synced`.
    ready: Option<mpsc::Sender<()>>,
    stop: watch::Receiver<bool>,
    epoch: tokio::time::Instant,
}

impl DeviceConnection {
    async fn run(mut self) {
        let mut cursor: Option<String> = None;
        let mut connection = 0u32;
        let mut quick_failures = 0u32;
        while !*self.stop.borrow() {
            self.turn += 1;
            let Some(url) = self.urls.pick(self.turn) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(Ok((socket, _))) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            connection += 1;
            if let Ok(mut connections) = self.connections.lock() {
                connections.insert(self.name.clone(), connection);
            }
            let started = tokio::time::Instant::now();
            self.session(socket, connection, &mut cursor).await;
            // A session refused at once (the backend is away) is retried
            // after a growing pause, as real clients back off.
            if started.elapsed() < Duration::from_secs(2) {
                quick_failures += 1;
                let pause = 100u64 << quick_failures.min(4);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            } else {
                quick_failures = 0;
            }
        }
    }

    /// One connection, until it ends or the run stops.
    async fn session(
        &mut self,
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        connection: u32,
        cursor: &mut Option<String>,
    ) {
        let (mut sink, mut stream) = socket.split();
        let mut hello = json!({"type":"hello","token":self.token,"device":self.device});
        if let Some(cursor) = cursor.as_ref() {
            hello["cursor"] = json!(cursor);
        }
        if sink
            .send(Message::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        let mut synced = false;
        let mut in_flight: HashMap<String, oneshot::Sender<Value>> = HashMap::new();
        let mut next_ref = 0u64;
        let mut acked_cursor: Option<String> = None;
        let mut ack_tick = tokio::time::interval(Duration::from_millis(500));
        let mut ping_tick = tokio::time::interval(Duration::from_secs(5));
        let mut stop = self.stop.clone();
        loop {
            let requests = self.requests.as_mut().filter(|_| synced);
            tokio::select! {
                _ = stop.changed() => return,
                frame = stream.next() => {
                    let frame: Value = match frame {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                            Ok(frame) => frame,
                            Err(_) => continue,
                        },
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    match frame["type"].as_str() {
                        Some("synced") => {
                            synced = true;
                            if let Some(ready) = self.ready.take() {
                                let _ = ready.send(()).await;
                            }
                            // The head: a device that received nothing yet
                            // resumes from here, not from the newest item
                            // at its next connect (PROTOCOL.md: clients
                            // store every cursor they are given).
                            if let Some(c) = frame["cursor"].as_str() {
                                if cursor.is_none() {
                                    *cursor = Some(c.to_string());
                                }
                            }
                        }
                        Some("message") => {
                            self.record(connection, &frame);
                            if let Some(c) = frame["cursor"].as_str() {
                                *cursor = Some(c.to_string());
                            }
                        }
                        // Receipts are inbox items too (v1.1).
                        Some("membership") | Some("receipt") => {
                            if let Some(c) = frame["cursor"].as_str() {
                                *cursor = Some(c.to_string());
                            }
                        }
                        _ => {
                            if let Some(reply) = frame["ref"].as_str().and_then(|r| in_flight.remove(r)) {
                                let _ = reply.send(frame);
                            }
                        }
                    }
                }
                request = async {
                    match requests {
                        Some(requests) => requests.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(mut request) = request else { continue };
                    next_ref += 1;
                    let reference = format!("s{next_ref}");
                    request.frame["ref"] = json!(reference);
                    if sink.send(Message::Text(request.frame.to_string().into())).await.is_err() {
                        break;
                    }
                    let _ = request.written.set(tokio::time::Instant::now());
                    in_flight.insert(reference, request.reply);
                }
                _ = ack_tick.tick() => {
                    if cursor.is_some() && *cursor != acked_cursor {
                        let ack = json!({"type":"ack","cursor":cursor});
                        if sink.send(Message::Text(ack.to_string().into())).await.is_err() {
                            break;
                        }
                        acked_cursor = cursor.clone();
                    }
                }
                _ = ping_tick.tick() => {
                    if sink.send(Message::Text(json!({"type":"ping"}).to_string().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The connection is gone: its requests get an answer now (the
        // sender retries with the same client_msg_id).
        for (_, reply) in in_flight {
            let _ = reply.send(json!({"type":"error","code":"disconnected"}));
        }
    }

    fn record(&self, connection: u32, frame: &Value) {
        let text = |field: &str| frame[field].as_str().unwrap_or_default().to_string();
        let Some(id) = frame["id"].as_str().and_then(|id| id.parse().ok()) else {
            return;
        };
        let received = Received {
            connection,
            at_ms: millis_since(self.epoch),
            id,
            conversation: text("conversation"),
            from: text("from"),
            client_msg_id: text("client_msg_id"),
        };
        if let Ok(mut logs) = self.logs.lock() {
            logs.entry(self.name.clone()).or_default().push(received);
        }
    }
}
