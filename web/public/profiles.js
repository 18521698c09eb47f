// Names and avatars (`profiles`, `profile.set`): other users' profiles are
// asked for in batches when a name is shown and missing or old, and kept a
// few minutes; the profile dialog edits mine (the avatar uploaded as media).

import { $, h, avatar, coalesce, toast } from './ui.js';
import { state, displayName } from './state.js';
import { renderList, renderHeader } from './list.js';
import { scheduleMessages } from './messages.js';
import { upload, showPicture } from './media.js';

const PROFILE_TTL_MS = 5 * 60_000;
// A profile that could not be fetched is asked for again after this long.
const RETRY_MS = 15_000;
const BATCH = 100; // the most users one `profiles` request names

const wanted = new Set();

function want(user, known) {
  if (known && Date.now() - known.at < PROFILE_TTL_MS) return;
  // Until the answer (or a retry), the old profile stands and no one asks again.
  state.profiles.set(user, { name: known?.name || null, avatar: known?.avatar || null, at: Date.now() - PROFILE_TTL_MS + RETRY_MS });
  wanted.add(user);
  fetchWanted();
}

const fetchWanted = coalesce(async () => {
  // Offline: they stay wanted until the next `synced` (refreshProfiles).
  if (state.client?.status !== 'online') return;
  const users = [...wanted].slice(0, BATCH);
  for (const u of users) wanted.delete(u);
  if (wanted.size) fetchWanted();
  if (!users.length) return;
  try {
    const reply = await state.client.request({ type: 'profiles', users });
    const found = new Map(reply.items.map((p) => [p.user, p]));
    const at = Date.now();
    for (const user of users) {
      const p = found.get(user);
      state.profiles.set(user, { name: p?.name || null, avatar: p?.avatar || null, at });
    }
    renderProfiles();
  } catch {
    // Asked again after RETRY_MS.
  }
}, 50);

/** After each `synced`: every profile shown is asked for again (names change
 * while we are away; no frame says so). */
export function refreshProfiles() {
  for (const user of state.profiles.keys()) wanted.add(user);
  wanted.add(state.me);
  fetchWanted();
}

/** Everything that shows names and avatars. */
function renderProfiles() {
  renderList();
  renderHeader();
  scheduleMessages();
  renderMe();
}

/** A user's avatar: their picture if they set one, else their initials. */
export function avatarFor(user, options = {}) {
  const el = avatar(displayName(user), options);
  const picture = state.profiles.get(user)?.avatar;
  if (picture) {
    const img = h('img', { alt: '', class: 'avatar-img' });
    showPicture(img, picture, { thumb: true });
    el.prepend(img);
  }
  return el;
}

/** The side bar's head: my name and avatar. */
export function renderMe() {
  $('me-avatar').replaceChildren(avatarFor(state.me));
  $('me-name').textContent = displayName(state.me);
}

let chosen = null; // the picture file picked in the dialog, or 'remove'

function openProfile() {
  const mine = state.profiles.get(state.me);
  chosen = null;
  $('profile-name').value = mine?.name || state.me;
  $('profile-avatar-file').value = '';
  $('profile-avatar-status').textContent = mine?.avatar ? 'Your picture is set.' : 'No picture yet.';
  $('profile-avatar-preview').replaceChildren(avatarFor(state.me));
  $('profile-error').textContent = '';
  $('profile-dialog').showModal();
  $('profile-name').focus();
}

async function saveProfile(event) {
  event.preventDefault();
  const name = $('profile-name').value.trim();
  const error = $('profile-error');
  error.textContent = '';
  if (!name || [...name].length > 64) {
    error.textContent = 'A name is 1 to 64 characters.';
    return;
  }
  const button = $('profile-save');
  button.disabled = true;
  try {
    let picture = state.profiles.get(state.me)?.avatar || null;
    if (chosen === 'remove') picture = null;
    else if (chosen) {
      $('profile-avatar-status').textContent = 'Uploading…';
      picture = (await upload(chosen)).media;
    }
    await state.client.request({ type: 'profile.set', name, avatar: picture });
    state.profiles.set(state.me, { name, avatar: picture, at: Date.now() });
    renderProfiles();
    $('profile-dialog').close();
    toast('Profile saved');
  } catch (e) {
    error.textContent = `Could not save: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

export function wireProfiles() {
  state.wantProfile = want;
  $('profile-btn').addEventListener('click', openProfile);
  $('profile-form').addEventListener('submit', saveProfile);
  $('profile-avatar-file').addEventListener('change', () => {
    const file = $('profile-avatar-file').files[0];
    if (!file) return;
    if (!file.type.startsWith('image/')) {
      $('profile-error').textContent = 'Choose a picture.';
      return;
    }
    chosen = file;
    $('profile-avatar-status').textContent = `${file.name} chosen`;
  });
  $('profile-avatar-remove').addEventListener('click', () => {
    chosen = 'remove';
    $('profile-avatar-status').textContent = 'The picture will be removed.';
  });
}
