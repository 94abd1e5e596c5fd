'use strict';
/*
 * Socket.IO 4 peer for chatbench: one Node process, WebSocket transport.
 *
 *   PORT=8092 HOST=127.0.0.1 SECRET_FILE=/path node server.js
 *
 * Auth: when SECRET_FILE is set, the namespace connect must carry
 * {"token":"<HS256 JWT>"} (the same kind of token ngx_chat_module takes;
 * the key is the file's bytes minus one trailing newline).
 * Events (client -> server):
 *   "join"  room            -> joins the room, ack {ok:true}
 *   "send"  {room, body}    -> io.to(room).emit("msg", {room, sender, body})
 *                              (the sender is in the room, so it gets it
 *                              too), ack {ok:true}
 */
const http = require('http');
const crypto = require('crypto');
const fs = require('fs');
const { Server } = require('socket.io');

const PORT = parseInt(process.env.PORT || '8092', 10);
const HOST = process.env.HOST || '127.0.0.1';
let secret = null;

if (process.env.SECRET_FILE) {
  secret = fs.readFileSync(process.env.SECRET_FILE);
  if (secret.length > 0 && secret[secret.length - 1] === 0x0a) {
    secret = secret.subarray(0, secret.length - 1);
  }
}

function verify(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  let hdr, claims;
  try {
    hdr = JSON.parse(Buffer.from(parts[0], 'base64url'));
    claims = JSON.parse(Buffer.from(parts[1], 'base64url'));
  } catch (e) {
    return null;
  }
  if (hdr.alg !== 'HS256') return null;
  const mac = crypto.createHmac('sha256', secret)
    .update(parts[0] + '.' + parts[1]).digest();
  const sig = Buffer.from(parts[2], 'base64url');
  if (sig.length !== mac.length || !crypto.timingSafeEqual(sig, mac)) {
    return null;
  }
  if (typeof claims.exp !== 'number' || claims.exp * 1000 < Date.now()) {
    return null;
  }
  if (typeof claims.sub !== 'string') return null;
  return claims;
}

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});

const io = new Server(server, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  maxHttpBufferSize: 1e6,
  pingInterval: 25000,
  pingTimeout: 20000,
});

io.use((socket, next) => {
  if (secret === null) {
    socket.data.user = 'anon';
    return next();
  }
  const claims = verify(socket.handshake.auth && socket.handshake.auth.token);
  if (claims === null) return next(new Error('unauthorized'));
  socket.data.user = claims.sub;
  next();
});

io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    if (typeof room !== 'string' || room.length === 0 || room.length > 128) {
      if (typeof ack === 'function') ack({ ok: false, error: 'bad_request' });
      return;
    }
    socket.join(room);
    if (typeof ack === 'function') ack({ ok: true });
  });

  socket.on('send', (m, ack) => {
    if (!m || typeof m.room !== 'string' || typeof m.body !== 'string'
        || !socket.rooms.has(m.room)) {
      if (typeof ack === 'function') ack({ ok: false, error: 'forbidden' });
      return;
    }
    io.to(m.room).emit('msg', { room: m.room, sender: socket.data.user,
                                body: m.body });
    if (typeof ack === 'function') ack({ ok: true });
  });
});

server.listen(PORT, HOST, () => {
  console.log(`socketio peer listening on ${HOST}:${PORT} pid ${process.pid}`);
});

function stop() {
  io.close();
  server.close();
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
