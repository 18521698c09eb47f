// Friends and groups: starting chats, friend requests, creating and
// changing groups.

import { $, h, avatar, lastSeen, toast } from './ui.js';
import { USER_RE, state, dmId, conv, title, saveGroups, presenceOf } from './state.js';
import { renderHeader } from './list.js';
import { closeConversation } from './nav.js';

export function startChat(event) {
  event.preventDefault();
  const input = $('new-chat-user');
  const user = input.value.trim();
  if (!USER_RE.test(user)) {
    toast('A user name is 1-64 letters, digits, _ or -');
    return;
  }
  if (user === state.me) {
    toast('That is you. Pick someone else.');
    return;
  }
  input.value = '';
  location.hash = encodeURIComponent(dmId(state.me, user));
}

function names(text) {
  return [...new Set(text.split(/[\s,;]+/).filter(Boolean))];
}

export async function friendAction(type, user, errorEl) {
  try {
    await state.client.request({ type, user });
    if (type === 'friend.request') toast(`Friend request sent to ${user}`);
    return true;
  } catch (e) {
    if (errorEl) errorEl.textContent = e.message;
    else toast(e.message);
    return false;
  }
}

export function renderFriends() {
  const pending = [...state.friends.values()].filter((s) => s === 'pending').length;
  const badge = $('friends-badge');
  badge.hidden = pending === 0;
  badge.textContent = pending;
  $('friends-btn').setAttribute('aria-label', pending ? `Friends, ${pending} requests` : 'Friends');
  const order = { pending: 0, friends: 1, requested: 2 };
  const people = [...state.friends.entries()].sort((a, b) => order[a[1]] - order[b[1]] || a[0].localeCompare(b[0]));
  $('friend-list').replaceChildren(
    ...people.map(([user, rel]) => {
      const p = rel === 'friends' ? presenceOf(user) : null;
      const status =
        rel === 'pending' ? 'wants to be your friend' : rel === 'requested' ? 'request sent' : p?.status === 'online' ? 'online' : lastSeen(p?.last_active);
      const actions =
        rel === 'pending'
          ? [
              h('button', { type: 'button', class: 'primary small', onclick: () => friendAction('friend.accept', user) }, 'Accept'),
              h('button', { type: 'button', class: 'small', onclick: () => friendAction('friend.remove', user) }, 'Decline'),
            ]
          : rel === 'requested'
            ? [h('button', { type: 'button', class: 'small', onclick: () => friendAction('friend.remove', user) }, 'Cancel')]
            : [
                h('button', { type: 'button', class: 'small', onclick: () => { $('friends-dialog').close(); location.hash = encodeURIComponent(dmId(state.me, user)); } }, 'Message'),
                h('button', { type: 'button', class: 'small subtle', onclick: () => confirm(`Remove ${user} from your friends?`) && friendAction('friend.remove', user) }, 'Remove'),
              ];
      return h(
        'li',
        { dataset: { user, state: rel } },
        avatar(user, { online: p ? p.status === 'online' : null }),
        h('span', { class: 'person' }, h('span', { class: 'name' }, user), h('span', { class: 'status' }, status)),
        h('span', { class: 'actions' }, actions),
      );
    }),
  );
  if (!people.length) $('friend-list').replaceChildren(h('li', { class: 'empty' }, 'No friends yet. Add someone by name.'));
}

export function renderInfo() {
  const c = state.open && state.convs.get(state.open);
  const g = c?.group && state.groups.get(c.group);
  if (!g) return;
  $('info-title').textContent = g.name;
  $('member-list').replaceChildren(
    ...g.members.map((u) =>
      h(
        'li',
        {},
        avatar(u, { online: presenceOf(u) ? presenceOf(u).status === 'online' : null }),
        h('span', { class: 'person' }, h('span', { class: 'name' }, u === state.me ? `${u} (you)` : u), h('span', { class: 'status' }, u === g.owner ? 'owner' : '')),
      ),
    ),
  );
}

export async function createGroup(event) {
  event.preventDefault();
  const err = $('group-error');
  err.textContent = '';
  const name = $('group-name').value.trim();
  const members = names($('group-members').value).filter((u) => u !== state.me);
  if (!name) {
    err.textContent = 'Give the group a name.';
    return;
  }
  const bad = members.find((u) => !USER_RE.test(u));
  if (bad) {
    err.textContent = `"${bad}" is not a user name.`;
    return;
  }
  try {
    const reply = await state.client.request({ type: 'group.create', name, members });
    state.groups.set(reply.group.id, reply.group);
    saveGroups();
    const c = conv(`group:${reply.group.id}`);
    c.sortTs = Date.now();
    $('group-dialog').close();
    $('group-form').reset();
    location.hash = encodeURIComponent(c.id);
  } catch (e) {
    err.textContent = e.message;
  }
}

export async function addMembers(event) {
  event.preventDefault();
  const c = state.convs.get(state.open);
  const users = names($('add-member').value);
  const err = $('info-error');
  err.textContent = '';
  if (!c?.group || !users.length) return;
  try {
    const reply = await state.client.request({ type: 'group.add', group: c.group, users });
    state.groups.set(c.group, reply.group);
    saveGroups();
    $('add-member').value = '';
    renderInfo();
    renderHeader();
  } catch (e) {
    err.textContent = e.message;
  }
}

export async function leaveGroup() {
  const c = state.convs.get(state.open);
  if (!c?.group || !confirm(`Leave ${title(c)}?`)) return;
  try {
    await state.client.request({ type: 'group.leave', group: c.group });
    $('info-dialog').close();
    state.convs.delete(c.id);
    state.groups.delete(c.group);
    saveGroups();
    closeConversation();
  } catch (e) {
    $('info-error').textContent = e.message;
  }
}
