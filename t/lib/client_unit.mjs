// Unit tests of client/chat.js in node (no browser, no server): the
// ChatStore's state logic, backoffDelay, errorText, and ChatClient's outbox
// and transports against an in-memory fake of the server (globalThis.fetch
// and globalThis.WebSocket replaced).  Prints TAP; run by t/110-client-unit.t.
//
// Node 20 lacks what a browser has; chat.js copes with: no indexedDB
// (storage: false), no navigator / document / localStorage /
// sessionStorage / location (an absolute url).  Stubs this file adds:
// globalThis.fetch and globalThis.WebSocket (the fakes below) and, for the
// `online` test, globalThis.addEventListener / removeEventListener (an
// EventTarget), removed again afterwards.

import { fileURLToPath, pathToFileURL } from 'node:url';
import path from 'node:path';
import util from 'node:util';
import assert from 'node:assert';

const HERE = path.dirname(fileURLToPath(import.meta.url));
// CHAT_JS=<file> tests another copy (e.g. a mutated one, to see the tests catch it)
const CHAT_JS = process.env.CHAT_JS || path.resolve(HERE, '..', '..', 'client', 'chat.js');
const T0 = Date.now();

// ------------------------------------------------------------------ TAP

let n = 0;
let failed = 0;

function out(line) { process.stdout.write(line + '\n'); }
function diag(...lines) {
  for (const l of lines) {
    for (const s of String(l).split('\n')) {
      process.stderr.write('# ' + s + '\n');
    }
  }
}
function note(s) { out('# ' + s); }
function fmt(v) { return util.inspect(v, { depth: 4, breakLength: 120 }); }
function where() {
  const st = new Error().stack.split('\n').slice(3).find((l) => l.includes('client_unit.mjs'));
  return st ? st.trim().replace(/^at /, '').replace(/^.*\((.*)\)$/, '$1') : '?';
}

function ok(cond, name) {
  n++;
  name = String(name).replace(/\n/g, ' ').replace(/#/g, '\\#');
  if (cond) {
    out('ok ' + n + ' - ' + name);
  } else {
    failed++;
    out('not ok ' + n + ' - ' + name);
    diag("  Failed test '" + name + "'", '  at ' + where());
  }
  return !!cond;
}

function is(got, expected, name) {
  let same = true;
  try {
    assert.deepStrictEqual(got, expected);
  } catch (e) {
    same = false;
  }
  const r = ok(same, name);
  if (!r) {
    diag('         got: ' + fmt(got), '    expected: ' + fmt(expected));
  }
  return r;
}

function between(v, lo, hi, name) {
  const r = ok(typeof v === 'number' && v >= lo && v <= hi, name);
  if (!r) {
    diag('         got: ' + fmt(v), '    expected: within [' + lo + ', ' + hi + ']');
  }
  return r;
}

async function rejectsWith(p, code, name) {
  try {
    const v = await p;
    ok(false, name);
    diag('    resolved with ' + fmt(v) + ', expected a rejection with code ' + code);
    return null;
  } catch (e) {
    const r = ok(e && e.code === code, name);
    if (!r) {
      diag('    rejected with ' + fmt(e && { code: e.code, message: e.message }));
    }
    return e;
  }
}

// a section: its exceptions are one failed test, the others go on
async function section(title, fn) {
  note(title);
  try {
    await fn();
  } catch (e) {
    ok(false, title + ': ran to its end');
    diag('    threw: ' + (e && e.stack ? e.stack : fmt(e)));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond, ms, step = 5) {
  const end = Date.now() + ms;
  for (;;) {
    let v;
    try {
      v = cond();
    } catch (e) {
      v = false;
    }
    if (v) {
      return v;
    }
    if (Date.now() >= end) {
      return false;
    }
    await sleep(step);
  }
}

// settles with { ok, value | error } and never rejects unhandled
function track(p) {
  const t = { settled: false, ok: null, value: undefined, error: undefined };
  t.promise = p.then((v) => { t.settled = true; t.ok = true; t.value = v; return t; },
                     (e) => { t.settled = true; t.ok = false; t.error = e; return t; });
  return t;
}

const unhandled = [];
process.on('unhandledRejection', (e) => { unhandled.push(e); });
const warnings = [];
process.on('warning', (w) => { warnings.push(w); });

// ---------------------------------------------------------- fixtures

const iso = (s) => new Date(Date.UTC(2024, 0, 1, 12, 0, s)).toISOString();

function b64url(o) { return Buffer.from(JSON.stringify(o), 'utf8').toString('base64url'); }

function jwt(claims) {
  return b64url({ alg: 'HS256', typ: 'JWT' }) + '.' + b64url(claims) + '.c2ln';
}

// one hour: "far" for a test; see the token refresh test for years
const JWT = jwt({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 3600 });

function smsg(cid, seq, sender, extra = {}) {
  return Object.assign({
    id: cid + '-m' + seq, conversation_id: cid, seq, sender, created_at: iso(seq),
    client_msg_id: sender + '-' + cid + '-' + seq, body: 'text ' + seq, format: 'text',
    reply_to: null, attachments: [], edited_at: null, deleted: false,
  }, extra);
}

function sconv(id, members, extra = {}) {
  return Object.assign({
    id, kind: members.length === 2 ? 'direct' : 'group', title: null, context: null, members,
    last_seq: 0, created_at: iso(0), unread_count: 0, last_message: null,
  }, extra);
}

const clone = (o) => JSON.parse(JSON.stringify(o));
const seqs = (list) => list.map((m) => m.seq);
const bodies = (list) => list.map((m) => m.body);

// ------------------------------------------------------- fake server

class FakeServer {
  constructor() {
    this.down = false;
    this.log = [];            // every fetch: { t, method, path, query, url }
    this.polls = [];          // every poll: { url, query, signal }
    this.held = new Set();    // held polls
    this.convs = new Map();   // id -> { id, kind, members, created_at, last_seq }
    this.msgs = new Map();    // id -> [messages]
    this.byKey = new Map();   // sender|cmid -> message
    this.read = new Map();    // cid|user -> read seq
    this.events = [];         // durable log, index i has cursor 'k'+(i+1)
    this.posts = [];          // every POST /messages body
    this.fail503 = 0;         // next n sends: 503 unavailable
    this.reject = null;       // body regexp: 400 bad_request
    this.gates = [];          // { match(method, path), promise }
    this.sockets = [];        // every FakeWebSocket made
    this.wsRefuse = false;    // upgrades fail (1006 without a welcome)
    this.wsDropAfterStore = 0; // next n WS sends: stored, then the socket drops
    this.tickets = 0;
    this.nid = 0;
  }

  addConv(id, members, createdSec = 0) {
    this.convs.set(id, { id, kind: members.length === 2 ? 'direct' : 'group', title: null,
                         context: null, members, created_at: iso(createdSec), last_seq: 0,
                         created_by: members[0] });
    this.msgs.set(id, []);
  }

  now() { return 'k' + this.events.length; }

  publish(event) {
    this.events.push(event);
    const env = { type: 'event', cursor: 'k' + this.events.length, event };
    for (const h of [...this.held]) {
      this.held.delete(h);
      h.answer();
    }
    for (const ws of this.sockets) {
      if (ws.readyState === 1 && ws.live) {
        ws._deliver(env);
      }
    }
    return env.cursor;
  }

  // events after a cursor, as the server sends them
  after(cursor) {
    const i = cursor ? Number(String(cursor).slice(1)) : this.events.length;
    return this.events.slice(i).map((event, j) => ({ type: 'event', cursor: 'k' + (i + j + 1),
                                                     event: clone(event) }));
  }

  store(sender, cid, args) {
    const key = sender + '|' + args.client_msg_id;
    if (args.client_msg_id && this.byKey.has(key)) {
      return { message: this.byKey.get(key), created: false };
    }
    const c = this.convs.get(cid);
    c.last_seq++;
    const m = { id: 'm' + (++this.nid), conversation_id: cid, seq: c.last_seq, sender,
                created_at: new Date().toISOString(), client_msg_id: args.client_msg_id || null,
                body: args.body, format: args.format || 'text', reply_to: args.reply_to || null,
                attachments: [], edited_at: null, deleted: false };
    this.msgs.get(cid).push(m);
    this.byKey.set(key, m);
    this.read.set(cid + '|' + sender, c.last_seq);
    return { message: m, created: true };
  }

  // another member writes
  post(sender, cid, body) {
    const m = this.store(sender, cid, { client_msg_id: 'post-' + (++this.nid), body }).message;
    const cursor = this.publish({ kind: 'message.new', conversation_id: cid, seq: m.seq,
                                  message: clone(m) });
    return { m, cursor };
  }

  convFor(id, user) {
    const c = this.convs.get(id);
    const list = this.msgs.get(id);
    const rs = this.read.get(id + '|' + user) || 0;
    return Object.assign(clone(c), {
      last_message: list.length ? clone(list[list.length - 1]) : null,
      unread_count: list.filter((m) => m.seq > rs && m.sender !== user && !m.deleted).length,
    });
  }

  stored(cid) { return this.msgs.get(cid).map((m) => m.body); }

  setDown(down) {
    this.down = down;
    if (down) {
      for (const h of [...this.held]) {
        this.held.delete(h);
        h.fail(new TypeError('fetch failed'));
      }
      for (const ws of this.sockets) {
        if (ws.readyState === 1) {
          ws._serverClose(1006, '');
        }
      }
    }
  }

  gate(method, re) {
    let open;
    const g = { method, re, promise: new Promise((r) => { open = r; }) };
    g.open = () => { this.gates = this.gates.filter((x) => x !== g); open(); };
    this.gates.push(g);
    return g;
  }

  fetches(method, re) { return this.log.filter((r) => r.method === method && re.test(r.path)); }

  // --------------------------------------------------------- HTTP
  async fetch(input, init = {}) {
    const url = new URL(String(input));
    const method = (init.method || 'GET').toUpperCase();
    const rec = { t: Date.now(), method, path: url.pathname, query: url.searchParams,
                  url: url.href };
    this.log.push(rec);
    if (this.down) {
      throw new TypeError('fetch failed');
    }
    const auth = (init.headers && init.headers.Authorization) || '';
    const m = /^Bearer ([^.]+)\.([^.]+)\./.exec(auth);
    if (!m) {
      return json(401, { error: { code: 'unauthorized', message: 'no token' } });
    }
    const user = JSON.parse(Buffer.from(m[2], 'base64url').toString('utf8')).sub;
    const body = typeof init.body === 'string' ? JSON.parse(init.body) : undefined;
    const p = url.pathname;
    let ans;
    let m2;
    if (method === 'GET' && p === '/chat/poll') {
      return this._poll(url, init.signal);
    }
    if (method === 'POST' && p === '/chat/api/tickets') {
      ans = json(200, { ticket: 'tk' + (++this.tickets), expires_in: 30 });
    } else if (method === 'GET' && p === '/chat/api/conversations') {
      ans = json(200, { conversations: [...this.convs.keys()].map((id) => this.convFor(id, user)),
                        next: null });
    } else if ((m2 = /^\/chat\/api\/conversations\/([^/]+)$/.exec(p)) && method === 'GET') {
      const id = decodeURIComponent(m2[1]);
      const c = this.convFor(id, user);
      c.receipts = c.members.map((u) => ({ user: u, delivered_seq: this.read.get(id + '|' + u) || 0,
                                           read_seq: this.read.get(id + '|' + u) || 0 }));
      ans = json(200, { conversation: c });
    } else if ((m2 = /^\/chat\/api\/conversations\/([^/]+)\/messages$/.exec(p)) && method === 'GET') {
      const id = decodeURIComponent(m2[1]);
      const limit = Number(url.searchParams.get('limit') || 50);
      let list = this.msgs.get(id).slice();
      if (url.searchParams.has('after_seq')) {
        list = list.filter((x) => x.seq > Number(url.searchParams.get('after_seq'))).slice(0, limit);
      } else {
        if (url.searchParams.has('before_seq')) {
          list = list.filter((x) => x.seq < Number(url.searchParams.get('before_seq')));
        }
        list = list.reverse().slice(0, limit);
      }
      ans = json(200, { messages: clone(list), next: null });
    } else if ((m2 = /^\/chat\/api\/conversations\/([^/]+)\/messages$/.exec(p)) && method === 'POST') {
      const id = decodeURIComponent(m2[1]);
      this.posts.push(clone(body));
      if (this.fail503 > 0) {
        this.fail503--;
        ans = json(503, { error: { code: 'unavailable', message: 'store down',
                                   retry_after_ms: 30 } });
      } else if (this.reject && this.reject.test(body.body)) {
        ans = json(400, { error: { code: 'bad_request', message: 'body refused' } });
      } else {
        const r = this.store(user, id, body);
        if (r.created) {
          this.publish({ kind: 'message.new', conversation_id: id, seq: r.message.seq,
                         message: clone(r.message) });
        }
        ans = json(r.created ? 201 : 200, { message: clone(r.message) });
      }
    } else if ((m2 = /^\/chat\/api\/conversations\/([^/]+)\/(read|typing)$/.exec(p))
               && method === 'POST') {
      ans = new Response(null, { status: 204 });
    } else {
      ans = json(404, { error: { code: 'not_found', message: 'no such thing' } });
    }
    for (const g of this.gates) {
      if (g.method === method && g.re.test(p)) {
        await g.promise;
      }
    }
    return ans;
  }

  _poll(url, signal) {
    const rec = { url: url.href, query: url.searchParams, signal };
    this.polls.push(rec);
    const cursor = url.searchParams.get('cursor') || this.now();
    const timeout = Number(url.searchParams.get('timeout_ms'));
    return new Promise((resolve, reject) => {
      const h = {
        answer: () => {
          const events = this.after(cursor);
          resolve(json(200, { events, cursor: events.length ? events[events.length - 1].cursor
                                                              : cursor }));
        },
        fail: (e) => reject(e),
      };
      if (signal) {
        if (signal.aborted) {
          reject(new DOMException('aborted', 'AbortError'));
          return;
        }
        signal.addEventListener('abort', () => {
          this.held.delete(h);
          reject(new DOMException('The operation was aborted.', 'AbortError'));
        });
      }
      if (timeout === 0 || this.after(cursor).length) {
        h.answer();
      } else {
        this.held.add(h);     // until an event or the abort (no timeout: tests are short)
      }
    });
  }
}

function json(status, obj) {
  return new Response(JSON.stringify(obj), { status,
                                             headers: { 'Content-Type': 'application/json' } });
}

// ---------------------------------------------------- fake WebSocket

function makeWebSocket(server) {
  return class FakeWebSocket {
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.readyState = 0;
      this.sent = [];
      this.live = false;
      this.queue = [];
      this.closedWith = undefined;
      this.onmessage = this.onclose = this.onerror = this.onopen = null;
      const u = new URL(url);
      this.query = u.searchParams;
      server.sockets.push(this);
      setTimeout(() => {
        if (this.readyState !== 0) {
          return;
        }
        if (server.down || server.wsRefuse) {
          this._serverClose(1006, '');
          return;
        }
        this.readyState = 1;
        if (this.onopen) {
          this.onopen({});
        }
        const cursor = this.query.get('cursor') || server.now();
        this._deliver({ type: 'welcome', cursor, session_id: 's' + server.sockets.length,
                        heartbeat_ms: 30000, user: { id: 'alice', name: 'alice', role: 'user' } });
        for (const ev of server.after(cursor)) {
          this._deliver(ev);
        }
        this.live = true;
      }, 1);
    }

    // frames arrive later and in order, like a socket's
    _deliver(obj) {
      if (this.readyState !== 1) {
        return;
      }
      this.queue.push(JSON.stringify(obj));
      if (this.queue.length === 1) {
        setTimeout(() => this._drain(), 1);
      }
    }

    _drain() {
      const q = this.queue;
      this.queue = [];
      for (const data of q) {
        if (this.readyState !== 1) {
          return;
        }
        if (this.onmessage) {
          this.onmessage({ data });
        }
      }
    }

    _serverClose(code, reason) {
      this.readyState = 3;
      this.queue = [];
      if (this.onclose) {
        this.onclose({ code, reason, wasClean: false });
      }
    }

    send(data) {
      if (this.readyState !== 1) {
        throw new Error('InvalidStateError');
      }
      const m = JSON.parse(data);
      this.sent.push(m);
      if (m.type === 'send') {
        if (server.fail503 > 0) {
          server.fail503--;
          this._deliver({ type: 'reply', id: m.id, ok: false,
                          error: { code: 'unavailable', message: 'store down', retry_after_ms: 30 } });
          return;
        }
        if (server.reject && server.reject.test(m.body)) {
          this._deliver({ type: 'reply', id: m.id, ok: false,
                          error: { code: 'bad_request', message: 'body refused' } });
          return;
        }
        server.posts.push(clone(m));
        const r = server.store('alice', m.conversation_id, m);
        if (server.wsDropAfterStore > 0) {
          // stored and committed; the connection is gone before the reply
          server.wsDropAfterStore--;
          this.readyState = 3;
          this.queue = [];
          setTimeout(() => this._serverClose(1006, ''), 2);
        } else {
          this._deliver({ type: 'reply', id: m.id, ok: true, result: { message: clone(r.message) } });
        }
        if (r.created) {
          server.publish({ kind: 'message.new', conversation_id: m.conversation_id,
                           seq: r.message.seq, message: clone(r.message) });
        }
      } else if (m.type === 'ping') {
        this._deliver({ type: 'pong', id: m.id });
      } else if (m.id) {
        this._deliver({ type: 'reply', id: m.id, ok: true, result: {} });
      }
    }

    close(code) {
      this.closedWith = code === undefined ? null : code;
      this.readyState = 3;
      this.queue = [];
    }
  };
}

// ----------------------------------------------------- client setup

const saved = { fetch: globalThis.fetch, WebSocket: globalThis.WebSocket };

function install(server) {
  globalThis.fetch = (input, init) => server.fetch(input, init);
  globalThis.WebSocket = makeWebSocket(server);
}

function uninstall() {
  globalThis.fetch = saved.fetch;
  if (saved.WebSocket === undefined) {
    delete globalThis.WebSocket;
  } else {
    globalThis.WebSocket = saved.WebSocket;
  }
}

let chat;   // the module

function newClient(opts = {}) {
  const tokenCalls = [];
  const token = opts.jwt || JWT;
  const c = new chat.ChatClient(Object.assign({
    url: 'http://chat.test/chat',
    token: async (force) => { tokenCalls.push(force); return token; },
    shareConnection: false, storage: false, transports: ['poll'],
    backoffBase: 10, backoffCap: 50, probeIntervalMs: 60000,
  }, opts));
  c.tokenCalls = tokenCalls;
  const states = [];
  c.on('state', (s) => states.push(s));
  c.states = states;
  return c;
}

const connected = (c) => c.info.state === 'connected';

// what close() must leave: nothing running, nothing fetched after
async function checkClosed(c, server, what) {
  const t = Date.now();
  await c.close();
  is(c._timers.size, 0, what + ': close() leaves no timer of the client');
  is(c.listenerCount, 0, what + ': close() leaves listenerCount 0');
  is(c.info.state, 'closed', what + ': state closed');
  await sleep(200);
  const after = server.log.filter((r) => r.t > t + 5);
  is(after.map((r) => r.method + ' ' + r.path), [],
     what + ': no fetch within 200 ms after close()');
}

// ===================================================================
//                                 tests
// ===================================================================

async function storeTests() {
  const { ChatStore } = chat;

  await section('ChatStore: one message per id and own client_msg_id', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('c1', ['alice', 'bob']));
    const p = s.addPending({ conversation_id: 'c1', client_msg_id: 'k1', body: 'hi',
                             created_at: iso(1) });
    is([p.state, p.seq, p.id], ['sending', null, null], 'addPending: state sending, no seq, no id');
    is(s.messages('c1').length, 1, 'the pending message is listed');
    const srv = smsg('c1', 1, 'alice', { id: 'm1', client_msg_id: 'k1', body: 'hi' });
    const r1 = s.applyMessage(clone(srv), {});
    is(s.messages('c1').length, 1, 'reply to the send: still one message');
    ok(r1.msg === p, 'reply merged into the pending object (the UI keeps its element)');
    is([r1.msg.id, r1.msg.seq, r1.msg.state], ['m1', 1, 'sent'], 'reply: id and seq, state sending -> sent');
    const r2 = s.applyMessage(clone(srv), { live: true });
    is(s.messages('c1').map((m) => m.id), ['m1'], 'then its message.new event: still one message');
    is([r2.isNew, r2.gap, r2.msg.state], [false, null, 'sent'], 'the event is not new, no gap, state sent');

    // event before the reply
    s.addPending({ conversation_id: 'c1', client_msg_id: 'k2', body: 'two', created_at: iso(2) });
    const srv2 = smsg('c1', 2, 'alice', { id: 'm2', client_msg_id: 'k2', body: 'two' });
    s.applyMessage(clone(srv2), { live: true });
    s.applyMessage(clone(srv2), {});
    is(s.messages('c1').map((m) => [m.id, m.state]), [['m1', 'sent'], ['m2', 'sent']],
       'event first, reply second: one message, sent');
    s.addPending({ conversation_id: 'c1', client_msg_id: 'k1', body: 'hi', created_at: iso(1) });
    is(s.messages('c1').length, 2, 'addPending again for a stored client_msg_id adds nothing');
    // someone else may use the same client_msg_id (it is per sender)
    s.addPending({ conversation_id: 'c1', client_msg_id: 'k3', body: 'mine', created_at: iso(3) });
    s.applyMessage(smsg('c1', 3, 'bob', { id: 'b3', client_msg_id: 'k3', body: 'his' }), { live: true });
    is(s.messages('c1').map((m) => [m.sender, m.body, m.seq]),
       [['alice', 'hi', 1], ['alice', 'two', 2], ['bob', 'his', 3], ['alice', 'mine', null]],
       "bob's message with my pending client_msg_id is not taken for mine");
  });

  await section('ChatStore: order by seq, pending last in the order typed', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('c1', ['alice', 'bob']));
    // history pages newest first, the newer page first, then the older
    for (let q = 10; q >= 6; q--) s.applyMessage(smsg('c1', q, 'bob'), {});
    for (let q = 5; q >= 1; q--) s.applyMessage(smsg('c1', q, 'bob'), {});
    is(seqs(s.messages('c1')), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'history pages out of order: by seq');
    const s2 = new ChatStore('alice');
    for (const q of [7, 3, 9, 1, 10, 2, 8, 4, 6, 5]) s2.applyMessage(smsg('c2', q, 'bob'), {});
    is(seqs(s2.messages('c2')), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'shuffled arrival: by seq');
    is(s2.range('c2'), { first: 1, last: 10 }, 'range(): first and last seq held');
    s.addPending({ conversation_id: 'c1', client_msg_id: 'ka', body: 'typed first', created_at: iso(20) });
    s.addPending({ conversation_id: 'c1', client_msg_id: 'kb', body: 'typed second', created_at: iso(21) });
    s.applyMessage(smsg('c1', 11, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 12, 'bob'), { live: true });
    is(s.messages('c1').slice(-4).map((m) => m.seq === null ? m.body : m.seq),
       [11, 12, 'typed first', 'typed second'], 'live events go before the pending ones, which keep the typed order');
    // the second is stored first
    s.applyMessage(smsg('c1', 13, 'alice', { client_msg_id: 'kb', body: 'typed second' }), {});
    is(s.messages('c1').slice(-3).map((m) => m.seq === null ? m.body : m.seq), [12, 13, 'typed first'],
       'a pending message stored goes to its seq, the unsent stays last');
  });

  await section('ChatStore: gaps', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('c1', ['alice', 'bob']));
    for (let q = 1; q <= 5; q++) s.applyMessage(smsg('c1', q, 'bob'), {});
    is(s.applyMessage(smsg('c1', 6, 'bob'), { live: true }).gap, null, 'live seq last+1: no gap');
    is(s.applyMessage(smsg('c1', 9, 'bob'), { live: true }).gap, { after: 6, before: 9 },
       'live seq 9 with 6 held: gap {after: 6, before: 9}');
    is(s.applyMessage(smsg('c1', 9, 'bob'), { live: true }).gap, null, 'the same event again: no gap');
    is(s.applyMessage(smsg('c1', 10, 'bob'), { live: true }).gap, null, 'live 10 after 9: no gap');
    is(s.applyMessage(smsg('c1', 20, 'bob'), {}).gap, null, 'a history merge far ahead: no gap');
    is(s.applyMessage(smsg('c1', 3, 'bob', { body: 'x' }), { live: true }).gap, null,
       'a live event for an older seq: no gap');
    const e = new ChatStore('alice');
    is(e.applyMessage(smsg('c3', 40, 'bob'), { live: true }).gap, null, 'nothing held: no gap');
  });

  await section('ChatStore: edits and tombstones', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('c1', ['alice', 'bob']));
    s.applyMessage(smsg('c1', 1, 'bob', { body: 'first',
                                          reactions: [{ emoji: '👍', count: 2, me: true }] }), {});
    s.applyMessage(smsg('c1', 2, 'bob'), {});
    const ed = s.applyMessage(smsg('c1', 1, 'bob', { body: 'first, edited', edited_at: iso(30) }),
                              { live: true });
    is([ed.isNew, ed.msg.body, ed.msg.edited_at], [false, 'first, edited', iso(30)],
       'message.edited replaces body and edited_at');
    is(ed.msg.reactions, [{ emoji: '👍', count: 2, me: true }],
       'an edit keeps the reactions (event messages carry none; PROTOCOL §10)');
    is(s.messages('c1').length, 2, 'an edit adds no message');
    const del = s.applyMessage(smsg('c1', 1, 'bob', { body: '', deleted: true, attachments: [],
                                                      edited_at: iso(30) }), { live: true });
    is([del.msg.body, del.msg.deleted, del.msg.seq], ['', true, 1], 'a tombstone replaces the text, same seq');
    ok(!del.msg.reactions || del.msg.reactions.length === 0, 'a tombstone drops the reactions');
    is(seqs(s.messages('c1')), [1, 2], 'a tombstone keeps its place (no gap)');
    // a replayed message.new is built from the message as it is now
    const r = s.applyMessage(smsg('c1', 3, 'bob', { body: '', deleted: true }), { live: true });
    is([r.msg.deleted, s.conversation('c1').unread_count], [true, 0],
       'a message first seen as a tombstone is not unread');
  });

  await section('ChatStore: reactions', () => {
    const s = new ChatStore('alice');
    s.applyMessage(smsg('c1', 1, 'bob', { id: 'r1' }), {});
    const ev = (kind, user, emoji) => ({ kind, conversation_id: 'c1', message_id: 'r1', seq: 1, user, emoji });
    s.reactionApplied(ev('reaction.added', 'bob', '👍'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 1, me: false }], "bob's 👍: count 1, not me");
    s.reactionApplied(ev('reaction.added', 'carol', '👍'));
    s.reactionApplied(ev('reaction.added', 'alice', '👍'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 3, me: true }], "carol's and mine: count 3, me");
    s.reactionApplied(ev('reaction.removed', 'bob', '👍'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 2, me: true }], "bob's removed: count 2");
    // own react: the REST answer first, then the echo event
    s.setReactions('r1', [{ emoji: '👍', count: 2, me: true }, { emoji: '🎉', count: 1, me: true }]);
    s.reactionApplied(ev('reaction.added', 'alice', '🎉'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 2, me: true }, { emoji: '🎉', count: 1, me: true }],
       'own echo after setReactions is not counted twice');
    s.setReactions('r1', [{ emoji: '👍', count: 2, me: true }]);
    s.reactionApplied(ev('reaction.removed', 'alice', '🎉'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 2, me: true }],
       'own unreact echo after setReactions removes nothing more');
    s.setReactions('r1', [{ emoji: '👍', count: 1, me: false }]);
    s.reactionApplied(ev('reaction.removed', 'alice', '👍'));
    is(s.byId.get('r1').reactions, [{ emoji: '👍', count: 1, me: false }],
       "own 👍 removed: the echo leaves bob's... carol's count 1");
    s.reactionApplied(ev('reaction.removed', 'carol', '👍'));
    is(s.byId.get('r1').reactions, [], 'the last one removed: no entry left');
    is(s.reactionApplied({ kind: 'reaction.added', message_id: 'nope', user: 'bob', emoji: '👍' }), null,
       'a reaction to a message not held: null, no throw');
  });

  await section('ChatStore: receipts -> own message states (group of 3)', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('g', ['alice', 'bob', 'carol']));
    for (let q = 1; q <= 3; q++) s.applyMessage(smsg('g', q, 'alice'), {});
    s.applyMessage(smsg('g', 4, 'bob'), {});
    const st = () => s.messages('g').filter((m) => m.sender === 'alice').map((m) => m.state);
    is(st(), ['sent', 'sent', 'sent'], 'no receipts: sent');
    let ch = s.applyReceipts('g', [{ user: 'bob', delivered_seq: 3, read_seq: 0 }]);
    is([st(), ch.length], [['sent', 'sent', 'sent'], 0], 'delivered to bob only: still sent (carol has not)');
    ch = s.applyReceipts('g', [{ user: 'carol', delivered_seq: 2, read_seq: 0 }]);
    is(st(), ['delivered', 'delivered', 'sent'], 'carol delivered 2: 1-2 delivered, 3 sent');
    is(seqs(ch), [1, 2], 'applyReceipts returns the messages whose state changed');
    s.applyReceipts('g', [{ user: 'bob', delivered_seq: 3, read_seq: 3 }]);
    is(st(), ['delivered', 'delivered', 'sent'], 'bob read 3: not read by everyone yet');
    is(s.readBy(s.byId.get('g-m3')), ['bob'], 'readBy(m3) = [bob]');
    ch = s.applyReceipts('g', [{ user: 'carol', delivered_seq: 4, read_seq: 2 }]);
    is(st(), ['read', 'read', 'delivered'], 'carol delivered 4, read 2: 1-2 read, 3 delivered');
    is(s.readBy(s.byId.get('g-m2')).sort(), ['bob', 'carol'], 'readBy(m2) = [bob, carol]');
    s.applyReceipts('g', [{ user: 'carol', delivered_seq: 1, read_seq: 1 }]);
    is(st(), ['read', 'read', 'delivered'], 'an older receipt does not move positions back');
    is(s.receipts('g').find((r) => r.user === 'carol'), { user: 'carol', delivered_seq: 4, read_seq: 2 },
       "receipts(): carol's positions");
    const d = new ChatStore('alice');
    d.upsertConversation(sconv('d', ['alice', 'bob']));
    d.applyMessage(smsg('d', 1, 'alice'), {});
    d.applyReceipts('d', [{ user: 'bob', delivered_seq: 0, read_seq: 1 }]);
    is(d.messages('d')[0].state, 'read', 'direct: read_seq alone implies delivered and read');
  });

  await section('ChatStore: unread counts', () => {
    const s = new ChatStore('alice');
    const c = () => s.conversation('c1').unread_count;
    s.upsertConversation(sconv('c1', ['alice', 'bob'], { last_seq: 3, unread_count: 0 }));
    for (let q = 1; q <= 3; q++) s.applyMessage(smsg('c1', q, 'bob'), {});
    is(c(), 0, 'history merges count nothing');
    s.applyMessage(smsg('c1', 4, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 5, 'bob'), { live: true });
    is([c(), s.unreadTotal()], [2, 2], 'two live messages from bob: 2');
    s.applyMessage(smsg('c1', 5, 'bob'), { live: true });
    is(c(), 2, 'the same event twice counts once');
    s.applyMessage(smsg('c1', 6, 'alice'), { live: true });
    is(c(), 0, 'an own message resets it');
    s.applyMessage(smsg('c1', 7, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 8, 'bob'), { live: true });
    s.markReadLocal('c1', 7);
    is(c(), 1, 'markReadLocal(7) of 8: 1');
    s.markReadLocal('c1', 8);
    is(c(), 0, 'markReadLocal(8): 0');
    s.applyMessage(smsg('c1', 9, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 10, 'bob'), { live: true });
    s.applyReceipts('c1', [{ user: 'alice', delivered_seq: 9, read_seq: 9 }]);
    is(c(), 1, 'own receipt from another device (read 9 of 10): 1');
    s.upsertConversation(sconv('c1', ['alice', 'bob'], { last_seq: 9, unread_count: 0,
                                                          last_message: smsg('c1', 9, 'bob') }));
    is([c(), s.conversation('c1').last_seq, s.conversation('c1').last_message.seq], [1, 10, 10],
       'an older snapshot (last_seq 9, unread 0) keeps the live increment, last_seq and last_message');
    s.applyMessage(smsg('c1', 11, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 12, 'alice'), { live: true });
    is(c(), 0, 'bob 11, then my 12: 0');
    s.upsertConversation(sconv('c1', ['alice', 'bob'], { last_seq: 10, unread_count: 1,
                                                          last_message: smsg('c1', 10, 'bob') }));
    is(c(), 0, 'an older snapshot (last_seq 10, unread 1) does not undo my later message (read moved to 12)');
    s.applyMessage(smsg('c1', 13, 'bob'), { live: true });
    s.markReadLocal('c1', 13);
    s.upsertConversation(sconv('c1', ['alice', 'bob'], { last_seq: 12, unread_count: 0,
                                                          last_message: smsg('c1', 12, 'alice') }));
    is(c(), 0, 'an older snapshot (last_seq 12) does not undo a local read of 13');
    s.conversation('c1').unread_count = 0;      // whatever the last checks said, go on from 0
    s.applyMessage(smsg('c1', 14, 'bob'), { live: true });
    s.applyMessage(smsg('c1', 15, 'bob'), { live: true });
    is(c(), 2, 'bob 14, 15: 2');
    s.applyMessage(smsg('c1', 6, 'alice', { body: 'my old one, edited', edited_at: iso(40) }), { live: true });
    is(c(), 2, 'an edit of my old message (message.edited, live) leaves the unread count');
    s.conversation('c1').unread_count = 2;      // whatever the last check said, go on from 2
    s.applyMessage(smsg('c1', 15, 'bob', { body: '', deleted: true }), { live: true });
    is(c(), 1, 'an unread message deleted (tombstone event) is no longer unread');
  });

  await section('ChatStore: conversations() by last activity', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('a', ['alice', 'bob'], { created_at: iso(0), last_seq: 1,
                                                         last_message: smsg('a', 1, 'bob', { created_at: iso(50) }) }));
    s.upsertConversation(sconv('b', ['alice', 'carol'], { created_at: iso(30) }));
    s.upsertConversation(sconv('c', ['alice', 'dave'], { created_at: iso(1), last_seq: 1,
                                                         last_message: smsg('c', 1, 'dave', { created_at: iso(40) }) }));
    is(s.conversations().map((x) => x.id), ['a', 'c', 'b'],
       'newest last message (or creation when empty) first');
    s.applyMessage(smsg('b', 1, 'carol', { created_at: iso(55) }), { live: true });
    is(s.conversations().map((x) => x.id), ['b', 'a', 'c'], 'a live message moves its conversation first');
    s.applyMessage(smsg('c', 2, 'alice', { created_at: iso(59) }), {});
    is(s.conversations()[0].id, 'c', 'an own stored message moves it first too');
  });

  await section('ChatStore: snapshot() round trip', () => {
    const s = new ChatStore('alice');
    s.upsertConversation(sconv('c1', ['alice', 'bob'], { last_seq: 0 }));
    s.upsertConversation(sconv('c2', ['alice', 'carol'], { created_at: iso(2) }));
    for (let q = 1; q <= 5; q++) {
      s.applyMessage(smsg('c1', q, q === 3 ? 'alice' : 'bob',
                          q === 4 ? { reactions: [{ emoji: '👍', count: 1, me: true }] } : {}), {});
    }
    s.applyMessage(smsg('c1', 6, 'bob'), { live: true });
    s.applyReceipts('c1', [{ user: 'bob', delivered_seq: 6, read_seq: 6 }]);
    s.addPending({ conversation_id: 'c1', client_msg_id: 'kp', body: 'unsent', created_at: iso(70) });
    const snap = clone(s.snapshot(4));
    ok(!snap.convs.some((c) => 'receipts' in c), 'the snapshot strips receipts from conversations');
    is(seqs(snap.msgs.c1), [3, 4, 5, 6], 'snapshot(4): the last 4 stored messages, no pending one');
    const r = new ChatStore('alice');
    r.restore(snap);
    is(r.conversations().map((c) => c.id), s.conversations().map((c) => c.id), 'restored: same conversation order');
    is(r.conversations().map((c) => [c.id, c.last_seq, c.unread_count, c.last_message && c.last_message.id]),
       s.conversations().map((c) => [c.id, c.last_seq, c.unread_count, c.last_message && c.last_message.id]),
       'restored: last_seq, unread_count, last_message');
    is(r.messages('c1').map((m) => [m.id, m.seq, m.body, m.reactions || null]),
       s.messages('c1').filter((m) => m.seq >= 3).map((m) => [m.id, m.seq, m.body, m.reactions || null]),
       'restored: messages, order, reactions');
    is(r.conversation('c1').last_message === r.byId.get('c1-m6'), true,
       "restored: last_message is the store's own message object");
    is(r.byId.get('c1-m3').state, s.byId.get('c1-m3').state,
       'restored: an own message keeps its state (read by bob)');
  });
}

function helperTests() {
  const { backoffDelay, errorText } = chat;
  note('backoffDelay');
  is([backoffDelay(0, 500, 30000), backoffDelay(0, 500, 30000, () => 0.99)], [0, 0], 'attempt 0 -> 0');
  let inRange = true;
  let bad = null;
  for (let a = 1; a <= 12; a++) {
    const hi = Math.min(30000, 500 * 2 ** (a - 1));
    for (let i = 0; i < 300; i++) {
      const d = backoffDelay(a, 500, 30000);
      if (!(d >= 125 && d <= hi)) {
        inRange = false;
        bad = bad || { attempt: a, delay: d, range: [125, hi] };
      }
    }
    for (const r of [0, 0.5, 0.999999]) {
      const d = backoffDelay(a, 500, 30000, () => r);
      if (!(d >= 125 && d <= hi)) {
        inRange = false;
        bad = bad || { attempt: a, rand: r, delay: d, range: [125, hi] };
      }
    }
  }
  ok(inRange, 'attempts 1..12 (base 500, cap 30000): within [base/4, min(cap, base*2^(n-1))]');
  if (bad) diag('    ' + fmt(bad));
  const xs = Array.from({ length: 1000 }, () => backoffDelay(20, 500, 30000));
  const mn = Math.min(...xs);
  const mx = Math.max(...xs);
  ok(mn < 10000 && mx > 25000 && mx <= 30000 && new Set(xs).size > 100,
     'at the cap (attempt 20): spread, min ' + mn + ' < 10000, max ' + mx + ' > 25000, not all equal');
  is([backoffDelay(3, 100, 30000, () => 0.5), backoffDelay(3, 100, 30000, () => 0.5)], [200, 200],
     'deterministic with an injected rand (attempt 3, base 100, rand 0.5 -> 200)');
  is(backoffDelay(3, 100, 30000, () => 0), 25, 'rand 0: the floor base/4');
  is(backoffDelay(40, 100, 1000, () => 0.999), 999, 'attempt 40: under the cap, no overflow');

  note('errorText');
  is(errorText({ code: 'too_large' }), 'Message too long', 'too_large -> "Message too long"');
  const codes = ['bad_request', 'unauthorized', 'token_expired', 'forbidden', 'not_found', 'blocked',
                 'conflict', 'too_large', 'rate_limited', 'unavailable', 'internal', 'network',
                 'closed', 'timeout'];
  const notSentences = codes.filter((c) => {
    const t = errorText({ code: c, message: 'raw ' + c });
    return !/^[A-Z][a-z]/.test(t) || t.includes('_') || t.startsWith('raw ');
  });
  is(notSentences, [], 'every PROTOCOL §2 code (and network, closed, timeout) gets a sentence, not the code or the raw message');
  is(errorText({ code: 'some_new_code', message: 'The server says why' }), 'The server says why',
     'an unknown code: the server message');
  is(errorText({ code: 'some_new_code' }), 'Something went wrong', 'unknown code, no message: a generic sentence');
  is([errorText(null), errorText(undefined)], ['', ''], 'no error: empty');
}

// --------------------------------------------------- client scenarios

async function clientPollOutbox() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  srv.addConv('c2', ['alice', 'carol'], 2);
  install(srv);
  const c = newClient({ transports: ['poll'] });
  try {
    srv.setDown(true);
    await c.start();
    is(c.user && c.user.id, 'alice', 'start(): the user from the JWT (sub)');
    await waitFor(() => c.info.state === 'retrying', 1000);
    is(c.info.state, 'retrying', 'server down: state retrying');
    const sends = ['one', 'two', 'three'].map((b) => track(c.send('c1', b)));
    await sleep(10);
    is(c.messages('c1').map((m) => [m.body, m.state, m.seq]),
       [['one', 'sending', null], ['two', 'sending', null], ['three', 'sending', null]],
       'typed while down: shown at once, sending, in order');
    await sleep(120);
    ok(srv.fetches('GET', /\/poll$/).length >= 3, 'it kept trying (' + srv.fetches('GET', /\/poll$/).length + ' polls)');
    is(srv.posts.length, 0, 'nothing reached the server while down');
    srv.setDown(false);
    await waitFor(() => sends.every((s) => s.settled), 3000);
    is(sends.map((s) => s.ok), [true, true, true], 'the server back: every send resolves');
    is(srv.stored('c1'), ['one', 'two', 'three'], 'stored exactly once each, in the order typed');
    is(srv.posts.map((p) => p.body), ['one', 'two', 'three'], 'one POST each (no duplicate request)');
    is(sends.map((s) => s.value && [s.value.body, s.value.seq, s.value.state]),
       [['one', 1, 'sent'], ['two', 2, 'sent'], ['three', 3, 'sent']], 'resolved with the stored messages, state sent');
    ok(sends.every((s, i) => s.value && s.value.client_msg_id === srv.posts[i].client_msg_id),
       'sent with their client_msg_id');
    // the message.new events of these arrive on the poll
    const last = srv.now();
    await waitFor(() => c.cursor === last, 2000);
    is(c.cursor, last, 'the events of the sends moved the cursor (' + last + ')');
    is(c.messages('c1').map((m) => [m.body, m.seq, m.state]),
       [['one', 1, 'sent'], ['two', 2, 'sent'], ['three', 3, 'sent']],
       'events for messages already acked: no duplicate');
    await waitFor(() => c.conversations().length === 2, 500);
    is(c.conversations().map((x) => x.id).sort(), ['c1', 'c2'],
       'started while the server was down: the conversation list is loaded once it is up');

    // transient 503: retried, stored once
    srv.fail503 = 1;
    const t503 = track(c.send('c1', 'after a 503'));
    await waitFor(() => t503.settled, 3000);
    is(t503.ok, true, 'a send answered 503 unavailable is retried and resolves');
    is(srv.stored('c1').filter((b) => b === 'after a 503').length, 1, '... stored once');
    is(srv.posts.filter((p) => p.body === 'after a 503').length, 2, '... two POSTs (the 503, the retry)');
    const p1 = srv.posts.filter((p) => p.body === 'after a 503');
    is(p1[0].client_msg_id, p1[1].client_msg_id, '... the retry has the same client_msg_id');

    // permanent 400, later messages still go
    srv.reject = /^BAD/;
    const bad1 = track(c.send('c1', 'BAD one'));
    const fine = track(c.send('c1', 'after the bad one'));
    await waitFor(() => bad1.settled && fine.settled, 3000);
    await rejectsWith(bad1.promise.then((t) => t.ok ? t.value : Promise.reject(t.error)),
                      'bad_request', 'a 400 bad_request rejects its send promise with code bad_request');
    const badMsg = c.messages('c1').find((m) => m.body === 'BAD one');
    is(badMsg && [badMsg.state, badMsg.error && badMsg.error.code, badMsg.seq], ['failed', 'bad_request', null],
       "the message is marked 'failed' with its error");
    is(fine.ok, true, 'the message typed after it still goes');
    is(srv.stored('c1').slice(-1), ['after the bad one'], '... and is stored');
    is(c.messages('c1').slice(-2).map((m) => [m.body, m.state]),
       [['after the bad one', 'sent'], ['BAD one', 'failed']], 'the failed one stays last, unsent');
    // retry after fixing
    srv.reject = null;
    const cmid = badMsg.client_msg_id;
    const rt = track(c.retry(cmid));
    await waitFor(() => rt.settled, 3000);
    is(rt.ok && [rt.value.body, rt.value.state], ['BAD one', 'sent'], 'retry(cmid) after the fix: sent');
    is(srv.stored('c1').filter((b) => b === 'BAD one').length, 1, '... stored once');
    is(c.messages('c1').filter((m) => m.body === 'BAD one').length, 1, '... listed once');
    // discard
    srv.reject = /^BAD/;
    const bad2 = track(c.send('c1', 'BAD two'));
    await waitFor(() => bad2.settled, 3000);
    const m2 = c.messages('c1').find((m) => m.body === 'BAD two');
    const seen = [];
    c.on('message', (m) => seen.push([m.body, m.state]));
    await c.discard(m2.client_msg_id);
    ok(!c.messages('c1').some((m) => m.body === 'BAD two'), 'discard(cmid) removes the failed message');
    is(seen, [['BAD two', 'discarded']], "discard emits the message with state 'discarded'");
    srv.reject = null;
    const after = track(c.send('c1', 'after the discard'));
    await waitFor(() => after.settled, 3000);
    is(srv.posts.filter((p) => p.body === 'BAD two').length, 1, 'a discarded message is not sent again');
    // discard one still queued (server down)
    srv.setDown(true);
    const q = track(c.send('c1', 'never'));
    await sleep(20);
    const qm = c.messages('c1').find((m) => m.body === 'never');
    await c.discard(qm.client_msg_id);
    await q.promise;
    ok(q.ok === false && q.error && q.error.code === 'closed', 'discarding a queued send rejects its promise (closed)');
    srv.setDown(false);
    await waitFor(() => connected(c), 2000);
    await sleep(50);
    is(srv.posts.filter((p) => p.body === 'never').length, 0, '... and it is never sent');

    // duplicate events and the cursor
    const before = c.messages('c1').length;
    const a503 = srv.msgs.get('c1').find((m) => m.body === 'after a 503');
    srv.publish({ kind: 'message.new', conversation_id: 'c1', seq: a503.seq, message: clone(a503) });
    const { m: bm, cursor: bc } = srv.post('bob', 'c1', 'hi from bob');
    await waitFor(() => c.cursor === bc, 2000);
    is(c.messages('c1').length, before + 1, "a repeated message.new adds nothing; bob's adds one");
    is(c.cursor, bc, 'a durable event with a cursor moves client.cursor');
    await waitFor(() => srv.polls.length && srv.polls[srv.polls.length - 1].query.get('cursor') === bc, 1000);
    const lp = srv.polls[srv.polls.length - 1];
    is([lp.query.get('cursor'), lp.query.get('timeout_ms')], [bc, '25000'],
       'the next poll asks from that cursor');
    is(c.conversation('c1').unread_count, 1, "bob's live message: unread 1");
    // a drop: the reconnect resumes from the cursor
    const npolls = srv.polls.length;
    srv.setDown(true);
    await sleep(30);
    const { cursor: bc2 } = srv.post('bob', 'c1', 'while you were away');
    srv.setDown(false);
    await waitFor(() => c.cursor === bc2, 2000);
    const firstAfter = srv.polls.slice(npolls).find((p) => p.query.get('timeout_ms') === '0');
    is(firstAfter && firstAfter.query.get('cursor'), bc, 'after a drop the first poll resumes from the cursor');
    is(c.messages('c1').filter((m) => m.body === 'while you were away').length, 1,
       'the event missed while away arrives once');
    ok(bm && c.messages('c1').filter((m) => m.id === bm.id).length === 1, "bob's message listed once");
    is(c.db.mem.outbox.size, 0, 'the outbox is empty');

    // close
    const held = srv.polls[srv.polls.length - 1];
    await checkClosed(c, srv, 'poll');
    ok(held.signal && held.signal.aborted, "close() aborts the held poll (its signal fired)");
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function clientUnreadRaces() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  srv.post('bob', 'c1', 'old');               // seq 1, unread for alice
  install(srv);
  const c = newClient({ transports: ['poll'] });
  try {
    await c.start();
    await waitFor(() => connected(c) && c.conversation('c1'), 2000);
    is(c.conversation('c1').unread_count, 1, 'listed: unread 1 as the server says');
    c.markRead('c1');
    await waitFor(() => srv.fetches('POST', /\/read$/).length === 1, 2000);
    srv.read.set('c1|alice', 1);
    is(c.conversation('c1').unread_count, 0, 'markRead(): 0, one POST /read');
    // the list is answered (seq 1, unread 0), a live message arrives before it is applied
    const g = srv.gate('GET', /^\/chat\/api\/conversations$/);
    const lc = track(c.loadConversations());
    await waitFor(() => srv.fetches('GET', /^\/chat\/api\/conversations$/).length === 2, 1000);
    const { cursor } = srv.post('bob', 'c1', 'live');
    await waitFor(() => c.cursor === cursor, 2000);
    is(c.conversation('c1').unread_count, 1, 'a live message from bob: unread 1');
    g.open();
    await lc.promise;
    is([c.conversation('c1').unread_count, c.conversation('c1').last_seq], [1, 2],
       'loadConversations() answered before that event does not lose it (unread 1, last_seq 2)');

    // three more, then a seq gap
    srv.read.set('c1|alice', 2);
    c.markRead('c1', 2);
    is(c.conversation('c1').unread_count, 0, 'markRead(cid, 2): 0');
    srv.post('bob', 'c1', 'g3');
    srv.post('bob', 'c1', 'g4');
    srv.post('bob', 'c1', 'g5');
    await waitFor(() => c.messages('c1').some((m) => m.body === 'g5'), 2000);
    is(c.conversation('c1').unread_count, 3, 'three more from bob: unread 3');
    // a gap: deliver an event whose seq skips two (the server lost nothing: history has them)
    srv.store('bob', 'c1', { client_msg_id: 'gap-6', body: 'g6' });
    srv.store('bob', 'c1', { client_msg_id: 'gap-7', body: 'g7' });
    const s8 = srv.store('bob', 'c1', { client_msg_id: 'gap-8', body: 'g8' }).message;
    const cur8 = srv.publish({ kind: 'message.new', conversation_id: 'c1', seq: s8.seq, message: clone(s8) });
    await waitFor(() => c.cursor === cur8, 2000);
    await waitFor(() => c.messages('c1').some((m) => m.body === 'g6'), 2000);
    is(c.messages('c1').filter((m) => m.seq >= 5).map((m) => m.body), ['g5', 'g6', 'g7', 'g8'],
       'a seq gap is filled from history (after_seq), in order');
    ok(srv.fetches('GET', /\/messages$/).some((r) => r.query.get('after_seq') === '5'),
       'the gap is asked for with after_seq=5');
    is(c.conversation('c1').unread_count, 6, 'the messages fetched for a gap count as unread too (3 + 3)');
    await checkClosed(c, srv, 'unread races');
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function clientWebSocket() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  const c = newClient({ transports: ['websocket'] });
  try {
    srv.setDown(true);
    await c.start();
    await waitFor(() => c.info.state === 'retrying', 1000);
    const w = ['w1', 'w2', 'w3'].map((b) => track(c.send('c1', b)));
    await sleep(60);
    is(srv.posts.length, 0, 'websocket, server down: nothing sent');
    srv.setDown(false);
    await waitFor(() => w.every((t) => t.settled), 3000);
    is(w.map((t) => t.ok), [true, true, true], 'websocket: the sends typed while down resolve');
    is(srv.stored('c1'), ['w1', 'w2', 'w3'], 'websocket: stored once each, in order');
    const ws = srv.sockets[srv.sockets.length - 1];
    is(ws.sent.filter((m) => m.type === 'send').map((m) => m.body), ['w1', 'w2', 'w3'],
       'websocket: one send request each');
    ok(ws.url.startsWith('ws://chat.test/chat/ws?') && ws.query.get('ticket') && ws.query.get('device_id')
       && ws.protocol === 'chat.v1', 'websocket: ws:// URL with a ticket, a device_id, subprotocol chat.v1');
    is(ws.query.get('cursor'), null, 'the first connection has no cursor');
    await waitFor(() => c.cursor === srv.now(), 1000);
    is(c.cursor, srv.now(), 'the message.new events moved the cursor');
    is(c.messages('c1').map((m) => [m.body, m.state]), [['w1', 'sent'], ['w2', 'sent'], ['w3', 'sent']],
       'replies and events: one message each');
    await waitFor(() => ws.sent.some((m) => m.type === 'ack' && m.cursor === srv.now()), 1000);
    ok(ws.sent.some((m) => m.type === 'ack' && m.cursor === srv.now()), 'the events are acked with the last cursor');
    is(ws.sent.filter((m) => m.type === 'ack').length, 1, 'acks are coalesced (one for three events)');

    // stored, but the connection drops before the reply: the resend is the same message
    const cur0 = c.cursor;
    srv.wsDropAfterStore = 1;
    const nsock = srv.sockets.length;
    const d = track(c.send('c1', 'dropped reply'));
    await waitFor(() => d.settled, 3000);
    is(d.ok && d.value.body, 'dropped reply', 'a send whose reply was lost (connection dropped) resolves');
    is(srv.stored('c1').filter((b) => b === 'dropped reply').length, 1, '... stored once');
    is(c.messages('c1').filter((m) => m.body === 'dropped reply').length, 1, '... listed once');
    const re = srv.sockets.slice(nsock).find((s) => s.readyState === 1);
    is(re && re.query.get('cursor'), cur0, 'the reconnect resumes from the cursor');
    await waitFor(() => c.cursor === srv.now(), 1000);
    is(c.cursor, srv.now(), 'the replayed event moved the cursor');

    // 503 over WebSocket: retried
    srv.fail503 = 1;
    const u = track(c.send('c1', 'ws after a 503'));
    await waitFor(() => u.settled, 3000);
    is([u.ok, srv.stored('c1').filter((b) => b === 'ws after a 503').length], [true, 1],
       'websocket: an unavailable reply is retried, stored once');
    // bad_request over WebSocket
    srv.reject = /^BAD/;
    const b = track(c.send('c1', 'BAD ws'));
    const b2 = track(c.send('c1', 'ws after the bad one'));
    await waitFor(() => b.settled && b2.settled, 3000);
    is([b.ok, b.error && b.error.code, b2.ok], [false, 'bad_request', true],
       'websocket: bad_request fails that send (code bad_request), the next one goes');
    srv.reject = null;

    // a quick second drop: the state text says what happened
    const s0 = srv.sockets[srv.sockets.length - 1];
    srv.wsRefuse = false;
    s0._serverClose(1006, '');
    await waitFor(() => srv.sockets.length > 0 && srv.sockets[srv.sockets.length - 1] !== s0
                        && srv.sockets[srv.sockets.length - 1].readyState === 1 && connected(c), 2000);
    const s1 = srv.sockets[srv.sockets.length - 1];
    const nst = c.states.length;
    s1._serverClose(1006, '');
    await waitFor(() => c.states.slice(nst).some((s) => s.state === 'retrying'), 1000);
    const rs = c.states.slice(nst).find((s) => s.state === 'retrying');
    ok(rs && !/^Something went wrong|1006/.test(rs.text),
       'a connection lost (close 1006, no reason; the second drop in a row): the retrying text names '
       + "the cause, not the generic 'Something went wrong' (got \"" + (rs && rs.text) + '")');
    await waitFor(() => connected(c), 2000);

    const last = srv.sockets[srv.sockets.length - 1];
    await checkClosed(c, srv, 'websocket');
    is(last.closedWith, 1000, 'close() closes the WebSocket with 1000');
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function clientFallbackAndProbe() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  srv.wsRefuse = true;
  const c = newClient({ transports: ['websocket', 'poll'], probeIntervalMs: 80 });
  try {
    await c.start();
    await waitFor(() => connected(c), 2000);
    is([c.info.transport, c.info.text], ['poll', 'Connected (polling fallback)'],
       'a WebSocket that never comes up: long-poll fallback');
    const { cursor } = srv.post('bob', 'c1', 'over poll');
    await waitFor(() => c.cursor === cursor, 1000);
    const pollsBefore = srv.polls.slice();
    srv.wsRefuse = false;
    await waitFor(() => c.info.transport === 'websocket' && connected(c), 2000);
    is(c.info.transport, 'websocket', 'the probe finds the WebSocket back and moves to it');
    const main = srv.sockets.filter((s) => s.readyState === 1);
    is(main.length, 1, 'one WebSocket open (the probe is closed)');
    is(main[0] && main[0].query.get('cursor'), cursor, 'the WebSocket resumes from the cursor of the poll');
    ok(pollsBefore.length && pollsBefore[pollsBefore.length - 1].signal.aborted, 'the poll is aborted');
    await sleep(30);
    const n0 = srv.polls.length;
    srv.post('bob', 'c1', 'over ws');
    await waitFor(() => c.messages('c1').some((m) => m.body === 'over ws'), 1000);
    await sleep(30);
    is(srv.polls.length, n0, 'no poll after the move');
    is(c.messages('c1').map((m) => m.body), ['over poll', 'over ws'], 'each event once');
    await checkClosed(c, srv, 'fallback');
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function clientOnlineWake() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  const et = new EventTarget();
  globalThis.addEventListener = et.addEventListener.bind(et);
  globalThis.removeEventListener = et.removeEventListener.bind(et);
  const c = newClient({ transports: ['poll'], backoffBase: 4000, backoffCap: 4000 });
  try {
    srv.setDown(true);
    await c.start();
    is(c.listenerCount > 0, true, "with window events: the client listens ('online', 'offline')");
    await waitFor(() => c.info.state === 'retrying', 1000);
    between(c.info.retryInMs, 1000, 4000, 'retrying with backoff base 4000: 1000..4000 ms');
    ok(/retrying in \d+ s$/.test(c.info.text), 'the state text says when: "' + c.info.text + '"');
    srv.setDown(false);
    const t = Date.now();
    et.dispatchEvent(new Event('online'));
    await waitFor(() => connected(c), 500);
    ok(connected(c) && Date.now() - t < 500, "'online' reconnects now, not at the timer");
    await checkClosed(c, srv, 'online');
    const n0 = srv.log.length;
    et.dispatchEvent(new Event('online'));
    await sleep(20);
    is(srv.log.length, n0, "'online' after close() does nothing (the listener is removed)");
  } finally {
    await c.close().catch(() => {});
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    uninstall();
  }
}

async function clientCloseInFlight() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  const c = newClient({ transports: ['poll'] });
  try {
    await c.start();
    await waitFor(() => connected(c), 2000);
    const g = srv.gate('POST', /\/messages$/);
    srv.fail503 = 1;
    const s = track(c.send('c1', 'in flight'));
    await waitFor(() => srv.posts.length === 1, 1000);
    await c.close();
    await s.promise;
    is([s.ok, s.error && s.error.code], [false, 'closed'], 'close() rejects a send in flight (closed)');
    g.open();
    await sleep(20);
    is(c._timers.size, 0, 'a send that fails after close() schedules no retry timer');
    const t = Date.now();
    await sleep(200);
    is(srv.log.filter((r) => r.t >= t).length, 0, '... and nothing is fetched');
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function clientToken() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  // a long-lived token (2100-01-01): the refresh is due in decades
  const c = newClient({ transports: ['poll'], jwt: jwt({ sub: 'alice', exp: 4102444800 }) });
  const u = newClient({ transports: ['poll'],
                        jwt: jwt({ sub: 'zoë', name: 'Zoë Ångström', exp: Math.floor(Date.now() / 1000) + 3600 }) });
  try {
    await c.start();
    await waitFor(() => connected(c), 2000);
    await sleep(300);
    ok(c.tokenCalls.length <= 2,
       'a token valid until 2100: the provider is not asked again and again (' + c.tokenCalls.length
       + ' calls in 300 ms)');
    await u.start();
    is(u.user && [u.user.id, u.user.name], ['zoë', 'Zoë Ångström'], 'JWT claims are read as UTF-8 (sub, name)');
  } finally {
    await c.close().catch(() => {});
    await u.close().catch(() => {});
    uninstall();
  }
}

// What the second cold review found: a captive portal's 200, a cached
// token's shorter life, a poll closed while the token is on its way.
async function clientSecondReview() {
  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  install(srv);
  const now = Math.floor(Date.now() / 1000);
  // issued 50 minutes ago, 10 minutes left
  const cached = jwt({ sub: 'alice', iat: now - 3000, exp: now + 600 });
  const c = newClient({ transports: ['poll'], jwt: cached });
  let portal = false;
  const real = globalThis.fetch;
  globalThis.fetch = async (input, init) => {
    if (portal) {
      srv.log.push({ t: Date.now(), method: (init && init.method) || 'GET',
                     path: new URL(String(input)).pathname, query: new URLSearchParams(),
                     url: String(input) });
      return new Response('<html><body>Sign in to the hotel Wi-Fi</body></html>',
                          { status: 200, headers: { 'Content-Type': 'text/html' } });
    }
    return real(input, init);
  };
  try {
    await c.start();
    await waitFor(() => connected(c), 2000);
    const left = (c._tokExp - Date.now()) / 60000;
    ok(left > 9 && left < 10.5, 'a cached token with 10 minutes left counts 10, not its '
       + 'issued life of 60 (' + left.toFixed(1) + ' min)');

    // the portal answers everything with a 200 page
    portal = true;
    const p = c.send('c1', 'behind the portal');
    p.catch(() => {});
    await sleep(400);
    is(c.messages('c1').filter((m) => m.seq == null).map((m) => [m.body, m.state]),
       [['behind the portal', 'sending']],
       "a portal's 200 page is not the server's answer: the message waits, not lost");
    const polls = srv.log.filter((r) => r.path === '/chat/poll' && r.t > Date.now() - 400).length;
    ok(polls < 20, 'and the poll does not spin on it (' + polls + ' polls in 400 ms)');
    portal = false;
    await waitFor(() => srv.stored('c1').includes('behind the portal'), 5000);
    is(srv.stored('c1').filter((b) => b === 'behind the portal').length, 1,
       'once the portal lets go, it is stored once');
    await checkClosed(c, srv, 'second review');
  } finally {
    globalThis.fetch = real;
    await c.close().catch(() => {});
    uninstall();
  }

  // close() while the token provider is still working: no poll goes out
  const srv2 = new FakeServer();
  srv2.addConv('c1', ['alice', 'bob'], 1);
  install(srv2);
  let release;
  const slow = new Promise((r) => { release = r; });
  const d = newClient({ transports: ['poll'] });
  try {
    await d.start();
    await waitFor(() => connected(d), 2000);
    d._tokForce = true;              // the next call asks the provider...
    d.o.token = async () => { await slow; return JWT; };   // ...which takes its time
    d.transport.close();
    d.transport = null;
    d._connect();                     // a poll waits for the token
    await sleep(50);
    const t = Date.now();
    const closing = d.close();
    release();
    await closing;
    await sleep(200);
    is(srv2.log.filter((r) => r.t >= t && r.path === '/chat/poll').length, 0,
       'a poll closed while its token was on the way is never sent');
  } finally {
    await d.close().catch(() => {});
    uninstall();
  }
}

// ------------------------------------------------------------------ main

// What the cold review of chat.js found, held down.
async function clientReviewFixes() {
  const { ChatStore } = chat;
  const st = new ChatStore('alice');
  st.applyMessage(smsg('c1', 1, 'bob', { id: 'rx' }), {});
  const rev = (kind, user) => ({ kind, conversation_id: 'c1', message_id: 'rx', seq: 1, user,
                                 emoji: '👍' });
  st.reactionApplied(rev('reaction.added', 'bob'));
  st.reactionApplied(rev('reaction.added', 'bob'));
  is(st.byId.get('rx').reactions, [{ emoji: '👍', count: 1, me: false }],
     'the same reaction event twice (a replay) counts once');
  st.reactionApplied(rev('reaction.removed', 'bob'));
  st.reactionApplied(rev('reaction.removed', 'bob'));
  st.reactionApplied(rev('reaction.added', 'carol'));
  is(st.byId.get('rx').reactions, [{ emoji: '👍', count: 1, me: false }],
     'a removal replayed removes once');

  const s2 = new ChatStore('alice');
  s2.upsertConversation(sconv('c2', ['alice', 'bob'], { last_seq: 5, unread_count: 2 }));
  s2.markReadLocal('c2', 5);
  s2.upsertConversation(sconv('c2', ['alice', 'bob'], { last_seq: 5, unread_count: 2 }));
  is(s2.conversation('c2').unread_count, 0,
     'a list answer from before the read was stored does not bring the badge back');

  const srv = new FakeServer();
  srv.addConv('c1', ['alice', 'bob'], 1);
  for (let i = 1; i <= 30; i++) {
    srv.post('bob', 'c1', 'h' + i);
  }
  install(srv);
  const c = newClient({ transports: ['poll'] });
  try {
    await c.start();
    await waitFor(() => connected(c) && c.conversation('c1'), 2000);
    is(c.messages('c1').length, 0, "the list's last message is a preview, not held history");
    await c.loadHistory('c1', { limit: 5 });
    is(seqs(c.messages('c1')), [26, 27, 28, 29, 30], 'the newest page');
    // an edit of an old message not held: history will show it as it is
    const old = srv.msgs.get('c1')[2];
    old.body = 'h3 edited';
    let cur = srv.publish({ kind: 'message.edited', conversation_id: 'c1', seq: old.seq,
                           message: clone(old) });
    await waitFor(() => c.cursor === cur, 2000);
    is(seqs(c.messages('c1')), [26, 27, 28, 29, 30],
       'an edit of a message not held does not insert it (no hole below the held run)');
    const last = srv.msgs.get('c1')[29];
    last.body = 'h30 edited';
    cur = srv.publish({ kind: 'message.edited', conversation_id: 'c1', seq: 30,
                       message: clone(last) });
    await waitFor(() => c.cursor === cur, 2000);
    is(c.conversation('c1').last_message.body, 'h30 edited', 'an edit of the last one: preview');
    // many more while "away": the newest page no longer touches what is held
    c.store.dropBefore('c1', 1000);           // (what a resync leaves: nothing held...)
    await c.loadHistory('c1', { limit: 5 });
    for (let i = 31; i <= 60; i++) {
      srv.store('bob', 'c1', { client_msg_id: 'away-' + i, body: 'h' + i });
    }
    await c.loadHistory('c1', { limit: 5 });
    is(seqs(c.messages('c1')), [56, 57, 58, 59, 60],
       'a newest page after a hole replaces the held run: one run of seqs, older pages load before it');
    await c.loadHistory('c1', { beforeSeq: 56, limit: 5 });
    is(seqs(c.messages('c1')), [51, 52, 53, 54, 55, 56, 57, 58, 59, 60], 'and the next older page joins it');

    // discard while its send is on the way and fails: it stays discarded
    const g = srv.gate('POST', /\/messages$/);
    srv.fail503 = 1;
    const p = c.send('c1', 'regret');
    p.catch(() => {});
    await waitFor(() => srv.fetches('POST', /\/messages$/).length === 1, 2000);
    const cmid = c.messages('c1').find((m) => m.body === 'regret').client_msg_id;
    await c.discard(cmid);
    g.open();
    await rejectsWith(p, 'closed', 'send() of a discarded message rejects');
    await sleep(300);
    c._flushOutbox();
    await sleep(300);
    is(srv.fetches('POST', /\/messages$/).length, 1, 'a discarded message is not sent again');
    is(srv.stored('c1').includes('regret'), false, 'and never stored');
    is(c.messages('c1').filter((m) => m.seq == null).length, 0, 'nor shown');
    await checkClosed(c, srv, 'review fixes');
  } finally {
    await c.close().catch(() => {});
    uninstall();
  }
}

async function main() {
  const guard = setTimeout(() => {
    ok(false, 'the unit tests finished within 25 s');
    out('1..' + n);
    process.exit(1);
  }, 25000);
  try {
    chat = await import(pathToFileURL(CHAT_JS).href);
    ok(true, 'client/chat.js imports in node');
  } catch (e) {
    ok(false, 'client/chat.js imports in node');
    diag(String(e && e.stack));
    out('1..' + n);
    process.exit(1);
  }
  is(['ChatClient', 'ChatStore', 'backoffDelay', 'errorText'].filter((k) => typeof chat[k] !== 'function'), [],
     'exports ChatClient, ChatStore, backoffDelay, errorText');

  await storeTests();
  await section('backoffDelay and errorText', helperTests);
  await section('ChatClient, long-poll: outbox, retries, failures, cursor, close', clientPollOutbox);
  await section('ChatClient, long-poll: unread counts against the list and gaps', clientUnreadRaces);
  await section('ChatClient, WebSocket: outbox, lost reply, acks, close', clientWebSocket);
  await section('ChatClient: WebSocket -> poll fallback and the probe back', clientFallbackAndProbe);
  await section("ChatClient: 'online' wakes the retry", clientOnlineWake);
  await section('ChatClient: close() with a send in flight', clientCloseInFlight);
  await section('ChatClient: token handling', clientToken);
  await section('ChatClient: what the cold review found', clientReviewFixes);
  await section('ChatClient: what the second cold review found', clientSecondReview);

  await sleep(20);
  is(unhandled.map((e) => String(e && e.stack || e)), [], 'no unhandled promise rejections');
  const other = warnings.filter((w) => w.name !== 'TimeoutOverflowWarning');
  for (const w of other) diag('warning: ' + w.name + ': ' + w.message);
  const tow = warnings.filter((w) => w.name === 'TimeoutOverflowWarning');
  if (tow.length) {
    diag(tow.length + ' TimeoutOverflowWarning(s), first: ' + tow[0].message);
  }
  note('runtime ' + (Date.now() - T0) + ' ms');
  clearTimeout(guard);
  out('1..' + n);
  process.exit(failed ? 1 : 0);
}

main();
