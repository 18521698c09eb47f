// Searching history (`search`): the results dialog, and jumping to a
// result: its conversation opens, older pages load until the message is
// there, and it is scrolled to and highlighted.

import { $, h, time, when, toast } from './ui.js';
import { state, conv, title, displayName, shownText } from './state.js';
import { loadHistory } from './history.js';
import { renderMessages } from './messages.js';
import { openFromHash } from './nav.js';

const SEARCH_PAGE = 20;
// Older pages loaded at most, looking for a result (50 messages each).
const MAX_PAGES = 200;
const HIGHLIGHT_MS = 2_500;

let current = { query: '', conversation: null, items: [], more: false, busy: false };

/** The search form: a new search, in every conversation or the open one. */
async function search(event) {
  event?.preventDefault();
  const query = $('search-input').value.trim();
  if (!query) return;
  const only = $('search-here').checked && state.open ? state.open : null;
  current = { query, conversation: only, items: [], more: false, busy: false };
  $('search-dialog').showModal();
  await more();
}

/** The next page of the current search. */
async function more() {
  if (current.busy) return;
  current.busy = true;
  const asked = current;
  renderResults();
  const request = { type: 'search', query: asked.query, limit: SEARCH_PAGE };
  if (asked.conversation) request.conversation = asked.conversation;
  if (asked.items.length) request.before = asked.items.at(-1).id;
  try {
    const reply = await state.client.request(request);
    if (asked !== current) return;
    asked.items.push(...reply.items);
    asked.more = reply.more;
    asked.error = null;
  } catch (e) {
    if (asked === current) asked.error = e.message;
  } finally {
    asked.busy = false;
  }
  if (asked === current) renderResults();
}

/** `text` with each case-insensitive occurrence of `query` in a <mark>. */
function marked(text, query) {
  const parts = [];
  const lower = text.toLowerCase();
  const q = query.toLowerCase();
  let at = 0;
  for (let i = lower.indexOf(q); q && i >= 0; i = lower.indexOf(q, i + q.length)) {
    parts.push(text.slice(at, i), h('mark', {}, text.slice(i, i + q.length)));
    at = i + q.length;
  }
  parts.push(text.slice(at));
  return parts;
}

function renderResults() {
  const { query, conversation, items, more: hasMore, busy, error } = current;
  const where = conversation ? ` in ${title(conv(conversation))}` : '';
  $('search-summary').textContent = busy && !items.length
    ? `Searching for “${query}”${where}…`
    : error
      ? `Search failed: ${error}`
      : `${items.length}${hasMore ? '+' : ''} result${items.length === 1 ? '' : 's'} for “${query}”${where}`;
  $('search-results').replaceChildren(
    ...items.map((m) =>
      h(
        'li',
        {},
        h(
          'button',
          { type: 'button', class: 'result', dataset: { id: m.id, conversation: m.conversation }, onclick: () => jumpTo(m.conversation, m.id) },
          h(
            'span',
            { class: 'result-top' },
            h('span', { class: 'result-conv' }, title(conv(m.conversation))),
            h('time', { datetime: new Date(m.ts).toISOString() }, `${when(m.ts)} ${time(m.ts)}`),
          ),
          h('span', { class: 'result-text' }, `${m.from === state.me ? 'You' : displayName(m.from)}: `, ...marked(shownText(m), query)),
        ),
      ),
    ),
  );
  $('search-more').hidden = !hasMore;
  $('search-more').disabled = busy;
}

/** Opens `convId` and shows message `id`, loading older pages until it is there. */
async function jumpTo(convId, id) {
  $('search-dialog').close();
  // No hashchange (it would come later and scroll to the bottom again).
  history.pushState(null, '', `#${encodeURIComponent(convId)}`);
  openFromHash();
  const c = conv(convId);
  for (let pages = 0; !c.messages.has(id) && pages < MAX_PAGES; pages++) {
    if (state.open !== convId) return; // the user went elsewhere
    if (c.loaded && !c.more) break;
    if (c.loading) await new Promise((r) => setTimeout(r, 50));
    else await loadHistory(c);
  }
  if (state.open !== convId) return;
  renderMessages({ keepBottom: false });
  const el = $('msg-list').querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
  if (!el) {
    toast('That message is no longer there.');
    return;
  }
  el.scrollIntoView({ block: 'center' });
  el.classList.add('found');
  setTimeout(() => el.classList.remove('found'), HIGHLIGHT_MS);
}

export function wireSearch() {
  $('search-form').addEventListener('submit', search);
  $('search-more').addEventListener('click', more);
}
