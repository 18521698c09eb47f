// The conversation list, the open conversation's header and the connection
// status.

import { $, h, avatar, when, lastSeen, coalesce } from './ui.js';
import { state, title, displayName, presenceOf, typists, typingText, shownText, isMuted } from './state.js';
import { renderHistoryStatus } from './history.js';
import { renderMessages } from './messages.js';
import { renderPrivacy } from './privacy.js';
import { avatarFor } from './profiles.js';

export function renderStatus() {
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

// The list is rebuilt at most once per ~30 ms, however many frames arrive
// (a backlog of hundreds, typing in many conversations).
export const renderList = coalesce(renderListNow, 30);

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
        ? `${last.from === state.me ? 'You: ' : c.group ? `${displayName(last.from)}: ` : ''}${shownText(last)}`
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
        c.peer
          ? avatarFor(c.peer, { online: p ? p.status === 'online' : null })
          : avatar(title(c), { group: true }),
        h(
          'span',
          { class: 'conv-body' },
          h('span', { class: 'conv-top' }, h('span', { class: 'conv-title' }, title(c)), last ? h('span', { class: 'conv-time' }, when(last.ts)) : null),
          h(
            'span',
            { class: 'conv-bottom' },
            h('span', { class: 'preview' }, preview),
            isMuted(c.id) ? h('span', { class: 'muted-icon', title: 'muted', 'aria-label': 'muted' }, '🔕') : null,
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

export function renderHeader() {
  const c = state.open && state.convs.get(state.open);
  if (!c) return;
  const p = c.peer ? presenceOf(c.peer) : null;
  $('conv-avatar').replaceChildren(
    c.peer
      ? avatarFor(c.peer, { online: p ? p.status === 'online' : null, size: 'small' })
      : avatar(title(c), { group: true, size: 'small' }),
  );
  $('conv-title').textContent = title(c);
  const sub = $('conv-sub');
  const typing = typingText(c.id);
  sub.classList.toggle('typing', Boolean(typing));
  if (typing) sub.textContent = typing;
  else if (c.group) sub.textContent = (state.groups.get(c.group)?.members || []).map(displayName).join(', ');
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
  renderPrivacy(c);
}

export function renderConversation() {
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

export function renderTyping(convId) {
  renderList();
  if (convId === state.open) {
    renderHeader();
    const line = $('typing-line');
    const who = typists(convId);
    line.replaceChildren(
      ...(who.length
        ? [h('span', { class: 'dots' }, h('i'), h('i'), h('i')), convId.startsWith('group:') ? ` ${who.map(displayName).join(', ')}` : '']
        : []),
    );
  }
}
