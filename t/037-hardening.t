#!/usr/bin/python3
# Foundation hardening (issue 7), each defect from outside:
#  - hello{token} + auth pipelined in one write (the join once kept a
#    pointer into the identity that auth freed), also while the pool is
#    frozen so the join is still queued;
#  - the browser's ticket flow: ?cursor= on the upgrade, and a hello with a
#    cursor after the implicit join -- never a duplicate, never a gap;
#  - a cursor from another worker a little ahead is not "unknown";
#  - the database replaced under running workers: resync_required, and
#    live delivery goes on;
#  - chat_max_rewind; one bad item in a batch fails only itself;
#  - sends in flight per connection, attachments refused, caps on
#    unauthenticated and per-address connections.
import asyncio
import json
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

# a database of its own: rewind distances count positions, and other
# nginx instances on one database take chunks of positions in between
pg_rw = PgCluster()
pg = PgCluster()             # the last one: the helpers' default
ng_rw = Nginx(pg_rw, workers=2, http="chat_max_rewind 10;")
ng_small = Nginx(pg, workers=1, http="chat_db_pool_size 2;")
ng_lim = Nginx(pg, workers=1, http="chat_max_unauthenticated 3;\n"
               "chat_max_connections_per_address 4;\nchat_auth_timeout 30s;")
# the smallest queue there is: replies to pipelined sends must still fit
ng_tiny = Nginx(pg, workers=1, http="chat_max_message_size 1k;\nchat_max_queue 2k;")
# created last: the default of the harness' helpers
ng = Nginx(pg, workers=2)

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


def module_backends():
    return [int(r[0]) for r in pg.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'chat' "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")]


class Frozen:
    """SIGSTOPs the module's PostgreSQL backends (every nginx's) meanwhile."""

    def __enter__(self):
        self.pids = module_backends()
        for p in self.pids:
            os.kill(p, signal.SIGSTOP)
        return self

    def __exit__(self, *a):
        for p in self.pids:
            os.kill(p, signal.SIGCONT)


def raw_replies(ws, want, timeout=10):
    """Reads from a RawWS until replies with the ids in `want` came; returns
    ({id: reply}, [other messages in order])."""
    got, other = {}, []
    deadline = time.monotonic() + timeout
    while set(want) - set(got) and time.monotonic() < deadline:
        m = ws.recv_json(max(0.01, deadline - time.monotonic()))
        if m is None:
            break
        if m.get("type") == "reply" and m.get("id") in want:
            got[m["id"]] = m
        else:
            other.append(m)
    return got, other


def raw_wait(ws, pred, timeout=5):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            m = ws.recv_json(max(0.01, deadline - time.monotonic()))
        except socket.timeout:
            break
        if m is None:
            break
        seen.append(m)
        if pred(m):
            return m, seen
    return None, seen


def is_msg(cmid):
    return lambda m: (m.get("type") == "event" and
                      m["event"].get("message", {}).get("client_msg_id") == cmid)


async def send_and_wait(sender, conv, cmid, body="x", nginx=None):
    c = await ws_connect_on(sender, nginx=nginx)
    r = await c.request("send", conversation_id=conv, client_msg_id=cmid, body=body)
    await c.close()
    return r


# ---------------------------------------------------------------- A ----

def test_pipelined_hello_auth():
    conv = rest_create_conv("pa-alice", "group", ["pa-bob"], title="pipelined")
    other = rest_create_conv("pa-carol", "group", ["pa-dave"], title="not alice's")
    good = 0
    for i in range(20):
        ws = RawWS(ng)
        ws.sendall(RawWS.frame(1, json.dumps({"type": "hello", "id": 1, "token": token("pa-alice")}))
                   + RawWS.frame(1, json.dumps({"type": "auth", "id": 2,
                                                "token": token("pa-alice", name="Alice %d" % i)}))
                   + RawWS.frame(1, json.dumps({"type": "ping", "id": 3})))
        got, _ = raw_replies(ws, [1, 2])
        if got.get(1, {}).get("ok") and got.get(2, {}).get("ok"):
            good += 1
        ws.close()
    is_(good, 20, "hello{token} + auth + ping in one write: both answered ok, 20 times")

    # while the pool is frozen the join waits in the store's queue; the
    # identity changes under it (another name: a new copy)
    ws = RawWS(ng, timeout=15)
    with Frozen():
        ws.sendall(RawWS.frame(1, json.dumps({"type": "hello", "id": 1, "token": token("pa-alice")})))
        time.sleep(0.3)
        ws.sendall(RawWS.frame(1, json.dumps({"type": "auth", "id": 2,
                                              "token": token("pa-alice", name="Renamed")}))
                   + RawWS.frame(1, json.dumps({"type": "hello", "id": 3, "token": token("pa-alice")})))
        time.sleep(0.5)
    got, _ = raw_replies(ws, [1, 2, 3], timeout=15)
    ok(got.get(1, {}).get("ok"), "frozen pool: the first hello is answered ok after the thaw")
    ok(got.get(2, {}).get("ok"), "frozen pool: auth with another name answered ok")
    is_(got.get(3, {}).get("error", {}).get("code"), "bad_request",
        "frozen pool: a second hello while one is in progress is refused")
    run(send_and_wait("pa-bob", conv, "pa-1", "to alice"))
    run(send_and_wait("pa-carol", other, "pa-2", "not to alice"))
    m, seen = raw_wait(ws, is_msg("pa-1"), timeout=5)
    ok(m is not None, "frozen pool: the session joined alice's conversations")
    m, seen2 = raw_wait(ws, is_msg("pa-2"), timeout=1)
    ok(m is None, "frozen pool: and no one else's")
    ws.close()


# ---------------------------------------------------------------- B ----

async def test_ticket_cursor():
    conv = rest_create_conv("tk-bob", "direct", ["tk-alice"])
    c = await ws_connect_on("tk-alice")
    c0 = c.hello["result"]["cursor"]
    await c.close()
    for i in range(5):
        await send_and_wait("tk-bob", conv, "tk-%d" % i)
    want = db_messages(conv)

    st, _, b = api("POST", "/chat/api/tickets", token=token("tk-alice"))
    is_(st, 201 if st == 201 else 200, "ticket issued")
    c = await ws_connect(ticket=b["ticket"], path="/chat/ws?cursor=" + c0, hello=False)
    w = await c.wait_event(lambda m: m.get("type") == "welcome", timeout=5)
    ok(w is not None and w.get("cursor") == c0, "ticket + ?cursor=: welcome starts at the cursor")
    await until(lambda: len(conv_events(c, conv)) >= len(want), timeout=10)
    stream_ok("ticket + ?cursor=", conv_events(c, conv, whole=True), want)
    ok(c.received and c.received[0].get("type") == "welcome", "welcome comes first")
    await c.close()

    # the demo's way: ?cursor= on the upgrade, then a hello without one
    c = await ws_connect_on("tk-alice")
    c1 = c.hello["result"]["cursor"]
    await c.close()
    for i in range(5, 8):
        await send_and_wait("tk-bob", conv, "tk-%d" % i)
    want = db_messages(conv)[5:]
    st, _, b = api("POST", "/chat/api/tickets", token=token("tk-alice"))
    c = await ws_connect(ticket=b["ticket"], path="/chat/ws?cursor=" + c1, hello=False)
    r = await c.request("hello")
    # the upgrade's join may already have delivered events before the hello
    # is read (a slow machine): then the hello tells where the stream is now
    before = []
    for m in c.received:
        if m is r:
            break
        if m.get("type") == "event" and m.get("cursor"):
            before.append(m["cursor"])
    ok(r and r["ok"] and r["result"]["cursor"] in [c1] + before[-1:],
       "?cursor= then a hello without a cursor: the upgrade's cursor holds (%r; %d events before)"
       % (r and r.get("result", {}).get("cursor"), len(before)))
    await until(lambda: len(conv_events(c, conv)) >= len(want), timeout=10)
    stream_ok("?cursor= + hello{}", conv_events(c, conv, whole=True), want)
    await c.close()


async def test_late_hello():
    """Bearer upgrade (implicit join, welcome) then hello{cursor}: replayed
    when nothing was delivered yet; under traffic, never a duplicate or a
    gap: the stream continues exactly, or says resync_required."""
    conv = rest_create_conv("lh-bob", "direct", ["lh-alice"])
    c = await ws_connect_on("lh-alice")
    c0 = c.hello["result"]["cursor"]
    await c.close()
    for i in range(4):
        await send_and_wait("lh-bob", conv, "lh-q%d" % i)
    want = db_messages(conv)

    c = await ws_connect(token=token("lh-alice"), bearer=True)
    w = await c.wait_event(lambda m: m.get("type") == "welcome", timeout=5)
    ok(w is not None, "bearer upgrade: welcome")
    r = await c.request("hello", cursor=c0)
    ok(r and r["ok"] and r["result"]["cursor"] == c0,
       "late hello with an older cursor, nothing delivered yet: resumes there")
    await until(lambda: len(conv_events(c, conv)) >= len(want), timeout=10)
    stream_ok("late hello", conv_events(c, conv, whole=True), want)
    await c.close()

    # under traffic: a sender keeps going while the receiver reconnects
    stop = {"on": True}

    async def sender():
        s = await ws_connect_on("lh-bob")
        i = 0
        while stop["on"]:
            await s.request("send", conversation_id=conv, client_msg_id="lh-t%d" % i, body="t")
            i += 1
            await asyncio.sleep(0.003)
        await s.close()

    task = asyncio.ensure_future(sender())
    seen_seq = [e["seq"] for e in conv_events(c, conv)]
    cursor = conv_events(c, conv, whole=True)[-1]["cursor"]
    dups = gaps = resyncs = 0
    for trial in range(10):
        st, _, b = api("POST", "/chat/api/tickets", token=token("lh-alice"))
        c = await ws_connect(ticket=b["ticket"], hello=False)
        r = await c.request("hello", cursor=cursor)
        await asyncio.sleep(0.15)
        evs = conv_events(c, conv, whole=True)
        if any(m.get("type") == "resync_required" for m in c.messages):
            resyncs += 1
        else:
            seqs = [e["event"]["seq"] for e in evs]
            prev = seen_seq[-1]
            if seqs and seqs[0] <= prev:
                dups += 1
            if seqs and seqs[0] != prev + 1:
                gaps += 1
            if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                gaps += 1
            seen_seq += seqs
        if evs:
            cursor = evs[-1]["cursor"]
        await c.close()
    stop["on"] = False
    await task
    is_(dups, 0, "ticket upgrade + hello{cursor} under traffic: no duplicates in 10 reconnects")
    is_(gaps, 0, "... and no gaps (%d of 10 answered resync_required)" % resyncs)


# ---------------------------------------------------------------- D ----

async def test_cursor_ahead():
    """x's worker is stopped; x says (sync) it has the next event, which
    then commits on the other worker: when x's worker runs again it reads
    x's socket before it has dispatched that event, and the cursor is still
    known (published), not "unknown"."""
    conv = rest_create_conv("ca-bob", "group", ["ca-alice"], title="ahead")
    pids = ng.worker_pids()
    trials = 6
    fine = 0
    dup = 0
    for t in range(trials):
        x = await ws_connect_on("ca-alice", want_pid=pids[1])
        y = await ws_connect_on("ca-alice", want_pid=pids[0])
        await asyncio.sleep(0.1)
        epoch = x.hello["result"]["cursor"].rsplit(".", 1)[0]
        # the next position this nginx hands out follows its newest event
        nxt = gseq(y.hello["result"]["cursor"]) + 1
        os.kill(pids[1], signal.SIGSTOP)
        try:
            await x.send({"type": "sync", "id": 77, "cursor": "%s.%d" % (epoch, nxt)})
            await asyncio.sleep(0.05)
            r = await y.request("send", conversation_id=conv, client_msg_id="ca-%d" % t, body="a")
            ev = await y.wait_event(is_msg("ca-%d" % t), timeout=5)
            ok(ev is not None and gseq(ev["cursor"]) == nxt, "trial %d: the event is the one x named" % t)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        await until(lambda: any(m.get("id") == 77 for m in x.received), timeout=5)
        await asyncio.sleep(0.3)
        resync = [m for m in x.messages if m.get("type") == "resync_required"]
        rep = [i for i, m in enumerate(x.received) if m.get("id") == 77]
        # delivered before the sync was read is fine; after its reply it
        # would be a duplicate
        again = [i for i, m in enumerate(x.received) if is_msg("ca-%d" % t)(m)
                 and rep and i > rep[0]]
        if not resync and rep and x.received[rep[0]].get("ok"):
            fine += 1
        else:
            diag("trial %d: sync reply %r, resync %r" % (t, x._replies.get(77), resync))
        if again:
            dup += 1
        await x.close()
        await y.close()
    is_(fine, trials, "a cursor from a worker that is ahead: no resync_required (%d trials)" % trials)
    is_(dup, 0, "... and the event it already has is not delivered again")


# ---------------------------------------------------------------- E ----

async def test_epoch_replaced():
    conv = rest_create_conv("ep-bob", "group", ["ep-alice"], title="epoch")
    pids = ng.worker_pids()
    cs = [await ws_connect_on("ep-alice", want_pid=p) for p in pids]
    old_epoch = pg.query("SELECT epoch FROM chat_clock")[0][0]
    pg.query("UPDATE chat_clock SET epoch = 'replaced' || epoch RETURNING 1")
    got = await asyncio.gather(*[c.wait_event(lambda m: m.get("type") == "resync_required",
                                              timeout=10) for c in cs])
    ok(all(got), "database replaced: every session (both workers) gets resync_required")
    ok(all(g and g["cursor"].startswith("replaced") for g in got),
       "... with a cursor of the new epoch")
    r = await send_and_wait("ep-bob", conv, "ep-after", "after")
    ok(r and r["ok"], "a send after the replacement")
    evs = await asyncio.gather(*[c.wait_event(is_msg("ep-after"), timeout=10) for c in cs])
    ok(all(evs), "live delivery goes on at once on both workers")
    ok(all(e and e["cursor"].startswith("replaced") for e in evs), "... with new-epoch cursors")
    for c in cs:
        await c.close()
    c = await ws_connect_on("ep-alice")
    ok(c.hello["result"]["cursor"].startswith("replaced"), "new sessions start in the new epoch")
    await c.close()
    del old_epoch


# ---------------------------------------------------------------- F ----

async def test_max_rewind():
    conv = rest_create_conv("mr-bob", "direct", ["mr-alice"], nginx=ng_rw)
    c = await ws_connect_on("mr-alice", nginx=ng_rw)
    c0 = c.hello["result"]["cursor"]
    await c.close()
    for i in range(20):
        await send_and_wait("mr-bob", conv, "mr-%d" % i, nginx=ng_rw)
    c = await ws_connect_on("mr-alice", nginx=ng_rw, cursor=c0)
    rs = await c.wait_event(lambda m: m.get("type") == "resync_required", timeout=5)
    ok(rs is not None, "a cursor 20 events back with chat_max_rewind 10: resync_required")
    await asyncio.sleep(0.3)
    is_(len(conv_events(c, conv)), 0, "... and no replay")
    r = await c.request("sync", cursor=c0.rsplit(".", 1)[0] + ".0")
    ok(r and not r["ok"], "sync to the beginning refused")
    await c.close()
    epoch = c0.rsplit(".", 1)[0]
    gs = [r[0] for r in pg_rw.query("SELECT gseq FROM chat_events WHERE conversation_id = %s "
                                 "AND kind = 'message.new' ORDER BY gseq", int(conv))]
    near = "%s.%d" % (epoch, gs[14])
    c = await ws_connect_on("mr-alice", nginx=ng_rw, cursor=near)
    await until(lambda: len(conv_events(c, conv)) >= 5, timeout=5)
    is_(len(conv_events(c, conv)), 5, "a cursor 5 back: the 5 events replayed")
    await c.close()


# ---------------------------------------------------------------- G ----

async def test_batch_isolation():
    pg.query("CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS "
             "$$BEGIN RAISE EXCEPTION 'poisoned body'; END$$")
    pg.query("CREATE TRIGGER poison BEFORE INSERT ON chat_messages FOR EACH ROW "
             "WHEN (NEW.body = 'poison') EXECUTE FUNCTION poison()")
    conv = rest_create_conv("bi-bob", "group", ["bi-alice"], nginx=ng_small, title="batch")
    ws = RawWS(ng_small, timeout=20)
    ws.send_json({"type": "hello", "id": 1, "token": token("bi-bob")})
    got, _ = raw_replies(ws, [1])
    ok(got.get(1, {}).get("ok"), "sender joined")
    mark = len(ng_small.error_log())
    with Frozen():
        ws.send_json({"type": "send", "id": 2, "conversation_id": conv, "client_msg_id": "bi-0",
                      "body": "first"})
        time.sleep(0.1)
        frames = b""
        for i in range(1, 11):
            frames += RawWS.frame(1, json.dumps({"type": "send", "id": 2 + i, "conversation_id": conv,
                                                 "client_msg_id": "bi-%d" % i, "body": "good %d" % i}))
            if i == 5:
                frames += RawWS.frame(1, json.dumps({"type": "send", "id": 100, "conversation_id": conv,
                                                     "client_msg_id": "bi-poison", "body": "poison"}))
        ws.sendall(frames)
        time.sleep(0.3)
    got, _ = raw_replies(ws, list(range(2, 13)) + [100], timeout=20)
    oks = [i for i in range(2, 13) if got.get(i, {}).get("ok")]
    is_(len(oks), 11, "the 11 good sends of the failed batch are stored")
    ok(got.get(100) is not None and not got[100]["ok"], "the poisoned one alone fails (%r)"
       % (got.get(100, {}).get("error"),))
    bodies = [r[0] for r in pg.query("SELECT body FROM chat_messages WHERE conversation_id = %s "
                                     "ORDER BY seq", int(conv))]
    is_(bodies, ["first"] + ["good %d" % i for i in range(1, 11)], "stored once each, in order")
    ok("storing them one by one" in ng_small.error_log()[mark:],
       "error.log: the batch was split (it did fail as a whole first)")
    ws.close()
    pg.query("DROP TRIGGER poison ON chat_messages")


# ---------------------------------------------------------------- I ----

async def test_send_cap():
    conv = rest_create_conv("sc-bob", "group", ["sc-carol"], title="cap")
    ws = RawWS(ng, timeout=30)
    ws.send_json({"type": "hello", "id": 1, "token": token("sc-bob")})
    raw_replies(ws, [1])
    frames = b"".join(RawWS.frame(1, json.dumps({"type": "send", "id": 10 + i, "conversation_id": conv,
                                                 "client_msg_id": "sc-%d" % i, "body": "b"}))
                      for i in range(300))
    ws.sendall(frames)
    c = await ws_connect_on("sc-carol")
    r = await c.request("send", conversation_id=conv, client_msg_id="sc-carol", body="mine")
    ok(r and r["ok"], "another user's send is stored while one connection floods")
    await c.close()
    got, _ = raw_replies(ws, [10 + i for i in range(300)], timeout=30)
    codes = [("ok" if got[k]["ok"] else got[k]["error"]["code"]) for k in sorted(got)]
    is_(len(got), 300, "300 pipelined sends: 300 replies")
    ok(codes.count("rate_limited") > 0, "some are told rate_limited (%d)" % codes.count("rate_limited"))
    is_(codes.count("ok") + codes.count("rate_limited"), 300, "the rest are stored")
    n = pg.query("SELECT count(*) FROM chat_messages WHERE conversation_id = %s AND sender = 'sc-bob'",
                 int(conv))[0][0]
    is_(n, codes.count("ok"), "every ok is one stored message")
    lim = [got[k] for k in got if not got[k]["ok"]]
    ok(all(x["error"].get("retry_after_ms") for x in lim), "rate_limited carries retry_after_ms")
    ws.close()


async def test_tiny_queue():
    conv = rest_create_conv("tq-bob", "direct", ["tq-alice"], nginx=ng_tiny)
    c = await ws_connect_on("tq-bob", nginx=ng_tiny)
    reps = await asyncio.gather(*[c.request("send", conversation_id=conv, client_msg_id="tq-%d" % i,
                                            body="short %d" % i) for i in range(30)])
    ok(not c.closed, "chat_max_queue 2k: 30 pipelined sends do not cut a reading client (%s)"
       % (c.close_code,))
    oks = sum(1 for r in reps if r and r["ok"])
    lim = sum(1 for r in reps if r and not r["ok"] and r["error"]["code"] == "rate_limited")
    is_(oks + lim, 30, "... each answered: %d stored, %d rate_limited" % (oks, lim))
    await c.close()


async def test_no_false_reset():
    """Bursts with quiet gaps, so the clock check runs while batches commit:
    a stale clock answer must not pass for a replaced database."""
    conv = rest_create_conv("nr-bob", "group", ["nr-alice"], title="bursts")
    pids = ng.worker_pids()
    watch = [await ws_connect_on("nr-alice", want_pid=p) for p in pids]
    s = await ws_connect_on("nr-bob")
    n = 0
    t_end = time.monotonic() + 7
    while time.monotonic() < t_end:
        await asyncio.gather(*[s.request("send", conversation_id=conv, client_msg_id="nr-%d" % (n + i),
                                         body="b") for i in range(20)])
        n += 20
        await asyncio.sleep(0.9 + (n % 7) * 0.05)
    await asyncio.sleep(0.5)
    resets = [m for c in watch for m in c.messages if m.get("type") == "resync_required"]
    is_(resets, [], "7 s of bursts and pauses on both workers: no resync_required")
    for c in watch:
        ids = [e["message"]["client_msg_id"] for e in conv_events(c, conv)]
        is_(ids, ["nr-%d" % i for i in range(n)], "every burst delivered once, in order")
        await c.close()
    await s.close()


# ---------------------------------------------------------------- K ----

async def test_attachments():
    conv = rest_create_conv("at-bob", "direct", ["at-alice"])
    c = await ws_connect_on("at-bob")
    r = await c.request("send", conversation_id=conv, client_msg_id="at-1", body="x",
                        attachments=[{"url": "javascript:alert(1)", "name": "x"}])
    ok(r and not r["ok"] and r["error"]["code"] == "bad_request",
       "client JSON as attachments is refused (%r)" % (r and r.get("error"),))
    r = await c.request("send", conversation_id=conv, client_msg_id="at-2", body="x", attachments=[])
    ok(r and r["ok"] and r["result"]["message"]["attachments"] == [], "an empty list is fine")
    await c.close()


# ---------------------------------------------------------------- J ----

def upgrade(src="127.0.0.1", tok=None):
    s = socket.create_connection(("127.0.0.1", ng_lim.port), timeout=5, source_address=(src, 0))
    h = ("GET /chat/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Protocol: chat.v1\r\n")
    if tok:
        h += "Authorization: Bearer %s\r\n" % tok
    s.sendall((h + "\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(4096)
        if not b:
            break
        buf += b
    status = int(buf.split(b" ", 2)[1]) if buf else None
    return s, status


def test_caps():
    held = [upgrade() for _ in range(3)]
    is_([st for _, st in held], [101, 101, 101], "3 unauthenticated upgrades")
    s, st = upgrade()
    is_(st, 429, "the 4th unauthenticated one: 429 (chat_max_unauthenticated 3)")
    s.close()
    # one of them authenticates: a place frees up
    held[0][0].sendall(RawWS.frame(1, json.dumps({"type": "hello", "id": 1, "token": token("cap-a")})))
    time.sleep(0.3)
    s, st = upgrade()
    is_(st, 101, "after one authenticated, another unauthenticated upgrade is accepted")
    held.append((s, st))
    # per address: 4 held from 127.0.0.1 now
    s, st = upgrade(tok=token("cap-b"))
    is_(st, 429, "the 5th connection from one address: 429 (chat_max_connections_per_address 4)")
    s.close()
    s, st = upgrade(src="127.0.0.2", tok=token("cap-b"))
    is_(st, 101, "another address is not affected")
    s.close()
    for s, _ in held:
        s.close()
    time.sleep(0.3)
    got = [upgrade(tok=token("cap-c")) for _ in range(4)]
    is_([st for _, st in got], [101] * 4, "closed connections give their places back")
    for s, _ in got:
        s.close()


test_pipelined_hello_auth()
run(test_ticket_cursor())
run(test_late_hello())
run(test_cursor_ahead())
run(test_max_rewind())
run(test_batch_isolation())
run(test_send_cap())
run(test_attachments())
run(test_tiny_queue())
run(test_no_false_reset())
test_caps()
run(test_epoch_replaced())
done()
