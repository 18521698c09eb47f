// The chat web client: state, rendering and user actions.
// Protocol and connection handling live in client.js.

import { ChatClient, cmpId, randomId, tokenExpiry } from './client.js';
import { $, h, avatar, time, day, dayKey, when, lastSeen, toast, announce } from './ui.js';

const USER_RE = /^[A-Za-z0-9_-]{1,64}$/;
const HISTORY_PAGE = 50;
const TYPING_REFRESH_MS = 3_000;
const TYPING_IDLE_MS = 4_000;
const TYPING_LAPSE_MS = 7_000;

// ---------------------------------------------------------------- state

const state = {
  me: null,
  client: null,
  convs: new Map(), // id -> conversation
  groups: new Map(), // group id -> {id, name, owner, members}
  friends: new Map(), // user -> 'friends' | 'requested' | 'pending'
  presence: new Map(), // user -> {status, last_active}
  receipts: new Map(), // conversation -> {user: {d, r}}
  typing: new Map(), // conversation -> Map(user -> lapse timer)
  open: null, // open conversation id
  mode: null, // 'dev' (sign-in by name) or 'token' (pasted)
  typingSent: { conv: null, at: 0, idle: null },
};

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;

function dmId(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function peerOf(convId) {
  if (!convId.startsWith('dm:')) return null;
  const [, a, b] = convId.split(':');
  return a === state.me ? b : a;
}

function groupIdOf(convId) {
  return convId.startsWith('group:') ? convId.slice(6) : null;
}

function conv(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = {
      id,
      peer: peerOf(id),
      group: groupIdOf(id),
      last: null,
      unread: 0,
      readUpTo: null,
      sortTs: Date.now(),
      createdAt: Date.now(),
      messages: new Map(), // id -> message
      loaded: false, // history fetched once
      more: true,
      loading: false,
    };
    state.convs.set(id, c);
  }
  return c;
}

function title(c) {
  if (c.peer) return c.peer;
  return state.groups.get(c.group)?.name || 'Group';
}

function storeKey(name) {
  return `chat.${state.me}.${name}`;
}

function loadJson(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(storeKey(name))) ?? fallback;
  } catch {
    return fallback;
  }
}

let saveTimers = {};
function saveJson(name, value) {
  clearTimeout(saveTimers[name]);
  saveTimers[name] = setTimeout(() => localStorage.setItem(storeKey(name), JSON.stringify(value)), 200);
}

// ---------------------------------------------------------------- sign in

async function fetchDevToken(user) {
  const body = { user };
  const ttl = Number(localStorage.getItem('chat.dev-token-ttl'));
  if (ttl > 0) body.ttl_secs = ttl;
  const res = await fetch('/v1/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (res.status === 404) {
    const e = new Error('Sign-in by name is off on this server (CHAT_DEV_TOKENS). Use a token.');
    e.devOff = true;
    throw e;
  }
  const json = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(json.error || `sign-in failed (${res.status})`);
  return json.token;
}

function tokenSub(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).sub;
  } catch {
    return null;
  }
}

/** Tokens: dev mode fetches a new one when needed; a pasted one is kept. */
function tokenSource(mode, first) {
  let current = first;
  return async (fresh) => {
    const exp = tokenExpiry(current || '');
    const stale = !current || (exp && exp - Date.now() < 30_000);
    if (mode === 'dev' && (fresh || stale)) {
      try {
        current = await fetchDevToken(state.me);
      } catch (e) {
        if (e.devOff) backToLogin(e.message);
        throw e;
      }
    }
    if (mode === 'token' && exp && exp <= Date.now()) backToLogin('Your token has expired. Sign in again.');
    if (!current) throw new Error('no token');
    return current;
  };
}

function backToLogin(message) {
  state.client?.stop();
  localStorage.removeItem('chat.user');
  sessionStorage.removeItem('chat.token');
  sessionStorage.setItem('chat.login-error', message);
  location.reload();
}

async function signIn(event) {
  event?.preventDefault();
  const error = $('login-error');
  error.textContent = '';
  const pasted = $('login-token').value.trim();
  try {
    if (pasted) {
      const user = tokenSub(pasted);
      if (!user || !USER_RE.test(user)) throw new Error('That does not look like a token for this chat.');
      sessionStorage.setItem('chat.token', pasted);
      start(user, 'token', pasted);
      return;
    }
    const user = $('login-user').value.trim();
    if (!USER_RE.test(user)) throw new Error('Use 1-64 letters, digits, _ or -.');
    const token = await fetchDevToken(user);
    localStorage.setItem('chat.user', user);
    start(user, 'dev', token);
  } catch (e) {
    error.textContent = e.message;
    if (e.devOff) $('login-token-box').open = true;
  }
}

function signOut() {
  state.client?.stop();
  localStorage.removeItem('chat.user');
  sessionStorage.removeItem('chat.token');
  location.hash = '';
  location.reload();
}

function start(user, mode, token) {
  state.me = user;
  state.mode = mode;
  let device = sessionStorage.getItem('chat.device');
  if (!device) {
    device = randomId('web-', 6);
    sessionStorage.setItem('chat.device', device);
  }
  state.receipts = new Map(Object.entries(loadJson('receipts', {})));
  for (const [id, g] of Object.entries(loadJson('groups', {}))) state.groups.set(id, g);
  $('login').hidden = true;
  $('app').hidden = false;
  $('me-avatar').replaceChildren(avatar(user));
  $('me-name').textContent = user;
  document.title = `${user} · Chat`;
  state.client = new ChatClient({
    user,
    device,
    url: wsUrl,
    token: tokenSource(mode, token),
    onFrame,
    onStatus: renderStatus,
    onOutbox: () => {
      scheduleMessages();
      renderList();
    },
  });
  window.chat = state; // for the browser tests and the curious
  state.client.start();
  openFromHash();
}

// ---------------------------------------------------------------- frames

function onFrame(f) {
  switch (f.type) {
    case 'welcome':
      if (!f.resumed) {
        // Items may be gone: forget what we had and load it again.
        for (const c of state.convs.values()) {
          c.messages.clear();
          c.loaded = false;
          c.more = true;
        }
      }
      return;
    case 'synced':
      onSynced();
      return;
    case 'message':
      addMessage(f, true);
      return;
    case 'sent':
      addMessage(
        { id: f.id, conversation: f.conversation, from: state.me, text: f.text, ts: f.ts, client_msg_id: f.client_msg_id },
        false,
      );
      return;
    case 'membership':
      onMembership(f);
      return;
    case 'receipt':
      onReceipt(f);
      return;
    case 'presence':
      state.presence.set(f.user, { status: f.status, last_active: f.last_active });
      renderList();
      renderHeader();
      return;
    case 'typing':
      onTyping(f);
      return;
    case 'friend':
      if (f.state === 'none') state.friends.delete(f.user);
      else state.friends.set(f.user, f.state);
      if (f.state === 'pending') toast(`${f.user} wants to be friends`);
      if (f.state === 'friends') toast(`You and ${f.user} are friends now`);
      renderFriends();
      renderHeader();
      renderList();
      return;
    case 'error':
      if (state.mode === 'token' && (f.code === 'unauthorized' || f.code === 'token_expired')) {
        // A pasted token cannot be renewed here.
        backToLogin(f.code === 'token_expired' ? 'Your token has expired. Sign in again.' : 'That token was refused.');
        return;
      }
      if (f.code !== 'rate_limited' && f.code !== 'unauthorized' && f.code !== 'token_expired') toast(f.message || f.code);
      return;
    default:
  }
}

async function onSynced() {
  const client = state.client;
  const asked = Date.now();
  try {
    const [list, friends] = await Promise.all([
      client.request({ type: 'conversations' }),
      client.request({ type: 'friends' }),
    ]);
    // Groups we are no longer in (left on another device while this one
    // could not resume) go; DMs stay, they are only hidden while empty.
    const listed = new Set(list.items.map((i) => i.conversation));
    for (const c of [...state.convs.values()]) {
      if (c.group && !listed.has(c.id) && c.createdAt < asked) state.convs.delete(c.id);
    }
    if (state.open?.startsWith('group:') && !state.convs.has(state.open)) closeConversation();
    for (const item of list.items) {
      const c = conv(item.conversation);
      const known = [...c.messages.values()];
      // Messages that arrived after the list was read: unread beyond it.
      const newer = known.filter(
        (m) =>
          m.from !== state.me &&
          (!item.last || cmpId(m.id, item.last.id) > 0) &&
          (!item.read_up_to || cmpId(m.id, item.read_up_to) > 0),
      ).length;
      c.unread = item.unread + newer;
      c.readUpTo = maxId(c.readUpTo, item.read_up_to);
      if (item.last && (!c.last || cmpId(item.last.id, c.last.id) > 0)) c.last = item.last;
      if (c.last) c.sortTs = c.last.ts;
      if (c.group && !state.groups.has(c.group)) loadGroup(c.group);
    }
    state.friends.clear();
    for (const f of friends.items) {
      state.friends.set(f.user, f.state);
      if (f.state === 'friends' && !state.presence.has(f.user)) {
        state.presence.set(f.user, { status: f.status, last_active: f.last_active });
      }
    }
  } catch (e) {
    if (e.code !== 'disconnected') toast(`Could not load conversations: ${e.message}`);
  }
  renderList();
  renderFriends();
  if (state.open) {
    const c = conv(state.open);
    if (!c.loaded) loadHistory(c);
    renderConversation();
    markRead();
  }
}

function maxId(a, b) {
  if (!a) return b || null;
  if (!b) return a;
  return cmpId(a, b) >= 0 ? a : b;
}

function addMessage(m, live) {
  const c = conv(m.conversation);
  const fresh = !c.messages.has(m.id);
  if (fresh) c.messages.set(m.id, m);
  // Our own message came back (sent, echo, history): the outbox is done with it.
  if (m.from === state.me && m.client_msg_id) state.client.forget(m.client_msg_id);
  if (!c.last || cmpId(m.id, c.last.id) >= 0) {
    c.last = m;
    c.sortTs = m.ts;
  }
  if (fresh && live && m.from !== state.me) {
    stopTyping(c.id, m.from);
    const readHere = c.id === state.open && document.visibilityState === 'visible';
    if (!readHere && (!c.readUpTo || cmpId(m.id, c.readUpTo) > 0)) c.unread += 1;
    if (state.client.status === 'online') announce(`${m.from}${c.group ? ` in ${title(c)}` : ''}: ${m.text}`);
  }
  renderList();
  if (c.id === state.open) {
    scheduleMessages();
    if (live) markRead();
  }
}

function onReceipt(f) {
  const byUser = state.receipts.get(f.conversation) || {};
  const r = byUser[f.user] || {};
  if (f.kind === 'read') {
    r.r = maxId(r.r, f.up_to);
    r.d = maxId(r.d, f.up_to);
  } else {
    r.d = maxId(r.d, f.up_to);
  }
  byUser[f.user] = r;
  state.receipts.set(f.conversation, byUser);
  saveJson('receipts', Object.fromEntries(state.receipts));
  if (f.user === state.me && f.kind === 'read') {
    // Read on this or another of my devices.
    const c = conv(f.conversation);
    c.readUpTo = maxId(c.readUpTo, f.up_to);
    const left = [...c.messages.values()].filter((m) => m.from !== state.me && cmpId(m.id, c.readUpTo) > 0);
    c.unread = c.last && cmpId(c.readUpTo, c.last.id) >= 0 ? 0 : Math.min(c.unread, left.length || c.unread);
    renderList();
  }
  if (f.conversation === state.open) scheduleMessages();
}

function onMembership(f) {
  const gid = groupIdOf(f.conversation);
  const c = conv(f.conversation);
  const gone = (f.event === 'removed' || f.event === 'left') && f.users.includes(state.me);
  if (gone) {
    state.convs.delete(f.conversation);
    state.groups.delete(gid);
    saveGroups();
    if (f.event === 'removed') toast(`You were removed from ${title(c)}`);
    if (state.open === f.conversation) closeConversation();
    renderList();
    return;
  }
  if (f.event === 'created') c.sortTs = Date.now();
  loadGroup(gid);
  renderList();
}

async function loadGroup(gid) {
  try {
    const reply = await state.client.request({ type: 'group.info', group: gid });
    state.groups.set(gid, reply.group);
    saveGroups();
    renderList();
    if (state.open === `group:${gid}`) {
      renderHeader();
      renderInfo();
    }
  } catch (e) {
    if (e.code === 'forbidden' || e.code === 'not_found') {
      state.convs.delete(`group:${gid}`);
      renderList();
    }
  }
}

function saveGroups() {
  saveJson('groups', Object.fromEntries(state.groups));
}

// ---------------------------------------------------------------- typing

function onTyping(f) {
  if (f.user === state.me) return;
  if (f.active) {
    const per = state.typing.get(f.conversation) || new Map();
    clearTimeout(per.get(f.user));
    // The server lapses typing after 6 s; our own timer covers a lost frame.
    per.set(f.user, setTimeout(() => stopTyping(f.conversation, f.user), TYPING_LAPSE_MS));
    state.typing.set(f.conversation, per);
  } else {
    stopTyping(f.conversation, f.user);
    return;
  }
  renderTyping(f.conversation);
}

function stopTyping(convId, user) {
  const per = state.typing.get(convId);
  if (!per || !per.has(user)) return;
  clearTimeout(per.get(user));
  per.delete(user);
  renderTyping(convId);
}

function typists(convId) {
  return [...(state.typing.get(convId)?.keys() || [])];
}

function typingText(convId) {
  const who = typists(convId);
  if (!who.length) return '';
  if (convId.startsWith('dm:')) return 'typing…';
  if (who.length === 1) return `${who[0]} is typing…`;
  return `${who.slice(0, -1).join(', ')} and ${who.at(-1)} are typing…`;
}

function renderTyping(convId) {
  renderList();
  if (convId === state.open) {
    renderHeader();
    const line = $('typing-line');
    const who = typists(convId);
    line.replaceChildren(
      ...(who.length
        ? [h('span', { class: 'dots' }, h('i'), h('i'), h('i')), convId.startsWith('group:') ? ` ${who.join(', ')}` : '']
        : []),
    );
  }
}

/** While the composer has text, tell the others every ~3 s; stop after idling. */
function composerInput() {
  const text = $('composer-text').value;
  autoGrow();
  const t = state.typingSent;
  if (!state.open) return;
  if (!text.trim()) {
    sendTyping(false);
    return;
  }
  const now = Date.now();
  if (t.conv !== state.open || now - t.at > TYPING_REFRESH_MS) {
    if (t.conv && t.conv !== state.open) sendTyping(false);
    if (state.client.cast({ type: 'typing', conversation: state.open, active: true })) {
      t.conv = state.open;
      t.at = now;
    }
  }
  clearTimeout(t.idle);
  t.idle = setTimeout(() => sendTyping(false), TYPING_IDLE_MS);
}

function sendTyping(active) {
  const t = state.typingSent;
  clearTimeout(t.idle);
  if (!active && t.conv) {
    state.client.cast({ type: 'typing', conversation: t.conv, active: false });
    t.conv = null;
    t.at = 0;
  }
}

function autoGrow() {
  const ta = $('composer-text');
  ta.style.height = 'auto';
  ta.style.height = `${Math.min(ta.scrollHeight, 160)}px`;
}

// ---------------------------------------------------------------- reading

let readTimer;
function markRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    const c = state.open && state.convs.get(state.open);
    if (!c || document.visibilityState !== 'visible') return;
    let newest = null;
    for (const m of c.messages.values()) {
      if (m.from !== state.me && (!newest || cmpId(m.id, newest) > 0)) newest = m.id;
    }
    if (newest && (!c.readUpTo || cmpId(newest, c.readUpTo) > 0)) {
      if (state.client.cast({ type: 'read', conversation: c.id, up_to: newest })) {
        c.readUpTo = newest;
        c.unread = 0;
        renderList();
      }
    } else if (c.unread && c.last && c.readUpTo && cmpId(c.readUpTo, c.last.id) >= 0) {
      c.unread = 0;
      renderList();
    }
  }, 150);
}

document.addEventListener('visibilitychange', markRead);

// ---------------------------------------------------------------- history

async function loadHistory(c) {
  if (c.loading || (c.loaded && !c.more)) return;
  c.loading = true;
  renderHistoryStatus();
  let oldest = null;
  if (c.loaded) {
    for (const id of c.messages.keys()) if (!oldest || cmpId(id, oldest) < 0) oldest = id;
  }
  const request = { type: 'history', conversation: c.id, limit: HISTORY_PAGE };
  if (oldest) request.before = oldest;
  const box = $('messages');
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const reply = await state.client.request(request);
    for (const m of reply.messages) {
      c.messages.set(m.id, m);
      if (m.from === state.me) state.client.forget(m.client_msg_id);
      if (!c.last || cmpId(m.id, c.last.id) > 0) {
        c.last = m;
        c.sortTs = m.ts;
      }
    }
    c.more = reply.more;
    c.loaded = true;
  } catch (e) {
    if (e.code === 'forbidden') c.more = false;
    else if (e.code !== 'disconnected') toast(`Could not load messages: ${e.message}`);
  } finally {
    c.loading = false;
  }
  if (c.id !== state.open) return;
  const wasFirstPage = !oldest;
  renderMessages({ keepBottom: !wasFirstPage });
  if (!wasFirstPage) box.scrollTop = box.scrollHeight - fromBottom;
  else box.scrollTop = box.scrollHeight;
  renderHistoryStatus();
  renderList();
  markRead();
  // A short first page may not fill the screen: no scroll event would come.
  if (c.more && box.scrollHeight <= box.clientHeight + 40) loadHistory(c);
}

function renderHistoryStatus() {
  const c = state.open && state.convs.get(state.open);
  const el = $('history-status');
  if (!c) return;
  el.textContent = c.loading ? 'Loading…' : c.loaded && !c.more ? (c.messages.size ? 'Beginning of the conversation' : '') : '';
}

// ---------------------------------------------------------------- rendering

function renderStatus() {
  const client = state.client;
  const el = $('conn-status');
  const banner = $('conn-banner');
  const s = client.status;
  el.dataset.state = s;
  el.textContent = { connecting: 'connecting…', syncing: 'syncing…', online: 'online', waiting: 'offline', stopped: 'signed out' }[s];
  banner.hidden = s !== 'waiting';
  if (s === 'waiting') {
    const tick = () => {
      if (client.status !== 'waiting') return;
      const secs = Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000));
      $('conn-banner-text').textContent = `Not connected. Retrying in ${secs} s…`;
      setTimeout(tick, 500);
    };
    tick();
  }
}

function ticks(c, m) {
  if (m.pending) {
    return m.failed
      ? h('span', { class: 'tick failed', title: m.error || 'not sent' }, '!')
      : h('span', { class: 'tick pending', title: 'sending', 'aria-label': 'sending' }, '🕓');
  }
  const others = c.peer ? [c.peer] : (state.groups.get(c.group)?.members || []).filter((u) => u !== state.me);
  const byUser = state.receipts.get(c.id) || {};
  const all = (kind) => others.length > 0 && others.every((u) => byUser[u]?.[kind] && cmpId(byUser[u][kind], m.id) >= 0);
  if (all('r')) return h('span', { class: 'tick read', title: 'read', 'aria-label': 'read' }, '✓✓');
  if (all('d')) return h('span', { class: 'tick delivered', title: 'delivered', 'aria-label': 'delivered' }, '✓✓');
  return h('span', { class: 'tick sent', title: 'sent', 'aria-label': 'sent' }, '✓');
}

function sortedMessages(c) {
  const list = [...c.messages.values()].sort((a, b) => cmpId(a.id, b.id));
  const shown = new Set(list.map((m) => m.client_msg_id));
  for (const item of state.client.outbox) {
    if (item.conversation !== c.id || shown.has(item.client_msg_id)) continue;
    list.push({
      pending: true,
      failed: item.state === 'failed',
      error: item.error,
      client_msg_id: item.client_msg_id,
      from: state.me,
      text: item.text,
      ts: item.ts,
      conversation: c.id,
    });
  }
  return list;
}

function messageEl(c, m, showFrom) {
  const mine = m.from === state.me;
  const el = h(
    'div',
    {
      class: `msg ${mine ? 'mine' : 'theirs'} ${m.pending ? 'pending' : ''}`,
      dataset: { id: m.id || '', cmid: m.client_msg_id || '' },
    },
    showFrom && !mine ? h('div', { class: 'from' }, m.from) : null,
    h('div', { class: 'text' }, m.text),
    h('div', { class: 'meta' }, h('time', { datetime: new Date(m.ts).toISOString() }, time(m.ts)), mine ? ticks(c, m) : null),
  );
  if (m.failed) {
    el.append(
      h(
        'div',
        { class: 'failed-actions' },
        h('button', { type: 'button', class: 'link', onclick: () => state.client.retry(m.client_msg_id) }, 'Retry'),
        h('button', { type: 'button', class: 'link', onclick: () => state.client.forget(m.client_msg_id) }, 'Delete'),
      ),
    );
  }
  return el;
}

// Rendered rows by key, so a re-render keeps unchanged elements in place
// (no flicker, no replayed animation, scroll position kept).
let rowCache = { conv: null, rows: new Map() };

function renderMessages({ keepBottom = true } = {}) {
  const c = state.open && state.convs.get(state.open);
  if (!c) return;
  if (rowCache.conv !== c.id) rowCache = { conv: c.id, rows: new Map() };
  const box = $('messages');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const nodes = [];
  const used = new Map();
  const row = (key, sig, make) => {
    const cached = rowCache.rows.get(key);
    let el = cached && cached.sig === sig ? cached.el : null;
    if (!el) {
      el = make();
      if (cached) el.classList.add('no-anim'); // an update, not a new message
    }
    used.set(key, { sig, el });
    nodes.push(el);
  };
  let lastDay = null;
  let lastFrom = null;
  for (const m of sortedMessages(c)) {
    const d = dayKey(m.ts);
    if (d !== lastDay) {
      row(`d:${d}`, day(m.ts), () => h('div', { class: 'day', role: 'separator' }, h('span', {}, day(m.ts))));
      lastDay = d;
      lastFrom = null;
    }
    const showFrom = Boolean(c.group) && m.from !== lastFrom;
    const tick = m.from === state.me ? ticks(c, m).className : '';
    const sig = `${m.id || ''}|${m.pending ? 1 : 0}|${m.failed ? 1 : 0}|${tick}|${showFrom}`;
    row(`m:${m.from}:${m.client_msg_id || m.id}`, sig, () => messageEl(c, m, showFrom));
    lastFrom = m.from;
  }
  rowCache.rows = used;
  const list = $('msg-list');
  let cur = list.firstChild;
  for (const node of nodes) {
    if (node === cur) {
      cur = cur.nextSibling;
      continue;
    }
    list.insertBefore(node, cur);
  }
  while (cur) {
    const next = cur.nextSibling;
    cur.remove();
    cur = next;
  }
  if (keepBottom && atBottom) box.scrollTop = box.scrollHeight;
}

function presenceOf(user) {
  if (state.friends.get(user) !== 'friends') return null;
  return state.presence.get(user) || { status: 'offline', last_active: null };
}

// The list is rebuilt at most once per ~30 ms, however many frames arrive
// (a backlog of hundreds, typing in many conversations).
let listTimer = null;
function renderList() {
  if (listTimer === null) {
    listTimer = setTimeout(() => {
      listTimer = null;
      renderListNow();
    }, 30);
  }
}

let messagesTimer = null;
function scheduleMessages() {
  if (messagesTimer === null) {
    messagesTimer = setTimeout(() => {
      messagesTimer = null;
      renderMessages();
    }, 16);
  }
}

function renderListNow() {
  const ul = $('conv-list');
  const focused = document.activeElement?.closest?.('#conv-list li')?.dataset.id;
  const items = [...state.convs.values()]
    .filter((c) => c.last || c.group || c.id === state.open || state.client.outbox.some((o) => o.conversation === c.id))
    .sort((a, b) => b.sortTs - a.sortTs);
  let total = 0;
  const rows = items.map((c) => {
    total += c.unread;
    const p = c.peer ? presenceOf(c.peer) : null;
    const typing = typingText(c.id);
    const pending = state.client.outbox.filter((o) => o.conversation === c.id).at(-1);
    const last = pending && (!c.last || pending.ts >= c.last.ts) ? { from: state.me, text: pending.text, ts: pending.ts } : c.last;
    const preview = typing
      ? h('span', { class: 'typing' }, typing)
      : last
        ? `${last.from === state.me ? 'You: ' : c.group ? `${last.from}: ` : ''}${last.text}`
        : c.group
          ? 'No messages yet'
          : '';
    const label = `${title(c)}${c.unread ? `, ${c.unread} unread` : ''}${p?.status === 'online' ? ', online' : ''}`;
    return h(
      'li',
      { dataset: { id: c.id }, class: c.id === state.open ? 'active' : '' },
      h(
        'a',
        { href: `#${encodeURIComponent(c.id)}`, class: 'conv', 'aria-label': label, 'aria-current': c.id === state.open ? 'page' : false },
        avatar(title(c), { group: Boolean(c.group), online: p ? p.status === 'online' : null }),
        h(
          'span',
          { class: 'conv-body' },
          h('span', { class: 'conv-top' }, h('span', { class: 'conv-title' }, title(c)), last ? h('span', { class: 'conv-time' }, when(last.ts)) : null),
          h(
            'span',
            { class: 'conv-bottom' },
            h('span', { class: 'preview' }, preview),
            c.unread ? h('span', { class: 'badge', 'aria-hidden': 'true' }, c.unread > 99 ? '99+' : c.unread) : null,
          ),
        ),
      ),
    );
  });
  ul.replaceChildren(...rows);
  $('conv-empty').hidden = rows.length > 0;
  document.title = `${total ? `(${total}) ` : ''}${state.me} · Chat`;
  if (focused) ul.querySelector(`li[data-id="${CSS.escape(focused)}"] a`)?.focus();
}

function renderHeader() {
  const c = state.open && state.convs.get(state.open);
  if (!c) return;
  const p = c.peer ? presenceOf(c.peer) : null;
  $('conv-avatar').replaceChildren(avatar(title(c), { group: Boolean(c.group), online: p ? p.status === 'online' : null, size: 'small' }));
  $('conv-title').textContent = title(c);
  const sub = $('conv-sub');
  const typing = typingText(c.id);
  sub.classList.toggle('typing', Boolean(typing));
  if (typing) sub.textContent = typing;
  else if (c.group) sub.textContent = (state.groups.get(c.group)?.members || []).join(', ');
  else if (p) sub.textContent = p.status === 'online' ? 'online' : lastSeen(p.last_active);
  else {
    const rel = state.friends.get(c.peer);
    sub.textContent = rel === 'requested' ? 'friend request sent' : rel === 'pending' ? 'wants to be your friend' : '';
  }
  sub.dataset.presence = p ? p.status : '';
  const fb = $('friend-btn');
  const rel = c.peer ? state.friends.get(c.peer) : 'n/a';
  fb.hidden = !c.peer || rel === 'friends' || rel === 'requested';
  fb.textContent = rel === 'pending' ? 'Accept friend' : 'Add friend';
  $('info-btn').hidden = !c.group;
}

function renderConversation() {
  const c = state.open && state.convs.get(state.open);
  $('pane-empty').hidden = Boolean(c);
  $('pane-main').hidden = !c;
  $('app').classList.toggle('show-pane', Boolean(c));
  if (!c) return;
  renderHeader();
  renderMessages();
  renderHistoryStatus();
  renderTyping(c.id);
}

// ---------------------------------------------------------------- navigation

function openFromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  if (/^(dm:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+|group:[A-Za-z0-9_-]+)$/.test(id)) openConversation(id);
  else closeConversation();
}

function openConversation(id) {
  if (state.open !== id) sendTyping(false);
  const c = conv(id);
  state.open = id;
  $('composer-text').value = '';
  renderConversation();
  renderList();
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  if (!c.loaded && state.client.status === 'online') loadHistory(c);
  if (c.group && !state.groups.has(c.group) && state.client.status === 'online') loadGroup(c.group);
  markRead();
  if (matchMedia('(min-width: 761px)').matches) $('composer-text').focus();
}

function closeConversation() {
  sendTyping(false);
  state.open = null;
  if (location.hash) history.replaceState(null, '', location.pathname);
  renderConversation();
  renderList();
}

window.addEventListener('hashchange', openFromHash);

// ---------------------------------------------------------------- actions

function sendMessage(event) {
  event?.preventDefault();
  const ta = $('composer-text');
  const text = ta.value.replace(/^\s*\n|\s+$/g, '');
  if (!text || !state.open) return;
  sendTyping(false);
  state.client.send(state.open, text);
  ta.value = '';
  autoGrow();
  const c = conv(state.open);
  c.sortTs = Date.now();
  renderMessages({ keepBottom: false });
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  renderList();
  ta.focus();
}

function startChat(event) {
  event.preventDefault();
  const input = $('new-chat-user');
  const user = input.value.trim();
  if (!USER_RE.test(user)) {
    toast('A user name is 1-64 letters, digits, _ or -');
    return;
  }
  if (user === state.me) {
    toast('That is you. Pick someone else.');
    return;
  }
  input.value = '';
  location.hash = encodeURIComponent(dmId(state.me, user));
}

function names(text) {
  return [...new Set(text.split(/[\s,;]+/).filter(Boolean))];
}

async function friendAction(type, user, errorEl) {
  try {
    await state.client.request({ type, user });
    if (type === 'friend.request') toast(`Friend request sent to ${user}`);
    return true;
  } catch (e) {
    if (errorEl) errorEl.textContent = e.message;
    else toast(e.message);
    return false;
  }
}

function renderFriends() {
  const pending = [...state.friends.values()].filter((s) => s === 'pending').length;
  const badge = $('friends-badge');
  badge.hidden = pending === 0;
  badge.textContent = pending;
  $('friends-btn').setAttribute('aria-label', pending ? `Friends, ${pending} requests` : 'Friends');
  const order = { pending: 0, friends: 1, requested: 2 };
  const people = [...state.friends.entries()].sort((a, b) => order[a[1]] - order[b[1]] || a[0].localeCompare(b[0]));
  $('friend-list').replaceChildren(
    ...people.map(([user, rel]) => {
      const p = rel === 'friends' ? presenceOf(user) : null;
      const status =
        rel === 'pending' ? 'wants to be your friend' : rel === 'requested' ? 'request sent' : p?.status === 'online' ? 'online' : lastSeen(p?.last_active);
      const actions =
        rel === 'pending'
          ? [
              h('button', { type: 'button', class: 'primary small', onclick: () => friendAction('friend.accept', user) }, 'Accept'),
              h('button', { type: 'button', class: 'small', onclick: () => friendAction('friend.remove', user) }, 'Decline'),
            ]
          : rel === 'requested'
            ? [h('button', { type: 'button', class: 'small', onclick: () => friendAction('friend.remove', user) }, 'Cancel')]
            : [
                h('button', { type: 'button', class: 'small', onclick: () => { $('friends-dialog').close(); location.hash = encodeURIComponent(dmId(state.me, user)); } }, 'Message'),
                h('button', { type: 'button', class: 'small subtle', onclick: () => confirm(`Remove ${user} from your friends?`) && friendAction('friend.remove', user) }, 'Remove'),
              ];
      return h(
        'li',
        { dataset: { user, state: rel } },
        avatar(user, { online: p ? p.status === 'online' : null }),
        h('span', { class: 'person' }, h('span', { class: 'name' }, user), h('span', { class: 'status' }, status)),
        h('span', { class: 'actions' }, actions),
      );
    }),
  );
  if (!people.length) $('friend-list').replaceChildren(h('li', { class: 'empty' }, 'No friends yet. Add someone by name.'));
}

function renderInfo() {
  const c = state.open && state.convs.get(state.open);
  const g = c?.group && state.groups.get(c.group);
  if (!g) return;
  $('info-title').textContent = g.name;
  $('member-list').replaceChildren(
    ...g.members.map((u) =>
      h(
        'li',
        {},
        avatar(u, { online: presenceOf(u) ? presenceOf(u).status === 'online' : null }),
        h('span', { class: 'person' }, h('span', { class: 'name' }, u === state.me ? `${u} (you)` : u), h('span', { class: 'status' }, u === g.owner ? 'owner' : '')),
      ),
    ),
  );
}

async function createGroup(event) {
  event.preventDefault();
  const err = $('group-error');
  err.textContent = '';
  const name = $('group-name').value.trim();
  const members = names($('group-members').value).filter((u) => u !== state.me);
  if (!name) {
    err.textContent = 'Give the group a name.';
    return;
  }
  const bad = members.find((u) => !USER_RE.test(u));
  if (bad) {
    err.textContent = `"${bad}" is not a user name.`;
    return;
  }
  try {
    const reply = await state.client.request({ type: 'group.create', name, members });
    state.groups.set(reply.group.id, reply.group);
    saveGroups();
    const c = conv(`group:${reply.group.id}`);
    c.sortTs = Date.now();
    $('group-dialog').close();
    $('group-form').reset();
    location.hash = encodeURIComponent(c.id);
  } catch (e) {
    err.textContent = e.message;
  }
}

async function addMembers(event) {
  event.preventDefault();
  const c = state.convs.get(state.open);
  const users = names($('add-member').value);
  const err = $('info-error');
  err.textContent = '';
  if (!c?.group || !users.length) return;
  try {
    const reply = await state.client.request({ type: 'group.add', group: c.group, users });
    state.groups.set(c.group, reply.group);
    saveGroups();
    $('add-member').value = '';
    renderInfo();
    renderHeader();
  } catch (e) {
    err.textContent = e.message;
  }
}

async function leaveGroup() {
  const c = state.convs.get(state.open);
  if (!c?.group || !confirm(`Leave ${title(c)}?`)) return;
  try {
    await state.client.request({ type: 'group.leave', group: c.group });
    $('info-dialog').close();
    state.convs.delete(c.id);
    state.groups.delete(c.group);
    saveGroups();
    closeConversation();
  } catch (e) {
    $('info-error').textContent = e.message;
  }
}

// ---------------------------------------------------------------- wiring

function wire() {
  $('login-form').addEventListener('submit', signIn);
  $('signout-btn').addEventListener('click', signOut);
  $('conn-retry').addEventListener('click', () => state.client.retryNow());
  $('new-chat').addEventListener('submit', startChat);
  $('composer').addEventListener('submit', sendMessage);
  const ta = $('composer-text');
  ta.addEventListener('input', composerInput);
  ta.addEventListener('blur', () => sendTyping(false));
  ta.addEventListener('keydown', (e) => {
    // Enter sends; Shift+Enter is a new line; nothing while composing (IME).
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) sendMessage(e);
  });
  $('back-btn').addEventListener('click', () => {
    closeConversation();
    $('new-chat-user').focus();
  });
  $('messages').addEventListener('scroll', () => {
    const c = state.open && state.convs.get(state.open);
    if (c && c.loaded && c.more && !c.loading && $('messages').scrollTop < 200) loadHistory(c);
    if ($('messages').scrollHeight - $('messages').scrollTop - $('messages').clientHeight < 40) markRead();
  });
  $('friends-btn').addEventListener('click', () => {
    renderFriends();
    $('friends-dialog').showModal();
    $('friend-user').focus();
  });
  $('friend-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = $('friend-user');
    const user = input.value.trim();
    $('friend-error').textContent = '';
    if (!USER_RE.test(user) || user === state.me) {
      $('friend-error').textContent = user === state.me ? 'That is you.' : 'Not a user name.';
      return;
    }
    if (await friendAction('friend.request', user, $('friend-error'))) input.value = '';
  });
  $('friend-btn').addEventListener('click', () => {
    const c = state.convs.get(state.open);
    if (!c?.peer) return;
    friendAction(state.friends.get(c.peer) === 'pending' ? 'friend.accept' : 'friend.request', c.peer);
  });
  $('group-btn').addEventListener('click', () => {
    $('group-error').textContent = '';
    $('group-dialog').showModal();
    $('group-name').focus();
  });
  $('group-form').addEventListener('submit', createGroup);
  $('info-btn').addEventListener('click', () => {
    renderInfo();
    $('info-error').textContent = '';
    $('info-dialog').showModal();
  });
  $('add-member-form').addEventListener('submit', addMembers);
  $('leave-btn').addEventListener('click', leaveGroup);
  for (const b of document.querySelectorAll('[data-close]')) {
    b.addEventListener('click', () => b.closest('dialog').close());
  }
  // "last seen 3 min ago" ages.
  setInterval(() => {
    renderHeader();
  }, 30_000);
}

wire();
const saved = localStorage.getItem('chat.user');
const pasted = sessionStorage.getItem('chat.token');
if (pasted && tokenSub(pasted)) start(tokenSub(pasted), 'token', pasted);
else if (saved && USER_RE.test(saved)) start(saved, 'dev', null);
else {
  $('login').hidden = false;
  $('login-error').textContent = sessionStorage.getItem('chat.login-error') || '';
  if (sessionStorage.getItem('chat.login-error')) $('login-token-box').open = true;
  sessionStorage.removeItem('chat.login-error');
  $('login-user').focus();
}
