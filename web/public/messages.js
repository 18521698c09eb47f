// The open conversation's messages, with their ticks and the outbox's
// pending ones; rows are kept across renders.

import { cmpId } from './client.js';
import { $, h, time, day, dayKey, coalesce } from './ui.js';
import { state, displayName } from './state.js';
import { menuButton, reactionChips, replyQuote } from './changes.js';
import { avatarFor } from './profiles.js';
import { isImage, size, showPicture, linkTo } from './media.js';

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

/** In a group, who has read (or only received) my message: each member by name. */
function seenBy(c, m) {
  const members = (state.groups.get(c.group)?.members || []).filter((u) => u !== state.me);
  const byUser = state.receipts.get(c.id) || {};
  const reached = (kind) => members.filter((u) => byUser[u]?.[kind] && cmpId(byUser[u][kind], m.id) >= 0);
  const read = reached('r');
  const delivered = reached('d').filter((u) => !read.includes(u));
  if (!read.length && !delivered.length) return null;
  return h(
    'div',
    { class: 'seen' },
    read.length ? h('span', { class: 'seen-read' }, `Read by ${read.map(displayName).join(', ')}`) : null,
    delivered.length ? h('span', { class: 'seen-delivered' }, `Delivered to ${delivered.map(displayName).join(', ')}`) : null,
  );
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
      attachments: item.attachments,
      ts: item.ts,
      conversation: c.id,
    });
  }
  return list;
}

function messageEl(c, m, showFrom, showSeen) {
  const mine = m.from === state.me;
  const el = h(
    'div',
    {
      class: `msg ${mine ? 'mine' : 'theirs'} ${m.pending ? 'pending' : ''} ${m.deleted ? 'deleted' : ''}`,
      dataset: { id: m.id || '', cmid: m.client_msg_id || '' },
    },
    menuButton(c, m),
    showFrom && !mine ? h('div', { class: 'from' }, avatarFor(m.from, { size: 'tiny' }), displayName(m.from)) : null,
    replyQuote(c, m),
    m.deleted ? null : attachmentsEl(m),
    m.deleted
      ? h('div', { class: 'text gone' }, 'This message was deleted')
      : m.text || !m.attachments?.length
        ? h('div', { class: 'text' }, m.text)
        : null,
    reactionChips(c, m),
    h(
      'div',
      { class: 'meta' },
      m.edited_ts && !m.deleted ? h('span', { class: 'edited' }, 'edited') : null,
      h('time', { datetime: new Date(m.ts).toISOString() }, time(m.ts)),
      mine ? ticks(c, m) : null,
    ),
    showSeen ? seenBy(c, m) : null,
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

/** A message's pictures (thumbnails, opening the picture) and files (download links). */
function attachmentsEl(m) {
  if (!m.attachments?.length) return null;
  return h(
    'div',
    { class: 'attachments' },
    ...m.attachments.map((a) => {
      if (m.pending) return h('span', { class: 'att-file uploading' }, `${isImage(a) ? '📷' : '📎'} ${a.name || 'file'}`);
      if (isImage(a)) {
        // The picture's own proportions, at most 240 px wide, before it loads.
        const width = Math.min(240, a.width || 240);
        const height = a.width && a.height ? Math.round((a.height * width) / a.width) : 160;
        const img = h('img', { class: 'thumb', alt: a.name || 'picture', width, height });
        // Its box holds its place while it loads (CSSOM: the CSP allows no style attribute).
        img.style.width = `${width}px`;
        img.style.height = `${height}px`;
        showPicture(img, a.media, { thumb: true });
        const link = h('a', { class: 'att-image', target: '_blank', rel: 'noopener', title: a.name || 'picture', dataset: { media: a.media } }, img);
        linkTo(link, a.media);
        return link;
      }
      const link = h(
        'a',
        { class: 'att-file', download: a.name || 'file', dataset: { media: a.media } },
        h('span', { class: 'att-icon', 'aria-hidden': 'true' }, '📄'),
        h('span', { class: 'att-name' }, a.name || 'file'),
        h('span', { class: 'att-size' }, size(a.size)),
      );
      linkTo(link, a.media);
      return link;
    }),
  );
}

// Rendered rows by key, so a re-render keeps unchanged elements in place
// (no flicker, no replayed animation, scroll position kept).
let rowCache = { conv: null, rows: new Map() };

export function renderMessages({ keepBottom = true } = {}) {
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
  const messages = sortedMessages(c);
  // In a group, the newest of my stored messages says who read it.
  const seenId = c.group ? messages.findLast((m) => m.from === state.me && m.id)?.id : null;
  for (const m of messages) {
    const d = dayKey(m.ts);
    if (d !== lastDay) {
      row(`d:${d}`, day(m.ts), () => h('div', { class: 'day', role: 'separator' }, h('span', {}, day(m.ts))));
      lastDay = d;
      lastFrom = null;
    }
    const showFrom = Boolean(c.group) && m.from !== lastFrom;
    const tick = m.from === state.me ? ticks(c, m).className : '';
    const showSeen = m.id !== undefined && m.id === seenId;
    const seen = showSeen ? seenBy(c, m)?.textContent || '' : '';
    const quoted = m.reply_to ? c.messages.get(m.reply_to) : null;
    const sig = [
      m.id || '', m.pending ? 1 : 0, m.failed ? 1 : 0, tick, showFrom, m.text, m.edited_ts || '', m.deleted ? 1 : 0,
      (m.attachments || []).map((a) => a.media).join(','), showFrom ? `${displayName(m.from)}${state.profiles.get(m.from)?.avatar || ''}` : '',
      JSON.stringify(m.reactions || {}), quoted ? `${quoted.deleted ? 1 : 0}${quoted.text}` : '', seen,
    ].join('|');
    row(`m:${m.from}:${m.client_msg_id || m.id}`, sig, () => messageEl(c, m, showFrom, showSeen));
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

// Frames that change the open conversation re-render it once per frame time.
export const scheduleMessages = coalesce(renderMessages, 16);
