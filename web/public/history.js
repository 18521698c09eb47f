// Older messages of a conversation, a page at a time as the user scrolls up.

import { cmpId } from './client.js';
import { $, toast } from './ui.js';
import { state } from './state.js';
import { markRead } from './composer.js';
import { renderMessages } from './messages.js';
import { renderList } from './list.js';

const HISTORY_PAGE = 50;

export async function loadHistory(c) {
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

export function renderHistoryStatus() {
  const c = state.open && state.convs.get(state.open);
  const el = $('history-status');
  if (!c) return;
  el.textContent = c.loading ? 'Loading…' : c.loaded && !c.more ? (c.messages.size ? 'Beginning of the conversation' : '') : '';
}
