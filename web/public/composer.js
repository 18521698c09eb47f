// The composer: sending, typing notices, and read receipts for what is on
// screen.

import { cmpId } from './client.js';
import { $ } from './ui.js';
import { state, conv } from './state.js';
import { renderMessages } from './messages.js';
import { renderList } from './list.js';
import { submitEdit, takeReplyTo } from './changes.js';
import { hasAttachments, uploadAttachments } from './attach.js';

const TYPING_REFRESH_MS = 3_000;

const TYPING_IDLE_MS = 4_000;

/** While the composer has text, tell the others every ~3 s; stop after idling. */
export function composerInput() {
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

export function sendTyping(active) {
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

let readTimer;

export function markRead() {
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

export async function sendMessage(event) {
  event?.preventDefault();
  const ta = $('composer-text');
  const text = ta.value.replace(/^\s*\n|\s+$/g, '');
  const conversation = state.open;
  if ((!text && !hasAttachments()) || !conversation) return;
  sendTyping(false);
  if (text && submitEdit(text)) {
    ta.value = '';
    autoGrow();
    return;
  }
  // Files go up first; the message (which names them) then waits in the
  // outbox like any other. A failed upload keeps the text and the files.
  let attachments = [];
  if (hasAttachments()) {
    const sending = $('send-btn');
    sending.disabled = true;
    attachments = await uploadAttachments();
    sending.disabled = false;
    if (attachments === null) return;
  }
  if (ta.value.replace(/^\s*\n|\s+$/g, '') === text) ta.value = '';
  state.client.send(conversation, text, takeReplyTo(), attachments);
  autoGrow();
  if (state.open !== conversation) return;
  const c = conv(conversation);
  c.sortTs = Date.now();
  renderMessages({ keepBottom: false });
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  renderList();
  ta.focus();
}

document.addEventListener('visibilitychange', markRead);
