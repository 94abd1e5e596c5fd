#!/usr/bin/python3
# A WebSocket connection is detached from HTTP once its 101 is out: the
# request is logged and freed, and the connection keeps only the
# transport's context and the session (ngx_chat_ws.c).
#  1. the access log has exactly one line per WebSocket connection, status
#     101, written at the upgrade, none when the connection closes;
#  2. a 101 that cannot be written at once (limit_rate) is finished before
#     the detach; frames sent behind the handshake still arrive;
#  3. error log lines about a detached connection name client and server;
#  4. wss: the same over TLS (that connection keeps its pool), a protocol
#     error, a client close and a graceful stop (1001);
#  5. a worker holds well under 4 KiB per idle WebSocket connection.
import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

PROTO = {"Sec-WebSocket-Protocol": "chat.v1"}

pg = PgCluster()


def access_lines(ng):
    try:
        with open(os.path.join(ng.dir, "access.log")) as f:
            return [l for l in f.read().splitlines() if "/chat/ws" in l]
    except OSError:
        return []


def ping(ws, rid):
    ws.send_json({"type": "ping", "id": rid})
    try:
        return ws.recv_json()
    except (socket.timeout, OSError, ValueError):
        return None


# ------------------------------------------------------ 1. access log ----

ng = Nginx(pg, workers=1, access_log=True)

conns = [RawWS(ng, headers=dict(PROTO)) for _ in range(3)]
is_([c.status for c in conns], [101, 101, 101], "three connections upgraded")
is_([ping(c, i) for i, c in enumerate(conns)],
    [{"type": "pong", "id": i} for i in range(3)], "each answers a ping")

got = wait_for(lambda: (lambda l: l if len(l) >= 3 else None)(access_lines(ng)),
               timeout=5)
is_(len(got or []), 3, "access log: one line per connection while they are open")
ok(got and all(re.search(r'"GET /chat/ws HTTP/1\.1" 101 ', l) for l in got),
   "access log lines have status 101 (%r)" % (got[:1] if got else None,))

for c in conns:
    c.send_close(1000)
    c.recv_frame()
    c.close()

time.sleep(0.5)
is_(len(access_lines(ng)), 3, "closing them writes no further lines")

# ----------------------------------------- 2. a 101 that is written late ----

ng_slow = Nginx(pg, workers=1, location="limit_rate 100;")

ws = RawWS(ng_slow, handshake=False)
pipelined = RawWS.frame(0x1, b'{"type":"ping","id":1}') + RawWS.frame(0x9, b"p")
real_sendall = ws.sendall
ws.sendall = lambda data: real_sendall(data + pipelined)
t0 = time.monotonic()
ws.handshake("/chat/ws", dict(PROTO))
ws.sendall = real_sendall
took = time.monotonic() - t0
is_(ws.status, 101, "101 at limit_rate 100 -> upgraded")
ok(took >= 0.8, "the 101 really was written in pieces (%.1fs)" % took)
frames = []
try:
    for _ in range(2):
        f = ws.recv_frame()
        if f is None:
            break
        frames.append(f)
except socket.timeout:
    pass
texts = [json.loads(f.payload) for f in frames if f.opcode == 1]
is_(texts, [{"type": "pong", "id": 1}], "frame sent behind the handshake answered")
is_([f.payload for f in frames if f.opcode == 0xA], [b"p"],
    "ping sent behind the handshake answered")
is_(ping(ws, 2), {"type": "pong", "id": 2}, "frames are not rate limited after the 101")
ws.close()

# an upgrade after a keep-alive request on the same connection
ws = RawWS(ng, handshake=False)
ws.sendall(b"GET /chat/api/nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    b = ws.sock.recv(65536)
    if not b:
        break
    head += b
hdr, _, body = head.partition(b"\r\n\r\n")
m = re.search(rb"(?i)content-length: *(\d+)", hdr)
want = int(m.group(1)) if m else 0
while len(body) < want:
    b = ws.sock.recv(65536)
    if not b:
        break
    body += b
like(hdr.decode("latin-1"), r"(?is)^HTTP/1\.1 401 .*connection: keep-alive",
     "keep-alive: first request answered, connection kept")
ws.buf = body[want:]
ws.handshake("/chat/ws", dict(PROTO))
is_(ws.status, 101, "keep-alive: upgrade as the second request")
is_(ping(ws, 5), {"type": "pong", "id": 5}, "keep-alive: upgraded connection answers")
ws.close()

# headers larger than client_header_buffer_size (large header buffers),
# with a frame behind them
ws = RawWS(ng, handshake=False)
frame = RawWS.frame(0x1, b'{"type":"ping","id":6}')
real_sendall = ws.sendall
ws.sendall = lambda data: real_sendall(data + frame)
ws.handshake("/chat/ws", dict(PROTO, **{"X-Pad": "p" * 3000}))
ws.sendall = real_sendall
is_(ws.status, 101, "3 KB of headers -> upgraded")
is_(ws.recv_json(), {"type": "pong", "id": 6}, "frame behind 3 KB of headers answered")
is_(ping(ws, 7), {"type": "pong", "id": 7}, "... and the next one")
ws.close()

# ---------------------------------------------------- 3. error log ----

mark = len(ng.error_log())
ws = RawWS(ng, headers=dict(PROTO))
ws.send_frame(0x1, b'{"type":"ping","id":1}', mask=False)
f = ws.recv_frame()
ok(f is not None and f.close_code == 1002, "unmasked frame -> 1002 (%r)" % (f,))
ws.close()
m = ng.wait_log(r"client websocket error: unmasked frame.*", start=mark, timeout=5)
like(m.group(0) if m else None,
     r"while serving websocket, client: 127\.0\.0\.1, server: localhost$",
     "error log line of a detached connection names client and server")

# -------------------------------------------------------------- 4. wss ----

d = tmpdir()
crt, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
     "-subj", "/CN=localhost", "-keyout", key, "-out", crt],
               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tls_port = free_port()
ng_tls = Nginx(pg, workers=1, access_log=True,
               http="server {\n"
                    "    listen 127.0.0.1:%d ssl;\n"
                    "    server_name tls;\n"
                    "    ssl_certificate %s;\n"
                    "    ssl_certificate_key %s;\n"
                    "    location /chat/ { chat; }\n"
                    "}\n" % (tls_port, crt, key))


async def wss(**kw):
    import websockets
    kw.setdefault("extra_headers", {"Authorization": "Bearer " + token("alice")})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ws = await websockets.connect("wss://127.0.0.1:%d/chat/ws" % tls_port, ssl=ctx,
                                  subprotocols=["chat.v1"], compression=None,
                                  ping_interval=None, open_timeout=10, close_timeout=5,
                                  **kw)
    return ChatClient(ws)


async def tls_tests():
    import websockets
    c = await wss()
    w = await c.wait_event(lambda m: m.get("type") == "welcome", timeout=10)
    ok(w is not None, "wss: welcome after an upgrade with a bearer token")
    await c.send({"type": "ping", "id": 7})
    p = await c.wait_event(lambda m: m.get("type") == "pong", timeout=5)
    is_(p, {"type": "pong", "id": 7}, "wss: ping answered")
    await c.close(1000)
    is_(c.close_code, 1000, "wss: clean close by the client")

    c = await wss()
    await c.send(b"\x00\x01")
    res = await c.wait_closed(timeout=10)
    is_(res[0] if res else None, 1003, "wss: binary message -> 1003")

    # many messages through one TLS connection, written as they come;
    # its headers overflow into the large header buffers
    c = await wss(extra_headers={"Authorization": "Bearer " + token("alice"),
                                 "X-Pad": "p" * 3000})
    for i in range(200):
        await c.send({"type": "ping", "id": i})
    ids = []
    deadline = time.monotonic() + 10
    while len(ids) < 200 and time.monotonic() < deadline:
        m = await c.wait_event(lambda m: m.get("type") == "pong", timeout=1)
        if m is not None:
            ids.append(m.get("id"))
    is_(ids, list(range(200)), "wss: 200 pings answered in order")

    # left open: the graceful stop below says 1001
    return c

keep = asyncio.get_event_loop().run_until_complete(tls_tests())
lines = [l for l in access_lines(ng_tls) if " 101 " in l]
is_(len(lines), 3, "wss: one access log line per connection")

rc = ng_tls.stop()
res = asyncio.get_event_loop().run_until_complete(keep.wait_closed(timeout=10))
is_(res[0] if res else None, 1001, "wss: graceful stop closes an open connection with 1001")
is_(rc, 0, "wss: nginx stopped cleanly with a wss connection open")

# ---------------------------------------------------------- 5. memory ----

# ASan's quarantine keeps freed memory resident: no figure to compare
with open(sys.modules["chattest"].NGINX_BIN, "rb") as f:
    sanitized = b"__asan_init" in f.read()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1])
    return 0


if sanitized:
    skip("memory per connection: not measured under a sanitizer", 2)
else:
    # every client is 127.0.0.1: no per-address cap for this one
    ng_mem = Nginx(pg, workers=1, worker_connections=4096,
                   http="chat_max_connections_per_address 0;")
    wpid = ng_mem.worker_pids()[0]
    tok = token("memuser")
    warm = [RawWS(ng_mem, headers=dict(PROTO), token=tok) for _ in range(20)]
    time.sleep(0.5)
    N = 1500
    before = rss_kib(wpid)
    many = []
    for i in range(N):
        many.append(RawWS(ng_mem, headers=dict(PROTO), token=token("mem%d" % i)))
    ok(all(c.status == 101 for c in many), "%d connections upgraded" % N)
    time.sleep(1.0)
    per = (rss_kib(wpid) - before) * 1024 / N
    diag("worker RSS: %.0f bytes per idle WebSocket connection" % per)
    ok(per < 4096, "worker holds < 4 KiB per idle WebSocket (%.0f B)" % per)
    for c in many + warm:
        c.close()

done()
