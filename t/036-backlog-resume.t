#!/usr/bin/python3
# A client that was offline while far more than chat_max_queue of events
# piled up resumes from its cursor: the catch-up is paced by the client's
# reading (the transport's window and "drained"), not cut with 4008 --
# from the bus ring and from the store, with small and 64 KiB messages,
# several resuming clients at once.  The hello reply comes first, every
# missed message arrives exactly once in seq order, and the worker's
# memory stays bounded by the queue cap, not by the backlog.
import asyncio
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

MAX_QUEUE = 128 * 1024
MIB = 1024 * 1024

os.environ.setdefault("ASAN_OPTIONS",
                      "detect_leaks=0:abort_on_error=0:quarantine_size_mb=0")

pg = PgCluster()
common = "chat_max_queue 128k;\nchat_send_timeout 20s;\n"
# the ring holds every backlog below: catch-up from the ring
ng_ring = Nginx(pg, workers=2, http=common + "chat_bus_slots 65536;\nchat_shm_size 64m;")
# no leeway: a token expires on the second (the close-while-paused case)
ng_exp = Nginx(pg, workers=1, http=common + "chat_jwt_leeway 0s;")
# a small ring in a small zone: catch-up reads the store
ng_store = Nginx(pg, workers=2, http=common + "chat_bus_slots 1024;\nchat_shm_size 1m;\n"
                 "chat_catchup_page 64;")

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


def rss_anon(ng):
    out = 0
    for pid in ng.worker_pids():
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        out = max(out, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return out


async def send_many(ng, sender, conv, n, body, tag):
    """n sends over one WebSocket, at most 48 waiting at a time (a session
    may have 64 in the store)."""
    c = await ws_connect_on(sender, nginx=ng)
    sent = 0
    window = max(1, min(48, 60000 // len(body)))
    while sent < n:
        k = min(window, n - sent)
        reps = await asyncio.gather(*[
            c.request("send", conversation_id=conv, client_msg_id="%s-%d" % (tag, sent + i),
                      body=body, timeout=60) for i in range(k)])
        bad = [r for r in reps if not r or not r.get("ok")]
        if bad:
            await c.close()
            raise RuntimeError("send failed: %r" % (bad[0],))
        sent += k
    await c.close()


async def case(ng, label, body, n, receivers=3):
    users = ["%s-r%d" % (label, i) for i in range(receivers)]
    sender = "%s-s" % label
    conv = rest_create_conv(sender, "group", users, nginx=ng, title=label)

    # each receiver takes its cursor, then goes away
    cursors = {}
    for u in users:
        c = await ws_connect_on(u, nginx=ng)
        cursors[u] = c.hello["result"]["cursor"]
        await c.close()

    await send_many(ng, sender, conv, n, body, label)
    want = db_messages(conv)
    backlog = sum(len(body) for _ in want)
    ok(backlog >= 20 * MAX_QUEUE,
       "%s: backlog of %d bytes is %.0f x chat_max_queue" % (label, backlog, backlog / MAX_QUEUE))

    mem0 = rss_anon(ng)
    t0 = time.monotonic()
    clients = await asyncio.gather(*[
        ws_connect_on(u, nginx=ng, cursor=cursors[u], max_size=2 * MIB) for u in users])
    for u, c in zip(users, clients):
        await until(lambda: len(conv_events(c, conv)) >= len(want) or c.closed, timeout=120)
    took = time.monotonic() - t0
    mem1 = rss_anon(ng)
    diag("%s: %d clients resumed %d messages each in %.2f s; worker RssAnon %+d KiB"
         % (label, len(users), len(want), took, (mem1 - mem0) // 1024))

    for u, c in zip(users, clients):
        ok(not c.closed, "%s/%s: still connected after the catch-up (close %s)"
           % (label, u, c.close_code))
        first = c.received[0] if c.received else None
        ok(isinstance(first, dict) and first.get("type") == "reply" and first.get("ok"),
           "%s/%s: the hello reply is the first thing sent" % (label, u))
        stream_ok("%s/%s" % (label, u), conv_events(c, conv, whole=True), want)
        cur = [gseq(m["cursor"]) for m in conv_events(c, conv, whole=True)]
        ok(cur == sorted(cur) and len(set(cur)) == len(cur),
           "%s/%s: cursors strictly increase" % (label, u))
    return clients, mem1 - mem0


async def main():
    small = "s" * 200
    big = "B" * 60000

    for ng, where in ((ng_ring, "ring"), (ng_store, "store")):
        clients, _ = await case(ng, "%s-small" % where, small, 14000)
        # live delivery goes on for the resumed sessions
        conv = conv_events(clients[0])[0]["conversation_id"]
        c = await ws_connect_on("%s-small-s" % where, nginx=ng)
        r = await c.request("send", conversation_id=conv, client_msg_id="after", body="live")
        ok(r and r["ok"], "%s: a send after the catch-up" % where)
        for cl in clients:
            got = await cl.wait_event(lambda m: m.get("type") == "event" and
                                      m["event"].get("message", {}).get("client_msg_id") == "after",
                                      timeout=10)
            ok(got is not None, "%s: the resumed session gets it live" % where)
        await c.close()
        for cl in clients:
            await cl.close()

        clients, grew = await case(ng, "%s-big" % where, big, 60, receivers=4)
        # 4 clients x 3.6 MB of backlog: held to about a queue each
        ok(grew < 8 * MIB, "%s-big: worker memory grew %d KiB (< 8 MiB for 14 MiB of backlog)"
           % (where, grew // 1024))
        for cl in clients:
            await cl.close()



async def close_while_paused():
    """The server closes (token expired) a connection whose queue is past
    the window, so its input is not being read: once the client reads
    everything and answers the close, the server must read that answer and
    end the TCP connection cleanly (FIN, not RST)."""
    import socket as _s
    conv = rest_create_conv("cp-s", "group", ["cp-r"], nginx=ng_exp, title="paused")
    c = await ws_connect_on("cp-r", nginx=ng_exp)
    cur = c.hello["result"]["cursor"]
    await c.close()
    await send_many(ng_exp, "cp-s", conv, 4000, "p" * 400, "cp")
    sock = _s.socket(_s.AF_INET, _s.SOCK_STREAM)
    sock.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", ng_exp.port))
    ws = RawWS.__new__(RawWS)
    ws.sock, ws.buf, ws.timeout, ws.port = sock, b"", 10, ng_exp.port
    ws.status, ws.headers = None, {}
    ws.handshake("/chat/ws", {"Sec-WebSocket-Protocol": "chat.v1"})
    ok(ws.status == 101, "close-while-paused: upgraded")
    ws.send_json({"type": "hello", "id": 1, "token": token("cp-r", exp_in=3), "cursor": cur})
    await asyncio.sleep(3.3)        # not reading; the token runs out within 3 s
    frames, close = 0, None
    try:
        while True:
            f = ws.recv_frame(timeout=10)
            if f is None or f.opcode == 8:
                close = f
                break
            frames += 1
    except Exception as e:  # noqa: BLE001
        close = e
    code = struct.unpack("!H", close.payload[:2])[0] if isinstance(close, Frame) else close
    is_(code, 4001, "close-while-paused: the client reads %d frames, then close 4001" % frames)
    ws.send_close(4001)
    how = None
    try:
        sock.settimeout(5)
        while True:
            b = sock.recv(65536)
            if not b:
                how = "FIN"
                break
    except ConnectionResetError:
        how = "RST"
    except _s.timeout:
        how = "timeout"
    is_(how, "FIN", "close-while-paused: the server read the close reply and closed cleanly")
    sock.close()


run(main())
run(close_while_paused())
done()
