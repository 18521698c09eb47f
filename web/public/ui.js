// Small DOM and formatting helpers. Text always goes in as text nodes
// (never innerHTML): message text is untrusted.

/** `h('div', {class: 'x', onclick: f}, 'text', child)` */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (id) => document.getElementById(id);

function hash(text) {
  let x = 2166136261;
  for (let i = 0; i < text.length; i++) {
    x ^= text.charCodeAt(i);
    x = Math.imul(x, 16777619);
  }
  return x >>> 0;
}

/** A round avatar with the name's initials on a colour of its own. */
export function avatar(name, { group = false, online = null, size = '' } = {}) {
  const initials = name
    .replace(/[_-]+/g, ' ')
    .trim()
    .split(/\s+/)
    .map((w) => w[0])
    .join('')
    .slice(0, 2)
    .toUpperCase();
  const el = h('span', { class: `avatar ${size} ${group ? 'group' : ''}`, 'aria-hidden': 'true' }, initials || '?');
  el.style.setProperty('--hue', String(hash(name) % 360));
  if (online !== null) el.append(h('span', { class: `dot ${online ? 'on' : 'off'}` }));
  return el;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'short', day: 'numeric' });
const shortDayFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

function startOfDay(ms) {
  const d = new Date(ms);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

export const time = (ms) => timeFmt.format(ms);

/** "Today", "Yesterday" or the date, for day separators. */
export function day(ms) {
  const today = startOfDay(Date.now());
  const that = startOfDay(ms);
  if (that === today) return 'Today';
  if (today - that === 86_400_000) return 'Yesterday';
  return dayFmt.format(ms);
}

export const dayKey = (ms) => startOfDay(ms);

/** Time for the conversation list: "14:05", "Yesterday", "Mar 3". */
export function when(ms) {
  const today = startOfDay(Date.now());
  const that = startOfDay(ms);
  if (that === today) return timeFmt.format(ms);
  if (today - that === 86_400_000) return 'Yesterday';
  return shortDayFmt.format(ms);
}

/** "last seen just now / 5 min ago / today at 14:05 / Mar 3 at 09:12". */
export function lastSeen(ms) {
  if (!ms) return 'offline';
  const ago = Date.now() - ms;
  if (ago < 60_000) return 'last seen just now';
  if (ago < 3_600_000) return `last seen ${Math.floor(ago / 60_000)} min ago`;
  const w = when(ms);
  if (w.includes(':')) return `last seen today at ${w}`;
  return `last seen ${w} at ${timeFmt.format(ms)}`;
}

let toastTimer;
export function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.hidden = true;
  }, 4000);
}

/** Announces text to screen readers (a polite live region). */
export function announce(text) {
  const el = $('announcer');
  el.textContent = '';
  // A new text node, so repeated identical text is announced again.
  setTimeout(() => {
    el.textContent = text;
  }, 50);
}

/** A function that runs `fn` once, `ms` after its first call, however often
 * it is called meanwhile: a burst of frames costs one render. */
export function coalesce(fn, ms) {
  let timer = null;
  return () => {
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      fn();
    }, ms);
  };
}
