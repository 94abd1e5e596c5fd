'use strict';
/*
 * mockchat: an in-memory stand-in for the part of chat.v1 that chatbench
 * uses (PROTOCOL.md), so the generator's chat mode can be tested before
 * ngx_chat_module links. It is NOT a benchmark peer.
 *
 *   PORT=8093 SECRET_FILE=/path [FAIL_EVERY=n] [PING_MS=n] node server.js
 *
 * - GET /chat/ws, subprotocol chat.v1, Authorization: Bearer <HS256 JWT>
 *   or a hello frame {"type":"hello","id":..,"token":..}
 * - POST /chat/api/conversations {kind, members, title?} -> 201/200
 * - send -> reply {message} + message.new event (with cursor) to every
 *   member connection, sender's included; idempotent on client_msg_id
 * - typing / read -> ok replies; typing relayed as an ephemeral event
 * - FAIL_EVERY=n: every n-th send first answers ok:false "unavailable"
 *   with retry_after_ms (tests the generator's retry path)
 * - PING_MS=n: WebSocket pings every n ms (tests pong handling)
 * - DROP_EVERY / DUP_EVERY / DELAY_EVERY=n: every n-th message.new
 *   delivery is dropped, sent twice, or sent 30 ms late (tests the
 *   generator's loss / duplicate / order accounting)
 */
const http = require('http');
const crypto = require('crypto');
const fs = require('fs');
const { WebSocketServer } = require('ws');

const PORT = parseInt(process.env.PORT || '8093', 10);
const FAIL_EVERY = parseInt(process.env.FAIL_EVERY || '0', 10);
const PING_MS = parseInt(process.env.PING_MS || '0', 10);
const DROP_EVERY = parseInt(process.env.DROP_EVERY || '0', 10);
const DUP_EVERY = parseInt(process.env.DUP_EVERY || '0', 10);
const DELAY_EVERY = parseInt(process.env.DELAY_EVERY || '0', 10);
let deliveries = 0;
let secret = fs.readFileSync(process.env.SECRET_FILE);
if (secret.length && secret[secret.length - 1] === 0x0a) {
  secret = secret.subarray(0, secret.length - 1);
}

function verify(token) {
  if (typeof token !== 'string') return null;
  const p = token.split('.');
  if (p.length !== 3) return null;
  try {
    const hdr = JSON.parse(Buffer.from(p[0], 'base64url'));
    const claims = JSON.parse(Buffer.from(p[1], 'base64url'));
    if (hdr.alg !== 'HS256') return null;
    const mac = crypto.createHmac('sha256', secret)
      .update(p[0] + '.' + p[1]).digest();
    const sig = Buffer.from(p[2], 'base64url');
    if (sig.length !== mac.length || !crypto.timingSafeEqual(sig, mac)) {
      return null;
    }
    if (typeof claims.exp !== 'number' || claims.exp * 1000 < Date.now()) {
      return null;
    }
    return claims.sub;
  } catch (e) {
    return null;
  }
}

function bearer(req) {
  const a = req.headers.authorization || '';
  return a.startsWith('Bearer ') ? verify(a.slice(7)) : null;
}

let nextConv = 1000000000001n;
let nextMsg = 5000000000001n;
let cursor = 0;
let sends = 0;
const convs = new Map();      // id -> {id, kind, members:Set, seq}
const directs = new Map();    // "a\0b" -> conv id
const sockets = new Map();    // user -> Set(ws)
const idem = new Map();       // sender\0client_msg_id -> message

function json(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'Content-Type': 'application/json',
                          'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function convObj(c) {
  return { id: c.id, kind: c.kind, title: c.title || null,
           members: [...c.members], last_seq: c.seq,
           created_at: c.created_at };
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/chat/api/conversations') {
    return json(res, 404, { error: { code: 'not_found', message: '' } });
  }
  const user = bearer(req);
  if (!user) {
    return json(res, 401, { error: { code: 'unauthorized', message: '' } });
  }
  let data = '';
  req.on('data', (d) => { data += d; });
  req.on('end', () => {
    let b;
    try { b = JSON.parse(data); } catch (e) { b = null; }
    if (!b || !Array.isArray(b.members)
        || (b.kind !== 'direct' && b.kind !== 'group')) {
      return json(res, 400, { error: { code: 'bad_request', message: '' } });
    }
    const members = new Set([user, ...b.members]);
    if (b.kind === 'direct') {
      if (members.size !== 2) {
        return json(res, 400, { error: { code: 'bad_request', message: '' } });
      }
      const key = [...members].sort().join('\0');
      if (directs.has(key)) {
        return json(res, 200, { conversation: convObj(convs.get(directs.get(key))) });
      }
      const c = { id: String(nextConv++), kind: 'direct', members, seq: 0,
                  created_at: new Date().toISOString() };
      convs.set(c.id, c);
      directs.set(key, c.id);
      return json(res, 201, { conversation: convObj(c) });
    }
    const c = { id: String(nextConv++), kind: 'group', title: b.title,
                members, seq: 0, created_at: new Date().toISOString() };
    convs.set(c.id, c);
    return json(res, 201, { conversation: convObj(c) });
  });
});

const wss = new WebSocketServer({
  noServer: true,
  perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has('chat.v1') ? 'chat.v1' : false),
});

server.on('upgrade', (req, sock, head) => {
  if (!req.url.startsWith('/chat/ws')) {
    sock.destroy();
    return;
  }
  let user = null;
  if (req.headers.authorization) {
    user = bearer(req);
    if (!user) {
      sock.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
      return;
    }
  }
  wss.handleUpgrade(req, sock, head, (ws) => attach(ws, user));
});

function bind(ws, user) {
  ws.user = user;
  if (!sockets.has(user)) sockets.set(user, new Set());
  sockets.get(user).add(ws);
}

function reply(ws, id, result) {
  ws.send(JSON.stringify({ type: 'reply', id, ok: true, result }));
}

function fail(ws, id, code, extra) {
  ws.send(JSON.stringify({ type: 'reply', id, ok: false,
                           error: Object.assign({ code, message: code }, extra || {}) }));
}

function toMembers(c, obj, except) {
  const s = JSON.stringify(obj);
  for (const m of c.members) {
    const set = sockets.get(m);
    if (!set) continue;
    for (const ws of set) {
      if (ws === except) continue;
      if (obj.cursor !== undefined) {
        deliveries++;
        if (DROP_EVERY > 0 && deliveries % DROP_EVERY === 0) continue;
        if (DUP_EVERY > 0 && deliveries % DUP_EVERY === 0) ws.send(s);
        if (DELAY_EVERY > 0 && deliveries % DELAY_EVERY === 0) {
          setTimeout(() => ws.send(s), 30);
          continue;
        }
      }
      ws.send(s);
    }
  }
}

function attach(ws, user) {
  if (user) bind(ws, user);
  let timer = null;
  if (PING_MS > 0) timer = setInterval(() => ws.ping('p'), PING_MS);
  ws.on('close', () => {
    if (timer) clearInterval(timer);
    if (ws.user && sockets.has(ws.user)) sockets.get(ws.user).delete(ws);
  });
  ws.on('message', (data) => {
    let m;
    try { m = JSON.parse(data); } catch (e) {
      return fail(ws, null, 'bad_request');
    }
    if (m.type === 'hello') {
      const u = verify(m.token);
      if (!u) { fail(ws, m.id, 'unauthorized'); return ws.close(1008); }
      bind(ws, u);
      return reply(ws, m.id, { user: { id: u }, session_id: 's' + m.id,
                               cursor: String(cursor), heartbeat_ms: 30000 });
    }
    if (!ws.user) return fail(ws, m.id, 'unauthorized');
    const c = convs.get(m.conversation_id);
    switch (m.type) {
    case 'send': {
      if (!c || !c.members.has(ws.user)) return fail(ws, m.id, 'forbidden');
      const key = ws.user + '\0' + m.client_msg_id;
      if (idem.has(key)) return reply(ws, m.id, { message: idem.get(key) });
      if (FAIL_EVERY > 0 && ++sends % FAIL_EVERY === 0) {
        return fail(ws, m.id, 'unavailable', { retry_after_ms: 20 });
      }
      const msg = { id: String(nextMsg++), conversation_id: c.id,
                    seq: ++c.seq, sender: ws.user,
                    created_at: new Date().toISOString(),
                    client_msg_id: m.client_msg_id, body: m.body,
                    format: 'text', reply_to: null, attachments: [],
                    edited_at: null, deleted: false };
      idem.set(key, msg);
      reply(ws, m.id, { message: msg });
      return toMembers(c, { type: 'event', cursor: String(++cursor),
                            event: { kind: 'message.new', conversation_id: c.id,
                                     seq: msg.seq, message: msg } });
    }
    case 'typing':
      if (!c || !c.members.has(ws.user)) return fail(ws, m.id, 'forbidden');
      reply(ws, m.id, {});
      return toMembers(c, { type: 'event', event: { kind: 'typing',
                            conversation_id: c.id, user: ws.user,
                            state: m.state } }, ws);
    case 'read':
      if (!c || !c.members.has(ws.user)) return fail(ws, m.id, 'forbidden');
      return reply(ws, m.id, {});
    case 'ping':
      return ws.send(JSON.stringify({ type: 'pong' }));
    default:
      return fail(ws, m.id, 'bad_request');
    }
  });
}

server.listen(PORT, '127.0.0.1', () => {
  console.log(`mockchat listening on 127.0.0.1:${PORT} pid ${process.pid}`);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
