// Drives client/chat.js in a real browser: Debian's Chromium through
// playwright-core, or Firefox ESR through puppeteer-core over WebDriver
// BiDi.  argv: chromium|firefox, the page's URL (t/lib/www/client.html on
// a static server) and the chat location (another origin: every request
// is cross-origin, as when the platform embeds the client).
//
// The test (t/111, t/112) controls the server: the driver prints
//   {"ask": "<command>", ...}
// and waits for one line on stdin with the answer.  At the end it prints
//   {"result": {...}}
// Each step records what it saw; assertions are made by the test.
'use strict';
const path = require('path');
const readline = require('readline');

const [browserName, pageUrl, chatUrl] = process.argv.slice(2);
const MODS = path.join(__dirname, '..', '..', 'client', 'node_modules');
const T = 15000;

const rl = readline.createInterface({ input: process.stdin });
const answers = [];
let waiting = null;
rl.on('line', (l) => {
  if (waiting) {
    const w = waiting;
    waiting = null;
    w(JSON.parse(l));
  } else {
    answers.push(JSON.parse(l));
  }
});

function ask(cmd, args = {}) {
  process.stdout.write(JSON.stringify(Object.assign({ ask: cmd }, args)) + '\n');
  return new Promise((resolve) => {
    if (answers.length) {
      resolve(answers.shift());
    } else {
      waiting = resolve;
    }
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function launch() {
  if (browserName === 'firefox') {
    const puppeteer = require(path.join(MODS, 'puppeteer-core'));
    const browser = await puppeteer.launch({
      browser: 'firefox', executablePath: '/usr/bin/firefox-esr', headless: true,
      protocol: 'webDriverBiDi',
    });
    return {
      browser,
      newContext: () => browser.createBrowserContext(),
      close: () => browser.close(),
    };
  }
  const { chromium } = require(path.join(MODS, 'playwright-core'));
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
                                          args: ['--no-sandbox'] });
  return {
    browser,
    newContext: () => browser.newContext(),
    close: () => browser.close(),
  };
}

async function open(ctx, user, opts) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => log.push(user + ' pageerror: ' + e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') {
      log.push(user + ' console: ' + m.text());
    }
  });
  await page.goto(pageUrl + '?chat=' + encodeURIComponent(chatUrl));
  await page.waitForFunction(() => window.ready === true, { timeout: T });
  await page.evaluate(({ user, opts }) => T.make(user, opts), { user, opts: opts || {} });
  return page;
}

function ev(page, fn, arg) {
  return page.evaluate(fn, arg);
}

// resolves once the client in `page` says state (and transport, if given)
function waitState(page, state, transport, ms = T) {
  return ev(page, ({ state, transport, ms }) => T.waitFor(() => {
    const i = T.client.info;
    return i.state === state && (!transport || i.transport === transport);
  }, ms).then(() => T.client.info), { state, transport, ms });
}

function waitBody(page, cid, body, ms = T) {
  // the time the message handler saw it (a background tab's timers are
  // throttled; its event handlers are not)
  return ev(page, ({ cid, body, ms }) => T.waitFor(() => {
    const m = T.client.messages(cid).find((x) => x.body === body && x.seq != null);
    return m ? T.arrivals[body] || Date.now() : null;
  }, ms), { cid, body, ms });
}

const log = [];
const out = { browser: browserName, steps: {} };

async function main() {
  const b = await launch();
  const ctxA = await b.newContext();
  const ctxB = await b.newContext();

  // -------- two users: message, ticks, typing
  const alice = await open(ctxA, 'alice');
  const bob = await open(ctxB, 'bob');
  await waitState(alice, 'connected');
  await waitState(bob, 'connected');
  const cid = await ev(alice, async () =>
    (await T.client.createConversation({ kind: 'direct', members: ['bob'] })).id);
  out.cid = cid;
  await ev(bob, (cid) => T.client.loadConversation(cid).then(() => true), cid);
  await ev(alice, (cid) => T.client.loadConversation(cid).then(() => true), cid);

  const s1 = {};
  await ev(alice, (cid) => T.client.typing(cid), cid);
  s1.typingSeen = await ev(bob, (cid) => T.waitFor(() => T.client.typingUsers(cid).includes('alice'))
    .then(() => true, () => false), cid);
  const sentAt = await ev(alice, (cid) => {
    const t = Date.now();
    T.sent1 = T.client.send(cid, 'hello bob');
    return t;
  }, cid);
  const gotAt = await waitBody(bob, cid, 'hello bob');
  s1.latencyMs = gotAt - sentAt;
  s1.typingCleared = await ev(bob, (cid) => T.waitFor(() => T.client.typingUsers(cid).length === 0)
    .then(() => true, () => false), cid);
  s1.stateAfterSend = await ev(alice, async () => (await T.sent1).state);
  s1.delivered = await ev(alice, (cid) => T.waitFor(() => {
    const m = T.client.messages(cid).find((x) => x.body === 'hello bob');
    return m && (m.state === 'delivered' || m.state === 'read');
  }).then(() => true, () => false), cid);
  await ev(bob, (cid) => T.client.markRead(cid), cid);
  s1.read = await ev(alice, (cid) => T.waitFor(() => {
    const m = T.client.messages(cid).find((x) => x.body === 'hello bob');
    return m && m.state === 'read';
  }).then(() => true, () => false), cid);
  s1.bobUnread = await ev(bob, (cid) => T.client.conversation(cid).unread_count, cid);
  await ev(bob, (cid) => T.client.send(cid, 'hi alice').then(() => true), cid);
  await waitBody(alice, cid, 'hi alice');

  // presence: alice asks for bob's; bob's page is hidden (away), then shown
  const setVisible = (v) => {
    Object.defineProperty(document, 'visibilityState', { value: v ? 'visible' : 'hidden',
                                                         configurable: true });
    document.dispatchEvent(new Event('visibilitychange'));
  };
  const presenceIs = (status) => T.waitFor(() => {
    const p = T.client.presence('bob');
    return p && p.status === status;
  }).then(() => true, () => false);
  await ev(alice, () => T.client.subscribePresence(['bob']));
  s1.online = await ev(alice, presenceIs, 'online');
  await ev(bob, setVisible, false);
  s1.away = await ev(alice, presenceIs, 'away');
  await ev(bob, setVisible, true);
  s1.back = await ev(alice, presenceIs, 'online');
  out.steps.chat = s1;

  // -------- three tabs of bob: one connection; the leader goes, nothing lost
  const s2 = {};
  const bob2 = await open(ctxB, 'bob');
  const bob3 = await open(ctxB, 'bob');
  const bobs = [bob, bob2, bob3];
  for (const p of bobs) {
    await waitState(p, 'connected');
  }
  s2.leaders = await Promise.all(bobs.map((p) => ev(p, () => T.client.leader)));
  s2.connections = (await ask('connections', { want: 2 })).n;   // alice's + bob's one
  for (let i = 1; i <= 3; i++) {
    await ev(alice, ({ cid, i }) => T.client.send(cid, 'tabs ' + i).then(() => true), { cid, i });
  }
  for (const p of bobs) {
    await waitBody(p, cid, 'tabs 3');
  }
  // the leader closes while alice goes on sending
  const leaderIdx = s2.leaders.indexOf(true);
  const rest = bobs.filter((p, i) => i !== leaderIdx);
  const sending = ev(alice, async (cid) => {
    for (let i = 1; i <= 8; i++) {
      await T.client.send(cid, 'switch ' + i);
      await new Promise((r) => setTimeout(r, 60));
    }
    return true;
  }, cid);
  await sleep(150);
  if (browserName === 'chromium') {
    // the leader's renderer crashes (no unload, no goodbye on the channel)
    const cdp = await ctxB.newCDPSession(bobs[leaderIdx]);
    cdp.send('Page.crash').catch(() => {});
    s2.leaderGone = 'crashed';
  } else {
    await bobs[leaderIdx].close();
    s2.leaderGone = 'closed';
  }
  await sending;
  for (const p of rest) {
    await waitBody(p, cid, 'switch 8', 20000);
  }
  s2.afterLeaders = await Promise.all(rest.map((p) => ev(p, () => T.client.leader)));
  // a read in one tab clears the badge in the others (the server does not
  // echo a read to the connection that sent it) and reaches alice
  s2.unreadBefore = await Promise.all(rest.map((p) => ev(p, (cid) =>
    T.client.conversation(cid).unread_count, cid)));
  const reader = s2.afterLeaders.indexOf(false);
  await ev(rest[reader], (cid) => T.client.markRead(cid), cid);
  s2.unreadAfter = await Promise.all(rest.map((p) => ev(p, (cid) => T.waitFor(() =>
    T.client.conversation(cid).unread_count === 0, 5000).then(() => 0,
    () => T.client.conversation(cid).unread_count), cid)));
  s2.aliceRead = await ev(alice, (cid) => T.waitFor(() => {
    const m = T.client.messages(cid).find((x) => x.body === 'switch 8');
    return m && m.state === 'read';
  }).then(() => true, () => false), cid);
  s2.tabs = await Promise.all(rest.map((p) => ev(p, (cid) => ({
    counts: T.newCounts(cid), bodies: T.bodies(cid),
  }), cid)));
  for (const p of rest) {
    await waitState(p, 'connected');
  }
  s2.connectionsAfter = (await ask('connections', { want: 2 })).n;
  out.steps.tabs = s2;

  // -------- offline: the chat server stops; alice types three messages,
  // reloads the page with them in the outbox, the server comes back
  const s3 = {};
  await ask('stop');
  s3.banner = await ev(alice, () => T.waitFor(() =>
    ['retrying', 'offline'].includes(T.client.info.state) && T.client.info.text));
  await ev(alice, (cid) => {
    for (const b of ['offline 1', 'offline 2', 'offline 3']) {
      T.client.send(cid, b).catch(() => {});
    }
    return true;
  }, cid);
  s3.pendingBeforeReload = await ev(alice, (cid) => T.client.messages(cid)
    .filter((m) => m.seq == null).map((m) => [m.body, m.state]), cid);
  await sleep(300);               // IndexedDB writes are done before send() returns its promise
  await alice.reload();
  await alice.waitForFunction(() => window.ready === true, { timeout: T });
  await ev(alice, () => T.make('alice'));
  s3.pendingAfterReload = await ev(alice, (cid) => T.waitFor(() => {
    const p = T.client.messages(cid).filter((m) => m.seq == null);
    return p.length === 3 ? p.map((m) => [m.body, m.state]) : null;
  }, 5000).catch(() => T.client.messages(cid).filter((m) => m.seq == null)
    .map((m) => [m.body, m.state])), cid);
  await ask('start');
  await waitBody(alice, cid, 'offline 3', 30000);
  for (const p of rest) {
    await waitBody(p, cid, 'offline 3', 20000);
  }
  s3.alice = await ev(alice, (cid) => T.client.messages(cid).map((m) => [m.body, m.seq, m.state]),
                      cid);
  s3.bobTabs = await Promise.all(rest.map((p) => ev(p, (cid) => ({
    counts: T.newCounts(cid), bodies: T.bodies(cid),
  }), cid)));
  out.steps.offline = s3;

  // -------- WebSocket refused by a "proxy": SSE, then long-poll, then back
  const s4 = { phases: [] };
  const users = [alice, ...rest];
  async function exchange(tag) {
    const ph = { tag };
    ph.transports = await Promise.all(users.map((p) => ev(p, () => T.client.info.transport)));
    await ev(alice, (cid) => T.client.typing(cid), cid);
    ph.typing = await ev(rest[0], (cid) => T.waitFor(() => T.client.typingUsers(cid)
      .includes('alice')).then(() => true, () => false), cid);
    const t0 = await ev(alice, ({ cid, tag }) => {
      T.client.send(cid, tag + ' from alice');
      return Date.now();
    }, { cid, tag });
    ph.latencyMs = (await waitBody(rest[0], cid, tag + ' from alice')) - t0;
    await ev(rest[1], ({ cid, tag }) => T.client.send(cid, tag + ' from bob').then(() => true),
             { cid, tag });
    await waitBody(alice, cid, tag + ' from bob');
    for (const p of rest) {
      await waitBody(p, cid, tag + ' from bob');
    }
    s4.phases.push(ph);
  }
  await ask('block', { ws: true, sse: false });
  await waitState(alice, 'connected', 'sse', 20000);
  for (const p of rest) {
    await waitState(p, 'connected', 'sse', 20000);
  }
  await exchange('sse');
  await ask('block', { ws: true, sse: true });
  await waitState(alice, 'connected', 'poll', 20000);
  for (const p of rest) {
    await waitState(p, 'connected', 'poll', 20000);
  }
  await exchange('poll');
  await ask('block', { ws: false, sse: false });
  await waitState(alice, 'connected', 'websocket', 30000);
  for (const p of rest) {
    await waitState(p, 'connected', 'websocket', 30000);
  }
  await exchange('websocket');
  s4.alice = await ev(alice, (cid) => ({ counts: T.newCounts(cid), bodies: T.bodies(cid) }), cid);
  s4.bobTabs = await Promise.all(rest.map((p) => ev(p, (cid) => ({
    counts: T.newCounts(cid), bodies: T.bodies(cid),
  }), cid)));
  s4.aliceStates = await ev(alice, () => T.states.map((s) => s[0] + '/' + s[1]));
  out.steps.fallback = s4;

  // -------- close() leaves nothing behind
  out.steps.close = await closeCheck(ctxA);

  // -------- tokens that live 6 s: refreshed on the open WebSocket; a
  // refresh refused: closed 4001, and back once a token comes again
  const s5 = {};
  const ctxD = await b.newContext();
  const dave = await ctxD.newPage();
  await dave.goto(pageUrl + '?chat=' + encodeURIComponent(chatUrl));
  await dave.waitForFunction(() => window.ready === true, { timeout: T });
  await ev(dave, (secret) => { T.secret = secret; }, process.env.CHAT_TEST_SECRET);
  await ev(dave, () => T.make('dave', { ttl: 6 }));
  await waitState(dave, 'connected');
  const gid = await ev(dave, async () =>
    (await T.client.createConversation({ kind: 'group', members: ['alice'], title: 'tokens' })).id);
  await sleep(15000);
  s5.refresh = await ev(dave, () => ({ sockets: T.sockets, tokenCalls: T.tokenCalls,
                                       states: T.states.map((x) => x[0]) }));
  await ev(dave, (gid) => T.client.send(gid, 'after refreshes').then(() => true), gid);
  // the provider now gives the token it has (about to expire) again
  await ev(dave, () => T.client._token(false).then((t) => { T.frozen = t; }));
  await ev(dave, () => T.waitFor(() => T.client.info.state === 'retrying', 20000));
  s5.expired = await ev(dave, () => ({ info: T.client.info, states: T.states.map((x) => x[0]) }));
  await ev(dave, (gid) => { T.client.send(gid, 'while expired'); return true; }, gid);
  await ev(dave, () => { T.frozen = null; });
  await waitState(dave, 'connected', null, 20000);
  await ev(dave, (gid) => T.waitFor(() => T.client.messages(gid).some((m) =>
    m.body === 'while expired' && m.seq != null), 15000), gid);
  s5.after = await ev(dave, (gid) => ({ sockets: T.sockets, closes: T.closes,
    bodies: T.client.messages(gid).map((m) => [m.body, m.state]) }), gid);
  out.steps.auth = s5;

  if (browserName === 'chromium') {
    out.steps.bgsync = await backgroundSync(b);
  }

  out.log = log;
  await b.close();
}

// Background Sync: frank types two messages while the chat server is down
// and closes his only tab; the server comes back and the browser fires the
// sync (here through the DevTools protocol, as it would when the network
// returns): client/chat-sw.js sends them, no page of the chat open.
async function backgroundSync(b) {
  const r = {};
  const ctx = await b.newContext();
  const page = await ctx.newPage();
  await page.goto(pageUrl + '?chat=' + encodeURIComponent(chatUrl));
  await page.waitForFunction(() => window.ready === true, { timeout: T });
  r.active = await ev(page, async () => {
    const reg = await navigator.serviceWorker.register('/client/chat-sw.js');
    await T.waitFor(() => reg.active, 10000);
    T.reg = reg;
    return !!reg.sync;
  });
  await ev(page, () => T.make('frank', { serviceWorker: T.reg }));
  await waitState(page, 'connected');
  const cid = await ev(page, async () =>
    (await T.client.createConversation({ kind: 'group', members: ['alice'], title: 'bg' })).id);
  r.cid = cid;
  await ask('stop');
  await ev(page, () => T.waitFor(() => T.client.info.state !== 'connected'));
  await ev(page, async (cid) => {
    T.client.send(cid, 'bg 1').catch(() => {});
    T.client.send(cid, 'bg 2').catch(() => {});
    await new Promise((res) => setTimeout(res, 500));
  }, cid);
  await page.close();
  await ask('start');
  const blank = await ctx.newPage();
  await blank.goto(pageUrl);
  const cdp = await ctx.newCDPSession(blank);
  const regs = [];
  cdp.on('ServiceWorker.workerRegistrationUpdated', (e) => regs.push(...e.registrations));
  await cdp.send('ServiceWorker.enable');
  for (let i = 0; i < 50 && !regs.some((x) => !x.isDeleted); i++) {
    await sleep(100);
  }
  const reg = regs.find((x) => !x.isDeleted);
  await cdp.send('ServiceWorker.dispatchSyncEvent', {
    origin: new URL(pageUrl).origin, registrationId: reg.registrationId,
    tag: 'ngx-chat-outbox', lastChance: false,
  });
  r.stored = (await ask('bodies', { cid, want: 2 })).bodies;
  r.outboxLeft = await ev(blank, () => new Promise((resolve) => {
    const dbs = indexedDB.databases ? indexedDB.databases() : Promise.resolve([]);
    dbs.then(async (list) => {
      let n = 0;
      for (const d of list) {
        if (!d.name.endsWith(':frank')) {
          continue;
        }
        const db = await new Promise((ok) => { const q = indexedDB.open(d.name); q.onsuccess = () => ok(q.result); });
        n += await new Promise((ok) => {
          const q = db.transaction('outbox').objectStore('outbox').count();
          q.onsuccess = () => ok(q.result);
        });
        db.close();
      }
      resolve(n);
    });
  }));
  await ctx.close();
  return r;
}

// A fresh page counts timers, listeners, sockets, channels and fetches
// made after the client was created, then closes it.
async function closeCheck(ctx) {
  const page = await ctx.newPage();
  await page.goto(pageUrl + '?chat=' + encodeURIComponent(chatUrl));
  await page.waitForFunction(() => window.ready === true, { timeout: T });
  return page.evaluate(async () => {
    const live = { timeouts: new Set(), intervals: new Set(), listeners: 0, ws: [], es: [],
                   bc: [], fetches: 0 };
    const st = window.setTimeout;
    const ct = window.clearTimeout;
    const si = window.setInterval;
    const ci = window.clearInterval;
    window.setTimeout = (fn, ms, ...a) => {
      const id = st(() => { live.timeouts.delete(id); fn(...a); }, ms);
      live.timeouts.add(id);
      return id;
    };
    window.clearTimeout = (id) => { live.timeouts.delete(id); ct(id); };
    window.setInterval = (fn, ms, ...a) => {
      const id = si(fn, ms, ...a);
      live.intervals.add(id);
      return id;
    };
    window.clearInterval = (id) => { live.intervals.delete(id); ci(id); };
    for (const target of [window, document]) {
      const add = target.addEventListener.bind(target);
      const rm = target.removeEventListener.bind(target);
      target.addEventListener = (t, fn, o) => { live.listeners++; add(t, fn, o); };
      target.removeEventListener = (t, fn, o) => { live.listeners--; rm(t, fn, o); };
    }
    const W = window.WebSocket;
    window.WebSocket = class extends W {
      constructor(...a) { super(...a); live.ws.push(this); }
    };
    const E = window.EventSource;
    window.EventSource = class extends E {
      constructor(...a) { super(...a); live.es.push(this); }
    };
    const B = window.BroadcastChannel;
    window.BroadcastChannel = class extends B {
      constructor(...a) { super(...a); this.__open = true; live.bc.push(this); }
      close() { this.__open = false; return super.close(); }
    };
    const F = window.fetch;
    window.fetch = (...a) => { live.fetches++; return F(...a); };

    await T.make('erin');
    await T.waitFor(() => T.client.info.state === 'connected');
    const c = T.client;
    const conv = await c.createConversation({ kind: 'group', members: ['alice'], title: 'close' });
    await c.send(conv.id, 'before close');
    c.typing(conv.id);
    c.markRead(conv.id);
    c.subscribePresence(['alice']);
    await new Promise((r) => setTimeout(r, 300));
    const before = { timeouts: live.timeouts.size, intervals: live.intervals.size,
                     listeners: live.listeners };
    await c.close();
    await new Promise((r) => st(r, 1500));
    const fetchesAtClose = live.fetches;
    await new Promise((r) => st(r, 1500));
    const locks = navigator.locks ? await navigator.locks.query() : { held: [] };
    return {
      before,
      timeouts: live.timeouts.size,
      intervals: live.intervals.size,
      listeners: live.listeners,
      emitter: c.ev.listeners(),
      sockets: live.ws.map((w) => w.readyState),
      streams: live.es.map((e) => e.readyState),
      channels: live.bc.filter((x) => x.__open).length,
      fetchesAfterClose: live.fetches - fetchesAtClose,
      locksHeld: locks.held.filter((l) => l.name.startsWith('ngx-chat') && l.name.endsWith('|erin'))
        .length,
      state: c.info.state,
    };
  });
}

main().then(() => {
  process.stdout.write(JSON.stringify({ result: out }) + '\n');
  process.exit(0);
}, (e) => {
  out.error = String(e && e.stack || e);
  out.log = log;
  process.stdout.write(JSON.stringify({ result: out }) + '\n');
  process.exit(1);
});
