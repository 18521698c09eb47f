// Messages that change after they are sent: `update` frames (edits,
// deletes, reactions) and the message menu that asks for them (reply, edit,
// delete for me or everyone, react).

import { cmpId } from './client.js';
import { $, h, toast } from './ui.js';
import { state, conv } from './state.js';
import { scheduleMessages } from './messages.js';
import { renderList } from './list.js';

// PROTOCOL.md v1.1's defaults (CHAT_EDIT_WINDOW_SECS, CHAT_DELETE_WINDOW_SECS):
// the menu offers only what the server would allow; the server decides.
const EDIT_WINDOW_MS = 900 * 1000;
const DELETE_WINDOW_MS = 172_800 * 1000;

export const QUICK_REACTIONS = ['👍', '❤️', '😂', '😮', '😢', '🙏'];

/** An `update` frame: the message it names changes in place. */
export function applyUpdate(f) {
  const c = conv(f.conversation);
  const m = c.messages.get(f.id);
  if (f.kind === 'delete' && f.for === 'me') {
    c.messages.delete(f.id);
    if (c.last?.id === f.id) c.last = newest(c);
  } else if (m) {
    if (f.kind === 'edit') {
      m.text = f.text;
      m.edited_ts = f.ts;
    } else if (f.kind === 'delete') {
      m.deleted = true;
      delete m.text;
      delete m.reactions;
    } else if (f.kind === 'reaction') {
      react(m, f.emoji, f.by, f.on);
    }
  }
  renderList();
  if (c.id === state.open) scheduleMessages();
}

function react(m, emoji, user, on) {
  const reactions = m.reactions || {};
  const users = (reactions[emoji] || []).filter((u) => u !== user);
  if (on) users.push(user);
  if (users.length) reactions[emoji] = users;
  else delete reactions[emoji];
  m.reactions = reactions;
}

function newest(c) {
  let last = null;
  for (const m of c.messages.values()) if (!last || cmpId(m.id, last.id) > 0) last = m;
  return last;
}

/** What the signed-in user may do with a message. */
function allowed(c, m) {
  const mine = m.from === state.me;
  const age = Date.now() - m.ts;
  const owner = c.group && state.groups.get(c.group)?.owner === state.me;
  return {
    edit: mine && !m.deleted && age < EDIT_WINDOW_MS,
    everyone: !m.deleted && ((mine && age < DELETE_WINDOW_MS) || owner),
  };
}

async function ask(frame, what) {
  try {
    await state.client.request(frame);
    return true;
  } catch (e) {
    toast(`Could not ${what}: ${e.message}`);
    return false;
  }
}

/** Adds or takes back my `emoji` on a message. */
export function toggleReaction(c, m, emoji) {
  const on = !(m.reactions?.[emoji] || []).includes(state.me);
  ask({ type: 'react', conversation: c.id, id: m.id, emoji, on }, 'react');
}

/** The reaction chips under a message: who reacted, and a tap toggles mine. */
export function reactionChips(c, m) {
  const entries = Object.entries(m.reactions || {}).filter(([, users]) => users.length);
  if (!entries.length) return null;
  return h(
    'div',
    { class: 'reactions' },
    entries.map(([emoji, users]) =>
      h(
        'button',
        {
          type: 'button',
          class: `reaction ${users.includes(state.me) ? 'mine' : ''}`,
          title: users.join(', '),
          'aria-label': `${emoji} ${users.join(', ')}`,
          onclick: () => toggleReaction(c, m, emoji),
        },
        `${emoji} ${users.length}`,
      ),
    ),
  );
}

/** The quoted message a reply answers (tap: scroll to it). */
export function replyQuote(c, m) {
  if (!m.reply_to) return null;
  const quoted = c.messages.get(m.reply_to);
  const text = !quoted ? 'an earlier message' : quoted.deleted ? 'This message was deleted' : quoted.text;
  return h(
    'button',
    {
      type: 'button',
      class: 'quote',
      onclick: () => document.querySelector(`#msg-list [data-id="${CSS.escape(m.reply_to)}"]`)?.scrollIntoView({ block: 'center' }),
    },
    quoted ? h('span', { class: 'quote-from' }, quoted.from === state.me ? 'You' : quoted.from) : null,
    h('span', { class: 'quote-text' }, text),
  );
}

let openMenu = null;

function closeMenu() {
  openMenu?.remove();
  openMenu = null;
}

document.addEventListener('click', (e) => {
  if (openMenu && !openMenu.contains(e.target) && !e.target.closest?.('.msg-menu-btn')) closeMenu();
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape') closeMenu();
});

/** The "⋯" button of a stored message and the menu it opens. */
export function menuButton(c, m) {
  if (!m.id || m.pending) return null;
  return h(
    'button',
    {
      type: 'button',
      class: 'msg-menu-btn',
      'aria-label': 'Message actions',
      title: 'Message actions',
      onclick: (e) => {
        e.stopPropagation();
        const el = e.currentTarget.closest('.msg');
        const again = openMenu?.dataset.id === m.id;
        closeMenu();
        if (!again) showMenu(el, c, m);
      },
    },
    '⋯',
  );
}

function showMenu(el, c, m) {
  const may = allowed(c, m);
  const item = (label, action, cls = '') =>
    h('button', { type: 'button', class: `menu-item ${cls}`, role: 'menuitem', onclick: () => { closeMenu(); action(); } }, label);
  const menu = h(
    'div',
    { class: 'msg-menu', role: 'menu', dataset: { id: m.id } },
    m.deleted
      ? null
      : h(
          'div',
          { class: 'quick-reactions' },
          QUICK_REACTIONS.map((emoji) =>
            h('button', { type: 'button', class: 'menu-emoji', 'aria-label': `React ${emoji}`, onclick: () => { closeMenu(); toggleReaction(c, m, emoji); } }, emoji),
          ),
        ),
    m.deleted ? null : item('Reply', () => startCompose('reply', c, m)),
    may.edit ? item('Edit', () => startCompose('edit', c, m)) : null,
    item('Delete for me', () => ask({ type: 'delete', conversation: c.id, id: m.id, for: 'me' }, 'delete')),
    may.everyone
      ? item('Delete for everyone', () => ask({ type: 'delete', conversation: c.id, id: m.id, for: 'everyone' }, 'delete'), 'danger')
      : null,
  );
  el.append(menu);
  openMenu = menu;
  menu.querySelector('button')?.focus();
}

/** The composer's next submit replies to, or edits, `m`. */
export function startCompose(mode, c, m) {
  state.compose = { mode, conv: c.id, id: m.id };
  $('compose-title').textContent = mode === 'edit' ? 'Edit message' : `Reply to ${m.from === state.me ? 'yourself' : m.from}`;
  $('compose-quote').textContent = m.text || '';
  $('compose-bar').hidden = false;
  const ta = $('composer-text');
  if (mode === 'edit') ta.value = m.text || '';
  ta.focus();
}

export function cancelCompose() {
  const editing = state.compose?.mode === 'edit';
  state.compose = null;
  $('compose-bar').hidden = true;
  if (editing) $('composer-text').value = '';
}

/** Sends an edit if the composer is editing; false when it is not. */
export function submitEdit(text) {
  const target = state.compose;
  if (target?.mode !== 'edit' || target.conv !== state.open) return false;
  cancelCompose();
  const m = conv(target.conv).messages.get(target.id);
  if (m && m.text !== text) ask({ type: 'edit', conversation: target.conv, id: target.id, text }, 'edit');
  return true;
}

/** The message a new send answers, if the composer is replying. */
export function takeReplyTo() {
  const target = state.compose;
  if (target?.mode !== 'reply' || target.conv !== state.open) return null;
  cancelCompose();
  return target.id;
}
