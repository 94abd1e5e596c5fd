#!/usr/bin/python3
# WebSocket transport, RFC 6455 conformance (PROTOCOL.md section 4):
# handshake checks, framing errors and their close codes, fragmentation with
# interleaved control frames, UTF-8 validation, message size limit, the
# closing handshake, pipelined frames, server keepalive (ping / idle close),
# HTTP/2 refusal, nothing but ping before hello, the hello deadline.
import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

MAX_MSG = 2048

pg = PgCluster()

h2_port = free_port()

# main server: small messages, default keepalive/auth timers (long enough
# not to interfere); a second server speaks HTTP/2 (prior knowledge, h2c)
ng = Nginx(pg, workers=2,
           http="chat_max_message_size 2k;\n"
                "server {\n"
                "    listen 127.0.0.1:%d http2;\n"
                "    server_name h2;\n"
                "    location /chat/ { chat; }\n"
                "}\n" % h2_port)

# keepalive: ping after 1 s of silence, close 1001 after 3 s
ng_ka = Nginx(pg, workers=2,
              http="chat_ping_interval 1s;\nchat_idle_timeout 3s;\nchat_auth_timeout 60s;")

# hello deadline of 1 s
ng_auth = Nginx(pg, workers=2, http="chat_auth_timeout 1s;")

PROTO = {"Sec-WebSocket-Protocol": "chat.v1"}


# ------------------------------------------------------------ helpers ----

def handshake(nginx, headers=None, method="GET", path="/chat/ws", version="1.1",
              timeout=5):
    """One raw handshake request; returns (status, {lower: value}, body)
    with body parsed as JSON when it is JSON. Headers given as None are
    left out; the defaults are a valid WebSocket upgrade."""
    key = base64.b64encode(os.urandom(16)).decode()
    h = {"Host": "127.0.0.1:%d" % nginx.port, "Upgrade": "websocket",
         "Connection": "Upgrade", "Sec-WebSocket-Key": key,
         "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "chat.v1"}
    h.update(headers or {})
    req = "%s %s HTTP/%s\r\n" % (method, path, version)
    req += "".join("%s: %s\r\n" % (k, v) for k, v in h.items() if v is not None)
    req += "\r\n"
    s = socket.create_connection(("127.0.0.1", nginx.port), timeout=timeout)
    buf = b""
    try:
        s.sendall(req.encode())
        while b"\r\n\r\n" not in buf:
            b = s.recv(65536)
            if not b:
                break
            buf += b
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.\d (\d{3})", lines[0])
        status = int(m.group(1)) if m else None
        hdrs = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status == 101:
            return status, hdrs, rest
        n = int(hdrs.get("content-length", "-1"))
        deadline = time.monotonic() + timeout
        while (n < 0 or len(rest) < n) and time.monotonic() < deadline:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            if not b:
                break
            rest += b
        body = rest
        if "json" in hdrs.get("content-type", ""):
            try:
                body = json.loads(rest)
            except ValueError:
                pass
        return status, hdrs, body
    finally:
        s.close()


def err_code(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def connect(nginx=None, **kw):
    kw.setdefault("headers", {})
    return RawWS(nginx or ng, **kw)


def expect_close(ws, code, name, timeout=5):
    """Reads until the server's close frame; checks its code, that it is a
    proper server frame (unmasked, FIN) and that the server then closes the
    TCP connection."""
    try:
        f, frames = ws.read_until_close(timeout=timeout)
    except socket.timeout:
        f, frames = "timeout", []
    if f is None or f == "timeout":
        ok(False, "%s: close %s (got %s)" % (name, code, "EOF" if f is None else "no close frame in %ds" % timeout))
        ws.close()
        return None
    good = is_(f.close_code, code, "%s: close %s" % (name, code))
    if not good:
        diag("close frame: %r, frames before: %r" % (f, frames))
    ok(f.fin and not f.masked, "%s: close frame unmasked, FIN" % name)
    ok(ws.eof(timeout=5), "%s: server closes the TCP connection" % name)
    ws.close()
    return f


def request_json(ws, obj, timeout=5):
    """Sends one JSON text frame, returns the next text message as JSON."""
    ws.send_json(obj)
    return ws.recv_json(timeout)


# ---------------------------------------------------------- handshake ----

st, hd, body = handshake(ng)
is_(st, 101, "valid handshake -> 101")

st, hd, body = handshake(ng, method="POST", headers={"Content-Length": "0"})
is_(st, 405, "POST /chat/ws -> 405")
like(hd.get("content-type"), r"^application/json", "405 is JSON")
ok(err_code(body) is not None, "405 body is {\"error\":{\"code\":...}}")
is_(hd.get("allow"), "GET", "405 carries Allow: GET")

st, hd, body = handshake(ng, method="PUT", headers={"Content-Length": "0"})
is_(st, 405, "PUT /chat/ws -> 405")

st, hd, body = handshake(ng, headers={"Upgrade": None})
is_(st, 400, "no Upgrade header -> 400")
is_(err_code(body), "bad_request", "... JSON error bad_request")

st, hd, body = handshake(ng, headers={"Upgrade": "h2c"})
is_(st, 400, "Upgrade: h2c -> 400")

st, hd, body = handshake(ng, headers={"Connection": None})
is_(st, 400, "no Connection header -> 400")
is_(err_code(body), "bad_request", "... JSON error bad_request")

st, hd, body = handshake(ng, headers={"Connection": "keep-alive"})
is_(st, 400, "Connection: keep-alive (no upgrade token) -> 400")

st, hd, body = handshake(ng, headers={"Connection": "keep-alive, Upgrade",
                                      "Upgrade": "WebSocket"})
is_(st, 101, "Connection: keep-alive, Upgrade + Upgrade: WebSocket -> 101 (token list, case-insensitive)")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Version": "8"})
is_(st, 426, "Sec-WebSocket-Version: 8 -> 426")
is_(hd.get("sec-websocket-version"), "13", "426 carries Sec-WebSocket-Version: 13")
like(hd.get("content-type"), r"^application/json", "426 is JSON")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Version": "14"})
is_(st, 426, "Sec-WebSocket-Version: 14 -> 426")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Key": None})
is_(st, 400, "no Sec-WebSocket-Key -> 400")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Key": base64.b64encode(os.urandom(8)).decode()})
is_(st, 400, "Sec-WebSocket-Key of 8 bytes -> 400")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Key": base64.b64encode(os.urandom(20)).decode()})
is_(st, 400, "Sec-WebSocket-Key of 20 bytes -> 400")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!=="})
is_(st, 400, "Sec-WebSocket-Key not base64 -> 400")
is_(err_code(body), "bad_request", "... JSON error bad_request")

# RFC 6455 section 1.3 example
st, hd, body = handshake(ng, headers={"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
is_(st, 101, "RFC 6455 sample key -> 101")
is_(hd.get("sec-websocket-accept"), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "Sec-WebSocket-Accept of the RFC sample")
like(hd.get("upgrade"), r"(?i)^websocket$", "101 carries Upgrade: websocket")
like(hd.get("connection"), r"(?i)\bupgrade\b", "101 carries Connection: upgrade")

ws = connect()
ok(ws.status == 101 and ws.accept_ok, "random key: Sec-WebSocket-Accept correct")
ws.close()

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Protocol": "foo, chat.v1, bar"})
is_(st, 101, "offered foo, chat.v1, bar -> 101")
is_(hd.get("sec-websocket-protocol"), "chat.v1", "subprotocol chat.v1 echoed")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Protocol": "foo, bar"})
is_(st, 400, "offered protocols without chat.v1 -> 400")
is_(err_code(body), "bad_request", "... JSON error bad_request")

st, hd, body = handshake(ng, headers={"Sec-WebSocket-Protocol": None})
ok(st in (101, 400), "no subprotocol offered: 101 or 400 (got %s)" % st)
ok(st != 101 or "sec-websocket-protocol" not in hd,
   "no subprotocol offered: none selected in the 101")

st, hd, body = handshake(ng, version="1.0", headers={"Host": "localhost"})
is_(st, 400, "HTTP/1.0 upgrade -> 400")

# ------------------------------------------------------------ framing ----

ws = connect()
ws.send_frame(0x1, b'{"type":"ping","id":1}', mask=False)
expect_close(ws, 1002, "unmasked client frame")

for rsv in (4, 2, 1):
    ws = connect()
    ws.send_frame(0x1, b'{"type":"ping","id":1}', rsv=rsv)
    expect_close(ws, 1002, "RSV bits %d" % rsv)

for op in (0x3, 0x7, 0xB, 0xF):
    ws = connect()
    ws.send_frame(op, b"x")
    expect_close(ws, 1002, "unknown opcode 0x%X" % op)

ws = connect()
ws.send_ping(b"x" * 126)
expect_close(ws, 1002, "ping with 126-byte payload")

ws = connect()
ws.send_frame(0xA, b"x" * 200)
expect_close(ws, 1002, "pong with 200-byte payload")

ws = connect()
ws.send_frame(0x9, b"abc", fin=False)
expect_close(ws, 1002, "fragmented ping")

ws = connect()
ws.send_frame(0x8, struct.pack("!H", 1000), fin=False)
expect_close(ws, 1002, "fragmented close")

# a ping of exactly 125 bytes is fine and answered with the same payload
ws = connect()
payload = bytes(range(125))
ws.send_ping(payload)
f = ws.recv_frame()
ok(f is not None and f.opcode == 0xA and f.payload == payload and f.fin and not f.masked,
   "ping of 125 bytes -> pong with the same payload")
ws.close()

# fragmented request, a ping interleaved between the fragments
ws = connect()
ws.send_frame(0x1, b'{"type":"pi', fin=False)
ws.send_ping(b"between")
ws.send_frame(0x0, b'ng","id"', fin=False)
ws.send_frame(0xA, b"unsolicited pong")
ws.send_frame(0x0, b':7}', fin=True)
f1 = ws.recv_frame()
ok(f1 is not None and f1.opcode == 0xA and f1.payload == b"between",
   "ping between fragments answered with a pong (%r)" % (f1,))
m = ws.recv_message()
ok(m is not None and m[0] == 0x1, "reassembled message answered with a text message")
is_(json.loads(m[1]) if m and m[0] == 1 else m, {"type": "pong", "id": 7},
    "fragmented {\"type\":\"ping\",\"id\":7} -> {\"type\":\"pong\",\"id\":7}")
# the connection still works afterwards, and a second fragmented message
# (with empty fragments) is assembled from scratch
ws.send_frame(0x1, b'', fin=False)
ws.send_frame(0x0, b'{"type":"ping",', fin=False)
ws.send_frame(0x0, b'', fin=False)
ws.send_frame(0x0, b'"id":"x"}', fin=True)
is_(ws.recv_json(), {"type": "pong", "id": "x"}, "fragmented message with empty fragments reassembled")
ws.close()

ws = connect()
ws.send_frame(0x0, b'{"type":"ping","id":1}', fin=True)
expect_close(ws, 1002, "continuation without a started message")

ws = connect()
ws.send_frame(0x1, b'{"type":', fin=False)
ws.send_frame(0x1, b'"ping"}', fin=True)
expect_close(ws, 1002, "new text message inside a fragmented one")

# --------------------------------------------------------------- UTF-8 ----

ws = connect()
ws.send_text(b'{"type":"ping","id":"\xff"}')
expect_close(ws, 1007, "invalid UTF-8 (0xFF) in a text message")

ws = connect()
ws.send_text(b'{"type":"ping","id":"\xc0\xaf"}')
expect_close(ws, 1007, "overlong UTF-8 encoding")

ws = connect()
ws.send_text(b'{"type":"ping","id":"\xed\xa0\x80"}')
expect_close(ws, 1007, "UTF-16 surrogate encoded in UTF-8")

ws = connect()
ws.send_text(b'{"type":"ping","id":"\xf4\x90\x80\x80"}')
expect_close(ws, 1007, "code point above U+10FFFF")

ws = connect()
ws.send_text(b'{"type":"ping","id":"abc\xe2\x82')
expect_close(ws, 1007, "text message ending inside a UTF-8 sequence")

# a valid sequence split across fragments is fine
euro = "\u20ac".encode()
ws = connect()
ws.send_frame(0x1, b'{"type":"ping","id":"' + euro[:1], fin=False)
ws.send_frame(0x0, euro[1:2], fin=False)
ws.send_frame(0x0, euro[2:] + b'"}', fin=True)
is_(ws.recv_json(), {"type": "pong", "id": "\u20ac"},
    "valid UTF-8 split across three fragments -> accepted")
ws.close()

ws = connect()
ws.send_frame(0x1, b'{"type":"ping","id":"' + euro[:2], fin=False)
ws.send_frame(0x0, b'x"}', fin=True)
expect_close(ws, 1007, "invalid UTF-8 split across fragments")

ws = connect()
ws.send_frame(0x1, b'{"type":"ping","id":"ok"' + euro[:1], fin=False)
ws.send_frame(0x0, b'', fin=True)
expect_close(ws, 1007, "fragmented message ending inside a UTF-8 sequence")

ws = connect()
ws.send_frame(0x1, b'{"type":"ping","id":"\xff', fin=False)
expect_close(ws, 1007, "invalid UTF-8 in a first fragment (fail fast)")

# ------------------------------------------------------ binary, size ----

ws = connect()
ws.send_frame(0x2, b"\x00\x01\x02")
expect_close(ws, 1003, "binary message")

ws = connect()
ws.send_frame(0x2, b"\x00\x01", fin=False)
expect_close(ws, 1003, "fragmented binary message")


def padded_ping(rid, size):
    base = '{"type":"ping","id":%d}' % rid
    return ('{"type":"ping",' + " " * (size - len(base)) + '"id":%d}' % rid).encode()


msg = padded_ping(11, MAX_MSG)
ws = connect()
ws.send_text(msg)
is_(ws.recv_json(), {"type": "pong", "id": 11}, "message of exactly chat_max_message_size (2k) accepted")
ws.close()

ws = connect()
ws.send_frame(0x1, msg[:1000], fin=False)
ws.send_frame(0x0, msg[1000:], fin=True)
is_(ws.recv_json(), {"type": "pong", "id": 11}, "fragmented message of exactly 2k accepted")
ws.close()

ws = connect()
ws.send_text(padded_ping(12, MAX_MSG + 1))
expect_close(ws, 1009, "message of 2k + 1 bytes")

ws = connect()
ws.send_text(b"x" * 100000)
expect_close(ws, 1009, "single frame of 100000 bytes")

ws = connect()
big = padded_ping(13, 3000)
ws.send_frame(0x1, big[:1000], fin=False)
ws.send_frame(0x0, big[1000:2000], fin=False)
ws.send_frame(0x0, big[2000:], fin=True)
expect_close(ws, 1009, "fragments adding up to 3000 bytes")

# only the header of a huge frame: refused before the payload arrives
ws = connect()
ws.sendall(RawWS.frame(0x1, b"", length=1 << 40)[:14])
expect_close(ws, 1009, "frame header announcing 1 TiB")

ws = connect()
ws.sendall(bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 63) + os.urandom(4))
expect_close(ws, 1002, "64-bit length with the most significant bit set")

# ------------------------------------------------------ closing handshake ----

for code, reason in ((1000, b"bye"), (1001, b""), (3000, b""), (4000, "\u00e9t\u00e9".encode())):
    ws = connect()
    ws.send_close(code, reason)
    expect_close(ws, code, "client close %d echoed" % code)

ws = connect()
ws.send_close(None)
f, frames = ws.read_until_close()
ok(f is not None and f.opcode == 8 and f.close_code in (None, 1000),
   "empty close frame answered with an empty close or 1000 (%r)" % (f,))
ok(ws.eof(), "empty close: server closes the TCP connection")
ws.close()

ws = connect()
ws.send_frame(0x8, b"\x03")
expect_close(ws, 1002, "close frame with a 1-byte payload")

for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535):
    ws = connect()
    ws.send_close(code)
    expect_close(ws, 1002, "invalid close code %d" % code)

ws = connect()
ws.send_close(1000, b"\xff\xfe")
expect_close(ws, 1007, "close reason with invalid UTF-8")

# the close frame ends the session: data frames after it are not processed
ws = connect()
ws.sendall(RawWS.frame(0x8, struct.pack("!H", 1000)) + RawWS.frame(0x1, b'{"type":"ping","id":99}'))
f, frames = ws.read_until_close()
ok(f is not None and f.close_code == 1000 and not any(x.opcode == 1 for x in frames),
   "data after the client's close frame is ignored (%r, %r)" % (f, frames))
ws.close()

# ----------------------------------------------------------- pipelining ----

ws = RawWS(ng, handshake=False)
orig_sendall = ws.sendall
pipelined = (RawWS.frame(0x1, b'{"type":"ping","id":1}')
             + RawWS.frame(0x9, b"p")
             + RawWS.frame(0x1, b'{"type":"ping",', fin=False)
             + RawWS.frame(0x0, b'"id":2}'))
ws.sendall = lambda data: orig_sendall(data + pipelined)
ws.handshake("/chat/ws", dict(PROTO))
ws.sendall = orig_sendall
is_(ws.status, 101, "handshake with frames pipelined in the same write -> 101")
got = []
try:
    for _ in range(3):
        f = ws.recv_frame()
        if f is None:
            break
        got.append(f)
except socket.timeout:
    pass
texts = [json.loads(f.payload) for f in got if f.opcode == 1]
pongs = [f.payload for f in got if f.opcode == 0xA]
is_(texts, [{"type": "pong", "id": 1}, {"type": "pong", "id": 2}],
    "pipelined requests answered in order")
is_(pongs, [b"p"], "pipelined ping answered")
ws.close()

# request and frames in one write, split in the middle of a frame header
ws = RawWS(ng, handshake=False)
frame = RawWS.frame(0x1, b'{"type":"ping","id":3}')
real_sendall = ws.sendall
ws.sendall = lambda data: real_sendall(data + frame[:3])
ws.handshake("/chat/ws", dict(PROTO))
ws.sendall = real_sendall
time.sleep(0.2)
ws.sendall(frame[3:])
is_(ws.recv_json(), {"type": "pong", "id": 3}, "frame header split between the handshake write and the next")
ws.close()

# ------------------------------------------- frames split across reads ----

ws = connect()
ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
small = RawWS.frame(0x1, b'{"type":"ping","id":21}')
medium = RawWS.frame(0x1, padded_ping(22, 300))      # 16-bit length
results = []
for fr, rid, cuts in ((small, 21, (1, 2, 4, 6, 9)), (medium, 22, (1, 3, 5, 7, 8, 11, 150))):
    for cut in cuts:
        ws.sendall(fr[:cut])
        time.sleep(0.03)
        ws.sendall(fr[cut:])
        results.append(ws.recv_json() == {"type": "pong", "id": rid})
ok(all(results), "frames split at every header/mask/payload position reassembled (%r)" % results)
# one byte at a time
for b in RawWS.frame(0x1, b'{"type":"ping","id":23}'):
    ws.sendall(bytes([b]))
    time.sleep(0.002)
is_(ws.recv_json(), {"type": "pong", "id": 23}, "frame sent one byte per write reassembled")
ws.close()

# bad JSON is a request error, not a protocol error
ws = connect()
for text in (b"not json", b'{"type":"ping"', b'"a string"', b"[1,2]"):
    ws.send_text(text)
    r = ws.recv_json()
    ok(isinstance(r, dict) and r.get("type") == "reply" and r.get("ok") is False
       and err_code(r) == "bad_request", "text %r -> bad_request reply (%r)" % (text, r))
is_(request_json(ws, {"type": "ping", "id": 24}), {"type": "pong", "id": 24},
    "connection still open after invalid JSON")
ws.close()

# many requests in one write: all answered, in order
ws = connect()
ws.sendall(b"".join(RawWS.frame(0x1, ('{"type":"ping","id":%d}' % i).encode()) for i in range(500)))
ids = []
try:
    while len(ids) < 500:
        m = ws.recv_json(timeout=10)
        if m is None:
            break
        ids.append(m.get("id"))
except socket.timeout:
    pass
is_(ids, list(range(500)), "500 requests in one write: 500 pongs in order")
ws.close()

# a client that half-closes after its close frame still gets the reply
ws = connect()
ws.send_close(1000, b"done")
ws.sock.shutdown(socket.SHUT_WR)
f, frames = ws.read_until_close()
ok(f is not None and f.close_code == 1000, "close then half-close: server's close frame arrives (%r)" % (f,))
ws.close()

# abrupt disconnects in every state (the log check at the end covers them)
for data in (b"", RawWS.frame(0x1, b'{"type":"ping","id":1}')[:5],
             RawWS.frame(0x1, b'{"type":"ping"', fin=False),
             RawWS.frame(0x1, b'{"type":"hello","id":1,"token":"%s"}' % token("zed").encode()),
             RawWS.frame(0x1, b"x" * 1000)[:600]):
    ws = connect()
    if data:
        ws.sendall(data)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.close()
ws = connect()
is_(request_json(ws, {"type": "ping", "id": 31}), {"type": "pong", "id": 31},
    "server fine after abrupt disconnects (RST) in every state")
ws.close()

# default chat_max_message_size (64k): 64-bit length form, read budget
ws = RawWS(ng_ka, headers=dict(PROTO), timeout=10)
big = padded_ping(41, 65536)
ws.send_text(big)
is_(ws.recv_json(), {"type": "pong", "id": 41}, "64k message (64-bit length form) accepted with the default limit")
ws.sendall(b"".join(RawWS.frame(0x1, padded_ping(50 + i, 60000)) for i in range(5)))
got = []
try:
    for i in range(5):
        got.append(ws.recv_json())
except socket.timeout:
    pass
is_([g.get("id") if isinstance(g, dict) else g for g in got], [50, 51, 52, 53, 54],
    "5 x 60k messages in one write (beyond one read budget): all answered in order")
ws.send_text(padded_ping(42, 65537))
expect_close(ws, 1009, "64k + 1 with the default limit")

# --------------------------------------------------------- before hello ----

ws = connect()
r = ws.request("send", conversation_id="1", client_msg_id="c1", body="hi")
ok(r is not None and r.get("ok") is False, "send before hello -> error reply")
is_(err_code(r), "unauthorized", "send before hello -> unauthorized")
r = ws.request("sync", cursor="1.0")
is_(err_code(r), "unauthorized", "sync before hello -> unauthorized")
r = ws.request("auth", token=token("alice"))
is_(err_code(r), "unauthorized", "auth before hello -> unauthorized")
is_(request_json(ws, {"type": "ping", "id": 42}), {"type": "pong", "id": 42},
    "ping before hello -> pong, connection still open")
r = ws.request("hello", token=token("alice"))
ok(r is not None and r.get("ok") is True and r["result"]["user"]["id"] == "alice",
   "hello after refused requests succeeds")
ws.close()

# ------------------------------------------------------------- HTTP/2 ----

out = subprocess.run(
    ["curl", "-s", "--http2-prior-knowledge", "-m", "10", "-o", "-",
     "-w", "\n%{http_code} %{http_version} %{content_type}",
     "-H", "Sec-WebSocket-Version: 13",
     "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
     "-H", "Sec-WebSocket-Protocol: chat.v1",
     "http://127.0.0.1:%d/chat/ws" % h2_port],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
body_txt, _, meta = out.stdout.rpartition("\n")
parts = meta.split(" ")
is_(parts[1] if len(parts) > 1 else None, "2", "HTTP/2 request really used HTTP/2")
is_(parts[0] if parts else None, "400", "GET /chat/ws over HTTP/2 -> 400")
like(parts[2] if len(parts) > 2 else None, r"^application/json", "HTTP/2 refusal is JSON")
try:
    h2body = json.loads(body_txt)
except ValueError:
    h2body = body_txt
is_(err_code(h2body), "bad_request", "HTTP/2 refusal body is {\"error\":{\"code\":\"bad_request\"}}")

# -------------------------------------------------- keepalive (ng_ka) ----

t0 = time.monotonic()
silent = RawWS(ng_ka, headers=dict(PROTO), timeout=10)
answering = RawWS(ng_ka, headers=dict(PROTO), timeout=10)
is_((silent.status, answering.status), (101, 101), "keepalive: two connections upgraded")

try:
    f = silent.recv_frame(timeout=5)
except socket.timeout:
    f = None
ok(f is not None and f.opcode == 0x9 and f.fin and not f.masked,
   "silent client gets a server ping (%r)" % (f,))
t_ping = time.monotonic() - t0
ok(0.5 <= t_ping <= 5, "first ping after about chat_ping_interval (%.1fs)" % t_ping)

# the other client answers every ping for ~5 s (longer than the idle timeout)
pings_answered = 0
end = time.monotonic() + 5
try:
    while time.monotonic() < end:
        try:
            f2 = answering.recv_frame(timeout=max(0.05, end - time.monotonic()))
        except socket.timeout:
            break
        if f2 is None or f2.opcode == 8:
            break
        if f2.opcode == 0x9:
            answering.send_frame(0xA, f2.payload)
            pings_answered += 1
finally:
    pass
ok(pings_answered >= 2, "answering client was pinged repeatedly (%d pings)" % pings_answered)
r = request_json(answering, {"type": "ping", "id": 5})
while isinstance(r, dict) and r.get("type") != "pong":
    r = answering.recv_json()
is_(r, {"type": "pong", "id": 5}, "client answering pings still open after 5 s (idle timeout 3 s)")

# the silent client was closed in the meantime (never answered)
try:
    fc, frames = silent.read_until_close(timeout=5)
except socket.timeout:
    fc, frames = None, []
t_close = time.monotonic() - t0
ok(fc is not None and fc.close_code == 1001, "silent client closed with 1001 (%r)" % (fc,))
ok(not any(x.opcode in (1, 2) for x in frames), "silent client got no data frames before the close")
ok(t_close >= 2.5, "idle close not before chat_idle_timeout (%.1fs)" % t_close)
ok(silent.eof(), "silent client: TCP closed after the close frame")
silent.close()
answering.close()

# ------------------------------------------------ auth timeout (ng_auth) ----

t0 = time.monotonic()
late = RawWS(ng_auth, headers=dict(PROTO), timeout=10)
is_(late.status, 101, "auth timeout: upgraded")
try:
    fc, frames = late.read_until_close(timeout=6)
except socket.timeout:
    fc, frames = None, []
ok(fc is not None and fc.close_code == 1008, "no hello within chat_auth_timeout (1s) -> close 1008 (%r)" % (fc,))
el = time.monotonic() - t0
ok(0.8 <= el <= 5, "closed after about 1 s (%.1fs)" % el)
late.close()

# pinging alone does not count as authenticating
t0 = time.monotonic()
pinger = RawWS(ng_auth, headers=dict(PROTO), timeout=10)
fc = None
i = 0
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    i += 1
    try:
        pinger.send_json({"type": "ping", "id": i})
        pinger.send_ping(b"p")
    except OSError:
        break
    try:
        m = pinger.recv_message(timeout=0.2)
        while m is not None and m[0] != 8 and time.monotonic() < deadline:
            m = pinger.recv_message(timeout=0.2)
    except socket.timeout:
        continue
    if m is None:
        break
    if m[0] == 8:
        fc = struct.unpack("!H", m[1][:2])[0] if len(m[1]) >= 2 else None
        break
ok(fc == 1008, "client that only pings is still closed with 1008 (%r)" % (fc,))
pinger.close()

# an authenticated hello in time cancels the deadline
prompt = RawWS(ng_auth, headers=dict(PROTO), timeout=10)
r = prompt.request("hello", token=token("bob"))
ok(r is not None and r.get("ok") is True, "hello within 1 s accepted")
time.sleep(2)
r = request_json(prompt, {"type": "ping", "id": 8})
is_(r, {"type": "pong", "id": 8}, "hello'd client still open 2 s later")
prompt.close()

# credentials on the upgrade count: no hello needed, no auth timeout
upg = RawWS(ng_auth, headers=dict(PROTO), token=token("carol"), timeout=10)
is_(upg.status, 101, "upgrade with Authorization: Bearer -> 101")
time.sleep(2)
upg.send_json({"type": "ping", "id": 9})
got = []
try:
    while True:
        m = upg.recv_json(timeout=3)
        if m is None:
            break
        got.append(m)
        if m.get("type") == "pong":
            break
except socket.timeout:
    pass
ok({"type": "pong", "id": 9} in got,
   "Bearer-authenticated client without hello still open after 2 s (auth timeout 1 s) (%r)" % (got,))
upg.close()

# a hello with a bad token: error reply, then close 1008
bad = RawWS(ng_auth, headers=dict(PROTO), timeout=10)
r = bad.request("hello", token=token("bob", key=b"x" * 64))
is_(err_code(r), "unauthorized", "hello with a badly signed token -> unauthorized")
fc, _ = bad.read_until_close(timeout=5)
ok(fc is not None and fc.close_code == 1008, "... then close 1008 (%r)" % (fc,))
bad.close()

done()
