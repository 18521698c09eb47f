// The client's state and what is derived from it: conversations, groups,
// friends, presence, receipts, typing; saved per user in localStorage.

import { cmpId } from './client.js';

export const USER_RE = /^[A-Za-z0-9_-]{1,64}$/;

export const state = {
  me: null,
  client: null,
  convs: new Map(), // id -> conversation
  groups: new Map(), // group id -> {id, name, owner, members}
  friends: new Map(), // user -> 'friends' | 'requested' | 'pending'
  presence: new Map(), // user -> {status, last_active}
  receipts: new Map(), // conversation -> {user: {d, r}}
  typing: new Map(), // conversation -> Map(user -> lapse timer)
  blocked: new Set(), // users I blocked
  muted: new Map(), // conversation -> muted until (ms)
  profiles: new Map(), // user -> {name, avatar, at}: `profiles` answers, kept a while (profiles.js)
  wantProfile: () => {}, // asks for a user's profile when it is missing or old (profiles.js)
  compose: null, // {mode: 'reply' | 'edit', conv, id}: what the composer's next submit does
  open: null, // open conversation id
  mode: null, // 'dev' (sign-in by name) or 'token' (pasted)
  typingSent: { conv: null, at: 0, idle: null },
};

export function dmId(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function peerOf(convId) {
  if (!convId.startsWith('dm:')) return null;
  const [, a, b] = convId.split(':');
  return a === state.me ? b : a;
}

export function groupIdOf(convId) {
  return convId.startsWith('group:') ? convId.slice(6) : null;
}

export function conv(id) {
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

/** The name a user chose (`profile.set`), else the user id. */
export function displayName(user) {
  const p = state.profiles.get(user);
  state.wantProfile(user, p);
  return p?.name || user;
}

export function title(c) {
  if (c.peer) return displayName(c.peer);
  return state.groups.get(c.group)?.name || 'Group';
}

function storeKey(name) {
  return `chat.${state.me}.${name}`;
}

export function loadJson(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(storeKey(name))) ?? fallback;
  } catch {
    return fallback;
  }
}

let saveTimers = {};

export function saveJson(name, value) {
  clearTimeout(saveTimers[name]);
  saveTimers[name] = setTimeout(() => localStorage.setItem(storeKey(name), JSON.stringify(value)), 200);
}

export function saveGroups() {
  saveJson('groups', Object.fromEntries(state.groups));
}

export function maxId(a, b) {
  if (!a) return b || null;
  if (!b) return a;
  return cmpId(a, b) >= 0 ? a : b;
}

export function presenceOf(user) {
  if (state.friends.get(user) !== 'friends') return null;
  return state.presence.get(user) || { status: 'offline', last_active: null };
}

/** The message's current text for previews and quotes. */
export function shownText(m) {
  if (!m) return '';
  if (m.deleted) return 'This message was deleted';
  if (m.text || !m.attachments?.length) return m.text || '';
  const a = m.attachments[0];
  const more = m.attachments.length > 1 ? ` +${m.attachments.length - 1}` : '';
  return `${/^image\//.test(a.content_type || '') ? '📷 Photo' : `📎 ${a.name || 'File'}`}${more}`;
}

export function isMuted(convId) {
  const until = state.muted.get(convId);
  return Boolean(until && until > Date.now());
}

export function typists(convId) {
  return [...(state.typing.get(convId)?.keys() || [])];
}

export function typingText(convId) {
  const who = typists(convId);
  if (!who.length) return '';
  if (convId.startsWith('dm:')) return 'typing…';
  const names = who.map(displayName);
  if (names.length === 1) return `${names[0]} is typing…`;
  return `${names.slice(0, -1).join(', ')} and ${names.at(-1)} are typing…`;
}
