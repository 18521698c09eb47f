// Files to send with the next message: picked (the paperclip), dropped on
// the conversation or pasted into the composer; shown in a tray above it
// and uploaded (`POST /v1/media`) when the message is sent.

import { $, h, toast } from './ui.js';
import { state } from './state.js';
import { upload, size } from './media.js';

// PROTOCOL.md v1.1: at most 10 attachments per message.
const MAX_ATTACHMENTS = 10;

let files = []; // File objects waiting in the tray
let uploading = false;

function add(list) {
  if (!state.open) return;
  for (const file of list) {
    if (files.length >= MAX_ATTACHMENTS) {
      toast(`At most ${MAX_ATTACHMENTS} files per message.`);
      break;
    }
    files.push(file);
  }
  renderTray();
}

function renderTray(uploading = false) {
  const tray = $('attach-tray');
  tray.hidden = files.length === 0;
  tray.replaceChildren(
    ...files.map((file, i) =>
      h(
        'li',
        { class: `attach-item ${uploading ? 'uploading' : ''}` },
        h('span', { class: 'att-icon', 'aria-hidden': 'true' }, file.type.startsWith('image/') ? '📷' : '📄'),
        h('span', { class: 'att-name' }, file.name || 'pasted'),
        h('span', { class: 'att-size' }, uploading ? 'uploading…' : size(file.size)),
        uploading
          ? null
          : h(
              'button',
              {
                type: 'button',
                class: 'icon-btn close',
                'aria-label': `Remove ${file.name || 'file'}`,
                onclick: () => {
                  files.splice(i, 1);
                  renderTray();
                },
              },
              '✕',
            ),
      ),
    ),
  );
}

export const hasAttachments = () => files.length > 0;

/**
 * Uploads the tray's files and empties it; resolves with the attachments
 * to send (as the server described each upload, plus its name), or null if
 * an upload failed (the files stay in the tray).
 */
export async function uploadAttachments() {
  if (!files.length) return [];
  // A second Enter while the files go up sends nothing twice.
  if (uploading) return null;
  uploading = true;
  // A copy: files dropped or pasted meanwhile wait for the next message.
  const taking = [...files];
  renderTray(true);
  try {
    const done = [];
    for (const file of taking) {
      const stored = await upload(file);
      done.push({ ...stored, name: file.name || undefined });
    }
    files = files.filter((f) => !taking.includes(f));
    renderTray();
    return done;
  } catch (e) {
    renderTray();
    toast(`Could not upload: ${e.message}`);
    return null;
  } finally {
    uploading = false;
  }
}

/** Forgets the tray (another conversation opened). */
export function clearAttachments() {
  files = [];
  renderTray();
}

export function wireAttachments() {
  $('attach-btn').addEventListener('click', () => $('attach-input').click());
  $('attach-input').addEventListener('change', () => {
    add($('attach-input').files);
    $('attach-input').value = '';
  });
  $('composer-text').addEventListener('paste', (e) => {
    const pasted = [...(e.clipboardData?.files || [])];
    if (!pasted.length) return;
    e.preventDefault();
    add(pasted);
  });
  const pane = $('pane-main');
  const zone = $('drop-zone');
  const carriesFiles = (e) => [...(e.dataTransfer?.types || [])].includes('Files');
  pane.addEventListener('dragover', (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    zone.hidden = false;
  });
  pane.addEventListener('dragleave', (e) => {
    if (e.target === zone || !pane.contains(e.relatedTarget)) zone.hidden = true;
  });
  pane.addEventListener('drop', (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    zone.hidden = true;
    add(e.dataTransfer.files);
  });
}
