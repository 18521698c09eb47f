// Blocks and mutes: who I blocked (asked for on every sync), which
// conversations are muted, and the header buttons that change them.

import { $, toast } from './ui.js';
import { state, isMuted } from './state.js';
import { renderHeader, renderList } from './list.js';

// A mute "for good" is a mute until far in the future (PROTOCOL.md: `until`
// is a time or null to unmute).
const MUTE_FOREVER_MS = 100 * 365 * 24 * 3600 * 1000;

/** Reads my block list; a server without blocks leaves it empty. */
export async function loadPrivacy() {
  try {
    const reply = await state.client.request({ type: 'blocked' });
    state.blocked = new Set(reply.items);
  } catch (e) {
    if (e.code !== 'disconnected') state.blocked = new Set();
  }
}

export async function toggleBlock() {
  const c = state.open && state.convs.get(state.open);
  if (!c?.peer) return;
  const blocking = !state.blocked.has(c.peer);
  if (blocking && !confirm(`Block ${c.peer}? They will not be able to message you or see when you are online.`)) return;
  try {
    await state.client.request({ type: blocking ? 'block' : 'unblock', user: c.peer });
    if (blocking) state.blocked.add(c.peer);
    else state.blocked.delete(c.peer);
    toast(blocking ? `You blocked ${c.peer}` : `You unblocked ${c.peer}`);
  } catch (e) {
    toast(`Could not ${blocking ? 'block' : 'unblock'}: ${e.message}`);
  }
  renderHeader();
}

export async function toggleMute() {
  const c = state.open && state.convs.get(state.open);
  if (!c) return;
  const muting = !isMuted(c.id);
  const until = muting ? Date.now() + MUTE_FOREVER_MS : null;
  try {
    await state.client.request({ type: 'mute', conversation: c.id, until });
    if (muting) state.muted.set(c.id, until);
    else state.muted.delete(c.id);
  } catch (e) {
    toast(`Could not ${muting ? 'mute' : 'unmute'}: ${e.message}`);
  }
  renderHeader();
  renderList();
}

/** The header's block and mute buttons for the open conversation. */
export function renderPrivacy(c) {
  const block = $('block-btn');
  block.hidden = !c.peer;
  const blocked = Boolean(c.peer && state.blocked.has(c.peer));
  block.textContent = blocked ? 'Unblock' : 'Block';
  block.setAttribute('aria-pressed', String(blocked));
  const mute = $('mute-btn');
  const muted = isMuted(c.id);
  mute.textContent = muted ? 'Unmute' : 'Mute';
  mute.setAttribute('aria-pressed', String(muted));
  $('blocked-note').hidden = !blocked;
}
