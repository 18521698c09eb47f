// Signing in and out: dev tokens by name, or a pasted token; starting the
// client once signed in.

import { ChatClient, randomId, tokenExpiry } from './client.js';
import { $ } from './ui.js';
import { USER_RE, state, loadJson } from './state.js';
import { onFrame } from './frames.js';
import { scheduleMessages } from './messages.js';
import { renderStatus, renderList } from './list.js';
import { openFromHash } from './nav.js';
import { renderMe } from './profiles.js';

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;

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

export function tokenSub(token) {
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

export function backToLogin(message) {
  state.client?.stop();
  localStorage.removeItem('chat.user');
  sessionStorage.removeItem('chat.token');
  sessionStorage.setItem('chat.login-error', message);
  location.reload();
}

export async function signIn(event) {
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

export function signOut() {
  state.client?.stop();
  localStorage.removeItem('chat.user');
  sessionStorage.removeItem('chat.token');
  location.hash = '';
  location.reload();
}

export function start(user, mode, token) {
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
  renderMe();
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
