// The chat web client: wires the page's controls to the modules and signs
// in. Protocol and connection handling live in client.js; ES modules, no
// build step (the edge serves these files as they are).

import { $ } from './ui.js';
import { USER_RE, state } from './state.js';
import { tokenSub, signIn, signOut, start } from './signin.js';
import { composerInput, sendTyping, markRead, sendMessage } from './composer.js';
import { loadHistory } from './history.js';
import { renderHeader } from './list.js';
import { closeConversation } from './nav.js';
import { startChat, friendAction, renderFriends, renderInfo, createGroup, addMembers, leaveGroup } from './people.js';
import { cancelCompose } from './changes.js';
import { toggleBlock, toggleMute } from './privacy.js';
import { wireSearch } from './search.js';
import { wireProfiles } from './profiles.js';
import { wireAttachments } from './attach.js';

function wire() {
  $('login-form').addEventListener('submit', signIn);
  $('signout-btn').addEventListener('click', signOut);
  $('conn-retry').addEventListener('click', () => state.client.retryNow());
  $('new-chat').addEventListener('submit', startChat);
  $('composer').addEventListener('submit', sendMessage);
  const ta = $('composer-text');
  ta.addEventListener('input', composerInput);
  ta.addEventListener('blur', () => sendTyping(false));
  ta.addEventListener('keydown', (e) => {
    // Enter sends; Shift+Enter is a new line; nothing while composing (IME).
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) sendMessage(e);
  });
  $('back-btn').addEventListener('click', () => {
    closeConversation();
    $('new-chat-user').focus();
  });
  $('messages').addEventListener('scroll', () => {
    const c = state.open && state.convs.get(state.open);
    if (c && c.loaded && c.more && !c.loading && $('messages').scrollTop < 200) loadHistory(c);
    if ($('messages').scrollHeight - $('messages').scrollTop - $('messages').clientHeight < 40) markRead();
  });
  $('friends-btn').addEventListener('click', () => {
    renderFriends();
    $('friends-dialog').showModal();
    $('friend-user').focus();
  });
  $('friend-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = $('friend-user');
    const user = input.value.trim();
    $('friend-error').textContent = '';
    if (!USER_RE.test(user) || user === state.me) {
      $('friend-error').textContent = user === state.me ? 'That is you.' : 'Not a user name.';
      return;
    }
    if (await friendAction('friend.request', user, $('friend-error'))) input.value = '';
  });
  $('friend-btn').addEventListener('click', () => {
    const c = state.convs.get(state.open);
    if (!c?.peer) return;
    friendAction(state.friends.get(c.peer) === 'pending' ? 'friend.accept' : 'friend.request', c.peer);
  });
  $('group-btn').addEventListener('click', () => {
    $('group-error').textContent = '';
    $('group-dialog').showModal();
    $('group-name').focus();
  });
  $('group-form').addEventListener('submit', createGroup);
  $('info-btn').addEventListener('click', () => {
    renderInfo();
    $('info-error').textContent = '';
    $('info-dialog').showModal();
  });
  $('add-member-form').addEventListener('submit', addMembers);
  $('compose-cancel').addEventListener('click', cancelCompose);
  $('block-btn').addEventListener('click', toggleBlock);
  $('mute-btn').addEventListener('click', toggleMute);
  $('leave-btn').addEventListener('click', leaveGroup);
  wireSearch();
  wireProfiles();
  wireAttachments();
  for (const b of document.querySelectorAll('[data-close]')) {
    b.addEventListener('click', () => b.closest('dialog').close());
  }
  // "last seen 3 min ago" ages.
  setInterval(() => {
    renderHeader();
  }, 30_000);
}

wire();
const saved = localStorage.getItem('chat.user');
const pasted = sessionStorage.getItem('chat.token');
if (pasted && tokenSub(pasted)) start(tokenSub(pasted), 'token', pasted);
else if (saved && USER_RE.test(saved)) start(saved, 'dev', null);
else {
  $('login').hidden = false;
  $('login-error').textContent = sessionStorage.getItem('chat.login-error') || '';
  if (sessionStorage.getItem('chat.login-error')) $('login-token-box').open = true;
  sessionStorage.removeItem('chat.login-error');
  $('login-user').focus();
}
