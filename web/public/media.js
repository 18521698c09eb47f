// Media (PROTOCOL.md v1.1 "Media"): uploads with the session's token, and
// short-lived signed URLs (`media.url`: the media's and its thumbnail's) for
// pictures and download links, since an <img> or a link cannot send a
// Bearer header. URLs are kept until shortly before they expire.

import { state } from './state.js';

// A URL this close to its expiry is asked for again.
const EXPIRY_MARGIN_MS = 30_000;
// A thumbnail is made by a worker after the upload, and a message is stored
// a moment after it is delivered: a picture or a link shown at once may
// have to wait, the longer the busier the server, so the waits grow (0.7 s,
// then half as long again each time: about a minute in all).
const RETRIES = 10;
const RETRY_MS = 700;
const RETRY_GROWTH = 1.5;

const REFUSED = {
  401: 'Your session has expired; try again in a moment.',
  404: 'This server does not take files.',
  413: 'That file is too big.',
  415: 'That file is not what its type says.',
  422: 'That file is not what its type says.',
  429: 'Too many uploads today; try again later.',
};

/** Uploads a File or Blob; resolves with the server's description of it. */
export async function upload(file) {
  const res = await fetch('/v1/media', {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${state.client.token}`,
      'Content-Type': file.type || 'application/octet-stream',
    },
    body: file,
  });
  if (res.status !== 201) throw new Error(REFUSED[res.status] || `Upload failed (${res.status}).`);
  return res.json();
}

export const isImage = (a) => /^image\//.test(a.content_type || '');

/** "2.4 MB" */
export function size(bytes) {
  if (!Number.isFinite(bytes)) return '';
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = bytes;
  let u = -1;
  do {
    v /= 1024;
    u += 1;
  } while (v >= 1024 && u < units.length - 1);
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[u]}`;
}

// media id -> {url, thumb, expires (ms)} once known, or {waiting: Promise}.
const signed = new Map();

/** `expires` as ms since the epoch, whether the server sent seconds, ms or a date. */
function expiryMs(expires) {
  if (typeof expires === 'number') return expires < 1e12 ? expires * 1000 : expires;
  const at = Date.parse(expires);
  return Number.isNaN(at) ? Date.now() + 60_000 : at;
}

const fresh = (known) => known?.url && known.expires - EXPIRY_MARGIN_MS > Date.now();

/** The signed URLs of a media ({url, thumb}), from the cache or asked for. */
async function signedUrls(id) {
  const known = signed.get(id);
  if (fresh(known)) return known;
  if (known?.waiting) return known.waiting;
  const waiting = state.client
    .request({ type: 'media.url', media: id })
    .then((reply) => {
      const urls = { url: reply.url, thumb: reply.thumb || thumbOf(reply.url), expires: expiryMs(reply.expires) };
      signed.set(id, urls);
      return urls;
    })
    .catch((e) => {
      signed.delete(id);
      throw e;
    });
  signed.set(id, { waiting });
  return waiting;
}

/** A thumbnail's URL when the server names none: the media URL's path with `/thumb`. */
function thumbOf(url) {
  const u = new URL(url, location.href);
  u.pathname = `${u.pathname.replace(/\/$/, '')}/thumb`;
  return u.origin === location.origin ? u.pathname + u.search : u.href;
}

/**
 * Points `img` at the media (its thumbnail with `thumb`) once a signed URL
 * is at hand. Both may take a moment, so each is asked for again a few
 * times: a thumbnail is made after the upload, and a message is delivered
 * before it is stored, while `media.url` answers `not_found` until it is.
 */
export function showPicture(img, id, { thumb = false } = {}) {
  let tries = 0;
  const again = () => {
    if (tries >= RETRIES || !img.isConnected) return;
    setTimeout(() => load(), RETRY_MS * RETRY_GROWTH ** tries);
    tries += 1;
  };
  img.addEventListener('error', () => {
    if (thumb) again();
  });
  const load = () =>
    signedUrls(id).then((urls) => {
      img.src = thumb ? urls.thumb : urls.url;
    }, again);
  load();
}

/**
 * Sets `a`'s href to a signed URL of the media, fresh again when it is used.
 * Asked for again a few times, as a picture's is: a message is delivered
 * before it is stored, and `media.url` answers `not_found` until it is.
 */
export function linkTo(a, id) {
  let tries = 0;
  const load = () =>
    signedUrls(id).then(
      (urls) => a.setAttribute('href', urls.url),
      () => {
        if (tries >= RETRIES) return;
        setTimeout(() => {
          if (a.isConnected) load();
        }, RETRY_MS * RETRY_GROWTH ** tries);
        tries += 1;
      },
    );
  load();
  a.addEventListener('click', (e) => {
    if (fresh(signed.get(id))) return;
    // Expired or never known: get one, then follow it.
    e.preventDefault();
    signedUrls(id).then((urls) => {
      a.setAttribute('href', urls.url);
      a.click();
    }, () => {});
  });
}
