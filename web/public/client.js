// One chat session over PROTOCOL.md v1 (`/v1/ws`), kept alive: reconnect
// with exponential backoff and jitter, resume from the stored cursor, acks,
// heartbeats, token refresh, `reconnect` frames to another edge, and an
// outbox of sends that survives reconnects and reloads (retried with the
// same client_msg_id, so the server stores each message once).
//
// No DOM in here: the app gives callbacks and reads `status`.

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const REQUEST_TIMEOUT_MS = 15_000;
const ACK_EVERY_MS = 1_000;

export function randomId(prefix, bytes = 8) {
  const raw = crypto.getRandomValues(new Uint8Array(bytes));
  return prefix + Array.from(raw, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Compares two decimal id/cursor strings numerically. */
export function cmpId(a, b) {
  const x = BigInt(a);
  const y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
}

/** `exp` of a JWT in ms since the epoch, or null. */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

export class RequestError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.code = frame.code;
    this.retryAfterMs = frame.retry_after_ms;
  }
}

export class ChatClient {
  /**
   * @param {object} o
   * @param {string} o.user
   * @param {string} o.device
   * @param {string} o.url       WebSocket URL of the edge that served the page
   * @param {(fresh: boolean) => Promise<string>} o.token
   * @param {(frame: object) => void} o.onFrame   every server frame but replies
   * @param {() => void} o.onStatus
   * @param {() => void} o.onOutbox
   */
  constructor(o) {
    Object.assign(this, {
      user: o.user,
      device: o.device,
      homeUrl: o.url,
      getToken: o.token,
      onFrame: o.onFrame,
      onStatus: o.onStatus,
      onOutbox: o.onOutbox,
    });
    this.key = `chat.${o.user}.`;
    this.url = o.url;
    this.ws = null;
    this.status = 'connecting'; // connecting | syncing | online | waiting | stopped
    this.retryAt = 0;
    this.attempt = 0;
    this.pending = new Map(); // ref -> {resolve, reject, timer}
    this.nextRef = 1;
    this.cursor = localStorage.getItem(this.key + 'cursor');
    this.ackedCursor = null;
    this.outbox = this.#loadOutbox();
    this.stopped = false;
    this.timers = {};
    this.alternates = [];
    this.edge = null;
    this.resumed = true;
    window.addEventListener('online', () => this.retryNow());
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') this.retryNow();
    });
  }

  // ------------------------------------------------------------ lifecycle

  start() {
    this.stopped = false;
    this.#connect();
  }

  stop() {
    this.stopped = true;
    this.#clearTimers();
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close(1000, 'signed out');
      this.ws = null;
    }
    this.#setStatus('stopped');
  }

  /** Reconnect at once if waiting for the backoff to pass. */
  retryNow() {
    if (this.stopped || this.status !== 'waiting') return;
    clearTimeout(this.timers.retry);
    this.#connect();
  }

  async #connect() {
    this.#clearTimers();
    this.#setStatus('connecting');
    let token;
    try {
      token = await this.getToken(this.attempt > 0 && this.lastClose === 4001);
    } catch (e) {
      this.lastError = `cannot get a token: ${e.message}`;
      this.#scheduleRetry();
      return;
    }
    if (this.stopped) return;
    this.token = token;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.url = this.homeUrl;
      this.#scheduleRetry();
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    ws.onopen = () => {
      const hello = { type: 'hello', token, device: this.device };
      if (this.cursor) hello.cursor = this.cursor;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (event) => this.#receive(event.data);
    ws.onclose = (event) => this.#closed(ws, event.code, event.reason);
    ws.onerror = () => {}; // onclose follows
  }

  #closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.lastClose = code;
    this.lastError = reason ? `${code} ${reason}` : `closed (${code})`;
    this.#clearTimers();
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError({ code: 'disconnected', message: 'connection lost' }));
    }
    this.pending.clear();
    if (this.stopped) return;
    if (!this.welcomed && this.url !== this.homeUrl) {
      // The edge we were sent to did not take us: try the next, then home.
      this.url = this.alternates.shift() || this.homeUrl;
    }
    if (code === 1001 && this.moveTo) {
      // Draining edge: go where it said, right away (a little jitter so
      // its clients do not arrive all at once).
      this.url = this.moveTo;
      this.moveTo = null;
      this.attempt = 0;
      this.#scheduleRetry(Math.random() * 300);
      return;
    }
    let floor = 0;
    if (code === 4008) floor = 10_000; // abuse: back off for real
    this.#scheduleRetry(undefined, floor);
  }

  #scheduleRetry(delay, floor = 0) {
    if (this.stopped) return;
    if (delay === undefined) {
      // Exponential backoff with full jitter, capped.
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
      delay = Math.max(floor, Math.random() * cap);
      this.attempt += 1;
    }
    this.retryAt = Date.now() + delay;
    this.#setStatus('waiting');
    this.timers.retry = setTimeout(() => this.#connect(), delay);
  }

  #clearTimers() {
    for (const t of Object.values(this.timers)) {
      clearTimeout(t);
      clearInterval(t);
    }
    this.timers = {};
  }

  #setStatus(status) {
    this.status = status;
    this.onStatus();
  }

  // ------------------------------------------------------------ frames

  #receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    this.lastHeard = Date.now();
    switch (frame.type) {
      case 'welcome':
        this.welcomed = true;
        this.edge = frame.edge;
        this.resumed = frame.resumed;
        this.heartbeatMs = (frame.heartbeat || 25) * 1000;
        this.#setStatus('syncing');
        this.onFrame(frame);
        return;
      case 'synced':
        this.attempt = 0;
        this.#markProcessed(frame.cursor);
        this.#startTimers();
        this.#setStatus('online');
        this.onFrame(frame);
        this.#flushOutbox();
        return;
      case 'pong':
        this.awaitingPong = false;
        if (frame.ref) this.#settle(frame);
        return;
      case 'reconnect': {
        const others = (frame.edges || []).filter((u) => u !== this.url);
        this.moveTo = others[0] || this.homeUrl;
        this.alternates = others.slice(1);
        if (!this.alternates.includes(this.homeUrl) && this.moveTo !== this.homeUrl) {
          this.alternates.push(this.homeUrl);
        }
        return;
      }
      case 'error':
        if (frame.ref && this.pending.has(frame.ref)) {
          this.#settle(frame);
          return;
        }
        this.onFrame(frame);
        return;
      default:
        if (frame.ref && this.pending.has(frame.ref)) {
          this.#settle(frame);
          return;
        }
        this.onFrame(frame);
        // Only after the app has taken it: a reload resumes after it.
        if (frame.cursor) this.#markProcessed(frame.cursor);
    }
  }

  #markProcessed(cursor) {
    if (this.cursor && cmpId(cursor, this.cursor) <= 0) return;
    this.cursor = cursor;
    localStorage.setItem(this.key + 'cursor', cursor);
  }

  #startTimers() {
    // Heartbeat: a ping well within the server's interval; a missing pong
    // means a dead connection (a phone that lost its network), so close and
    // reconnect rather than wait for TCP to notice.
    this.timers.ping = setInterval(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      if (this.awaitingPong && Date.now() - this.pingSent > 10_000) {
        this.ws.close(4000, 'no pong');
        return;
      }
      this.awaitingPong = true;
      this.pingSent = Date.now();
      this.#raw({ type: 'ping' });
    }, Math.min(this.heartbeatMs * 0.6, 15_000));
    this.timers.ack = setInterval(() => this.#ack(), ACK_EVERY_MS);
    this.#scheduleRefresh();
  }

  #ack() {
    if (!this.cursor || this.cursor === this.ackedCursor) return;
    if (this.#raw({ type: 'ack', cursor: this.cursor })) this.ackedCursor = this.cursor;
  }

  #scheduleRefresh() {
    const exp = tokenExpiry(this.token);
    if (!exp) return;
    // At 80 % of the remaining lifetime but 10 s before the end if it can
    // be (a slow network or a busy tab still makes it), and not sooner
    // than 2 s from now.
    const left = exp - Date.now();
    const delay = Math.max(2_000, Math.min(left * 0.8, left - 10_000));
    this.timers.refresh = setTimeout(async () => {
      try {
        const token = await this.getToken(true);
        if (token === this.token) return; // nothing newer to offer (a pasted token)
        await this.request({ type: 'refresh', token });
        this.token = token;
        this.refreshes = (this.refreshes || 0) + 1;
        this.#scheduleRefresh();
      } catch {
        // The token runs out and the server closes 4001; the reconnect
        // asks for a fresh token then.
      }
    }, delay);
  }

  #raw(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a fire-and-forget frame (typing, read) if connected. */
  cast(frame) {
    if (this.status !== 'online') return false;
    return this.#raw(frame);
  }

  /** Sends a request and resolves with its reply; rejects with RequestError. */
  request(frame) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN || !this.welcomed) {
        reject(new RequestError({ code: 'disconnected', message: 'not connected' }));
        return;
      }
      const ref = `r${this.nextRef++}`;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new RequestError({ code: 'timeout', message: 'no answer' }));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(ref, { resolve, reject, timer });
      this.#raw({ ...frame, ref });
    });
  }

  #settle(frame) {
    const p = this.pending.get(frame.ref);
    if (!p) return;
    this.pending.delete(frame.ref);
    clearTimeout(p.timer);
    if (frame.type === 'error') p.reject(new RequestError(frame));
    else p.resolve(frame);
  }

  // ------------------------------------------------------------ outbox

  #loadOutbox() {
    try {
      const items = JSON.parse(localStorage.getItem(this.key + 'outbox') || '[]');
      return Array.isArray(items) ? items : [];
    } catch {
      return [];
    }
  }

  #saveOutbox() {
    localStorage.setItem(this.key + 'outbox', JSON.stringify(this.outbox));
    this.onOutbox();
  }

  /**
   * Queues a message (`replyTo`: the id it answers; `attachments`: uploaded
   * media as `POST /v1/media` described them); it is shown at once and sent
   * when connected.
   */
  send(conversation, text, replyTo = null, attachments = []) {
    const item = {
      client_msg_id: randomId('w', 12),
      conversation,
      text,
      ts: Date.now(),
      state: 'pending',
    };
    if (replyTo) item.reply_to = replyTo;
    if (attachments.length) item.attachments = attachments;
    this.outbox.push(item);
    this.#saveOutbox();
    this.#flushOutbox();
    return item;
  }

  /** Drops an outbox item (it was stored, or the user gave up on it). */
  forget(clientMsgId) {
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((i) => i.client_msg_id !== clientMsgId);
    if (this.outbox.length !== before) this.#saveOutbox();
  }

  retry(clientMsgId) {
    const item = this.outbox.find((i) => i.client_msg_id === clientMsgId);
    if (!item) return;
    item.state = 'pending';
    this.#saveOutbox();
    this.#flushOutbox();
  }

  /**
   * Sends every pending item, oldest first, one at a time (so a
   * conversation's messages keep their order).
   */
  async #flushOutbox() {
    if (this.flushing || this.status !== 'online') return;
    this.flushing = true;
    try {
      for (;;) {
        const item = this.outbox.find((i) => i.state === 'pending');
        if (!item || this.status !== 'online') return;
        try {
          const request = {
            type: 'send',
            conversation: item.conversation,
            text: item.text,
            client_msg_id: item.client_msg_id,
          };
          if (item.reply_to) request.reply_to = item.reply_to;
          if (item.attachments) request.attachments = item.attachments.map(({ media, name }) => ({ media, name }));
          const sent = await this.request(request);
          this.forget(item.client_msg_id);
          this.onFrame({
            ...sent, type: 'sent', client_msg_id: item.client_msg_id, text: item.text, reply_to: item.reply_to,
            attachments: item.attachments,
          });
        } catch (e) {
          if (e.code === 'rate_limited') {
            await new Promise((r) => setTimeout(r, e.retryAfterMs || 1000));
          } else if (['disconnected', 'timeout', 'unavailable', 'internal'].includes(e.code)) {
            // Maybe stored, maybe not: the same client_msg_id settles it,
            // on this connection a little later or on the next one.
            if (e.code !== 'disconnected') {
              this.timers.flush = setTimeout(() => this.#flushOutbox(), 2_000);
            }
            return;
          } else {
            item.state = 'failed';
            item.error = e.message;
            this.#saveOutbox();
          }
        }
      }
    } finally {
      this.flushing = false;
    }
  }
}
