//! A minimal XMPP client, just enough for `chatctl bench --peer ejabberd`
//! (see [`crate::peer_bench`]): plain TCP to a loopback server, SASL
//! ANONYMOUS, resource binding, stream management (XEP-0198) acks as the
//! counterpart of our `sent`, chat and groupchat messages, MUC joins.
//!
//! No XML library: [`Splitter`] cuts the server's byte stream into
//! top-level elements by counting tags (quote-aware, so a `>` inside an
//! attribute value does not end a tag), and [`Element`] reads the few
//! attributes and child texts the bench needs. That is enough for what
//! ejabberd sends (no CDATA, no comments, no DTD); anything else is an
//! error rather than a guess.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The XMPP domain the bench's server serves (`hosts: [localhost]`).
pub const DOMAIN: &str = "localhost";
/// Its MUC service.
pub const MUC_DOMAIN: &str = "conference.localhost";
/// No element from the server is anywhere near this; a bigger one means the
/// splitter has lost its place, so stop instead of buffering forever.
const MAX_ELEMENT: usize = 1 << 20;
/// Queued writes per connection (stanzas and acks).
const WRITE_QUEUE: usize = 1024;
/// Events queued for the bench per connection before the reader waits.
const EVENT_QUEUE: usize = 8192;

const STREAM_HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";
const SM_NS: &str = "urn:xmpp:sm:3";

#[derive(Debug, thiserror::Error)]
pub enum XmppError {
    #[error("xmpp connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("xmpp connection closed by the server")]
    Closed,
    #[error("malformed xml from the server: {0}")]
    Malformed(String),
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// One top-level element (a stanza or a nonza such as `<a/>`), as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    raw: String,
}

/// What the splitter found next in the stream.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// `<stream:stream ...>` (the server's header, after each restart).
    StreamStart,
    /// `</stream:stream>`.
    StreamEnd,
    Element(Element),
}

/// Cuts bytes into top-level elements; feed it with [`Splitter::extend`],
/// take pieces with [`Splitter::next_piece`] until it says `None`.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already handed out.
    consumed: usize,
}

impl Splitter {
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete piece, `None` if more bytes are needed.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, XmppError> {
        let buf = &self.buf[self.consumed..];
        let mut depth = 0usize;
        let mut start = None;
        let mut at = 0;
        loop {
            // Text between elements at the top level is whitespace
            // keepalive; inside an element it is content. Either way only
            // tags move the depth.
            let Some(lt) = buf[at..].iter().position(|&b| b == b'<').map(|p| at + p) else {
                if depth == 0 {
                    self.consumed += buf.len();
                }
                return self.incomplete(buf.len());
            };
            let Some(gt) = tag_end(&buf[lt..]).map(|p| lt + p) else {
                return self.incomplete(buf.len());
            };
            let tag = &buf[lt..=gt];
            at = gt + 1;
            if tag.starts_with(b"<?") || tag.starts_with(b"<!") {
                if tag.starts_with(b"<!") {
                    return Err(XmppError::Malformed(lossy(tag)));
                }
                if depth == 0 {
                    self.consumed += at;
                    return self.next_piece();
                }
                continue;
            }
            if tag.starts_with(b"</") {
                if depth == 0 {
                    self.consumed += at;
                    if tag.starts_with(b"</stream:stream") {
                        return Ok(Some(Piece::StreamEnd));
                    }
                    return Err(XmppError::Malformed(lossy(tag)));
                }
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(self.take(start.unwrap_or(lt), at)?));
                }
                continue;
            }
            if depth == 0 && tag.starts_with(b"<stream:stream") {
                self.consumed += at;
                return Ok(Some(Piece::StreamStart));
            }
            if tag.ends_with(b"/>") {
                if depth == 0 {
                    return Ok(Some(self.take(lt, at)?));
                }
                continue;
            }
            if depth == 0 {
                start = Some(lt);
            }
            depth += 1;
        }
    }

    fn incomplete(&self, pending: usize) -> Result<Option<Piece>, XmppError> {
        if pending > MAX_ELEMENT {
            return Err(XmppError::Malformed(format!(
                "an element longer than {MAX_ELEMENT} bytes"
            )));
        }
        Ok(None)
    }

    /// Hands out `buf[consumed + from .. consumed + to]`.
    fn take(&mut self, from: usize, to: usize) -> Result<Piece, XmppError> {
        let bytes = &self.buf[self.consumed + from..self.consumed + to];
        let raw = String::from_utf8(bytes.to_vec())
            .map_err(|_| XmppError::Malformed("invalid UTF-8".into()))?;
        self.consumed += to;
        Ok(Piece::Element(Element { raw }))
    }
}

/// Index of the `>` that ends the tag starting at `tag[0] == b'<'`,
/// skipping quoted attribute values.
fn tag_end(tag: &[u8]) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in tag.iter().enumerate().skip(1) {
        match (quote, b) {
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), _) if q == b => quote = None,
            (None, b'>') => return Some(i),
            _ => {}
        }
    }
    None
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The five predefined entities (all that ejabberd writes).
fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Escapes text for an attribute value or element content.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Element {
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The element's name (`message`, `iq`, `a`, ...).
    pub fn name(&self) -> &str {
        let rest = &self.raw[1..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
            .unwrap_or(rest.len());
        &rest[..end]
    }

    /// The start tag, attributes included.
    fn start_tag(&self) -> &str {
        let end = tag_end(self.raw.as_bytes()).unwrap_or(self.raw.len() - 1);
        &self.raw[..=end]
    }

    /// An attribute of the element itself (not of its children).
    pub fn attr(&self, name: &str) -> Option<String> {
        attr_in(self.start_tag(), name)
    }

    /// The text of the first child element called `child` (`body`, `jid`).
    pub fn child_text(&self, child: &str) -> Option<String> {
        let inner = &self.raw[self.start_tag().len()..];
        let open = format!("<{child}");
        let mut from = 0;
        while let Some(found) = inner[from..].find(&open) {
            let at = from + found + open.len();
            // `<body>` or `<body xml:lang=...>`, not `<bodyx>`.
            match inner[at..].chars().next() {
                Some('>') | Some(' ') | Some('\t') | Some('\n') | Some('\r') => {}
                Some('/') => return Some(String::new()),
                _ => {
                    from = at;
                    continue;
                }
            }
            let tag_len = tag_end(&inner.as_bytes()[from + found..])?;
            let text_start = from + found + tag_len + 1;
            let close = format!("</{child}>");
            let text_end = text_start + inner[text_start..].find(&close)?;
            return Some(unescape(&inner[text_start..text_end]));
        }
        None
    }
}

fn attr_in(tag: &str, name: &str) -> Option<String> {
    let bytes = tag.as_bytes();
    let mut from = 0;
    while let Some(found) = tag[from..].find(name) {
        let at = from + found;
        from = at + name.len();
        let before_ok = at > 0 && bytes[at - 1].is_ascii_whitespace();
        let rest = &tag[from..];
        let Some(after_eq) = rest.strip_prefix('=') else {
            continue;
        };
        let Some(quote) = after_eq.chars().next().filter(|c| *c == '\'' || *c == '"') else {
            continue;
        };
        if !before_ok {
            continue;
        }
        let value = &after_eq[1..];
        let end = value.find(quote)?;
        return Some(unescape(&value[..end]));
    }
    None
}

/// What a connection's reader hands to the bench.
#[derive(Debug)]
pub enum Event {
    /// The server has handled this many of our stanzas (XEP-0198 `<a h>`).
    Acked(u64),
    /// A message with a body.
    Message {
        from: String,
        id: Option<String>,
        body: String,
    },
    /// Our own presence reflected by a room: the join of `from`
    /// (`room@service/nick`) is complete (status 110).
    Joined { from: String },
    /// The reader stopped; the connection is unusable.
    Closed(String),
}

/// A logged-in XMPP session: writes go through a bounded queue to the
/// writer task (one owner per socket), events come from the reader task.
pub struct Session {
    /// Our full JID, as bound by the server.
    pub jid: String,
    pub events: mpsc::Receiver<Event>,
    out: mpsc::Sender<String>,
    /// Stanzas sent since stream management was enabled; the server's
    /// `<a h>` counts the same way.
    stanzas_out: u64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Session {
    /// Connects and logs in anonymously; enables stream management and
    /// sends initial presence.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, XmppError> {
        tokio::time::timeout(timeout, Self::login(addr))
            .await
            .map_err(|_| XmppError::Timeout("the xmpp login"))?
    }

    async fn login(addr: SocketAddr) -> Result<Self, XmppError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        let mut splitter = Splitter::default();

        write.write_all(STREAM_HEADER.as_bytes()).await?;
        let features = next_element(&mut read, &mut splitter).await?;
        if features.name() != "stream:features" || !features.raw().contains(">ANONYMOUS<") {
            return Err(XmppError::Unexpected(features.raw));
        }
        write
            .write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
            .await?;
        let success = next_element(&mut read, &mut splitter).await?;
        if success.name() != "success" {
            return Err(XmppError::Unexpected(success.raw));
        }
        // After SASL the stream restarts.
        write.write_all(STREAM_HEADER.as_bytes()).await?;
        let features = next_element(&mut read, &mut splitter).await?;
        if features.name() != "stream:features" || !features.raw().contains(SM_NS) {
            return Err(XmppError::Unexpected(features.raw));
        }
        write
            .write_all(
                b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
            )
            .await?;
        let bound = next_element(&mut read, &mut splitter).await?;
        let jid = match (bound.name(), bound.attr("type").as_deref()) {
            ("iq", Some("result")) => bound.child_text("jid"),
            _ => None,
        };
        let Some(jid) = jid.filter(|j| j.contains('/')) else {
            return Err(XmppError::Unexpected(bound.raw));
        };
        write
            .write_all(format!("<enable xmlns='{SM_NS}'/>").as_bytes())
            .await?;
        let enabled = next_element(&mut read, &mut splitter).await?;
        if enabled.name() != "enabled" {
            return Err(XmppError::Unexpected(enabled.raw));
        }
        write.write_all(b"<presence/>").await?;

        let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let writer = tokio::spawn(write_loop(write, out_rx));
        let reader = tokio::spawn(read_loop(read, splitter, out.clone(), events_tx));
        Ok(Self {
            jid,
            events,
            out,
            stanzas_out: 1,
            reader,
            writer,
        })
    }

    /// Sends one stanza followed by an ack request; returns the `h` the
    /// server's `<a>` will reach once it has handled this stanza.
    pub async fn send_acked(&mut self, stanza: String) -> Result<u64, XmppError> {
        let mut text = stanza;
        text.push_str("<r xmlns='urn:xmpp:sm:3'/>");
        self.out.send(text).await.map_err(|_| XmppError::Closed)?;
        self.stanzas_out += 1;
        Ok(self.stanzas_out)
    }

    /// `<message type='chat'>` to a full JID.
    pub async fn send_chat(&mut self, to: &str, id: &str, body: &str) -> Result<u64, XmppError> {
        self.send_acked(format!(
            "<message to='{}' type='chat' id='{}'><body>{}</body></message>",
            escape(to),
            escape(id),
            escape(body)
        ))
        .await
    }

    /// `<message type='groupchat'>` to a room's bare JID.
    pub async fn send_groupchat(
        &mut self,
        room: &str,
        id: &str,
        body: &str,
    ) -> Result<u64, XmppError> {
        self.send_acked(format!(
            "<message to='{}' type='groupchat' id='{}'><body>{}</body></message>",
            escape(room),
            escape(id),
            escape(body)
        ))
        .await
    }

    /// Joins (creating it if new) the room `room@service` as `nick` and
    /// waits until the room confirms. Call it before any traffic: other
    /// events arriving meanwhile are dropped.
    pub async fn join(
        &mut self,
        room: &str,
        nick: &str,
        timeout: Duration,
    ) -> Result<(), XmppError> {
        let occupant = format!("{room}/{nick}");
        self.send_acked(format!(
            "<presence to='{}'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
            escape(&occupant)
        ))
        .await?;
        let wait = async {
            loop {
                match self.events.recv().await {
                    Some(Event::Joined { from }) if from == occupant => return Ok(()),
                    Some(Event::Closed(why)) => return Err(XmppError::Unexpected(why)),
                    None => return Err(XmppError::Closed),
                    Some(_) => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| XmppError::Timeout("the room join"))?
    }
}

/// Reads until one element (skipping stream headers) is complete.
async fn next_element(
    read: &mut OwnedReadHalf,
    splitter: &mut Splitter,
) -> Result<Element, XmppError> {
    let mut buf = [0u8; 8192];
    loop {
        match splitter.next_piece()? {
            Some(Piece::Element(element)) => {
                if element.name() == "stream:error" {
                    return Err(XmppError::Unexpected(element.raw));
                }
                return Ok(element);
            }
            Some(Piece::StreamStart) => continue,
            Some(Piece::StreamEnd) => return Err(XmppError::Closed),
            None => {}
        }
        let n = read.read(&mut buf).await?;
        if n == 0 {
            return Err(XmppError::Closed);
        }
        splitter.extend(&buf[..n]);
    }
}

/// Writes queued text, flushing once the queue is empty (so a burst of
/// stanzas becomes few syscalls).
async fn write_loop(write: OwnedWriteHalf, mut queue: mpsc::Receiver<String>) {
    let mut write = BufWriter::with_capacity(64 * 1024, write);
    while let Some(text) = queue.recv().await {
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        while let Ok(text) = queue.try_recv() {
            if write.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
        if write.flush().await.is_err() {
            return;
        }
    }
}

/// Splits the stream, answers the server's ack requests, and turns what
/// the bench needs into events.
async fn read_loop(
    mut read: OwnedReadHalf,
    mut splitter: Splitter,
    out: mpsc::Sender<String>,
    events: mpsc::Sender<Event>,
) {
    let why = read_stanzas(&mut read, &mut splitter, &out, &events).await;
    let _ = events.send(Event::Closed(why.to_string())).await;
}

async fn read_stanzas(
    read: &mut OwnedReadHalf,
    splitter: &mut Splitter,
    out: &mpsc::Sender<String>,
    events: &mpsc::Sender<Event>,
) -> XmppError {
    // Stanzas received since stream management was enabled, for our `<a h>`.
    let mut stanzas_in: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            let element = match splitter.next_piece() {
                Ok(Some(Piece::Element(element))) => element,
                Ok(Some(Piece::StreamStart)) => continue,
                Ok(Some(Piece::StreamEnd)) => return XmppError::Closed,
                Ok(None) => break,
                Err(e) => return e,
            };
            let event = match element.name() {
                "r" => {
                    // The server drops a connection that leaves its
                    // requests unanswered (ack_timeout, max_ack_queue).
                    let ack = format!("<a xmlns='{SM_NS}' h='{stanzas_in}'/>");
                    if out.send(ack).await.is_err() {
                        return XmppError::Closed;
                    }
                    None
                }
                "a" => match element.attr("h").and_then(|h| h.parse().ok()) {
                    Some(h) => Some(Event::Acked(h)),
                    None => return XmppError::Malformed(element.raw),
                },
                "message" => {
                    stanzas_in += 1;
                    match (element.attr("from"), element.child_text("body")) {
                        (Some(from), Some(body)) => Some(Event::Message {
                            from,
                            id: element.attr("id"),
                            body,
                        }),
                        _ => None,
                    }
                }
                "presence" => {
                    stanzas_in += 1;
                    let own = element.raw().contains("<status code='110'/>");
                    match element.attr("from") {
                        Some(from) if own => Some(Event::Joined { from }),
                        _ => None,
                    }
                }
                "iq" => {
                    stanzas_in += 1;
                    None
                }
                "stream:error" => return XmppError::Unexpected(element.raw),
                _ => None,
            };
            if let Some(event) = event {
                if events.send(event).await.is_err() {
                    // The session was dropped; nobody is listening.
                    return XmppError::Closed;
                }
            }
        }
        match read.read(&mut buf).await {
            Ok(0) => return XmppError::Closed,
            Ok(n) => splitter.extend(&buf[..n]),
            Err(e) => return XmppError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(chunks: &[&str]) -> Vec<Piece> {
        let mut splitter = Splitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.extend(chunk.as_bytes());
            while let Some(piece) = splitter.next_piece().unwrap() {
                out.push(piece);
            }
        }
        out
    }

    fn element(raw: &str) -> Piece {
        Piece::Element(Element { raw: raw.into() })
    }

    #[test]
    fn splits_top_level_elements_across_reads() {
        let stream = "<?xml version='1.0'?><stream:stream id='1' xmlns='jabber:client'><stream:features><mechanisms><mechanism>ANONYMOUS</mechanism></mechanisms></stream:features> <a h='3' xmlns='urn:xmpp:sm:3'/><message from='r@c/n1' id='x'><body>a &gt; b</body></message></stream:stream>";
        let expected = vec![
            Piece::StreamStart,
            element("<stream:features><mechanisms><mechanism>ANONYMOUS</mechanism></mechanisms></stream:features>"),
            element("<a h='3' xmlns='urn:xmpp:sm:3'/>"),
            element("<message from='r@c/n1' id='x'><body>a &gt; b</body></message>"),
            Piece::StreamEnd,
        ];
        assert_eq!(pieces(&[stream]), expected);
        // Byte by byte gives the same pieces.
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let chunks: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(pieces(&chunks), expected);
    }

    #[test]
    fn a_gt_inside_an_attribute_does_not_end_the_tag() {
        assert_eq!(
            pieces(&["<stream:stream><presence from='a>b'><x/></presence>"]),
            vec![
                Piece::StreamStart,
                element("<presence from='a>b'><x/></presence>")
            ]
        );
    }

    #[test]
    fn reads_attributes_and_child_text() {
        let e = Element {
            raw: "<message xml:lang='en' to='u@localhost/r' from='room@conference.localhost/m1' type='groupchat' id='g0s1n2'><stanza-id by='room' id='17'/><body>12345:g&amp;0</body></message>".into(),
        };
        assert_eq!(e.name(), "message");
        assert_eq!(e.attr("id").as_deref(), Some("g0s1n2"));
        assert_eq!(
            e.attr("from").as_deref(),
            Some("room@conference.localhost/m1")
        );
        assert_eq!(e.attr("lang"), None);
        assert_eq!(e.attr("by"), None, "only the element's own attributes");
        assert_eq!(e.child_text("body").as_deref(), Some("12345:g&0"));
        assert_eq!(e.child_text("subject"), None);
        let bound = Element {
            raw: "<iq type='result' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>1@localhost/2</jid></bind></iq>".into(),
        };
        assert_eq!(bound.child_text("jid").as_deref(), Some("1@localhost/2"));
        assert_eq!(
            bound.child_text("bind"),
            Some("<jid>1@localhost/2</jid>".into())
        );
    }

    #[test]
    fn escape_round_trips() {
        let text = "a<b>&'c\"";
        assert_eq!(unescape(&escape(text)), text);
    }

    #[test]
    fn rejects_what_it_cannot_split() {
        let mut splitter = Splitter::default();
        splitter.extend(b"<stream:stream><!DOCTYPE x>");
        assert_eq!(splitter.next_piece().unwrap(), Some(Piece::StreamStart));
        assert!(splitter.next_piece().is_err());
    }
}
