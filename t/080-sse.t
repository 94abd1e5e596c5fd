#!/usr/bin/python3
# Server-Sent Events (GET /chat/events, PROTOCOL 5), two workers:
#  1. authentication: none, a bad token, a used ticket -> 401 JSON (the only
#     non-200 answers); a ticket and a Bearer header open the stream; the
#     answer is text/event-stream, not cacheable, not buffered by proxies,
#     and starts with "retry:".
#  2. live delivery across workers: bob's stream on one worker gets alice's
#     messages sent on the other (WebSocket and REST) as id: <cursor> /
#     event: <kind> / data: <envelope>, and her typing without an id.
#  3. resume: after a drop, Last-Event-ID (which wins over ?cursor=) or
#     ?cursor= gives exactly the missed events, in order, once; the
#     welcome's id is where the stream starts (a reconnect before any event
#     misses nothing); an unknown cursor gives resync_required carrying the
#     new cursor as its id.
#  4. heartbeat comments on an idle stream (chat_sse_heartbeat 1s).
#  5. a client that goes away is cleaned up at once: 3 streams dropped and 3
#     new ones fit under chat_max_connections_per_user 3; a 4th is told
#     rate_limited in the stream (200), not refused.
#  6. delivered: what was written to the stream moves bob's delivered_seq.
#  7. token expiry: an "error" event token_expired, then the stream ends.
#  8. a reader that stops reading is cut after chat_send_timeout; the
#     other reader gets everything.
#  9. reload: every stream gets an "error" unavailable with a short retry
#     and ends at once; resuming from Last-Event-ID on the new workers
#     loses nothing sent around the reload.
# 10. the store down: a new stream is 200 with an "error" unavailable and
#     retry_after_ms, then ends (an EventSource comes back); after the
#     store returns, streams work again.
import asyncio
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob"], "sse group")
H = db_create_conv("carol", ["carol", "dave"], "flood")
ng = Nginx(pg, workers=2, http="""
chat_sse_heartbeat 1s;
chat_max_connections_per_user 3;
chat_max_message_size 4k;
chat_max_queue 16k;
chat_send_timeout 2s;
chat_jwt_leeway 1;
""")

P = None


def msgs_of(c, conv=G):
    return [e["seq"] for e in conv_events(c.messages, conv)]


async def send(c, n, prefix, conv=G):
    out = []
    for i in range(n):
        r = await c.request("send", conversation_id=conv, client_msg_id="%s-%d" % (prefix, i),
                            body="%s %d" % (prefix, i))
        assert r and r.get("ok"), r
        out.append(r["result"]["message"]["seq"])
    return out


async def part1():
    st, h, b = await ahttp("GET", "/chat/events")
    is_((st, (b.get("error") or {}).get("code") if isinstance(b, dict) else b), (401, "unauthorized"),
        "no credentials: 401 unauthorized (JSON)")
    st, h, b = await ahttp("GET", "/chat/events", token="x.y.z")
    is_(st, 401, "a bad token: 401")
    st, h, b = await ahttp("GET", "/chat/events", token=token("bob", exp_in=-100))
    is_((st, (b.get("error") or {}).get("code")), (401, "token_expired"), "an expired token: 401 token_expired")
    st, h, b = await ahttp("POST", "/chat/events", token=token("bob"))
    is_(st, 405, "POST: 405")
    st, h, b = await ahttp("GET", "/chat/events", token=token("bob"), body="x")
    is_(st, 400, "a GET with a body: 400")

    _, _, t = api("POST", "/chat/api/tickets", token=token("bob"))
    c = await sse_connect(ticket=t["ticket"])
    is_(c.status, 200, "a ticket opens the stream")
    ok(c.hello and c.hello["user"]["id"] == "bob", "the welcome names the ticket's user")
    is_(c.headers.get("content-type"), "text/event-stream", "Content-Type: text/event-stream")
    is_(c.headers.get("cache-control"), "no-cache, no-transform", "Cache-Control: no-cache, no-transform")
    is_(c.headers.get("x-accel-buffering"), "no", "X-Accel-Buffering: no")
    ok(c.body.startswith(b"retry: "), "the stream starts with a retry: hint")
    is_(c.records[0]["event"], "welcome", "the first event is the welcome")
    await c.close()
    c2 = await sse_connect(ticket=t["ticket"], welcome=False)
    is_(c2.status, 401, "the same ticket again: 401")
    await c2.close()


async def part2(a0, a1):
    global P
    P = ng.worker_pids()
    b = await sse_connect_on("bob", P[0])
    seqs = await send(a1, 3, "p2")
    st, _, m = api("POST", "/chat/api/conversations/%s/messages" % G, token=token("alice"),
                   json={"client_msg_id": "p2-rest", "body": "over REST"})
    is_(st, 201, "REST send")
    seqs.append(m["message"]["seq"])
    await b.wait(lambda c: msgs_of(c) == seqs, 10)
    is_(msgs_of(b), seqs, "bob's stream on one worker got alice's 4 messages sent on the other")
    recs = [r for r in b.records if r["event"] == "message.new"]
    ok(all(r["id"] and r["id"] == r["data"]["cursor"] for r in recs), "each message.new has id: its cursor")
    ok(all(r["data"]["type"] == "event" and r["data"]["event"]["kind"] == "message.new" for r in recs),
       "data is the event envelope")
    is_([r["data"]["event"]["message"]["body"] for r in recs][-1], "over REST", "bodies as sent")
    r = await a1.request("typing", conversation_id=G, state="start")
    await b.wait(lambda c: any(x["event"] == "typing" for x in c.records), 5)
    ty = [x for x in b.records if x["event"] == "typing"]
    ok(ty and ty[0]["id"] is None and ty[0]["data"]["event"]["user"] == "alice",
       "typing arrives as event: typing without an id")
    await a1.request("typing", conversation_id=G, state="stop")
    return b


async def part3(b, a1):
    last = b.last_id
    await b.close()
    seqs = await send(a1, 5, "p3")
    # Last-Event-ID wins over a ?cursor= that is older
    c = await sse_connect("bob", last_event_id=last, cursor=b.hello["cursor"])
    await c.wait(lambda c: msgs_of(c) == seqs, 10)
    is_(msgs_of(c), seqs, "Last-Event-ID: exactly the 5 missed messages, in order, once")
    last2 = c.last_id
    await c.close()
    seqs2 = await send(a1, 3, "p3b")
    c = await sse_connect("bob", cursor=last2)
    await c.wait(lambda c: msgs_of(c) == seqs2, 10)
    is_(msgs_of(c), seqs2, "?cursor=: exactly the 3 missed messages")
    await asyncio.sleep(0.3)
    is_(msgs_of(c), seqs2, "and nothing more")
    await c.close()
    # the welcome carries the start as its id: a browser that reconnects
    # before any event (Last-Event-ID = the welcome's) misses nothing
    c = await sse_connect("bob")
    wid = c.records[0]["id"]
    is_(wid, c.hello["cursor"], "the welcome's id: is where the stream starts")
    await c.close()
    seqs3 = await send(a1, 2, "p3c")
    c = await sse_connect("bob", last_event_id=wid)
    await c.wait(lambda c: msgs_of(c) == seqs3, 10)
    is_(msgs_of(c), seqs3, "reconnecting with the welcome's id: the 2 messages sent meanwhile")
    await c.close()
    c = await sse_connect("bob", cursor="nonsense.12")
    await c.wait(lambda c: any(r["event"] == "resync_required" for r in c.records), 5)
    rs = [r for r in c.records if r["event"] == "resync_required"]
    ok(rs and rs[0]["id"] and rs[0]["id"] == rs[0]["data"]["cursor"],
       "an unknown cursor: resync_required with its new cursor as the id")
    await c.close()
    return seqs2[-1]


async def part4():
    c = await sse_connect("bob")
    n0 = c.comments
    await asyncio.sleep(3.5)
    ok(c.comments - n0 >= 2, "heartbeat comments on an idle stream (%d in 3.5 s)" % (c.comments - n0))
    await c.close()


async def part5():
    cs = [await sse_connect("bob") for _ in range(3)]
    ok(all(c.hello for c in cs), "3 streams (the per-user cap)")
    for c in cs:
        c.abort()
    await asyncio.sleep(0.5)
    cs = [await sse_connect("bob") for _ in range(3)]
    ok(all(c.hello for c in cs), "after dropping them, 3 new streams fit: the dropped ones are gone")
    d = await sse_connect("bob", welcome=False)
    await d.wait_closed(5)
    errs = [r["data"] for r in d.records if r["event"] == "error"]
    is_((d.status, errs and errs[0]["error"]["code"]), (200, "rate_limited"),
        "a 4th: 200 and an error event rate_limited (an EventSource would come back)")
    ok(d.closed, "and the stream ends")
    for c in cs:
        await c.close()


async def part6(a1):
    c = await sse_connect("bob")
    seqs = await send(a1, 2, "p6")
    await c.wait(lambda c: msgs_of(c) == seqs, 10)
    ok(await until(lambda: pg.query("SELECT delivered_seq FROM chat_members WHERE conversation_id = %s "
                                    "AND user_id = 'bob'", G)[0][0] >= seqs[-1], 5),
       "what the stream wrote counts as delivered (delivered_seq %d)" % seqs[-1])
    await c.close()


async def part7():
    c = await sse_connect("bob", token_=token("bob", exp_in=2))
    await c.wait_closed(8)
    errs = [r["data"] for r in c.records if r["event"] == "error"]
    ok(c.closed and errs and errs[-1]["error"]["code"] == "token_expired",
       "token expiry: an error event token_expired, then the end of the stream")


async def part8():
    """dave stops reading; carol floods H; erin... the other member reads."""
    carol = await ws_connect_on("carol")
    good = await sse_connect("dave")
    s = socket.create_connection(("127.0.0.1", ng.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(("GET /chat/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
               % token("dave")).encode())
    await asyncio.sleep(0.5)
    body = "x" * 3000
    seqs = []
    t0 = time.monotonic()
    for i in range(1500):
        r = await carol.request("send", conversation_id=H, client_msg_id="f-%d" % i, body=body)
        seqs.append(r["result"]["message"]["seq"])
        if i % 100 == 0 and "too slow" in ng.error_log():
            break
    note("flood sent at %.1f s" % (time.monotonic() - t0))
    cut = await until(lambda: "client stream too slow" in ng.error_log(), 15)
    ok(cut, "the reader that stopped is cut (%.1f s, %d messages)" % (time.monotonic() - t0, len(seqs)))

    # the server's side of it is no longer an established connection
    # (draining what the kernel holds through a 4k window takes minutes)
    import chattest
    port = s.getsockname()[1]
    closed = await until(lambda: chattest._tcp_inode(ng.port, port) is None, 10)
    ok(closed, "its connection is closed by the server")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    await good.wait(lambda c: msgs_of(c, H) == seqs, 20)
    is_(msgs_of(good, H) == seqs, True, "the reader that reads got all %d, in order, once" % len(seqs))
    await good.close()
    await carol.close()


async def part9():
    base = pg.query("SELECT last_seq FROM chat_conversations WHERE id = %s", G)[0][0]
    streams = [await sse_connect_on("bob", p) for p in ng.worker_pids()]
    sent = []
    state = {"stop": False}

    async def sender():
        i = 0
        while not state["stop"]:
            try:
                c = await ws_connect_on("alice", timeout=20)
                while not state["stop"]:
                    r = await c.request("send", conversation_id=G, client_msg_id="r-%d" % i, body="r")
                    i += 1
                    if not (r and r.get("ok")):
                        break
                    sent.append(r["result"]["message"]["seq"])
                    await asyncio.sleep(0.02)
                await c.close()
            except Exception:  # noqa: BLE001 -- the worker went away
                await asyncio.sleep(0.1)
    t = asyncio.ensure_future(sender())
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    ng.reload()
    ended = await until(lambda: all(c.closed for c in streams), 10)
    ok(ended, "reload: every stream ends (%.1f s)" % (time.monotonic() - t0))
    errs = [[r["data"] for r in c.records if r["event"] == "error"] for c in streams]
    ok(all(e and e[-1]["error"]["code"] == "unavailable" and e[-1]["error"]["retry_after_ms"] < 1000
           for e in errs), "each with an error event unavailable and retry_after_ms < 1000")
    ok(all(c.retry is not None and c.retry < 1000 for c in streams), "and a retry: under a second")
    resumed = [await sse_connect("bob", last_event_id=c.last_id or c.hello["cursor"]) for c in streams]
    await asyncio.sleep(1.0)
    state["stop"] = True
    await t
    want = [r[0] for r in pg.query("SELECT seq FROM chat_messages WHERE conversation_id = %s "
                                   "AND seq > %s ORDER BY seq", G, base)]
    ok(len(sent) > 20 and set(sent) <= set(want), "alice sent %d messages around the reload" % len(sent))
    for i, (c, r) in enumerate(zip(streams, resumed)):
        await r.wait(lambda x: msgs_of(c) + msgs_of(x) == want, 10)
        is_(msgs_of(c) + msgs_of(r), want,
            "stream %d: before + after the reload, every message once, in order" % i)
    for c in resumed:
        await c.close()


async def part10():
    pg.stop()
    try:
        c = await sse_connect("bob", welcome=False)
        await c.wait_closed(15)
        errs = [r["data"] for r in c.records if r["event"] == "error"]
        is_(c.status, 200, "the store down: still 200 (an EventSource would give up on 503)")
        ok(errs and errs[-1]["error"]["code"] == "unavailable" and errs[-1]["error"]["retry_after_ms"] > 0,
           "an error event unavailable with retry_after_ms")
        ok(c.closed and c.retry and c.retry > 0, "a retry: hint, and the stream ends")
        await c.close()
    finally:
        pg.start()
    c = None
    for _ in range(100):
        c = await sse_connect("bob")
        if c.hello:
            break
        await c.close()
        await asyncio.sleep(0.2)
    ok(c and c.hello, "the store is back: streams work again")
    if c:
        await c.close()


T0 = time.monotonic()


async def main():
    await part1()
    note("part1 done at %.1f s" % (time.monotonic() - T0))
    a0 = await ws_connect_on("alice", ng.worker_pids()[0])
    a1 = await ws_connect_on("alice", ng.worker_pids()[1])
    b = await part2(a0, a1)
    note("part2 done at %.1f s" % (time.monotonic() - T0))
    await part3(b, a1)
    note("part3 done at %.1f s" % (time.monotonic() - T0))
    await part4()
    note("part4 done at %.1f s" % (time.monotonic() - T0))
    await part5()
    note("part5 done at %.1f s" % (time.monotonic() - T0))
    await part6(a1)
    note("part6 done at %.1f s" % (time.monotonic() - T0))
    await part7()
    note("part7 done at %.1f s" % (time.monotonic() - T0))
    await part8()
    note("part8 done at %.1f s" % (time.monotonic() - T0))
    await a0.close()
    await a1.close()
    await part9()
    note("part9 done at %.1f s" % (time.monotonic() - T0))
    await part10()
    note("part10 done at %.1f s" % (time.monotonic() - T0))

asyncio.run(main())
done()
