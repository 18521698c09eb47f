// Which conversation is open: the URL hash says.

import { $ } from './ui.js';
import { state, conv } from './state.js';
import { loadGroup, loadReceipts } from './frames.js';
import { cancelCompose } from './changes.js';
import { clearAttachments } from './attach.js';
import { sendTyping, markRead } from './composer.js';
import { loadHistory } from './history.js';
import { renderList, renderConversation } from './list.js';

export function openFromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  if (/^(dm:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+|group:[A-Za-z0-9_-]+)$/.test(id)) openConversation(id);
  else closeConversation();
}

function openConversation(id) {
  if (state.open !== id) {
    sendTyping(false);
    cancelCompose();
    clearAttachments();
  }
  const c = conv(id);
  state.open = id;
  $('composer-text').value = '';
  renderConversation();
  renderList();
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  if (!c.loaded && state.client.status === 'online') loadHistory(c);
  if (c.group && !state.groups.has(c.group) && state.client.status === 'online') loadGroup(c.group);
  if (state.client.status === 'online') loadReceipts(c);
  markRead();
  if (matchMedia('(min-width: 761px)').matches) $('composer-text').focus();
}

export function closeConversation() {
  sendTyping(false);
  state.open = null;
  if (location.hash) history.replaceState(null, '', location.pathname);
  renderConversation();
  renderList();
}

window.addEventListener('hashchange', openFromHash);
