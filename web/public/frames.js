// What the server sends: each frame type's effect on the state.

import { cmpId } from './client.js';
import { toast, announce } from './ui.js';
import { state, groupIdOf, conv, title, displayName, shownText, saveJson, saveGroups, maxId } from './state.js';
import { backToLogin } from './signin.js';
import { markRead } from './composer.js';
import { loadHistory } from './history.js';
import { scheduleMessages } from './messages.js';
import { renderList, renderHeader, renderConversation, renderTyping } from './list.js';
import { closeConversation } from './nav.js';
import { renderFriends, renderInfo } from './people.js';
import { applyUpdate } from './changes.js';
import { loadPrivacy } from './privacy.js';
import { refreshProfiles } from './profiles.js';

const TYPING_LAPSE_MS = 7_000;

export function onFrame(f) {
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
        {
          id: f.id, conversation: f.conversation, from: state.me, text: f.text, ts: f.ts,
          client_msg_id: f.client_msg_id, reply_to: f.reply_to, attachments: f.attachments,
        },
        false,
      );
      return;
    case 'update':
      applyUpdate(f);
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
      loadPrivacy(),
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
      if (item.muted_until) state.muted.set(c.id, item.muted_until);
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
  refreshProfiles();
  if (state.open) {
    const c = conv(state.open);
    if (!c.loaded) loadHistory(c);
    renderConversation();
    markRead();
  }
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
    if (state.client.status === 'online') announce(`${displayName(m.from)}${c.group ? ` in ${title(c)}` : ''}: ${shownText(m)}`);
  }
  renderList();
  if (c.id === state.open) {
    scheduleMessages();
    if (live) markRead();
  }
}

/** Every member's watermarks, from the server (they outlive this browser). */
export async function loadReceipts(c) {
  try {
    const reply = await state.client.request({ type: 'receipts', conversation: c.id });
    for (const m of reply.members) {
      if (m.delivered_up_to) onReceipt({ conversation: c.id, user: m.user, kind: 'delivered', up_to: m.delivered_up_to });
      if (m.read_up_to) onReceipt({ conversation: c.id, user: m.user, kind: 'read', up_to: m.read_up_to });
    }
  } catch {
    // Not a member (any more), or offline: the receipts we have stay.
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

export async function loadGroup(gid) {
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
