// End-to-end test of the web client in a real browser (Debian's chromium,
// driven by playwright-core). Run by the Rust test tests/tests/e2e/web.rs,
// which starts a whole system and passes:
//   CHAT_WEB_URL        the edge that serves the page, e.g. http://127.0.0.1:1234/
//   CHAT_WEB_ARTIFACTS  where screenshots go (default target/web-artifacts)
//   CHAT_WEB_DRAIN=1    the runner drains that edge when this script prints
//                       "@@drain" and answers "drained" on stdin
//   CHAT_CHROMIUM       the browser (default /usr/bin/chromium)
// By hand against ./scripts/dev:  CHAT_WEB_URL=http://127.0.0.1:8080/ node web/tests/browser.mjs
// (presence waits are generous: scripts/dev announces offline after 5 s).

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const base = process.env.CHAT_WEB_URL;
if (!base) {
  console.error('set CHAT_WEB_URL to the edge URL, e.g. http://127.0.0.1:8080/');
  process.exit(2);
}
const artifacts = path.resolve(process.env.CHAT_WEB_ARTIFACTS || 'target/web-artifacts');
const executablePath = process.env.CHAT_CHROMIUM || '/usr/bin/chromium';
const WAIT = 20_000;
fs.mkdirSync(artifacts, { recursive: true });
// Only this run's pictures: no failure shots left from an earlier one.
for (const f of fs.readdirSync(artifacts)) if (f.endsWith('.png')) fs.rmSync(path.join(artifacts, f));

/** Script errors and console errors (CSP violations among them) of any page. */
const problems = [];
let passed = 0;
let failed = 0;
const pages = {};

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    passed += 1;
    console.log(`ok - ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${name}\n  ${String(e.stack || e).split('\n').join('\n  ')}`);
    for (const [who, page] of Object.entries(pages)) {
      if (!page.isClosed()) await shot(page, `failure-${who}`).catch(() => {});
    }
    throw e;
  }
}

async function shot(page, name) {
  const file = path.join(artifacts, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

/** Waits until `fn(arg)` is truthy in the page. */
async function until(page, what, fn, arg, timeout = WAIT) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    throw new Error(`${what}: not within ${timeout} ms (${e.message.split('\n')[0]})`);
  }
}

const texts = (page) => page.locator('#msg-list .msg .text').allTextContents();

async function signIn(browser, user, { viewport = { width: 1100, height: 720 }, tokenTtl, mobile = false } = {}) {
  const context = await browser.newContext({ viewport, isMobile: mobile, hasTouch: mobile });
  if (tokenTtl) {
    await context.addInitScript((ttl) => localStorage.setItem('chat.dev-token-ttl', String(ttl)), tokenTtl);
  }
  const page = await context.newPage();
  page.on('pageerror', (e) => {
    console.log(`  [${user}] page error: ${e.message}`);
    problems.push(`${user}: ${e.message}`);
  });
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // A thumbnail asked for before the worker made it: the page retries it.
    if (m.text().startsWith('Failed to load resource') && m.location().url.includes('/thumb')) return;
    console.log(`  [${user}] console: ${m.text()}`);
    problems.push(`${user}: ${m.text()}`);
  });
  page.sockets = [];
  page.on('websocket', (ws) => {
    const record = { url: ws.url(), sent: [], received: [] };
    page.sockets.push(record);
    ws.on('framesent', (f) => record.sent.push(String(f.payload)));
    ws.on('framereceived', (f) => record.received.push(String(f.payload)));
  });
  await page.goto(base);
  await page.getByLabel('Your name').fill(user);
  if (user === 'alice') await shot(page, 'login');
  await page.getByLabel('Your name').press('Enter');
  await online(page, user);
  pages[user] = page;
  return page;
}

const online = (page, who) =>
  until(page, `${who} online`, () => document.querySelector('#conn-status')?.dataset.state === 'online');

async function send(page, text) {
  const box = page.getByLabel('Message', { exact: true });
  await box.fill(text);
  await box.press('Enter');
}

async function openConversation(page, title) {
  await page.locator('#conv-list .conv-title', { hasText: title }).first().click();
  await until(page, `conversation ${title} open`, (t) => document.querySelector('#conv-title')?.textContent === t, title);
}

/** The bubble whose own text is exactly `text` (not a reply quoting it). */
const bubble = (page, text) =>
  page.locator('#msg-list .msg').filter({ has: page.locator('.text', { hasText: new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`) }) });

/** Opens a message's menu and picks `item` (a menu item's name, or an emoji). */
async function messageAction(page, text, item) {
  await bubble(page, text).locator('.msg-menu-btn').click();
  const menu = page.locator('.msg-menu');
  if (/^\p{Extended_Pictographic}/u.test(item)) await menu.getByRole('button', { name: `React ${item}` }).click();
  else await menu.getByRole('menuitem', { name: item, exact: true }).click();
}

/**
 * Searches until `expected` is among the results (the persister stores a
 * message a moment after it is delivered); returns that result's button,
 * with the results dialog open.
 */
async function searchFor(page, query, expected) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const open = await page.locator('#search-dialog[open]').count();
    if (open) await page.locator('#search-dialog [data-close]').click();
    await page.getByLabel('Search messages').fill(query);
    await page.getByLabel('Search messages').press('Enter');
    await until(page, `search for ${query} answered`, () => {
      const s = document.querySelector('#search-summary')?.textContent || '';
      return s && !s.startsWith('Searching');
    });
    const result = page.locator('#search-results .result').filter({ has: page.locator('.result-text', { hasText: new RegExp(`: ${expected.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`) }) });
    if (await result.count()) return result.first();
    if (Date.now() > deadline) throw new Error(`search for ${query} never found ${expected}: ${await page.locator('#search-dialog').textContent()}`);
    await page.waitForTimeout(300);
  }
}

/** A PNG of a gradient with a label, drawn by the page's canvas. */
async function png(page, width, height, label) {
  const b64 = await page.evaluate(
    ([w, h, text]) => {
      const canvas = document.createElement('canvas');
      canvas.width = w;
      canvas.height = h;
      const g = canvas.getContext('2d');
      const fill = g.createLinearGradient(0, 0, w, h);
      fill.addColorStop(0, '#f6a04d');
      fill.addColorStop(1, '#6a3093');
      g.fillStyle = fill;
      g.fillRect(0, 0, w, h);
      g.fillStyle = '#fff';
      g.font = `${Math.round(h / 5)}px sans-serif`;
      g.fillText(text, w / 10, h / 2);
      return canvas.toDataURL('image/png').split(',')[1];
    },
    [width, height, label],
  );
  return Buffer.from(b64, 'base64');
}

const sha256 = (bytes) => crypto.createHash('sha256').update(bytes).digest('hex');

const frames = (page, type) =>
  page.sockets.flatMap((s) => s.sent.concat(s.received)).map((f) => JSON.parse(f)).filter((f) => f.type === type);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  // launch() gives the browser a fresh, empty user-data dir of its own
  // (removed on close); every context below is a separate profile.
});

let exitCode = 0;
try {
  let alice;
  let bob;
  let carol;

  await step('alice and bob sign in by name (dev tokens)', async () => {
    alice = await signIn(browser, 'alice');
    // Bob's tokens live 5 s: the client must refresh them on the open connection.
    bob = await signIn(browser, 'bob', { tokenTtl: 5 });
  });

  await step('friend request, accept, and the green dot', async () => {
    await alice.getByRole('button', { name: 'Friends' }).click();
    await alice.getByLabel('Add a friend (user name)').fill('bob');
    await alice.getByRole('button', { name: 'Send request' }).click();
    await alice.locator('#friend-list li[data-user=bob][data-state=requested]').waitFor({ timeout: WAIT });
    await alice.locator('#friends-dialog [data-close]').click();
    // Bob's badge counts the request; he accepts it.
    await bob.locator('#friends-badge:not([hidden])').waitFor({ timeout: WAIT });
    await bob.getByRole('button', { name: /Friends, 1 request/ }).click();
    await shot(bob, 'bob-friend-request');
    await bob.locator('#friend-list li[data-user=alice] button', { hasText: 'Accept' }).click();
    await bob.locator('#friend-list li[data-user=alice][data-state=friends]').waitFor({ timeout: WAIT });
    await bob.locator('#friends-dialog [data-close]').click();
    await alice.locator('#friend-list li[data-user=bob][data-state=friends]').waitFor({ state: 'attached', timeout: WAIT });
  });

  await step('alice starts a DM by typing a name; bob gets it with an unread badge', async () => {
    await alice.getByLabel('Start a chat with (user name)').fill('bob');
    await alice.getByLabel('Start a chat with (user name)').press('Enter');
    await until(alice, 'DM open', () => document.querySelector('#conv-title')?.textContent === 'bob');
    await until(alice, 'bob shown online', () => document.querySelector('#conv-sub')?.dataset.presence === 'online');
    await send(alice, 'Hi bob 👋');
    await send(alice, 'Lunch at 12?');
    await bob.locator('#conv-list li[data-id="dm:alice:bob"] .badge', { hasText: '2' }).waitFor({ timeout: WAIT });
    await shot(bob, 'bob-unread');
    await openConversation(bob, 'alice');
    await until(bob, 'both messages', () => document.querySelectorAll('#msg-list .msg').length === 2);
    // Screen readers hear new messages (a polite live region).
    await until(bob, 'announced', () => document.querySelector('#announcer').textContent.includes('alice: Lunch at 12?'));
    // Read by bob: alice's ticks turn blue.
    await alice.locator('#msg-list .msg.mine .tick.read').nth(1).waitFor({ timeout: WAIT });
    await send(bob, 'Sure, see you there!');
    await alice.locator('#msg-list .msg.theirs .text', { hasText: 'Sure, see you there!' }).waitFor({ timeout: WAIT });
    await shot(alice, 'alice-dm');
  });

  await step('typing shows and lapses', async () => {
    const box = bob.getByLabel('Message', { exact: true });
    await box.click();
    await box.pressSequentially('I am typing', { delay: 30 });
    await until(alice, 'typing shown', () => document.querySelector('#conv-sub')?.textContent === 'typing…');
    await shot(alice, 'alice-sees-typing');
    // Bob stops without sending: his client says so after a few idle
    // seconds (and the server would after 6 s anyway).
    await until(alice, 'typing lapsed', () => document.querySelector('#conv-sub')?.textContent === 'online', null, 12_000);
    await box.fill('');
  });

  await step('a dropped connection: sends wait in the outbox, go out once after the reconnect', async () => {
    const sockets = alice.sockets.length;
    // The network stays gone until the pending message has been seen: with
    // full-jitter backoff the first retry may come within a millisecond, so
    // a plain close alone would race the check below.
    await alice.evaluate(() => {
      window.realWebSocket = window.WebSocket;
      window.WebSocket = function offline() {
        throw new DOMException('network gone (test)', 'NetworkError');
      };
      window.chat.client.ws.close(4000, 'test: network gone');
    });
    await send(alice, 'written while offline');
    await alice.locator('#msg-list .msg.pending', { hasText: 'written while offline' }).waitFor({ timeout: WAIT });
    await alice.evaluate(() => {
      window.WebSocket = window.realWebSocket;
    });
    // The network is back: retry now rather than wait out the backoff
    // the failed attempts have grown to.
    await until(alice, 'a reconnect attempt', () => {
      window.chat.client.retryNow();
      return ['syncing', 'online'].includes(window.chat.client.status);
    });
    await online(alice, 'alice reconnected');
    if (alice.sockets.length !== sockets + 1) throw new Error('alice did not reconnect once');
    await bob.locator('#msg-list .msg.theirs .text', { hasText: 'written while offline' }).waitFor({ timeout: WAIT });
    await until(alice, 'stored', () => !document.querySelector('#msg-list .msg.pending'));
    const hello = alice.sockets.at(-1).sent.map((f) => JSON.parse(f)).find((f) => f.type === 'hello');
    if (!hello?.cursor) throw new Error('the reconnect did not resume from a cursor');
  });

  await step('bob reloads mid-conversation and sees every message exactly once', async () => {
    for (let i = 1; i <= 3; i++) await send(alice, `before reload ${i}`);
    await until(bob, 'bob has them', () => [...document.querySelectorAll('#msg-list .text')].some((e) => e.textContent === 'before reload 3'));
    // Bob sends and reloads at once: the outbox keeps the message and the
    // retry uses the same client_msg_id, so it is stored once.
    await send(bob, 'sent just before the reload');
    const reloading = bob.reload();
    for (let i = 1; i <= 3; i++) await send(alice, `during reload ${i}`);
    await reloading;
    await online(bob, 'bob after reload');
    for (let i = 1; i <= 2; i++) await send(alice, `after reload ${i}`);
    const expected = [
      'Hi bob 👋', 'Lunch at 12?', 'Sure, see you there!', 'written while offline',
      'before reload 1', 'before reload 2', 'before reload 3', 'sent just before the reload',
      'during reload 1', 'during reload 2', 'during reload 3', 'after reload 1', 'after reload 2',
    ];
    for (const page of [bob, alice]) {
      await until(page, 'every message', (n) => document.querySelectorAll('#msg-list .msg:not(.pending)').length >= n, expected.length);
      const seen = await texts(page);
      const ids = await page.locator('#msg-list .msg').evaluateAll((els) => els.map((e) => e.dataset.id));
      if (new Set(ids).size !== ids.length) throw new Error(`duplicate ids: ${ids}`);
      const missing = expected.filter((t) => !seen.includes(t));
      const twice = seen.filter((t, i) => seen.indexOf(t) !== i);
      if (missing.length || twice.length || seen.length !== expected.length) {
        throw new Error(`messages: missing ${JSON.stringify(missing)}, twice ${JSON.stringify(twice)}, got ${JSON.stringify(seen)}`);
      }
      if (page === alice) {
        // Alice's own messages are in the order she sent them.
        const mine = seen.filter((t) => /reload \d/.test(t) && !t.startsWith('sent'));
        const order = expected.filter((t) => mine.includes(t));
        if (JSON.stringify(mine) !== JSON.stringify(order)) throw new Error(`order: ${mine}`);
      }
    }
    // The reload resumed from the cursor it had stored (and acked).
    const hello = bob.sockets[1]?.sent.map((f) => JSON.parse(f)).find((f) => f.type === 'hello');
    if (!hello?.cursor) throw new Error(`bob's hello after the reload has no cursor: ${JSON.stringify(hello)}`);
    if (!frames(bob, 'ack').length) throw new Error('bob never acked');
    await shot(bob, 'bob-after-reload');
  });

  await step('groups: create, chat, add, leave (carol on a phone-sized screen)', async () => {
    carol = await signIn(browser, 'carol', { viewport: { width: 390, height: 844 }, mobile: true });
    await alice.getByRole('button', { name: 'New group' }).click();
    await alice.getByLabel('Group name').fill('Weekend plans');
    await alice.getByLabel('Members (user names, separated by commas or spaces)').fill('bob, carol');
    await alice.getByRole('button', { name: 'Create group' }).click();
    await until(alice, 'group open', () => document.querySelector('#conv-title')?.textContent === 'Weekend plans');
    await send(alice, 'Hiking on Saturday?');
    await carol.locator('#conv-list .conv-title', { hasText: 'Weekend plans' }).waitFor({ timeout: WAIT });
    await shot(carol, 'carol-phone-list');
    await openConversation(carol, 'Weekend plans');
    await carol.locator('#msg-list .text', { hasText: 'Hiking on Saturday?' }).waitFor({ timeout: WAIT });
    await send(carol, "I'm in 🥾");
    await openConversation(bob, 'Weekend plans');
    await send(bob, 'Count me in too');
    for (const page of [alice, bob, carol]) {
      await until(page, 'three group messages', () => document.querySelectorAll('#msg-list .msg:not(.pending)').length === 3);
    }
    await shot(carol, 'carol-phone-group');
    // A long conversation: carol reloads, gets the newest page, and scrolls
    // back through the rest.
    await alice.evaluate(() => {
      for (let i = 1; i <= 60; i++) window.chat.client.send(window.chat.open, `bulk ${i}`);
    });
    await until(carol, 'bulk 60 arrived', () => [...document.querySelectorAll('#msg-list .text')].some((e) => e.textContent === 'bulk 60'));
    await carol.reload();
    await online(carol, 'carol after reload');
    await until(carol, 'newest page', () => document.querySelectorAll('#msg-list .msg').length >= 50);
    await until(carol, 'scrolled back to the beginning', () => {
      document.querySelector('#messages').scrollTop = 0;
      return document.querySelector('#history-status').textContent === 'Beginning of the conversation';
    });
    const expected = ['Hiking on Saturday?', "I'm in 🥾", 'Count me in too', ...Array.from({ length: 60 }, (_, i) => `bulk ${i + 1}`)];
    const seen = await texts(carol);
    if (JSON.stringify(seen) !== JSON.stringify(expected)) throw new Error(`carol's history: ${JSON.stringify(seen)}`);
    await shot(carol, 'carol-phone-history');
    // Alice adds dave; everyone's member list follows.
    await alice.getByRole('button', { name: 'Members' }).click();
    await alice.getByLabel('Add members (user names)').fill('dave');
    await alice.getByRole('button', { name: 'Add', exact: true }).click();
    await alice.locator('#member-list .name', { hasText: 'dave' }).waitFor({ timeout: WAIT });
    await alice.locator('#info-dialog [data-close]').click();
    await until(bob, 'bob sees dave', () => document.querySelector('#conv-sub')?.textContent.includes('dave'));
    // Carol leaves (the app asks first).
    carol.once('dialog', (d) => d.accept());
    await carol.getByRole('button', { name: 'Members' }).click();
    await carol.getByRole('button', { name: 'Leave group' }).click();
    await until(carol, 'group gone for carol', () => !document.querySelector('#conv-list li[data-id^="group:"]'));
    await until(alice, 'alice sees carol gone', () => {
      const sub = document.querySelector('#conv-sub')?.textContent || '';
      return sub.includes('dave') && !sub.includes('carol');
    });
    await shot(alice, 'alice-group');
    await alice.emulateMedia({ colorScheme: 'dark' });
    await shot(alice, 'alice-group-dark');
    await alice.emulateMedia({ colorScheme: 'light' });
  });

  await step('reply, edit, react, delete for everyone and for me', async () => {
    await openConversation(alice, 'bob');
    await openConversation(bob, 'alice');
    await messageAction(bob, 'Lunch at 12?', 'Reply');
    await bob.locator('#compose-bar:not([hidden])').waitFor({ timeout: WAIT });
    await send(bob, 'Yes, 12 works');
    const reply = bubble(alice, 'Yes, 12 works');
    await reply.locator('.quote-text', { hasText: 'Lunch at 12?' }).waitFor({ timeout: WAIT });
    await messageAction(alice, 'after reload 2', 'Edit');
    if ((await alice.getByLabel('Message', { exact: true }).inputValue()) !== 'after reload 2') throw new Error('edit did not fill the composer');
    await send(alice, 'after reload 2, edited');
    await bubble(bob, 'after reload 2, edited').locator('.edited').waitFor({ timeout: WAIT });
    await messageAction(bob, 'Hi bob 👋', '👍');
    await bubble(alice, 'Hi bob 👋').locator('.reaction', { hasText: '👍 1' }).waitFor({ timeout: WAIT });
    await messageAction(alice, 'during reload 1', 'Delete for everyone');
    await until(bob, 'deleted for everyone', () =>
      [...document.querySelectorAll('#msg-list .text')].every((e) => e.textContent !== 'during reload 1') &&
      document.querySelector('#msg-list .text.gone')?.textContent === 'This message was deleted');
    await messageAction(bob, 'during reload 2', 'Delete for me');
    await until(bob, 'deleted for bob', () => [...document.querySelectorAll('#msg-list .text')].every((e) => e.textContent !== 'during reload 2'));
    // Only bob's devices hide it: alice still has it.
    if (!(await bubble(alice, 'during reload 2').count())) throw new Error("a delete for me reached alice");
    // A reload shows the same state, from history and the resumed updates.
    await bob.reload();
    await online(bob, 'bob after the changes');
    await openConversation(bob, 'alice');
    await bubble(bob, 'after reload 2, edited').waitFor({ timeout: WAIT });
    await bubble(bob, 'Hi bob 👋').locator('.reaction.mine', { hasText: '👍 1' }).waitFor({ timeout: WAIT });
    if (await bubble(bob, 'during reload 1').count()) throw new Error('the deleted text came back after a reload');
    await shot(alice, 'alice-changes');
    await shot(bob, 'bob-changes');
  });

  await step('read ticks per member in a group', async () => {
    await openConversation(alice, 'Weekend plans');
    await send(alice, 'Who brings snacks?');
    await openConversation(bob, 'Weekend plans');
    await bob.locator('#msg-list .text', { hasText: 'Who brings snacks?' }).waitFor({ timeout: WAIT });
    await bubble(alice, 'Who brings snacks?').locator('.seen-read', { hasText: 'Read by bob' }).waitFor({ timeout: WAIT });
    // dave never opened it: not among the readers.
    if ((await bubble(alice, 'Who brings snacks?').locator('.seen').textContent()).includes('Read by bob, dave')) throw new Error('dave read it?');
    await shot(alice, 'alice-group-read-by');
  });

  await step('mute and block', async () => {
    await openConversation(bob, 'alice');
    await bob.getByRole('button', { name: 'Mute' }).click();
    await bob.locator('#conv-list li[data-id="dm:alice:bob"] .muted-icon').waitFor({ timeout: WAIT });
    await bob.getByRole('button', { name: 'Unmute' }).waitFor({ timeout: WAIT });
    // Alice blocks carol: carol's DM is refused until alice unblocks her.
    await alice.getByLabel('Start a chat with (user name)').fill('carol');
    await alice.getByLabel('Start a chat with (user name)').press('Enter');
    await until(alice, 'DM with carol open', () => document.querySelector('#conv-title')?.textContent === 'carol');
    alice.once('dialog', (d) => d.accept());
    await alice.getByRole('button', { name: 'Block' }).click();
    await alice.locator('#blocked-note:not([hidden])').waitFor({ timeout: WAIT });
    await carol.getByLabel('Start a chat with (user name)').fill('alice');
    await carol.getByLabel('Start a chat with (user name)').press('Enter');
    await send(carol, 'are you there?');
    await carol.locator('#msg-list .msg.pending .tick.failed').waitFor({ timeout: WAIT });
    await shot(carol, 'carol-blocked');
    await shot(alice, 'alice-blocked-carol');
    await alice.getByRole('button', { name: 'Unblock' }).click();
    await alice.locator('#blocked-note').waitFor({ state: 'hidden', timeout: WAIT });
    await carol.locator('#msg-list .failed-actions button', { hasText: 'Retry' }).click();
    await alice.locator('#msg-list .text', { hasText: 'are you there?' }).waitFor({ timeout: WAIT });
  });

  await step("bob's short-lived tokens were refreshed on the open connection", async () => {
    // Three refreshes on one page take longer than a token lives.
    await until(bob, 'three refreshes', () => window.chat.client.refreshes >= 3);
    const refreshes = frames(bob, 'refresh');
    if (refreshes.length < 2) throw new Error(`${refreshes.length} refresh frames sent`);
    const answered = new Set(frames(bob, 'ok').map((f) => f.ref));
    const unanswered = refreshes.filter((f) => !answered.has(f.ref));
    // The last one may still be in flight.
    if (unanswered.length > 1) throw new Error(`refreshes without ok: ${JSON.stringify(unanswered)}`);
    const after = bob.sockets.length;
    // Three sockets: before and after each reload; none from an expiry.
    if (after !== 3) throw new Error(`bob opened ${after} WebSockets: ${bob.sockets.map((s) => s.url)}`);
  });

  await step('search: a Russian and an English word, a Japanese substring; a result opens at its message', async () => {
    await openConversation(alice, 'bob');
    await send(alice, 'Встретимся у метро завтра');
    await send(alice, '明日は東京駅で会いましょう');
    await bob.locator('#msg-list .text', { hasText: '明日は東京駅で会いましょう' }).waitFor({ timeout: WAIT });
    const found = await searchFor(alice, '東京', '明日は東京駅で会いましょう');
    const marked = await found.locator('mark').allTextContents();
    if (!marked.includes('東京')) throw new Error(`the match is not marked: ${marked}`);
    await shot(alice, 'alice-search-japanese');
    await alice.locator('#search-dialog [data-close]').click();
    await searchFor(alice, 'метро', 'Встретимся у метро завтра');
    await alice.locator('#search-dialog [data-close]').click();
    // After a reload nothing is loaded: the oldest message of the long group
    // is two history pages back.
    await alice.reload();
    await online(alice, 'alice after reload');
    const hiking = await searchFor(alice, 'hiking', 'Hiking on Saturday?');
    await hiking.click();
    await until(alice, 'the group open at the message', () => {
      const el = document.querySelector('#msg-list .msg.found');
      if (document.querySelector('#conv-title')?.textContent !== 'Weekend plans' || !el) return false;
      const box = document.querySelector('#messages').getBoundingClientRect();
      const at = el.getBoundingClientRect();
      return el.querySelector('.text')?.textContent === 'Hiking on Saturday?' && at.top >= box.top && at.bottom <= box.bottom;
    });
    const loaded = await alice.locator('#msg-list .msg').count();
    if (loaded <= 50) throw new Error(`only ${loaded} messages: older pages were not loaded`);
    await shot(alice, 'alice-search-jump');
    // Only in the open conversation.
    await alice.locator('#search-here').check();
    const here = await searchFor(alice, 'bulk 7', 'bulk 7');
    const where = await alice.locator('#search-results .result').evaluateAll((els) => [...new Set(els.map((e) => e.dataset.conversation))]);
    const group = await alice.evaluate(() => window.chat.open);
    if (where.length !== 1 || where[0] !== group) throw new Error(`results from ${where}, not only ${group}`);
    await here.click();
    await alice.locator('#msg-list .msg.found .text', { hasText: /^bulk 7$/ }).waitFor({ timeout: WAIT });
    await alice.locator('#search-here').uncheck();
  });

  await step('profiles: alice names herself; others see the name', async () => {
    await alice.getByRole('button', { name: 'Your profile' }).click();
    await alice.getByLabel('Display name (what others see)').fill('Alice Liddell');
    await shot(alice, 'alice-profile-dialog');
    await alice.getByRole('button', { name: 'Save' }).click();
    await until(alice, 'her name shown', () => document.querySelector('#me-name')?.textContent === 'Alice Liddell');
    // Carol's cache is refreshed on each `synced`: a reload shows the name,
    // in the conversation list and the DM's header.
    await carol.reload();
    await online(carol, 'carol after reload');
    // (On carol's phone-sized screen the list is hidden while a conversation is open.)
    await carol.locator('#conv-list li[data-id="dm:alice:carol"] .conv-title', { hasText: 'Alice Liddell' }).waitFor({ state: 'attached', timeout: WAIT });
    await carol.evaluate(() => {
      location.hash = `#${encodeURIComponent('dm:alice:carol')}`;
    });
    await until(carol, "the DM's header names her", () => document.querySelector('#conv-title')?.textContent === 'Alice Liddell');
    await shot(carol, 'carol-sees-alice-name');
    const asked = frames(carol, 'profiles').filter((f) => f.ref && Array.isArray(f.users));
    if (!asked.some((f) => f.users.includes('alice'))) throw new Error('carol never asked for profiles');
  });

  const media = await fetch(new URL('v1/media', base), { method: 'POST', body: 'probe' });
  if (media.status !== 401) {
    console.log(`# media steps skipped: POST /v1/media without a token answered ${media.status}, not 401 (this server has no media support)`);
  } else {
    await step('media: a picture picked, a file dropped, a picture pasted; thumbnails and a download', async () => {
      const sunset = await png(alice, 640, 400, 'sunset');
      const pasted = await png(alice, 300, 500, 'pasted');
      const notes = Buffer.from(`notes for carol\n${'0123456789'.repeat(5000)}\n`);
      await openConversation(alice, 'carol');
      // Picked with the file chooser (the paperclip's input).
      await alice.locator('#attach-input').setInputFiles({ name: 'sunset.png', mimeType: 'image/png', buffer: sunset });
      await alice.locator('#attach-tray .att-name', { hasText: 'sunset.png' }).waitFor({ timeout: WAIT });
      await shot(alice, 'alice-attach-tray');
      await send(alice, 'a picture');
      const uploaded = () => document.querySelector('#attach-tray').hidden;
      await until(alice, 'the picture uploaded', uploaded);
      // Dropped on the conversation, sent without text.
      await alice.evaluate((text) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], 'notes.txt', { type: 'text/plain' }));
        const pane = document.querySelector('#pane-main');
        pane.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
        pane.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
      }, notes.toString());
      await alice.locator('#attach-tray .att-name', { hasText: 'notes.txt' }).waitFor({ timeout: WAIT });
      await alice.getByLabel('Message', { exact: true }).press('Enter');
      await until(alice, 'the file uploaded', uploaded);
      // The list says what came without text.
      await alice.locator('#conv-list li[data-id="dm:alice:carol"] .preview', { hasText: '📎 notes.txt' }).waitFor({ timeout: WAIT });
      // Pasted into the composer.
      await alice.evaluate((b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'pasted.png', { type: 'image/png' }));
        document.querySelector('#composer-text').dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
      }, pasted.toString('base64'));
      await alice.locator('#attach-tray .att-name', { hasText: 'pasted.png' }).waitFor({ timeout: WAIT });
      await send(alice, 'and a pasted one');
      await until(alice, 'all three stored', () => document.querySelectorAll('#msg-list .msg:not(.pending) .attachments').length >= 3);
      // Carol sees both pictures as thumbnails (made by the server, at most 320 px).
      // A thumbnail is made by the server's worker, behind whatever else it
      // has to do on a busy test box: the client retries for about a minute.
      await until(carol, 'two thumbnails loaded', () => {
        const imgs = [...document.querySelectorAll('#msg-list .att-image img.thumb')];
        return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth > 0 && new URL(i.src).pathname.endsWith('/thumb'));
      }, undefined, 60_000);
      const sizes = await carol.locator('#msg-list .att-image img.thumb').evaluateAll((els) => els.map((i) => [i.naturalWidth, i.naturalHeight]));
      if (sizes.some(([w, h]) => w > 320 || h > 320)) throw new Error(`thumbnails larger than 320 px: ${JSON.stringify(sizes)}`);
      await shot(carol, 'carol-sees-pictures');
      // The file downloads as the same bytes.
      const link = carol.locator('#msg-list a.att-file[href]', { hasText: 'notes.txt' });
      await link.waitFor({ timeout: WAIT });
      const [download] = await Promise.all([carol.waitForEvent('download', { timeout: WAIT }), link.click()]);
      const got = fs.readFileSync(await download.path());
      if (sha256(got) !== sha256(notes)) throw new Error(`downloaded ${got.length} bytes, not the ${notes.length} sent`);
      if (download.suggestedFilename() !== 'notes.txt') throw new Error(`saved as ${download.suggestedFilename()}`);
    });

    await step('media: alice uploads an avatar; carol sees it', async () => {
      await alice.getByRole('button', { name: 'Your profile' }).click();
      await alice.locator('#profile-avatar-file').setInputFiles({ name: 'me.png', mimeType: 'image/png', buffer: await png(alice, 400, 400, 'A') });
      await alice.getByRole('button', { name: 'Save' }).click();
      const loaded = () => {
        const img = document.querySelector('#me-avatar img.avatar-img');
        return img && img.complete && img.naturalWidth > 0;
      };
      await until(alice, 'her avatar shown', loaded);
      await shot(alice, 'alice-avatar');
      const avatar = await alice.evaluate(() => window.chat.profiles.get('alice')?.avatar);
      await carol.reload();
      await online(carol, 'carol after reload');
      // Carol asks for a signed URL of alice's avatar: profiles are public,
      // and so is the picture a profile names.
      const socket = carol.sockets.at(-1);
      let answer;
      for (const deadline = Date.now() + WAIT; !answer && Date.now() < deadline; await carol.waitForTimeout(100)) {
        const asked = socket.sent.map((f) => JSON.parse(f)).filter((f) => f.type === 'media.url' && f.media === avatar).map((f) => f.ref);
        answer = socket.received.map((f) => JSON.parse(f)).find((f) => asked.includes(f.ref));
      }
      if (!answer) throw new Error("carol never asked for alice's avatar");
      if (answer.type !== 'media.url') throw new Error(`media.url for alice's avatar answered ${JSON.stringify(answer)}`);
      await until(carol, "alice's avatar in the list", () => {
        const img = document.querySelector('#conv-list li[data-id="dm:alice:carol"] img.avatar-img');
        return img && img.complete && img.naturalWidth > 0;
      });
      await shot(carol, 'carol-sees-alice-avatar');
    });
  }

  await step('bob closes his page: alice sees him go offline, with last seen', async () => {
    await openConversation(alice, 'bob');
    await until(alice, 'bob online', () => document.querySelector('#conv-sub')?.dataset.presence === 'online');
    await bob.context().close();
    delete pages.bob;
    await until(alice, 'bob offline', () => {
      const sub = document.querySelector('#conv-sub');
      return sub?.dataset.presence === 'offline' && sub.textContent.startsWith('last seen');
    }, null, 30_000);
    await alice.locator('#conv-list li[data-id="dm:alice:bob"] .dot.off').waitFor({ state: 'attached', timeout: WAIT });
    await shot(alice, 'alice-bob-offline');
  });

  if (process.env.CHAT_WEB_DRAIN === '1') {
    await step('the edge drains: clients follow `reconnect` to another edge and lose nothing', async () => {
      const edgeBefore = await alice.evaluate(() => window.chat.client.edge);
      const lines = readline.createInterface({ input: process.stdin });
      const drained = new Promise((resolve) => lines.once('line', resolve));
      console.log('@@drain');
      await drained;
      lines.close();
      for (const [page, who] of [[alice, 'alice'], [carol, 'carol']]) {
        await until(page, `${who} on another edge`, (before) => window.chat.client.edge && window.chat.client.edge !== before && document.querySelector('#conn-status').dataset.state === 'online', edgeBefore);
      }
      const received = alice.sockets.at(-1).received.map((f) => JSON.parse(f));
      if (!frames(alice, 'reconnect').length) throw new Error('alice got no reconnect frame');
      if (alice.sockets.at(-1).url === alice.sockets[0].url) throw new Error('alice reconnected to the same edge');
      if (!received.some((f) => f.type === 'welcome')) throw new Error('no welcome on the new edge');
      await openConversation(alice, 'bob');
      await send(alice, 'sent through the other edge');
      await alice.locator('#msg-list .msg.mine .tick.sent, #msg-list .msg.mine .tick.delivered, #msg-list .msg.mine .tick.read')
        .last().waitFor({ timeout: WAIT });
      await shot(alice, 'alice-after-drain');
    });
  }
  await step('no script errors and no Content-Security-Policy violations', async () => {
    if (problems.length) throw new Error(problems.join('\n'));
  });
} catch {
  exitCode = 1;
} finally {
  await browser.close().catch(() => {});
}

console.log(`screenshots: ${artifacts}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(exitCode);
