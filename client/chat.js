// ngx_chat_module browser client: one ES module, no dependencies.
//
//   import { ChatClient } from '/client/chat.js';
//   const chat = new ChatClient({ url: '/chat', token: (force) => getJwt(force) });
//   chat.on('message', (m) => render(m));
//   await chat.start();
//   await chat.send(conversationId, 'hello');
//
// The wire contract is docs/PROTOCOL.md; the API is client/chat.d.ts.
//
// How it holds together:
// - One tab per browser and user is the leader (Web Locks): it alone holds
//   the server connection and relays every server event to the other tabs
//   (BroadcastChannel).  When it closes or crashes the browser releases its
//   lock, the next tab takes it and resumes from the cursor of the last
//   event it was relayed: nothing is lost, nothing repeats.
// - Sends go through an outbox in IndexedDB that only the leader flushes,
//   one message at a time in the order typed, with the message's
//   client_msg_id: a retry, a reload or a new leader sends it again and the
//   server stores it once.
// - Transports: WebSocket, else SSE (+ REST for requests), else long-poll.
//   The one that worked is remembered for a while, and WebSocket is probed
//   again in the background.

const DURABLE_KINDS = [
  'message.new', 'message.edited', 'message.deleted', 'reaction.added',
  'reaction.removed', 'receipt', 'conversation.created', 'conversation.updated',
  'member.added', 'member.removed',
];
const EPHEMERAL_KINDS = ['typing', 'presence'];

const ALL_TRANSPORTS = ['websocket', 'sse', 'poll'];

// a connection that lived this long was healthy: its loss is retried at once
const HEALTHY_MS = 5000;
const OPEN_TIMEOUT_MS = 10000;
const REQUEST_TIMEOUT_MS = 15000;
const PING_MS = 25000;
const PONG_TIMEOUT_MS = 10000;
const ACK_DELAY_MS = 100;
const POLL_TIMEOUT_MS = 25000;
const TYPING_EXPIRE_MS = 12000;   // a peer's "start" without a "stop" (server: 10 s)
const CACHE_MESSAGES = 50;
const SEND_RETRY_BASE_MS = 1000;

// a status without a JSON body (a proxy's page) as an error code
const STATUS_CODES = {
  401: 'unauthorized', 403: 'forbidden', 404: 'not_found', 408: 'unavailable',
  413: 'too_large', 415: 'unsupported_type', 429: 'rate_limited',
};

// errors that retrying the same request cannot mend
const PERMANENT = new Set([
  'bad_request', 'forbidden', 'not_found', 'blocked', 'archived', 'conflict',
  'too_large', 'unsupported_type', 'limit',
]);

const now = () => Date.now();
// intervals are measured on a clock that never steps back
const mono = () => (globalThis.performance ? performance.now() : Date.now());
const noop = () => {};

// ---------------------------------------------------------------- helpers

export function backoffDelay(attempt, base, cap, rand = Math.random) {
  if (attempt <= 0) {
    return 0;
  }

  // full jitter over the whole window, also at the cap: clients that lost
  // the server together do not come back in waves
  const ceil = Math.min(cap, base * Math.pow(2, attempt - 1));
  return Math.max(base / 4, Math.floor(rand() * ceil));
}

const TEXTS = {
  network: 'Cannot reach the chat server',
  unauthorized: 'Your session is not valid; sign in again',
  token_expired: 'Your session expired; renewing it',
  forbidden: 'You are not allowed to do that here',
  not_found: 'That conversation or message no longer exists',
  blocked: 'You cannot message this person',
  archived: 'This conversation is archived and read-only',
  conflict: 'That changed in the meantime; try again',
  too_large: 'Message too long',
  rate_limited: 'Too many messages at once; slowing down',
  unavailable: 'The chat service is busy; retrying',
  unsupported_type: 'That file type is not allowed',
  limit: 'Limit reached',
  internal: 'Something went wrong on the server',
  timeout: 'The server did not answer in time',
  closed: 'The chat was closed',
  bad_request: 'The server could not accept that',
  going_away: 'The chat server is restarting',
  slow: 'The connection is too slow',
};

export function errorText(err) {
  if (!err) {
    return '';
  }
  return TEXTS[err.code] || err.message || 'Something went wrong';
}

// a WebSocket close code as an error a person can read
function closeError(code, reason) {
  const c = { 1001: 'going_away', 1008: 'unauthorized', 1009: 'too_large', 4001: 'token_expired',
              4008: 'slow', 4029: 'rate_limited' }[code] || 'network';
  return { code: c, message: reason || '', close_code: code };
}

function chatError(code, message, extra) {
  const e = new Error(message || TEXTS[code] || code);
  e.code = code;
  e.text = errorText({ code, message });
  if (extra) {
    Object.assign(e, extra);
  }
  return e;
}

function plainError(e) {
  return { code: e.code || 'internal', message: e.message || '',
           retry_after_ms: e.retry_after_ms, status: e.status };
}

function uuid() {
  if (globalThis.crypto && crypto.randomUUID) {
    return crypto.randomUUID();
  }
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function jwtClaims(token) {
  try {
    const p = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bin = atob(p + '='.repeat((4 - p.length % 4) % 4));
    // claims are UTF-8: a user id "zoë" must equal the server's sender
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (ch) => ch.charCodeAt(0))));
  } catch (e) {
    return {};
  }
}

function seconds(ms) {
  return Math.max(1, Math.round(ms / 1000));
}

class Emitter {
  constructor() { this._l = new Map(); }

  on(ev, fn) {
    if (!this._l.has(ev)) {
      this._l.set(ev, new Set());
    }
    this._l.get(ev).add(fn);
    return () => this.off(ev, fn);
  }

  off(ev, fn) {
    const s = this._l.get(ev);
    if (s) {
      s.delete(fn);
    }
  }

  emit(ev, data) {
    const s = this._l.get(ev);
    if (!s) {
      return;
    }
    for (const fn of [...s]) {
      try {
        fn(data);
      } catch (e) {
        // a UI handler's bug must not break the client
        setTimeout(() => { throw e; });
      }
    }
  }

  listeners() {
    let n = 0;
    for (const s of this._l.values()) {
      n += s.size;
    }
    return n;
  }

  clear() { this._l.clear(); }
}

// ------------------------------------------------------------- the store

// Conversations, messages, receipts, unread counts: what the events say,
// without any I/O, so that node can test it.  Every method that changes
// something returns what the UI should hear about.
export class ChatStore {
  constructor(me) {
    this.me = me || null;
    this.convs = new Map();       // id -> conversation
    this.msgs = new Map();        // conversation id -> { list: [by seq], pending: [] }
    this.byId = new Map();        // message id -> message
    this.byCmid = new Map();      // own client_msg_id -> message
    this.receiptMap = new Map();  // conversation id -> Map(user -> receipt)
    this.blocked = new Set();
    this.gen = 0;                 // bumped by every change of a conversation
  }

  conversation(id) { return this.convs.get(id); }

  conversations() {
    return [...this.convs.values()].sort((a, b) => lastActivity(b) - lastActivity(a));
  }

  unreadTotal() {
    let n = 0;
    for (const c of this.convs.values()) {
      n += c.unread_count || 0;
    }
    return n;
  }

  upsertConversation(c) {
    const old = this.convs.get(c.id);
    const oldSeq = old ? old.last_seq || 0 : 0;
    const oldLast = old ? old.last_message : null;
    const merged = Object.assign(old || { unread_count: 0, last_seq: 0, last_message: null }, c);
    if (oldSeq > (c.last_seq || 0)) {
      // a snapshot older than the events applied since: keep what they said
      merged.last_seq = oldSeq;
      merged.last_message = oldLast;
      if (typeof c.unread_count === 'number') {
        const read = this.readSeq(c.id, this.me);
        const from = Math.max(c.last_seq || 0, read);
        merged.unread_count = (read >= (c.last_seq || 0) ? 0 : c.unread_count)
          + this.messages(c.id).filter((m) => m.seq > from && m.sender !== this.me
                                              && !m.deleted).length;
      }
    }
    this.convs.set(c.id, merged);
    if (c.receipts) {
      const m = this._receipts(c.id);
      for (const r of c.receipts) {
        this._moveReceipt(m, r.user, r.delivered_seq, r.read_seq);
      }
    }
    if (this.me && this.readSeq(c.id, this.me) >= (merged.last_seq || 0)) {
      merged.unread_count = 0;  // read here already: an older count is stale
    }
    merged._gen = ++this.gen;
    return merged;
  }

  removeConversation(id) {
    this.convs.delete(id);
    const box = this.msgs.get(id);
    if (box) {
      for (const m of box.list) {
        this.byId.delete(m.id);
      }
      this.msgs.delete(id);
    }
  }

  _box(cid) {
    let b = this.msgs.get(cid);
    if (!b) {
      b = { list: [], pending: [] };
      this.msgs.set(cid, b);
    }
    return b;
  }

  // forget stored messages before seq (unsent ones stay)
  dropBefore(cid, seq) {
    const b = this.msgs.get(cid);
    if (!b) {
      return;
    }
    const keep = [];
    for (const m of b.list) {
      if (m.seq < seq) {
        this.byId.delete(m.id);
        if (m.client_msg_id && this.byCmid.get(m.client_msg_id) === m) {
          this.byCmid.delete(m.client_msg_id);
        }
      } else {
        keep.push(m);
      }
    }
    b.list = keep;
    b.complete = false;
  }

  hasMessages(cid) {
    const b = this.msgs.get(cid);
    return !!b && (b.list.length > 0 || b.loaded);
  }

  messages(cid) {
    const b = this.msgs.get(cid);
    if (!b) {
      return [];
    }
    return b.list.concat(b.pending);
  }

  // the oldest and newest seq held (history paging, gap detection)
  range(cid) {
    const b = this.msgs.get(cid);
    if (!b || b.list.length === 0) {
      return null;
    }
    return { first: b.list[0].seq, last: b.list[b.list.length - 1].seq };
  }

  // An optimistic message, before the server has it.
  addPending(m) {
    const b = this._box(m.conversation_id);
    const msg = Object.assign({
      id: null, seq: null, sender: this.me, format: 'text', attachments: [],
      edited_at: null, deleted: false, reply_to: null, state: 'sending',
    }, m);
    if (this.byCmid.has(msg.client_msg_id)) {
      return this.byCmid.get(msg.client_msg_id);
    }
    b.pending.push(msg);
    this.byCmid.set(msg.client_msg_id, msg);
    return msg;
  }

  setPendingState(cmid, state, error) {
    const m = this.byCmid.get(cmid);
    if (!m || m.seq != null) {
      return null;
    }
    m.state = state;
    m.error = error;
    return m;
  }

  dropPending(cmid) {
    const m = this.byCmid.get(cmid);
    if (!m || m.seq != null) {
      return null;
    }
    this.byCmid.delete(cmid);
    const b = this._box(m.conversation_id);
    b.pending = b.pending.filter((x) => x !== m);
    return m;
  }

  // A message from the server (event, reply or history).  Returns
  // { msg, isNew, gap } -- gap: { after, before } seqs missing before it.
  applyMessage(sm, opts = {}) {
    const cid = sm.conversation_id;
    const b = this._box(cid);
    let msg = this.byId.get(sm.id);
    let isNew = false;

    if (!msg && sm.client_msg_id && sm.sender === this.me) {
      const p = this.byCmid.get(sm.client_msg_id);
      if (p && p.conversation_id === cid) {
        msg = p;
        b.pending = b.pending.filter((x) => x !== p);
      }
    }

    let gap = null;
    const r = this.range(cid);

    if (!msg || msg.seq == null) {
      // live events must follow what we hold; history pages fill in
      if (opts.live && r && sm.seq > r.last + 1) {
        gap = { after: r.last, before: sm.seq };
      }
      if (!msg) {
        msg = {};
        isNew = true;
      }
      const reactions = msg.reactions;
      Object.assign(msg, sm);
      if (!sm.reactions && reactions) {
        msg.reactions = reactions;
      }
      delete msg.error;
      this.byId.set(msg.id, msg);
      if (msg.client_msg_id && msg.sender === this.me) {
        this.byCmid.set(msg.client_msg_id, msg);
      }
      insertBySeq(b.list, msg);
    } else {
      // an edit or a tombstone replaces the text; history carries reactions
      if (sm.reactions && msg._rx) {
        msg._rx.clear();
      }
      const reactions = msg.reactions;
      const c = this.convs.get(cid);
      if (sm.deleted && !msg.deleted && c && c.unread_count > 0 && msg.sender !== this.me
          && msg.seq > this.readSeq(cid, this.me)) {
        c.unread_count--;       // deleted messages are not unread
      }
      Object.assign(msg, sm);
      if (!sm.reactions && reactions) {
        msg.reactions = reactions;
      }
      if (msg.deleted) {
        msg.reactions = [];
      }
    }

    const c = this.convs.get(cid);
    if (c) {
      c._gen = ++this.gen;
      const unread = msg.sender !== this.me && !msg.deleted
                     && msg.seq > this.readSeq(cid, this.me);
      if (msg.seq > (c.last_seq || 0)) {
        c.last_seq = msg.seq;
        if (opts.live && unread) {
          c.unread_count = (c.unread_count || 0) + 1;
        }
        if (opts.live && msg.sender === this.me) {
          c.unread_count = 0;   // sending reads everything before it
        }
      } else if (opts.gap && isNew && unread) {
        // a gap's message: the event after it moved last_seq already
        c.unread_count = (c.unread_count || 0) + 1;
      }
      if (!c.last_message || c.last_message.seq <= msg.seq) {
        c.last_message = msg;
      }
    }

    if (opts.live && msg.sender) {
      // sending moves the sender's own positions (PROTOCOL §9)
      this._moveReceipt(this._receipts(cid), msg.sender, msg.seq, msg.seq);
    }

    if (msg.sender === this.me) {
      msg.state = this.stateOf(msg);
    }

    return { msg, isNew, gap };
  }

  markHistoryLoaded(cid, complete) {
    const b = this._box(cid);
    b.loaded = true;
    if (complete) {
      b.complete = true;
    }
  }

  reactionApplied(ev) {
    const m = this.byId.get(ev.message_id);
    if (!m) {
      return null;
    }
    // the same event twice (a replay, history racing the stream) counts once
    const key = ev.user + '|' + ev.emoji;
    const what = ev.kind === 'reaction.added' ? 'added' : 'removed';
    if (!m._rx) {
      Object.defineProperty(m, '_rx', { value: new Map(), enumerable: false, writable: true,
                                        configurable: true });
    }
    if (m._rx.get(key) === what) {
      return m;
    }
    m._rx.set(key, what);
    const list = m.reactions ? m.reactions.slice() : [];
    let r = list.find((x) => x.emoji === ev.emoji);
    const mine = ev.user === this.me;
    if (ev.kind === 'reaction.added') {
      if (!r) {
        r = { emoji: ev.emoji, count: 0, me: false };
        list.push(r);
      } else if (mine && r.me) {
        return m;                 // our own echo of what the reply applied
      }
      r.count++;
      if (mine) {
        r.me = true;
      }
    } else if (r) {
      if (mine && !r.me) {
        return m;
      }
      r.count--;
      if (mine) {
        r.me = false;
      }
    }
    m.reactions = list.filter((x) => x.count > 0);
    return m;
  }

  setReactions(messageId, reactions) {
    const m = this.byId.get(messageId);
    if (m) {
      m.reactions = reactions;
      if (m._rx) {
        m._rx.clear();          // the server's count from here on
      }
    }
    return m;
  }

  _receipts(cid) {
    let m = this.receiptMap.get(cid);
    if (!m) {
      m = new Map();
      this.receiptMap.set(cid, m);
    }
    return m;
  }

  _moveReceipt(m, user, d, r) {
    const cur = m.get(user) || { user, delivered_seq: 0, read_seq: 0 };
    cur.delivered_seq = Math.max(cur.delivered_seq, d || 0, r || 0);
    cur.read_seq = Math.max(cur.read_seq, r || 0);
    m.set(user, cur);
    return cur;
  }

  readSeq(cid, user) {
    const r = this._receipts(cid).get(user);
    return r ? r.read_seq : 0;
  }

  receipts(cid) {
    return [...this._receipts(cid).values()];
  }

  // receipt event -> the own messages whose ticks changed
  applyReceipts(cid, list) {
    const m = this._receipts(cid);
    for (const r of list) {
      const before = m.get(r.user) ? m.get(r.user).read_seq : 0;
      this._moveReceipt(m, r.user, r.delivered_seq, r.read_seq);
      if (r.user === this.me && r.read_seq > before) {
        this.markReadLocal(cid, r.read_seq);
      }
    }
    return this.retick(cid);
  }

  markReadLocal(cid, seq) {
    const c = this.convs.get(cid);
    this._moveReceipt(this._receipts(cid), this.me, seq, seq);
    if (!c) {
      return null;
    }
    const r = this.range(cid);
    if (seq >= (c.last_seq || 0)) {
      c.unread_count = 0;
    } else if (r && r.first <= seq + 1) {
      // everything after it is held: count it
      c.unread_count = this.messages(cid).filter((x) => x.seq > seq && x.sender !== this.me
                                                 && !x.deleted).length;
    } else {
      c.stale = true;             // the client asks the server
    }
    return c;
  }

  retick(cid) {
    const changed = [];
    const b = this.msgs.get(cid);
    if (!b) {
      return changed;
    }
    for (const m of b.list) {
      if (m.sender === this.me) {
        const s = this.stateOf(m);
        if (s !== m.state) {
          m.state = s;
          changed.push(m);
        }
      }
    }
    return changed;
  }

  // An own stored message is delivered / read once every other member's
  // position passed it (a direct conversation: the other person).
  stateOf(m) {
    if (m.seq == null) {
      return m.state || 'sending';
    }
    const c = this.convs.get(m.conversation_id);
    const others = c && c.members ? c.members.filter((u) => u !== this.me) : [];
    if (others.length === 0) {
      return 'sent';
    }
    const rm = this._receipts(m.conversation_id);
    let delivered = true;
    let read = true;
    for (const u of others) {
      const r = rm.get(u);
      if (!r || r.delivered_seq < m.seq) {
        delivered = false;
      }
      if (!r || r.read_seq < m.seq) {
        read = false;
      }
    }
    return read ? 'read' : delivered ? 'delivered' : 'sent';
  }

  readBy(m) {
    return this.receipts(m.conversation_id)
      .filter((r) => r.user !== m.sender && r.read_seq >= m.seq).map((r) => r.user);
  }

  // what snapshot() saved: conversations, receipts (the ticks), messages
  restore(snap) {
    for (const c of snap.convs || []) {
      this.upsertConversation(c);
    }
    for (const cid of Object.keys(snap.receipts || {})) {
      this.applyReceipts(cid, snap.receipts[cid]);
    }
    for (const cid of Object.keys(snap.msgs || {})) {
      for (const m of snap.msgs[cid]) {
        this.applyMessage(m, {});
      }
    }
  }

  // the last messages of each conversation, for the cache
  snapshot(n) {
    const out = { convs: [...this.convs.values()].map(stripConv), msgs: {}, receipts: {} };
    for (const [cid, m] of this.receiptMap) {
      out.receipts[cid] = [...m.values()];
    }
    for (const [cid, b] of this.msgs) {
      if (b.list.length) {
        out.msgs[cid] = b.list.slice(-n);
      }
    }
    return out;
  }
}

function stripConv(c) {
  const o = Object.assign({}, c);
  delete o.receipts;
  return o;
}

function lastActivity(c) {
  const t = c.last_message ? c.last_message.created_at : c.created_at;
  return t ? Date.parse(t) || 0 : 0;
}

function insertBySeq(list, m) {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid].seq < m.seq) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (list[lo] === m) {
    return;
  }
  list.splice(lo, 0, m);
}

// ------------------------------------------------------- persistent store

// IndexedDB: the outbox (keyed by client_msg_id, ordered by `order`) and a
// key/value store for the cursor and the conversation cache.  Every call
// degrades to memory when IndexedDB is missing or refuses (private mode).
class Db {
  constructor(name) {
    this.name = name;
    this.mem = { outbox: new Map(), kv: new Map() };
    this.db = null;
    this.wanted = false;        // opened once: IndexedDB, never memory again
  }

  async open() {
    if (!this.name || typeof indexedDB === 'undefined') {
      return false;
    }
    try {
      this.db = await new Promise((resolve, reject) => {
        const rq = indexedDB.open(this.name, 1);
        rq.onupgradeneeded = () => {
          rq.result.createObjectStore('outbox', { keyPath: 'client_msg_id' });
          rq.result.createObjectStore('kv');
        };
        rq.onsuccess = () => resolve(rq.result);
        rq.onerror = () => reject(rq.error);
        rq.onblocked = () => reject(new Error('blocked'));
      });
      this.wanted = true;
      // another tab upgrading (or the browser closing it): reopen on next use
      const db = this.db;
      db.onversionchange = () => {
        db.close();
        if (this.db === db) {
          this.db = null;
        }
      };
      db.onclose = () => {
        if (this.db === db) {
          this.db = null;
        }
      };
      if (this.closed) {
        db.close();
        this.db = null;
      }
      return true;
    } catch (e) {
      this.db = null;
      return false;
    }
  }

  get persistent() { return this.wanted; }

  async _ensure() {
    if (this.closed) {
      throw chatError('closed');
    }
    if (!this.db && this.wanted) {
      // one reopen for every caller that finds the database gone
      if (!this._opening) {
        this._opening = this.open().finally(() => { this._opening = null; });
      }
      if (!(await this._opening) || !this.db) {
        throw chatError('unavailable', 'IndexedDB cannot be opened');
      }
    }
    return this.db;
  }

  async _tx(store, mode, fn) {
    const db = await this._ensure();
    return new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const st = tx.objectStore(store);
      let out;
      fn(st, (v) => { out = v; });
      tx.oncomplete = () => resolve(out);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  async outboxAll() {
    if (!this.wanted) {
      return [...this.mem.outbox.values()].sort((a, b) => a.order - b.order);
    }
    const all = await this._tx('outbox', 'readonly', (st, set) => {
      const rq = st.getAll();
      rq.onsuccess = () => set(rq.result);
    });
    return all.sort((a, b) => a.order - b.order);
  }

  async outboxGet(cmid) {
    if (!this.wanted) {
      return this.mem.outbox.get(cmid);
    }
    return this._tx('outbox', 'readonly', (st, set) => {
      const rq = st.get(cmid);
      rq.onsuccess = () => set(rq.result);
    });
  }

  async outboxPut(e) {
    if (!this.wanted) {
      this.mem.outbox.set(e.client_msg_id, e);
      return;
    }
    await this._tx('outbox', 'readwrite', (st) => st.put(e));
  }

  // Changes an entry only if it is still there, in one transaction: a
  // message discarded while its send was in flight stays discarded.
  async outboxUpdate(cmid, patch) {
    const apply = (e) => {
      for (const k of Object.keys(patch)) {
        if (patch[k] === undefined) {
          delete e[k];
        } else {
          e[k] = patch[k];
        }
      }
      return e;
    };
    if (!this.wanted) {
      const e = this.mem.outbox.get(cmid);
      return e ? apply(e) : null;
    }
    return this._tx('outbox', 'readwrite', (st, set) => {
      const rq = st.get(cmid);
      rq.onsuccess = () => {
        if (rq.result) {
          const e = apply(rq.result);
          st.put(e);
          set(e);
        } else {
          set(null);
        }
      };
    });
  }

  async outboxDelete(cmid) {
    if (!this.wanted) {
      this.mem.outbox.delete(cmid);
      return;
    }
    await this._tx('outbox', 'readwrite', (st) => st.delete(cmid));
  }

  async get(k) {
    if (!this.wanted) {
      return this.mem.kv.get(k);
    }
    try {
      return await this._tx('kv', 'readonly', (st, set) => {
        const rq = st.get(k);
        rq.onsuccess = () => set(rq.result);
      });
    } catch (e) {
      return undefined;
    }
  }

  async put(k, v) {
    if (!this.wanted) {
      this.mem.kv.set(k, v);
      return true;
    }
    try {
      await this._tx('kv', 'readwrite', (st) => st.put(v, k));
      return true;
    } catch (e) {
      return false;             // the cache is an optimization
    }
  }

  close() {
    this.closed = true;
    if (this.db) {
      this.db.close();
      this.db = null;
    }
  }
}

// the service worker's list of outboxes (see client/chat-sw.js)
function syncRegistry(op, key, value) {
  return new Promise((resolve, reject) => {
    const rq = indexedDB.open('ngx-chat-sync', 1);
    rq.onupgradeneeded = () => rq.result.createObjectStore('outboxes');
    rq.onerror = () => reject(rq.error);
    rq.onsuccess = () => {
      const db = rq.result;
      const tx = db.transaction('outboxes', 'readwrite');
      if (op === 'put') {
        tx.objectStore('outboxes').put(value, key);
      } else {
        tx.objectStore('outboxes').delete(key);
      }
      tx.oncomplete = () => { db.close(); resolve(); };
      tx.onerror = () => { db.close(); reject(tx.error); };
    };
  });
}

// ------------------------------------------------------------- transports

// Every transport calls back the client the same way:
//   up(welcome)  once events flow;  frame(obj)  for each server object;
//   down({ code, reason, error, opened })  once, at its end.
// request(obj) sends a WebSocket request; REST does it for the others.

class Transport {
  constructor(name, client, cb) {
    this.name = name;
    this.c = client;
    this.cb = cb;
    this.done = false;
    this.opened = false;
  }

  // a new ticket (single use) and the cursor, as a query; null once closed
  async _query(fields, cursor) {
    const ticket = await this.c._ticket();
    if (this.done) {
      return null;
    }
    const q = new URLSearchParams(Object.assign({ ticket }, fields));
    if (cursor) {
      q.set('cursor', cursor);
    }
    return q;
  }

  // the end, told once
  _end(code, reason, error) {
    if (this.done) {
      return;
    }
    this.close(code);
    this.cb.down({ code, reason, error, opened: this.opened });
  }

  send() { return false; }
}

class WsTransport extends Transport {
  constructor(client, cb) {
    super('websocket', client, cb);
    this.ws = null;
  }

  async open(cursor) {
    const q = await this._query({ device_id: this.c.deviceId }, cursor);
    if (!q) {
      return;
    }
    const ws = new WebSocket(this.c._wsUrl('/ws?' + q), 'chat.v1');
    this.ws = ws;
    this.timer = setTimeout(() => this._end(4000, 'open timeout'), OPEN_TIMEOUT_MS);
    ws.onmessage = (ev) => this._message(ev);
    ws.onclose = (ev) => this._end(ev.code, ev.reason);
    ws.onerror = noop;          // onclose follows with the code
  }

  _message(ev) {
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    this.awaiting = false;
    if (m.type === 'welcome' && !this.opened) {
      this.opened = true;
      clearTimeout(this.timer);
      this._keepalive();
      this.cb.up(m);
      return;
    }
    this.cb.frame(m);
  }

  // The server pings too, but a browser cannot see that: a dead path shows
  // only as our own ping going unanswered.
  // A hidden tab's timers may run once a minute: what counts is whether
  // the last ping was answered, not how long ago something came.
  _keepalive() {
    this.timer = setInterval(() => this._ping(PONG_TIMEOUT_MS), PING_MS);
  }

  _ping(wait) {
    if (this.awaiting) {
      if (mono() - this.pingAt >= wait) {
        this._end(4000, 'no answer');
      }
      return;
    }
    this.awaiting = true;       // cleared by anything the server sends
    this.pingAt = mono();
    this.send({ type: 'ping', id: 'p' + now() });
  }

  // the browser says the network went away: find out now, not in 35 s
  check() {
    if (!this.opened || this.done) {
      return;
    }
    if (!this.awaiting) {
      this._ping(0);
    }
    clearTimeout(this.checkTimer);
    this.checkTimer = setTimeout(() => {
      if (!this.done && this.awaiting) {
        this._end(4000, 'no answer');
      }
    }, 3000);
  }

  send(obj) {
    if (!this.ws || this.ws.readyState !== 1) {
      return false;
    }
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  // our own ends say 1000 to the server; one the server or the network
  // ended is closed without a code
  close(code = 1000) {
    if (this.done) {
      return;
    }
    this.done = true;
    clearTimeout(this.timer);
    clearInterval(this.timer);
    clearTimeout(this.checkTimer);
    if (this.ws) {
      this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
      try {
        this.ws.close(code >= 4000 || code === 1000 ? 1000 : undefined);
      } catch (e) {
        // already closing
      }
    }
  }
}

class SseTransport extends Transport {
  constructor(client, cb) {
    super('sse', client, cb);
  }

  async open(cursor) {
    const q = await this._query({}, cursor);
    if (!q) {
      return;
    }
    const es = new EventSource(this.c._url('/events?' + q));
    this.es = es;
    this.timer = setTimeout(() => this._end('timeout', 'open timeout'), OPEN_TIMEOUT_MS);
    const onEvent = (ev) => {
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (m.type === 'welcome') {
        if (!this.opened) {
          this.opened = true;
          clearTimeout(this.timer);
          this.cb.up(m);
        }
        return;
      }
      this.cb.frame(m);
    };
    for (const k of ['welcome', 'resync_required', ...DURABLE_KINDS, ...EPHEMERAL_KINDS]) {
      es.addEventListener(k, onEvent);
    }
    es.addEventListener('message', onEvent);
    // the server's own "event: error" carries data; the browser's has none
    es.addEventListener('error', (ev) => {
      if (ev.data) {
        let m = {};
        try {
          m = JSON.parse(ev.data);
        } catch (e) {
          // keep {}
        }
        const err = m.error || {};
        this._end(err.code || 'unavailable', err.message, err);
        return;
      }
      // the EventSource would retry the spent ticket by itself and give
      // up for good on a 401: reconnects are ours
      this._end(this.opened ? 'network' : 'failed', 'stream ended');
    });
  }

  close() {
    this.done = true;
    clearTimeout(this.timer);
    if (this.es) {
      this.es.close();
    }
  }
}

class PollTransport extends Transport {
  constructor(client, cb) {
    super('poll', client, cb);
    this.abort = new AbortController();
  }

  async open(cursor) {
    this.cursor = cursor;
    let first = true;
    while (!this.done) {
      let j;
      try {
        const q = new URLSearchParams({ timeout_ms: String(first ? 0 : POLL_TIMEOUT_MS) });
        if (this.cursor) {
          q.set('cursor', this.cursor);
        }
        j = await this.c._fetchJson('GET', '/poll?' + q, undefined, this.abort.signal);
      } catch (e) {
        if (!this.done) {
          this._end(e.code || 'network', e.message, e);
        }
        return;
      }
      if (this.done) {
        return;
      }
      if (first) {
        // with events, their cursors move the client's; else the answer's
        first = false;
        this.opened = true;
        this.cb.up({ cursor: (j.events || []).length ? null : j.cursor });
      }
      for (const m of j.events || []) {
        this.cb.frame(m);
        if (this.done) {
          return;
        }
      }
      if (j.cursor) {
        this.cursor = j.cursor;
      }
    }
  }

  close() {
    this.done = true;
    this.abort.abort();
  }
}

const TRANSPORTS = { websocket: WsTransport, sse: SseTransport, poll: PollTransport };

// ----------------------------------------------------------------- client

let tabSeq = 0;
let orderSeq = 0;

export class ChatClient {
  constructor(opts) {
    if (!opts || !opts.url || typeof opts.token !== 'function') {
      throw new TypeError('ChatClient needs { url, token }');
    }
    this.o = Object.assign({
      transports: ALL_TRANSPORTS, backoffBase: 500, backoffCap: 30000,
      transportMemoryMs: 10 * 60000, probeIntervalMs: 60000, shareConnection: true,
      storage: 'ngx-chat', typingRefreshMs: 4000, typingIdleMs: 5000, readDelayMs: 500,
      presence: true,
    }, opts);
    this.base = new URL(opts.url.replace(/\/+$/, ''), globalThis.location ? location.href : undefined);
    this.ev = new Emitter();
    this.store = new ChatStore(null);
    this.user = null;
    this.cursor = null;
    this.leader = false;
    this.closed = false;
    this.tabId = 't' + (++tabSeq) + '-' + uuid().slice(0, 8);
    this.info = { state: 'idle', transport: null, text: 'Not connected', leader: false };
    this._timers = new Set();
    this._listeners = [];
    this._pending = new Map();      // WebSocket request id -> { resolve, reject, timer }
    this._reqSeq = 0;
    this._sendWaiters = new Map();  // client_msg_id -> [{ resolve, reject }]
    this._typing = new Map();       // conversation id -> { since, last, idle timer }
    this._peersTyping = new Map();  // conversation id -> Map(user -> expiry timer)
    this._presence = new Map();
    this._reads = new Map();        // conversation id -> seq to send
    this._myReads = new Map();      // follower: the reads this tab made
    this._attUrls = new Map();
    this._tabsVisible = new Map();  // leader: tab -> visible
    this._psubs = new Map();        // leader: tab -> [users]
    this.attempt = 0;
  }

  // ------------------------------------------------------------ lifecycle

  on(ev, fn) { return this.ev.on(ev, fn); }

  off(ev, fn) { this.ev.off(ev, fn); }

  get listenerCount() { return this._listeners.length + this._timers.size; }

  async start() {
    if (!this._started) {
      // a start that failed (no token: offline at page load) may be retried
      this._started = this._start().catch((e) => {
        this._started = null;
        this._release();
        if (this.db) {
          this.db.close();
          this.db = null;
        }
        throw e;
      });
    }
    return this._started;
  }

  async _start() {
    const token = await this._token(false);
    const claims = jwtClaims(token);
    this.user = { id: claims.sub, name: claims.name || claims.sub, role: claims.role || 'user' };
    this.store.me = this.user.id;
    const key = this.base.origin + this.base.pathname + '|' + this.user.id;

    const db = new Db(this.o.storage ? this.o.storage + ':' + this.base.host + ':' + this.user.id
                                     : null);
    this.db = db;
    const persistent = await db.open();
    if (this.closed) {
      db.close();
      return;
    }
    // Web Locks exist in secure contexts only (https, localhost): on plain
    // http every tab connects for itself, with a device id of its own
    const share = this.o.shareConnection && persistent
                  && typeof BroadcastChannel !== 'undefined'
                  && typeof navigator !== 'undefined' && !!navigator.locks;
    this.deviceId = this.o.deviceId || this._deviceId(share);

    if (share) {
      // listen before reading the cache: what the leader relays meanwhile
      // is applied after it, not lost
      this._relayQueue = [];
      this.bc = new BroadcastChannel('ngx-chat:' + key);
      this.bc.onmessage = (ev) => {
        if (this._relayQueue) {
          this._relayQueue.push(ev.data);
        } else {
          this._onRelay(ev.data);
        }
      };
    }

    await this._paintFromCache();
    if (this.closed) {
      return;
    }

    this._listen(globalThis, 'online', () => this._wake('online'));
    this._listen(globalThis, 'offline', () => this._offline());
    if (typeof document !== 'undefined') {
      this._listen(document, 'visibilitychange', () => this._visibility());
    }

    if (share) {
      const queued = this._relayQueue;
      this._relayQueue = null;
      for (const m of queued) {
        this._onRelay(m);
      }
      this._lockAbort = new AbortController();
      navigator.locks.request('ngx-chat:' + key, { signal: this._lockAbort.signal }, () => {
        if (this.closed) {
          return undefined;
        }
        return new Promise((release) => {
          this._releaseLock = release;
          this._becomeLeader();
        });
      }).catch(noop);
      // until a leader answers, say so
      this._post({ t: 'hello', tab: this.tabId });
      this._visibility();
    } else {
      this._becomeLeader();
    }

    this.loadConversations().catch(noop);
  }

  async close() {
    if (this.closed) {
      return;
    }
    this.closed = true;
    for (const cid of [...this._typing.keys()]) {
      this.stopTyping(cid);
    }
    this._flushReads();
    if (this.transport) {
      this.transport.close();
      this.transport = null;
    }
    if (this._probe) {
      this._probe.close();
      this._probe = null;
    }
    if (this._lockAbort) {
      this._lockAbort.abort();
    }
    if (this._releaseLock) {
      this._releaseLock();
    }
    if (this.bc && !this.leader) {
      this._post({ t: 'bye', tab: this.tabId });
    }
    this._release();
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(chatError('closed'));
    }
    this._pending.clear();
    for (const [, ws] of this._sendWaiters) {
      for (const w of ws) {
        w.reject(chatError('closed'));
      }
    }
    this._sendWaiters.clear();
    for (const m of this._peersTyping.values()) {
      for (const t of m.values()) {
        clearTimeout(t);
      }
    }
    this._peersTyping.clear();
    for (const u of this._attUrls.values()) {
      u.then((x) => URL.revokeObjectURL(x), noop);
    }
    this._attUrls.clear();
    await this._saveCache();
    if (this.o.serviceWorker && this.db && (await this.db.outboxAll().catch(() => [])).length) {
      await this._registerSync();
    }
    if (this.db) {
      this.db.close();
    }
    this._setState('closed', { text: 'Closed' });
    this.ev.clear();
  }

  // the channel, the timers and the listeners this client holds
  _release() {
    if (this.bc) {
      this.bc.close();
      this.bc = null;
    }
    for (const t of this._timers) {
      clearTimeout(t);
    }
    this._timers.clear();
    for (const [target, ev, fn] of this._listeners) {
      target.removeEventListener(ev, fn);
    }
    this._listeners = [];
  }

  _listen(target, ev, fn) {
    if (target && target.addEventListener) {
      target.addEventListener(ev, fn);
      this._listeners.push([target, ev, fn]);
    }
  }

  _later(fn, ms) {
    if (this.closed) {
      return null;
    }
    const t = setTimeout(() => {
      this._timers.delete(t);
      if (!this.closed) {
        fn();
      }
    }, ms);
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    if (t) {
      clearTimeout(t);
      this._timers.delete(t);
    }
  }

  _deviceId(share) {
    // one device per browser when tabs share the connection; else one per
    // client (two tabs with one device id would replace each other, 4009;
    // a duplicated tab copies sessionStorage, so not that either)
    const fresh = () => 'web-' + uuid().replace(/-/g, '').slice(0, 20);
    if (!share) {
      return fresh();
    }
    const k = 'ngx-chat-device';
    try {
      const st = localStorage;
      let d = st.getItem(k);
      if (!d) {
        d = 'web-' + uuid().replace(/-/g, '').slice(0, 20);
        st.setItem(k, d);
      }
      return d;
    } catch (e) {
      return 'web-' + uuid().replace(/-/g, '').slice(0, 20);
    }
  }

  _setState(state, extra = {}) {
    this.info = Object.assign({ state, transport: this.transportName || null,
                                leader: this.leader }, extra);
    if (!this.info.text) {
      this.info.text = state;
    }
    this.ev.emit('state', this.info);
    if (this.leader) {
      this._post({ t: 'state', info: this.info, cursor: this.cursor });
    }
  }

  // ---------------------------------------------------------------- auth

  async _token(force) {
    if (this._tokForce) {
      this._tokForce = false;
      force = true;
    }
    const fresh = this._tok && !force && (this._tokExp === 0 || this._tokExp - now() > 30000);
    if (fresh) {
      return this._tok;
    }
    if (!this._tokPending) {
      this._tokPending = Promise.resolve(this.o.token(!!force)).then((t) => {
        this._tokPending = null;
        if (typeof t !== 'string' || !t) {
          throw chatError('unauthorized', 'the token provider gave no token');
        }
        this._tok = t;
        this._refreshFails = 0;
        const cl = jwtClaims(t);
        // the token's life on this browser's clock: a clock that is off
        // must not make every token look expired
        // (a cached token has less left than exp - iat: the smaller one
        // counts, unless this clock is so far off that it says expired)
        const left = cl.exp ? cl.exp * 1000 - now() : 0;
        const full = cl.exp && cl.iat ? (cl.exp - cl.iat) * 1000 : left;
        const life = left > 0 ? Math.min(full, left) : full;
        this._tokExp = cl.exp ? now() + Math.max(life, 0) : 0;
        this._scheduleRefresh();
        return t;
      }, (e) => {
        this._tokPending = null;
        throw e;
      });
    }
    return this._tokPending;
  }

  // a minute before expiry (or at 80% of a short life) a WebSocket says
  // `auth`; other transports simply use the new token next time
  _scheduleRefresh() {
    this._cancel(this._refreshTimer);
    if (!this._tokExp || this.closed) {
      return;
    }
    // a minute before expiry; a short-lived token at 80% of its life
    const left = this._tokExp - now();
    // (setTimeout fires at once past 2^31-1 ms: a token of a month is
    // looked at again in 24 days)
    const at = Math.min(0x7fffffff, Math.max(5000, left > 300000 ? left - 60000 : left * 0.8));
    this._refreshTimer = this._later(async () => {
      try {
        const t = await this._token(true);
        if (this.transport && this.transport.name === 'websocket') {
          this._request({ type: 'auth', token: t }).catch(noop);
        }
      } catch (e) {
        // the provider failed: ask again, backing off
        this._refreshFails = (this._refreshFails || 0) + 1;
        this._cancel(this._refreshTimer);
        this._refreshTimer = this._later(() => this._scheduleRefresh(),
                                         backoffDelay(this._refreshFails, 2000, 60000));
      }
    }, at);
  }

  async _ticket() {
    const j = await this.rest('POST', '/api/tickets');
    return j.ticket;
  }

  // ---------------------------------------------------------------- REST

  _url(path) { return this.base.href + path; }

  _wsUrl(path) { return this._url(path).replace(/^http/, 'ws'); }

  async _fetchJson(method, path, body, signal, retried) {
    const token = await this._token(false);
    if (signal && signal.aborted) {
      throw chatError('closed', 'aborted');   // closed while the token was on its way
    }
    const headers = { Authorization: 'Bearer ' + token };
    let payload;
    if (body instanceof Blob) {
      payload = body;
      headers['Content-Type'] = body.type || 'application/octet-stream';
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers['Content-Type'] = 'application/json';
    }
    // a request that hangs (a half-open connection) must not hold the
    // outbox: every call has a deadline; a held poll gets its own
    const ac = new AbortController();
    // an upload may take long on a slow uplink: a second per 64 KB more
    const limit = (path.startsWith('/poll') ? POLL_TIMEOUT_MS + 15000 : 20000)
                  + (body instanceof Blob ? Math.ceil(body.size / 65536) * 1000 : 0);
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; ac.abort(); }, limit);
    const onAbort = () => ac.abort();
    if (signal) {
      signal.addEventListener('abort', onAbort);
    }
    let r;
    let text;
    try {
      r = await fetch(this._url(path), { method, headers, body: payload, signal: ac.signal,
                                         cache: 'no-store' });
      text = await r.text();    // under the same deadline: a body can hang too
    } catch (e) {
      if (timedOut) {
        throw chatError('timeout');
      }
      if (e.name === 'AbortError') {
        throw chatError('closed', 'aborted');
      }
      throw chatError('network', 'network error');
    } finally {
      clearTimeout(timer);
      if (signal) {
        signal.removeEventListener('abort', onAbort);
      }
    }
    let j = null;
    if (text) {
      try {
        j = JSON.parse(text);
      } catch (e) {
        j = null;
      }
    }
    if (r.ok) {
      if (text && (j === null || typeof j !== 'object')) {
        // a 200 that is not ours (a captive portal's login page)
        throw chatError('unavailable', 'the answer was not the chat server\'s',
                        { status: r.status });
      }
      return j || {};
    }
    const err = (j && j.error) || {};
    const code = err.code || STATUS_CODES[r.status]
                 || (r.status >= 500 ? 'unavailable' : 'bad_request');
    if (r.status === 401 && !retried) {
      await this._token(true);
      return this._fetchJson(method, path, body, signal, true);
    }
    let ra = err.retry_after_ms;
    if (ra === undefined && r.headers.get('Retry-After')) {
      ra = 1000 * Number(r.headers.get('Retry-After'));
    }
    throw chatError(code, err.message, { status: r.status, retry_after_ms: ra });
  }

  rest(method, path, body) {
    if (!path.startsWith('/api/')) {
      path = '/api' + (path.startsWith('/') ? path : '/' + path);
    }
    return this._fetchJson(method, path, body);
  }

  // ------------------------------------------------------- leader / relay

  _post(msg) {
    if (this.bc) {
      try {
        this.bc.postMessage(msg);
      } catch (e) {
        // closed channel
      }
    }
  }

  _becomeLeader() {
    if (this.closed || this.leader) {
      return;
    }
    this.leader = true;
    this._tabsVisible.set(this.tabId, this._visible());
    for (const [cid, seq] of this._myReads) {
      this._queueRead(cid, seq);      // the old leader may have died with them
    }
    this._myReads.clear();
    this._post({ t: 'leader', tab: this.tabId });
    this.ev.emit('leader', { leader: true });
    this._restoreOutbox().then(() => this._connect());
  }

  _onRelay(m) {
    if (this.closed || !m) {
      return;
    }
    // every tab shows what any tab typed or dropped
    if (m.t === 'sending') {
      this._showPending(m.entry);
      return;
    }
    if (m.t === 'discarded') {
      this._discarded(m.cmid);
      return;
    }
    if (this.leader) {
      switch (m.t) {
      case 'hello':
        this._post({ t: 'state', info: this.info, cursor: this.cursor });
        return;
      case 'flush':
        this._restoreOutbox().then(() => this._flushOutbox());
        return;
      case 'vis':
        this._tabsVisible.set(m.tab, m.visible);
        this._sendPresence();
        return;
      case 'psub':
        this._psubs.set(m.tab, m.users);
        this._sendPresenceSub();
        return;
      case 'bye':
        this._tabsVisible.delete(m.tab);
        this._psubs.delete(m.tab);
        this._sendPresence();
        return;
      case 'typing':
        this._typingOut(m.conversation_id, m.state);
        return;
      case 'read':
        if (m.seq > this.store.readSeq(m.conversation_id, this.user.id)) {
          // the server does not echo a read to the connection that sent it:
          // this tab's badge learns it here
          this.store.markReadLocal(m.conversation_id, m.seq);
          this._emitConv(m.conversation_id);
          this._post({ t: 'readlocal', conversation_id: m.conversation_id, seq: m.seq });
          this._queueRead(m.conversation_id, m.seq);
        }
        return;
      default:
        return;
      }
    }

    switch (m.t) {
    case 'leader':
      // a new leader: tell it what this tab shows and wants
      this._visibility();
      if (this._mySub) {
        this._post({ t: 'psub', tab: this.tabId, users: this._mySub });
      }
      for (const [cid, seq] of this._myReads) {
        this._post({ t: 'read', conversation_id: cid, seq });
      }
      this._post({ t: 'flush' });
      return;
    case 'state':
      if (m.cursor) {
        this.cursor = m.cursor;
      }
      this.transportName = m.info.transport;
      this.info = Object.assign({}, m.info, { leader: false });
      this.ev.emit('state', this.info);
      return;
    case 'frame':
      this._frame(m.frame, true);
      return;
    case 'sent':
      this._sent(m.cmid, m.message, true);
      return;
    case 'failed':
      this._failed(m.cmid, m.error, true);
      return;
    case 'readlocal':
      // read in another tab: the server tells no tab of this connection
      if (m.seq > this.store.readSeq(m.conversation_id, this.user.id)) {
        this.store.markReadLocal(m.conversation_id, m.seq);
        this._emitConv(m.conversation_id);
      }
      return;
    default:
      return;
    }
  }

  // ---------------------------------------------------------- connecting

  _order() {
    const order = this.o.transports.filter((t) => TRANSPORTS[t]);
    return order.length ? order : ['websocket'];
  }

  _remembered() {
    try {
      const r = JSON.parse(localStorage.getItem('ngx-chat-transport') || 'null');
      if (r && r.until > now() && this._order().includes(r.name)) {
        return r.name;
      }
    } catch (e) {
      // none
    }
    return null;
  }

  _remember(name) {
    try {
      if (name === this._order()[0]) {
        localStorage.removeItem('ngx-chat-transport');
      } else {
        localStorage.setItem('ngx-chat-transport',
                             JSON.stringify({ name, until: now() + this.o.transportMemoryMs }));
      }
    } catch (e) {
      // private mode: nothing remembered
    }
  }

  _connect() {
    if (this.closed || !this.leader || this.transport) {
      return;
    }
    this._cancel(this._retryTimer);
    this._retryTimer = null;
    const order = this._order();
    if (!this.transportName || !order.includes(this.transportName)) {
      this.transportName = this._remembered() || order[0];
    }
    const name = this.transportName;
    const t = new TRANSPORTS[name](this, {
      up: (w) => this._up(t, w),
      frame: (f) => { if (this.transport === t) this._frame(f, false); },
      down: (d) => this._down(t, d),
    });
    this.transport = t;
    this._setState('connecting', { text: 'Connecting…' });
    t.open(this.cursor).catch((e) => {
      // no ticket: the server is unreachable, not this transport's fault
      t.close();
      this._down(t, { code: e.code || 'network', error: e, opened: false, noTicket: true });
    });
  }

  _up(t, w) {
    if (this.transport !== t) {
      return;
    }
    this.connectedAt = now();
    if (w.cursor) {
      this.cursor = w.cursor;
    }
    this._remember(t.name);
    this._setState('connected', { text: t.name === 'websocket' ? 'Connected'
                                    : 'Connected (' + (t.name === 'sse' ? 'streaming' : 'polling')
                                      + ' fallback)' });
    this._sendPresence();
    this._sendPresenceSub();
    this._flushOutbox();
    this._flushReads();
    this._scheduleProbe();
    if (this._staleAfterDrop || !this._listLoaded) {
      // what changed while away (unread counts of conversations we do not
      // hold events for) comes with the list
      this._staleAfterDrop = false;
      this.loadConversations().catch(noop);
    }
  }

  _down(t, d) {
    if (this.transport !== t) {
      return;
    }
    this.transport = null;
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(chatError('network', 'connection lost'));
    }
    this._pending.clear();
    this._cancel(this._ackTimer);
    this._ackTimer = null;
    this._cancel(this._probeTimer);
    if (this.closed) {
      return;
    }

    const order = this._order();
    const code = d.code;
    let delay;
    let error = d.error ? plainError(d.error) : closeError(code, d.reason);

    if (code === 4009) {
      // replaced by a newer connection of this device: another window of
      // this browser holds it now; coming back would take it from that one
      this._setState('closed', { text: 'Connected in another window', error });
      return;
    }
    if (code === 4001 || code === 'token_expired' || code === 1008 || code === 'unauthorized') {
      this._tokForce = true;    // the next attempt asks for a new token
    }

    const healthy = d.opened && now() - this.connectedAt >= HEALTHY_MS;
    if (d.opened) {
      this._staleAfterDrop = true;
    }

    if (!d.opened && !d.noTicket && t.name !== order[order.length - 1]) {
      // the server answered REST but this transport did not come up (a
      // proxy that refuses upgrades, buffers streams): the next one, now
      this.transportName = order[order.indexOf(t.name) + 1];
      delay = 0;
    } else {
      if (!d.opened && !d.noTicket) {
        this.transportName = order[0];     // none worked: start over, later
      }
      // only a connection that lived resets the backoff: a server that
      // accepts and drops at once (whatever the code) is not hammered
      if (healthy) {
        this.attempt = 0;
      }
      delay = this.attempt === 0 && d.opened ? 0
              : backoffDelay(Math.max(1, this.attempt), this.o.backoffBase, this.o.backoffCap);
      if (delay === 0 && code === 1001) {
        // a reload closed every connection at once: come back spread
        delay = Math.floor(Math.random() * 1000);
      }
      this.attempt++;
      if (d.error && d.error.retry_after_ms) {
        delay = Math.max(delay, d.error.retry_after_ms);
      }
    }
    this._retry(delay, error);
  }

  _retry(delay, error) {
    if (delay === 0) {
      this._connect();
      return;
    }
    const offline = typeof navigator !== 'undefined' && navigator.onLine === false;
    const at = now() + delay;
    const text = (offline ? 'Offline' : errorText(error) || 'Disconnected')
                 + ' — retrying in ' + seconds(delay) + ' s';
    this._setState(offline ? 'offline' : 'retrying',
                   { retryInMs: delay, retryAt: at, text, error });
    this._retryTimer = this._later(() => {
      this._retryTimer = null;
      this._connect();
    }, delay);
  }

  // `online`, a page coming back into view: try now, not at the timer
  _wake() {
    if (this.leader && !this.transport && this._retryTimer) {
      this._cancel(this._retryTimer);
      this._retryTimer = null;
      this._connect();
    }
  }

  _offline() {
    if (this.leader && this.transport && this.transport.check) {
      this.transport.check();
    }
    if (this.leader && !this.transport && this._retryTimer) {
      this._setState('offline', Object.assign({}, this.info, { state: 'offline',
                     text: 'Offline — retrying when the network is back' }));
    }
  }

  // While on a fallback, try a WebSocket now and then; when one comes up,
  // move to it with the cursor (the fallback is closed first, so the two
  // never deliver at once).
  _scheduleProbe() {
    this._cancel(this._probeTimer);
    const order = this._order();
    if (!this.transport || this.transport.name === order[0]) {
      return;
    }
    this._probeTimer = this._later(() => this._runProbe(), this.o.probeIntervalMs);
  }

  _runProbe() {
    const cur = this.transport;
    if (!cur || this._probe) {
      return;
    }
    const best = this._order()[0];
    const p = new TRANSPORTS[best](this, {
      up: () => {
        p.close();
        this._probe = null;
        if (this.transport !== cur) {
          return;
        }
        cur.close();
        this.transport = null;
        this.transportName = best;
        this._remember(best);
        this._connect();
      },
      frame: noop,
      down: () => {
        this._probe = null;
        this._scheduleProbe();
      },
    });
    this._probe = p;
    // no cursor: a probe starts at "now" and is closed at its welcome
    p.open(null).catch(() => {
      p.close();
      this._probe = null;
      this._scheduleProbe();
    });
  }

  _visible() {
    return typeof document === 'undefined' || document.visibilityState !== 'hidden';
  }

  _visibility() {
    if (this.closed) {
      return;
    }
    const v = this._visible();
    if (v) {
      this._wake();
    }
    if (this.leader) {
      this._tabsVisible.set(this.tabId, v);
      this._sendPresence();
    } else {
      this._post({ t: 'vis', tab: this.tabId, visible: v });
    }
  }

  _sendPresence() {
    if (!this.o.presence || !this.transport || this.transport.name !== 'websocket') {
      return;
    }
    const status = [...this._tabsVisible.values()].some(Boolean) ? 'online' : 'away';
    if (status !== this._sentPresence || this._presenceConn !== this.transport) {
      this._sentPresence = status;
      this._presenceConn = this.transport;
      this.transport.send({ type: 'presence', status });
    }
  }

  _sendPresenceSub() {
    if (!this.transport || this.transport.name !== 'websocket') {
      return;
    }
    const all = new Set(this._mySub || []);
    for (const l of this._psubs.values()) {
      for (const u of l) {
        all.add(u);
      }
    }
    if (all.size === 0 && !this._subSent) {
      return;
    }
    this._subSent = true;
    this._request({ type: 'presence_sub', users: [...all].slice(0, 256) })
      .then((r) => {
        for (const p of (r && r.presence) || []) {
          this._applyPresence(p, true);
        }
      }, noop);
  }

  // ------------------------------------------------------- server frames

  _frame(m, relayed) {
    if (!m || this.closed) {
      return;
    }
    if (!relayed && this.leader && m.type !== 'reply') {
      this._post({ t: 'frame', frame: m });
    }
    if (m.type === 'reply') {
      const p = this._pending.get(m.id);
      if (p) {
        this._pending.delete(m.id);
        clearTimeout(p.timer);
        if (m.ok) {
          p.resolve(m.result || {});
        } else {
          const e = m.error || {};
          p.reject(chatError(e.code || 'internal', e.message,
                             { retry_after_ms: e.retry_after_ms }));
        }
      }
      return;
    }
    if (m.type === 'resync_required') {
      if (m.cursor) {
        this.cursor = m.cursor;
      }
      this._ack();
      this._resync(m.reason || 'resync');
      return;
    }
    if (m.type !== 'event' || !m.event) {
      return;
    }
    if (m.cursor) {
      this.cursor = m.cursor;
      if (this.leader) {
        this._ack();
        this._saveCacheSoon();
      }
    }
    this.ev.emit('event', m.event);
    this._apply(m.event);
  }

  _apply(e) {
    const s = this.store;
    switch (e.kind) {
    case 'message.new':
    case 'message.edited':
    case 'message.deleted': {
      if (!e.message) {
        return;
      }
      if (!s.conversation(e.conversation_id)) {
        // a conversation we have not listed yet: fetch it once
        this.loadConversation(e.conversation_id).catch(noop);
      }
      if (e.kind !== 'message.new' && !s.byId.has(e.message.id)) {
        // a change to a message not held: history shows it as it is now;
        // only the list's preview may need it
        const c = s.conversation(e.conversation_id);
        if (c && e.kind === 'message.deleted' && e.message.sender !== this.user.id
            && e.message.seq > s.readSeq(c.id, this.user.id) && c.unread_count > 0) {
          c.unread_count--;             // deleted messages are not unread
          this._emitConv(c.id);
        }
        if (c && c.last_message && c.last_message.id === e.message.id) {
          c.last_message = e.message;
          this._emitConv(c.id);
        }
        return;
      }
      const r = s.applyMessage(e.message, { live: true });
      if (e.kind === 'message.new' && e.message.sender !== this.user.id) {
        this._peerStopped(e.conversation_id, e.message.sender);
      }
      if (r.gap) {
        this._catchUp(e.conversation_id, r.gap.after, r.gap.before);
      }
      if (e.message.client_msg_id && e.message.sender === this.user.id) {
        this._resolveSend(e.message.client_msg_id, r.msg);
      }
      this._emitMessage(r.msg);
      this._emitConv(e.conversation_id);
      return;
    }
    case 'reaction.added':
    case 'reaction.removed': {
      const m = s.reactionApplied(e);
      if (m) {
        this._emitMessage(m);
      }
      return;
    }
    case 'receipt': {
      const changed = s.applyReceipts(e.conversation_id, e.receipts || []);
      for (const m of changed) {
        this._emitMessage(m);
      }
      if (this._myReads.has(e.conversation_id)
          && s.readSeq(e.conversation_id, this.user.id) >= this._myReads.get(e.conversation_id)) {
        this._myReads.delete(e.conversation_id);     // it arrived
      }
      const c = s.conversation(e.conversation_id);
      if (c && c.stale) {
        // read elsewhere up to a point we hold no messages after: ask
        delete c.stale;
        this.loadConversation(c.id).catch(noop);
      }
      this.ev.emit('receipt', { conversation_id: e.conversation_id, receipts: e.receipts || [] });
      this._emitConv(e.conversation_id);
      return;
    }
    case 'conversation.created':
    case 'conversation.updated':
      if (e.conversation) {
        s.upsertConversation(e.conversation);
        this._emitConv(e.conversation.id);
      }
      return;
    case 'member.added':
    case 'member.removed': {
      const c = s.conversation(e.conversation_id);
      if (e.kind === 'member.removed' && (e.members || []).includes(this.user.id)) {
        s.removeConversation(e.conversation_id);
        this.ev.emit('conversation', { id: e.conversation_id, removed: true });
        this._unread();
        return;
      }
      if (c) {
        const set = new Set(c.members || []);
        for (const u of e.members || []) {
          if (e.kind === 'member.added') {
            set.add(u);
          } else {
            set.delete(u);
          }
        }
        c.members = [...set];
        this._emitConv(c.id);
      } else {
        this.loadConversation(e.conversation_id).catch(noop);
      }
      return;
    }
    case 'typing':
      this._peerTyping(e);
      return;
    case 'presence':
      this._applyPresence(e, false);
      return;
    default:
      return;
    }
  }

  _emitMessage(m) {
    if (m.sender === this.user.id && m.seq != null) {
      m.state = this.store.stateOf(m);
    }
    this.ev.emit('message', m);
  }

  _emitConv(cid) {
    const c = this.store.conversation(cid);
    if (c) {
      this.ev.emit('conversation', c);
    }
    this._unread();
  }

  _unread() {
    const total = this.store.unreadTotal();
    if (total !== this._lastUnread) {
      this._lastUnread = total;
      this.ev.emit('unread', { total });
    }
  }

  // a durable event was handled: tell the server (coalesced)
  _ack() {
    if (!this.transport || this.transport.name !== 'websocket' || this._ackTimer) {
      return;
    }
    this._ackTimer = this._later(() => {
      this._ackTimer = null;
      if (this.transport && this.transport.name === 'websocket' && this.cursor) {
        this.transport.send({ type: 'ack', cursor: this.cursor });
      }
    }, ACK_DELAY_MS);
  }

  async _resync(reason) {
    this.ev.emit('resync', { reason });
    await this.loadConversations().catch(noop);
    // one request at a time: a resync of every tab must not flood the server
    for (const cid of [...this.store.msgs.keys()]) {
      if (this.store.hasMessages(cid) && !this.closed) {
        await this.loadHistory(cid, {}).catch(noop);
      }
    }
  }

  // a seq gap: fetch what is missing (oldest first) and merge it
  async _catchUp(cid, after, before) {
    let from = after;
    for (let i = 0; i < 100 && from < before - 1; i++) {
      let j;
      try {
        j = await this.rest('GET', '/conversations/' + encodeURIComponent(cid)
                            + '/messages?after_seq=' + from + '&limit=100');
      } catch (e) {
        return;
      }
      const list = (j.messages || []).slice().sort((a, b) => a.seq - b.seq);
      if (!list.length) {
        return;
      }
      for (const m of list) {
        this._emitMessage(this.store.applyMessage(m, { gap: true }).msg);
        from = Math.max(from, m.seq);
      }
    }
    this._emitConv(cid);
  }

  // -------------------------------------------------------- WS requests

  _request(obj) {
    const t = this.transport;
    if (!t || t.name !== 'websocket') {
      return Promise.reject(chatError('network', 'not connected'));
    }
    const id = 'r' + (++this._reqSeq);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(chatError('timeout'));
      }, REQUEST_TIMEOUT_MS);
      this._pending.set(id, { resolve, reject, timer });
      if (!t.send(Object.assign({ id }, obj))) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(chatError('network', 'not connected'));
      }
    });
  }

  // --------------------------------------------------------------- data

  conversations() { return this.store.conversations(); }

  conversation(id) { return this.store.conversation(id); }

  messages(cid) { return this.store.messages(cid); }

  receipts(cid) { return this.store.receipts(cid); }

  readBy(m) { return this.store.readBy(m); }

  async loadConversations() {
    const g0 = this.store.gen;
    const all = [];
    let before = null;
    for (let i = 0; i < 50; i++) {
      const j = await this.rest('GET', '/conversations?limit=100'
                                + (before ? '&before=' + encodeURIComponent(before) : ''));
      all.push(...(j.conversations || []));
      if (!j.next) {
        break;
      }
      before = j.next;
    }
    const seen = new Set();
    for (const c of all) {
      seen.add(c.id);
      this.store.upsertConversation(c);
    }
    for (const c of this.store.conversations()) {
      // not one an event created or changed while the list was on its way
      if (!seen.has(c.id) && !(c._gen > g0)) {
        this.store.removeConversation(c.id);
        this.ev.emit('conversation', { id: c.id, removed: true });
      }
    }
    for (const c of this.store.conversations()) {
      this.ev.emit('conversation', c);
    }
    this._unread();
    this._saveCacheSoon();
    this._listLoaded = true;
    return this.store.conversations();
  }

  async loadConversation(id) {
    const j = await this.rest('GET', '/conversations/' + encodeURIComponent(id));
    const c = this.store.upsertConversation(j.conversation);
    for (const m of this.store.retick(id)) {
      this._emitMessage(m);
    }
    this._emitConv(id);
    return c;
  }

  async createConversation(args) {
    const j = await this.rest('POST', '/conversations', args);
    const c = this.store.upsertConversation(j.conversation);
    this._emitConv(c.id);
    return c;
  }

  async loadHistory(cid, opts = {}) {
    const limit = opts.limit || 50;
    let q = '?limit=' + limit;
    if (opts.beforeSeq) {
      q += '&before_seq=' + opts.beforeSeq;
    }
    const j = await this.rest('GET', '/conversations/' + encodeURIComponent(cid) + '/messages' + q);
    const list = j.messages || [];
    const held = this.store.range(cid);
    if (!opts.beforeSeq && held && list.length) {
      // what is held must stay one run of seqs (older pages are asked for
      // before the first held): the newest page after a hole replaces it
      const first = Math.min(...list.map((m) => m.seq));
      if (held.last < first - 1) {
        this.store.dropBefore(cid, first);
      }
    }
    const out = [];
    for (const m of list) {
      const r = this.store.applyMessage(m, {});
      out.push(r.msg);
      this._emitMessage(r.msg);
    }
    this.store.markHistoryLoaded(cid, !j.next);
    const rng = this.store.range(cid);
    if (!opts.beforeSeq && rng) {
      // the newest page may leave a hole between it and what we held
      const c = this.store.conversation(cid);
      if (c && rng.last > (c.last_seq || 0)) {
        c.last_seq = rng.last;
      }
    }
    return { messages: out.sort((a, b) => a.seq - b.seq), next: j.next || null };
  }

  // ------------------------------------------------------------- sending

  async send(cid, body, opts = {}) {
    if (this.closed) {
      throw chatError('closed');
    }
    const entry = {
      client_msg_id: uuid(), conversation_id: cid, body: String(body),
      format: opts.format || 'text', order: now() * 1000 + (orderSeq = (orderSeq + 1) % 1000),
      created_at: new Date().toISOString(), attempts: 0,
    };
    for (const k of ['reply_to', 'mentions']) {
      if (opts[k] !== undefined) {
        entry[k] = opts[k];
      }
    }
    if (opts.attachments) {
      // ids go on the wire; what upload() answered shows while it waits
      entry.attachments = opts.attachments.map((a) => (typeof a === 'string' ? a : a.id));
      entry.shown_attachments = opts.attachments.map((a) => (typeof a === 'string'
        ? { id: a, name: '', mime: '', size: 0, url: null } : a));
    }
    const done = this._waitSent(entry.client_msg_id);
    this.stopTyping(cid);
    this._showPending(entry);
    try {
      await this.db.outboxPut(entry);
    } catch (e) {
      // nowhere to keep it: say so rather than pretend it will be sent
      this._failed(entry.client_msg_id, { code: 'storage', message: String(e && e.message) },
                   true);
      return done;
    }
    if (this.info.state !== 'connected') {
      this._registerSync();
    }
    this._post({ t: 'sending', entry });
    if (this.leader) {
      this._flushOutbox();
    } else {
      this._post({ t: 'flush' });
    }
    return done;
  }

  _waitSent(cmid) {
    return new Promise((resolve, reject) => {
      if (!this._sendWaiters.has(cmid)) {
        this._sendWaiters.set(cmid, []);
      }
      this._sendWaiters.get(cmid).push({ resolve, reject });
    });
  }

  _resolveSend(cmid, msg, err) {
    const ws = this._sendWaiters.get(cmid);
    if (!ws) {
      return;
    }
    this._sendWaiters.delete(cmid);
    for (const w of ws) {
      if (err) {
        w.reject(err);
      } else {
        w.resolve(msg);
      }
    }
  }

  _showPending(entry) {
    const state = entry.failed ? 'failed' : 'sending';
    const old = this.store.byCmid.get(entry.client_msg_id);
    if (old) {
      // a retry in another tab, a failure the service worker recorded
      const m = this.store.setPendingState(entry.client_msg_id, state, entry.failed || undefined);
      if (m) {
        this._emitMessage(m);
      }
      return;
    }
    const m = this.store.addPending({
      client_msg_id: entry.client_msg_id, conversation_id: entry.conversation_id,
      body: entry.body, format: entry.format, reply_to: entry.reply_to || null,
      created_at: entry.created_at, sender: this.user.id,
      state, error: entry.failed || undefined,
      attachments: entry.shown_attachments || [],
    });
    this._emitMessage(m);
  }

  async _restoreOutbox() {
    const all = await this.db.outboxAll().catch(() => []);
    for (const e of all) {
      const m = this.store.byCmid.get(e.client_msg_id);
      if (!m || (m.seq == null && (m.state === 'failed') !== !!e.failed)) {
        this._showPending(e);
      }
    }
  }

  // One at a time, in the order typed; the leader only.
  async _flushOutbox() {
    if (!this.leader || this._flushing || this.closed) {
      this._flushAgain = this._flushing;
      return;
    }
    this._flushing = true;
    try {
      for (;;) {
        this._flushAgain = false;
        if (!this.transport || this.info.state !== 'connected' || this.closed) {
          return;
        }
        const all = await this.db.outboxAll();
        for (const e of all) {
          if (e.failed && this.store.byCmid.has(e.client_msg_id)
              && this.store.byCmid.get(e.client_msg_id).state === 'sending') {
            this._failed(e.client_msg_id, e.failed, false);  // the service worker's verdict
          }
        }
        const next = all.find((e) => !e.failed);
        if (!next) {
          if (this._flushAgain) {
            continue;
          }
          if (this._syncToken || (this.o.serviceWorker && this.db.persistent)) {
            // nothing waits: the service worker needs no token any more
            this._syncToken = false;
            syncRegistry('delete', this.db.name).catch(noop);
          }
          return;
        }
        if (!(await this._sendOne(next))) {
          return;
        }
      }
    } catch (e) {
      // IndexedDB refused: try again a little later
      this._cancel(this._sendRetryTimer);
      this._sendRetryTimer = this._later(() => this._flushOutbox(), 5000);
    } finally {
      this._flushing = false;
    }
  }

  async _sendOne(e) {
    const args = { conversation_id: e.conversation_id, client_msg_id: e.client_msg_id,
                   body: e.body };
    if (e.format && e.format !== 'text') {
      args.format = e.format;
    }
    for (const k of ['reply_to', 'attachments', 'mentions']) {
      if (e[k] !== undefined) {
        args[k] = e[k];
      }
    }
    let msg;
    try {
      if (this.transport && this.transport.name === 'websocket') {
        msg = (await this._request(Object.assign({ type: 'send' }, args))).message;
      } else {
        const b = Object.assign({}, args);
        delete b.conversation_id;
        msg = (await this.rest('POST', '/conversations/' + encodeURIComponent(e.conversation_id)
                               + '/messages', b)).message;
      }
      if (!msg || !msg.id) {
        throw chatError('unavailable', 'the answer carried no message');
      }
    } catch (err) {
      if (PERMANENT.has(err.code)) {
        const failed = plainError(err);
        // not if it was discarded meanwhile
        if (await this.db.outboxUpdate(e.client_msg_id, { failed })) {
          this._failed(e.client_msg_id, failed, false);
        }
        return true;                    // the next one may go
      }
      // transient: keep it, try again later (in order: nothing after it
      // goes first)
      e.attempts = (e.attempts || 0) + 1;
      await this.db.outboxUpdate(e.client_msg_id, { attempts: e.attempts }).catch(noop);
      const delay = Math.max(err.retry_after_ms || 0,
                             backoffDelay(Math.min(e.attempts, 6), SEND_RETRY_BASE_MS, 30000));
      this._cancel(this._sendRetryTimer);
      this._sendRetryTimer = this._later(() => this._flushOutbox(), delay);
      return false;
    }
    await this.db.outboxDelete(e.client_msg_id);
    this._sent(e.client_msg_id, msg, false);
    return true;
  }

  _sent(cmid, msg, relayed) {
    if (!relayed) {
      this._post({ t: 'sent', cmid, message: msg });
    }
    if (msg) {
      const r = this.store.applyMessage(msg, {});
      this._emitMessage(r.msg);
      this._emitConv(msg.conversation_id);
      this._resolveSend(cmid, r.msg);
    }
  }

  _failed(cmid, error, relayed) {
    if (!relayed) {
      this._post({ t: 'failed', cmid, error });
    }
    const m = this.store.setPendingState(cmid, 'failed', error);
    if (m) {
      this._emitMessage(m);
    }
    this._resolveSend(cmid, null, chatError(error.code, error.message));
  }

  async retry(cmid) {
    const e = await this.db.outboxUpdate(cmid, { failed: undefined, attempts: 0 });
    if (!e) {
      throw chatError('not_found', 'nothing to retry');
    }
    const done = this._waitSent(cmid);
    const m = this.store.setPendingState(cmid, 'sending');
    if (m) {
      this._emitMessage(m);
    }
    this._post({ t: 'sending', entry: e });
    if (this.leader) {
      this._cancel(this._sendRetryTimer);
      this._flushOutbox();
    } else {
      this._post({ t: 'flush' });
    }
    return done;
  }

  async discard(cmid) {
    await this.db.outboxDelete(cmid);
    this._post({ t: 'discarded', cmid });
    this._discarded(cmid);
  }

  _discarded(cmid) {
    const m = this.store.dropPending(cmid);
    if (m) {
      m.state = 'discarded';
      this.ev.emit('message', m);
    }
    this._resolveSend(cmid, null, chatError('closed', 'discarded'));
  }

  // Background Sync (client/chat-sw.js): the browser sends the outbox when
  // the network is back, even with every tab closed.  The service worker
  // needs the token: it is kept in IndexedDB only while messages wait.
  async _registerSync() {
    try {
      const reg = await this.o.serviceWorker;
      if (!reg || !reg.sync || !this.db.persistent) {
        return;
      }
      const token = await this._token(false);
      await syncRegistry('put', this.db.name, { db: this.db.name, url: this.base.href, token,
                                                exp: Math.floor(this._tokExp / 1000) });
      this._syncToken = true;
      await reg.sync.register('ngx-chat-outbox');
    } catch (e) {
      // no Background Sync: the tabs send it
    }
  }

  // ----------------------------------------------- message operations

  async edit(id, body) {
    const j = await this.rest('PATCH', '/messages/' + encodeURIComponent(id), { body });
    this._emitMessage(this.store.applyMessage(j.message, {}).msg);
    return j.message;
  }

  async delete(id) {
    const j = await this.rest('DELETE', '/messages/' + encodeURIComponent(id));
    this._emitMessage(this.store.applyMessage(j.message, {}).msg);
    return j.message;
  }

  async react(id, emoji) {
    const j = await this.rest('POST', '/messages/' + encodeURIComponent(id) + '/reactions',
                              { emoji });
    const m = this.store.setReactions(id, j.reactions);
    if (m) {
      this._emitMessage(m);
    }
    return j;
  }

  async unreact(id, emoji) {
    const j = await this.rest('DELETE', '/messages/' + encodeURIComponent(id)
                              + '/reactions?emoji=' + encodeURIComponent(emoji));
    const m = this.store.setReactions(id, j.reactions);
    if (m) {
      this._emitMessage(m);
    }
    return j;
  }

  // ------------------------------------------------------------- reads

  markRead(cid, seq) {
    if (seq === undefined) {
      const r = this.store.range(cid);
      const c = this.store.conversation(cid);
      seq = Math.max(r ? r.last : 0, c ? c.last_seq || 0 : 0);
    }
    if (!seq || seq <= this.store.readSeq(cid, this.user.id)) {
      return;
    }
    const c = this.store.markReadLocal(cid, seq);
    if (c) {
      this._emitConv(cid);
    }
    if (this.leader) {
      this._post({ t: 'readlocal', conversation_id: cid, seq });
      this._queueRead(cid, seq);
    } else {
      // kept: a leader that dies before sending it gets it from the next
      this._myReads.set(cid, seq);
      this._post({ t: 'read', conversation_id: cid, seq });
    }
  }

  _queueRead(cid, seq, delay) {
    this._reads.set(cid, Math.max(seq, this._reads.get(cid) || 0));
    if (!this._readTimer) {
      this._readTimer = this._later(() => {
        this._readTimer = null;
        this._flushReads();
      }, delay === undefined ? this.o.readDelayMs : delay);
    }
  }

  _flushReads() {
    if (!this.leader || this._reads.size === 0 || !this.transport
        || this.info.state !== 'connected') {
      return;                   // kept for the next connection
    }
    const ws = this.transport.name === 'websocket' ? this.transport : null;
    for (const [cid, seq] of this._reads) {
      if (ws) {
        ws.send({ type: 'read', conversation_id: cid, seq });
      } else {
        this.rest('POST', '/conversations/' + encodeURIComponent(cid) + '/read', { seq })
          .then(() => { this._readFails = 0; }, (e) => {
            if (!PERMANENT.has(e.code) && e.code !== 'unauthorized' && !this.closed) {
              // later, and later again: not at the read pace
              this._readFails = (this._readFails || 0) + 1;
              this._queueRead(cid, seq, Math.max(e.retry_after_ms || 0,
                backoffDelay(Math.min(this._readFails, 6), 2000, 60000)));
            }
          });
      }
    }
    this._reads.clear();
  }

  // ------------------------------------------------------------ typing

  typing(cid) {
    let t = this._typing.get(cid);
    const n = now();
    if (!t) {
      t = { last: 0 };
      this._typing.set(cid, t);
    }
    if (n - t.last >= this.o.typingRefreshMs) {
      t.last = n;
      this._typingSend(cid, 'start');
    }
    this._cancel(t.idle);
    t.idle = this._later(() => this.stopTyping(cid), this.o.typingIdleMs);
  }

  stopTyping(cid) {
    const t = this._typing.get(cid);
    if (!t) {
      return;
    }
    this._cancel(t.idle);
    this._typing.delete(cid);
    this._typingSend(cid, 'stop');
  }

  _typingSend(cid, state) {
    if (this.leader) {
      this._typingOut(cid, state);
    } else {
      this._post({ t: 'typing', conversation_id: cid, state });
    }
  }

  _typingOut(cid, state) {
    if (this.transport && this.transport.name === 'websocket') {
      this.transport.send({ type: 'typing', conversation_id: cid, state });
    } else if (this.info.state === 'connected') {
      this.rest('POST', '/conversations/' + encodeURIComponent(cid) + '/typing', { state })
        .catch(noop);
    }
  }

  typingUsers(cid) {
    const m = this._peersTyping.get(cid);
    return m ? [...m.keys()] : [];
  }

  _peerTyping(e) {
    if (e.user === this.user.id) {
      return;
    }
    if (e.state === 'start') {
      let m = this._peersTyping.get(e.conversation_id);
      if (!m) {
        m = new Map();
        this._peersTyping.set(e.conversation_id, m);
      }
      this._cancel(m.get(e.user));
      // the server says stop; this is for a stop that never comes
      m.set(e.user, this._later(() => this._peerStopped(e.conversation_id, e.user),
                                TYPING_EXPIRE_MS));
      this.ev.emit('typing', { conversation_id: e.conversation_id,
                               users: this.typingUsers(e.conversation_id) });
    } else {
      this._peerStopped(e.conversation_id, e.user);
    }
  }

  _peerStopped(cid, user) {
    const m = this._peersTyping.get(cid);
    if (!m || !m.has(user)) {
      return;
    }
    this._cancel(m.get(user));
    m.delete(user);
    this.ev.emit('typing', { conversation_id: cid, users: this.typingUsers(cid) });
  }

  // ---------------------------------------------------------- presence

  presence(user) { return this._presence.get(user); }

  _applyPresence(p, snapshot) {
    const old = this._presence.get(p.user);
    const v = { user: p.user, status: p.status,
                last_seen: p.last_seen || (snapshot && old ? old.last_seen : null) };
    this._presence.set(p.user, v);
    if (!old || old.status !== v.status || old.last_seen !== v.last_seen) {
      this.ev.emit('presence', v);
    }
  }

  async fetchPresence(users) {
    if (!users.length) {
      return [];
    }
    const j = await this.rest('GET', '/presence?users=' + users.slice(0, 100)
                              .map(encodeURIComponent).join(','));
    for (const p of j.presence || []) {
      this._applyPresence(p, false);
    }
    return j.presence || [];
  }

  subscribePresence(users) {
    this._mySub = users.slice(0, 256);
    if (this.leader) {
      this._sendPresenceSub();
    } else {
      this._post({ t: 'psub', tab: this.tabId, users: this._mySub });
    }
  }

  // ------------------------------------------------------- attachments

  async upload(file, name) {
    const n = name || file.name || 'file';
    const j = await this._fetchJson('POST', '/api/attachments?filename=' + encodeURIComponent(n),
                                    file);
    return j.attachment;
  }

  // downloads need the token: fetch them and hand the page an object URL
  attachmentUrl(att) {
    let p = this._attUrls.get(att.id);
    if (!p) {
      p = (async () => {
        const token = await this._token(false);
        const url = new URL(att.url || ('api/attachments/' + att.id), this.base.href + '/');
        const r = await fetch(url, { headers: { Authorization: 'Bearer ' + token } });
        if (!r.ok) {
          throw chatError(r.status === 404 ? 'not_found' : 'unavailable');
        }
        return URL.createObjectURL(await r.blob());
      })();
      p.catch(() => this._attUrls.delete(att.id));
      this._attUrls.set(att.id, p);
      if (this._attUrls.size > 200) {
        // the oldest blob goes (a page that still shows it fetches it again)
        const [oldId, oldP] = this._attUrls.entries().next().value;
        this._attUrls.delete(oldId);
        oldP.then((u) => URL.revokeObjectURL(u), noop);
      }
    } else {
      this._attUrls.delete(att.id);         // most recently used last
      this._attUrls.set(att.id, p);
    }
    return p;
  }

  // ---------------------------------------------------- safety, search

  search(q, opts = {}) {
    const p = new URLSearchParams({ q });
    for (const k of ['conversation_id', 'limit', 'cursor', 'mode']) {
      if (opts[k] !== undefined) {
        p.set(k, String(opts[k]));
      }
    }
    return this.rest('GET', '/search?' + p);
  }

  async block(user) {
    await this.rest('POST', '/blocks', { user });
    this.store.blocked.add(user);
  }

  async unblock(user) {
    await this.rest('DELETE', '/blocks/' + encodeURIComponent(user));
    this.store.blocked.delete(user);
  }

  async blocks() {
    const j = await this.rest('GET', '/blocks');
    const list = (j.blocks || []).map((b) => b.user);
    this.store.blocked = new Set(list);
    return list;
  }

  async report(messageId, reason, note) {
    const body = { message_id: messageId, reason };
    if (note) {
      body.note = note;
    }
    return (await this.rest('POST', '/reports', body)).report;
  }

  // ------------------------------------------------------------- cache

  async _paintFromCache() {
    const snap = await this.db.get('cache');
    const cursor = await this.db.get('cursor');
    if (cursor && !this.cursor) {
      this.cursor = cursor;
    }
    if (!snap) {
      return;
    }
    try {
      this.store.restore(snap);
    } catch (e) {
      // a cache this version cannot read: start without it
      this.store = new ChatStore(this.user.id);
      return;
    }
    for (const c of this.store.conversations()) {
      this.ev.emit('conversation', c);
    }
    this._unread();
  }

  _saveCacheSoon() {
    if (!this.leader || this._cacheTimer) {
      return;
    }
    this._cacheTimer = this._later(() => {
      this._cacheTimer = null;
      this._saveCache();
    }, 1000);
  }

  async _saveCache() {
    if (!this.leader || !this.db) {
      return;
    }
    // the cache first: a cursor saved ahead of it would skip events the
    // cache does not hold (one behind it only replays, deduplicated)
    const cursor = this.cursor;
    if (await this.db.put('cache', this.store.snapshot(CACHE_MESSAGES)) && cursor) {
      await this.db.put('cursor', cursor);
    }
  }
}
