#!/usr/bin/python3
# No blocking on any worker: a PostgreSQL session of the test holds a row
# lock on conversation A (SELECT ... FOR UPDATE in an open transaction).
#  1. For 5 s, pings and sends to conversation B keep flowing on
#     connections of both workers, each round trip well under 1 s, and B's
#     events reach the other members on both workers during the lock.
#  2. Sends to A made during the lock are not answered until the lock goes,
#     then all succeed: in the order each connection made them, seq
#     consecutive, one row each.
#  3. One connection's order to a held conversation survives a release that
#     falls between two batches (a1 and a B send share a batch that waits
#     on the clock row; a2 comes in meanwhile; A is released, then the
#     clock): a1 is stored before a2.
#  4. With chat_db_statement_timeout 2s, a lock that outlasts it makes the
#     stalled A send (WebSocket and REST) answer `unavailable` with
#     retry_after_ms after about 2 s (while B on the same connection is
#     answered at once); a retry with the same client_msg_id after the
#     release stores it exactly once.
#  5. The same when every commit waits on the clock row past the statement
#     timeout (PostgreSQL cancels the batch): `unavailable` with
#     retry_after_ms, not `internal`; the retry stores it exactly once.
#  6. The deferred-send retry path with error_log at debug level: no crash.
#
# Conversations are created with the schema's own chat_create_conversation()
# before nginx starts (fixtures; REST creation is tested elsewhere).
import asyncio
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

LOCK_HOLD = 5.0
B_RTT_MAX = 1.0

pg = PgCluster()


A = db_create_conv("alice", ["alice", "bob", "carol"], "A")
B = db_create_conv("alice", ["alice", "bob", "carol"], "B")


def last_seq(conv):
    return pg.query("SELECT last_seq FROM chat_conversations WHERE id = %s", int(conv))[0][0]


def db_rows(conv):
    """{client_msg_id: [(id, seq), ...]} of a conversation."""
    out = {}
    for cmid, mid, seq in pg.query(
            "SELECT client_msg_id, id, seq FROM chat_messages WHERE conversation_id = %s "
            "ORDER BY seq", int(conv)):
        out.setdefault(cmid, []).append((str(mid), seq))
    return out


def lock_conv(conv):
    return db_lock("SELECT id FROM chat_conversations WHERE id = %s FOR UPDATE", int(conv))


def send_fields(conv, cmid, body=None):
    return dict(conversation_id=conv, client_msg_id=cmid, body=body or ("body of " + cmid))


# ----------------------------------------------------------------- 1, 2 --

async def part_lock_hold(ng):
    pids = ng.worker_pids()
    is_(len(pids), 2, "two workers")

    # per worker: alice and bob talk in B (and ping), carol listens,
    # alice's second connection writes to A
    talk, listen, a_send = [], {}, {}
    for pid in pids:
        talk.append(await ws_connect_on("alice", pid))
        talk.append(await ws_connect_on("bob", pid))
        listen[pid] = await ws_connect_on("carol", pid)
        a_send[pid] = await ws_connect_on("alice", pid)
    ok(sorted({session_pid(c) for c in talk}) == sorted(pids), "B traffic connections on both workers")

    a_base = last_seq(A)
    lk = lock_conv(A)
    t_lock = time.monotonic()
    note("conversation %s locked by the test (FOR UPDATE)" % A)

    # sends to A from both workers, in a known order per connection
    a_tasks = {}
    for n, pid in enumerate(pids):
        a_tasks[pid] = []
        for k in range(1, 5):
            cmid = "a-w%d-%d" % (n, k)
            t = asyncio.ensure_future(a_send[pid].request("send", timeout=LOCK_HOLD + 20,
                                                         **send_fields(A, cmid)))
            a_tasks[pid].append((cmid, t))
            await asyncio.sleep(0)      # the frame is written before the next one

    # B traffic for LOCK_HOLD seconds
    rtts = {"ping": [], "send": []}
    failures = []
    b_acked = []
    seqno = itertools.count(1)

    async def traffic(c):
        while time.monotonic() - t_lock < LOCK_HOLD - 0.3:
            t0 = time.monotonic()
            p = await ws_ping(c, timeout=LOCK_HOLD)
            if p is None:
                failures.append("ping without pong on worker %d" % session_pid(c))
            else:
                rtts["ping"].append(time.monotonic() - t0)
            cmid = "b-%d" % next(seqno)
            t0 = time.monotonic()
            r = await c.request("send", timeout=LOCK_HOLD, **send_fields(B, cmid))
            if not (r and r.get("ok")):
                failures.append("send %s to B on worker %d: %r" % (cmid, session_pid(c), r))
            else:
                rtts["send"].append(time.monotonic() - t0)
                b_acked.append((cmid, r["result"]["message"]["id"], time.monotonic()))
            await asyncio.sleep(0.05)

    await asyncio.gather(*[traffic(c) for c in talk])

    answered_early = [cmid for pid in pids for cmid, t in a_tasks[pid] if t.done()]
    is_(answered_early, [], "no send to the locked conversation A was answered while it was held")

    is_(failures, [], "every ping and every send to B during the lock was answered (both workers)")
    ok(len(rtts["send"]) >= 4 * len(talk), "B kept flowing: %d sends, %d pings in %.1f s"
       % (len(rtts["send"]), len(rtts["ping"]), LOCK_HOLD))
    mx_p = max(rtts["ping"] or [99])
    mx_s = max(rtts["send"] or [99])
    ok(mx_p < B_RTT_MAX, "every ping round trip under %.1f s while A is locked (max %.3f s)"
       % (B_RTT_MAX, mx_p))
    ok(mx_s < B_RTT_MAX, "every send-to-B round trip under %.1f s while A is locked (max %.3f s)"
       % (B_RTT_MAX, mx_s))

    # B's events reach carol on both workers while A is still held
    want_b = {mid for _, mid, t in b_acked if t < time.monotonic() - B_RTT_MAX}
    for pid in pids:
        got = {e["message"]["id"] for e in conv_events(listen[pid], B)}
        missing = want_b - got
        ok(not missing, "worker %d: carol got B's messages during the lock (%d of %d, missing %s)"
           % (pid, len(want_b) - len(missing), len(want_b), sorted(missing)[:5]))

    held = time.monotonic() - t_lock
    lk.rollback()
    lk.close()
    t_rel = time.monotonic()
    note("lock released after %.1f s" % held)

    # the sends to A complete after the release, in order, seq consecutive
    replies = {}
    for pid in pids:
        for cmid, t in a_tasks[pid]:
            try:
                replies[cmid] = await asyncio.wait_for(asyncio.shield(t), 10)
            except asyncio.TimeoutError:
                replies[cmid] = None
    t_done = time.monotonic() - t_rel
    bad = {k: v for k, v in replies.items() if not (v and v.get("ok"))}
    is_(bad, {}, "every send made to A during the lock succeeded after the release")
    ok(t_done < 5, "they were answered within %.2f s of the release" % t_done)

    for n, pid in enumerate(pids):
        seqs = [replies[cmid]["result"]["message"]["seq"] for cmid, _ in a_tasks[pid]
                if replies.get(cmid) and replies[cmid].get("ok")]
        ok(len(seqs) == 4 and seqs == sorted(seqs),
           "worker %d: A's seqs follow the order the connection sent them: %r" % (n, seqs))
    all_seqs = sorted(r["result"]["message"]["seq"] for r in replies.values() if r and r.get("ok"))
    is_(all_seqs, list(range(a_base + 1, a_base + 1 + len(replies))),
        "A's seqs are consecutive after the previous last_seq %d" % a_base)

    rows = db_rows(A)
    want = {k: [(v["result"]["message"]["id"], v["result"]["message"]["seq"])]
            for k, v in replies.items() if v and v.get("ok")}
    is_({k: rows.get(k) for k in replies}, want,
        "the database has exactly one row per A send, the acknowledged one")
    b_rows = db_rows(B)
    is_(sorted(k for k in b_rows), sorted(c for c, _, _ in b_acked),
        "the database has exactly the acknowledged B sends")
    ok(all(len(v) == 1 for v in b_rows.values()), "one row per B client_msg_id")

    # everyone on both workers ends with A's and B's messages, exactly once, in order
    n_a, n_b = last_seq(A), last_seq(B)
    for pid in pids:
        c = listen[pid]
        await until(lambda: len(conv_events(c, A)) >= n_a - a_base and len(conv_events(c, B)) >= n_b, 10)
        await asyncio.sleep(0.2)
        sa = [e["seq"] for e in conv_events(c, A)]
        sb = [e["seq"] for e in conv_events(c, B)]
        is_(sa, list(range(a_base + 1, n_a + 1)), "worker %d: carol got A's messages once, in seq order" % pid)
        is_(sb, list(range(1, n_b + 1)), "worker %d: carol got B's messages once, in seq order" % pid)

    for c in talk + list(listen.values()) + list(a_send.values()):
        await c.close()


# ------------------------------------------------------------------- 3 ---

def part_release_between_batches(ng):
    """a1 and a B send share one batch that waits on the clock row; a2 (to
    A, same connection) arrives meanwhile; A is released, then the clock.
    a1 was sent first, so it must get the lower seq."""
    base = last_seq(A)
    ws = RawWS(ng, timeout=10)
    h = ws.request("hello", token=token("bob"))
    ok(h and h.get("ok"), "raw connection: hello")
    lk_a = lock_conv(A)
    lk_c = db_lock("LOCK TABLE chat_events IN SHARE MODE; SELECT 1")
    import json as _j
    # a1 and b1 in one TCP write: one read, one batch
    ws.sendall(RawWS.frame(1, _j.dumps(dict(type="send", id="a1", **send_fields(A, "order-a1"))))
               + RawWS.frame(1, _j.dumps(dict(type="send", id="b1", **send_fields(B, "order-b1")))))
    time.sleep(0.5)      # the batch [a1, b1] now waits on the clock row
    ws.send_json(dict(type="send", id="a2", **send_fields(A, "order-a2")))
    time.sleep(0.3)
    lk_a.rollback()
    lk_a.close()
    time.sleep(0.2)
    lk_c.rollback()
    lk_c.close()
    replies = {}
    deadline = time.monotonic() + 10
    while len(replies) < 3 and time.monotonic() < deadline:
        m = ws.recv_json(timeout=max(0.01, deadline - time.monotonic()))
        if m is None:
            break
        if m.get("type") == "reply":
            replies[m.get("id")] = m
    ws.close()
    okays = {k: v for k, v in replies.items() if v.get("ok")}
    is_(sorted(okays), ["a1", "a2", "b1"], "a1, a2 and b1 all stored")
    if "a1" in okays and "a2" in okays:
        s1 = okays["a1"]["result"]["message"]["seq"]
        s2 = okays["a2"]["result"]["message"]["seq"]
        ok(s1 == base + 1 and s2 == base + 2,
           "one connection's sends to A keep their order across a release between batches "
           "(a1 seq %d, a2 seq %d; want %d, %d)" % (s1, s2, base + 1, base + 2))
    else:
        ok(False, "one connection's sends to A keep their order (replies: %r)" % (replies,))


# ------------------------------------------------------------------- 4 ---

async def part_statement_timeout(ng2):
    pids = ng2.worker_pids()
    senders = [await ws_connect_on("alice", pid, nginx=ng2) for pid in pids]
    base = last_seq(A)
    lk = lock_conv(A)
    t_lock = time.monotonic()

    tasks = []
    for n, c in enumerate(senders):
        tasks.append(("late-w%d" % n, asyncio.ensure_future(
            c.request("send", timeout=15, **send_fields(A, "late-w%d" % n)))))
    loop = asyncio.get_event_loop()
    rest = loop.run_in_executor(None, lambda: ng2.api(
        "POST", "/chat/api/conversations/%s/messages" % A, token=token("bob"),
        json={"client_msg_id": "late-rest", "body": "over REST"}, timeout=15))

    # the same connections are not held up meanwhile
    await asyncio.sleep(0.5)
    for n, c in enumerate(senders):
        t0 = time.monotonic()
        r = await c.request("send", timeout=5, **send_fields(B, "meanwhile-w%d" % n))
        dt = time.monotonic() - t0
        ok(r and r.get("ok") and dt < B_RTT_MAX,
           "worker %d: a send to B on the connection with a stalled A send is answered in %.3f s"
           % (n, dt))

    replies = {}
    for cmid, t in tasks:
        try:
            replies[cmid] = (await asyncio.wait_for(asyncio.shield(t), 8), time.monotonic() - t_lock)
        except asyncio.TimeoutError:
            replies[cmid] = (None, time.monotonic() - t_lock)
    st, hdrs, body = await rest
    t_rest = time.monotonic() - t_lock
    still_held = time.monotonic() - t_lock
    for cmid, (r, dt) in replies.items():
        err = (r or {}).get("error") or {}
        ok(r is not None and r.get("ok") is False and err.get("code") == "unavailable",
           "%s: a send stalled past chat_db_statement_timeout answers unavailable (%r)" % (cmid, r))
        ok(isinstance(err.get("retry_after_ms"), int) and err.get("retry_after_ms") > 0,
           "%s: with retry_after_ms (%r)" % (cmid, err.get("retry_after_ms")))
        ok(1.5 <= dt <= 4.5, "%s: answered after %.2f s (timeout 2 s, lock held longer)" % (cmid, dt))
    is_(st, 503, "REST send stalled past the timeout: 503")
    ok(isinstance(body, dict) and (body.get("error") or {}).get("code") == "unavailable"
       and isinstance((body.get("error") or {}).get("retry_after_ms"), int),
       "REST: unavailable with retry_after_ms (%r)" % (body,))
    ok(1.5 <= t_rest <= 4.5, "REST: answered after %.2f s" % t_rest)
    rows = db_rows(A)
    is_([k for k in ("late-w0", "late-w1", "late-rest") if k in rows], [],
        "nothing was stored for the timed-out sends")

    # outlast the timeout a bit more, then release
    if still_held < 5:
        await asyncio.sleep(5 - still_held)
    lk.rollback()
    lk.close()

    got = []
    for n, c in enumerate(senders):
        cmid = "late-w%d" % n
        r1 = await c.request("send", timeout=10, **send_fields(A, cmid))
        r2 = await c.request("send", timeout=10, **send_fields(A, cmid))
        ok(r1 and r1.get("ok"), "%s: the retry after the release succeeds" % cmid)
        ok(r1 and r2 and r2.get("ok") and r1["result"]["message"]["id"] == r2["result"]["message"]["id"],
           "%s: a second retry returns the same message" % cmid)
        if r1 and r1.get("ok"):
            got.append(r1["result"]["message"]["seq"])
    st, _, body = ng2.api("POST", "/chat/api/conversations/%s/messages" % A, token=token("bob"),
                          json={"client_msg_id": "late-rest", "body": "over REST"})
    is_(st, 201, "REST retry after the release: 201 created")
    if st == 201:
        got.append(body["message"]["seq"])
    is_(sorted(got), list(range(base + 1, base + 4)), "the retries got consecutive seqs")
    rows = db_rows(A)
    is_({k: len(rows.get(k, [])) for k in ("late-w0", "late-w1", "late-rest")},
        {"late-w0": 1, "late-w1": 1, "late-rest": 1}, "exactly one row per retried client_msg_id")
    for c in senders:
        await c.close()


# ------------------------------------------------------------------- 5 ---

async def part_clock_timeout(ng2):
    """Every commit waits on the clock row (held by the test) longer than
    chat_db_statement_timeout: PostgreSQL cancels the batch.  That is the
    store not answering in time, as transient as a held conversation: the
    sends are answered `unavailable` with retry_after_ms (not `internal`),
    and the retry after the release stores each exactly once."""
    c = await ws_connect_on("bob", nginx=ng2)
    base = {A: last_seq(A), B: last_seq(B)}
    lk = db_lock("LOCK TABLE chat_events IN SHARE MODE; SELECT 1")
    t0 = time.monotonic()
    tasks = [(conv, cmid, asyncio.ensure_future(c.request("send", timeout=15, **send_fields(conv, cmid))))
             for conv, cmid in ((A, "clock-a"), (B, "clock-b"))]
    res = []
    for conv, cmid, t in tasks:
        r = await t
        res.append((conv, cmid, r, time.monotonic() - t0))
    for conv, cmid, r, dt in res:
        err = (r or {}).get("error") or {}
        ok(r is not None and r.get("ok") is False and err.get("code") == "unavailable"
           and isinstance(err.get("retry_after_ms"), int) and err["retry_after_ms"] > 0,
           "%s: a send whose commit waits past chat_db_statement_timeout is answered unavailable "
           "with retry_after_ms (%r)" % (cmid, r))
        ok(dt <= 6.0, "%s: answered after %.2f s (one or two 2 s timeouts)" % (cmid, dt))
    await asyncio.sleep(max(0, 6.5 - (time.monotonic() - t0)))
    lk.rollback()
    lk.close()
    for conv, cmid, _, _ in res:
        r = await c.request("send", timeout=10, **send_fields(conv, cmid))
        ok(r and r.get("ok") and r["result"]["message"]["seq"] == base[conv] + 1,
           "%s: the retry after the release is stored (seq %r)"
           % (cmid, r and r.get("ok") and r["result"]["message"]["seq"]))
        is_(len(db_rows(conv).get(cmid, [])), 1, "%s: exactly one row" % cmid)
    await c.close()


# ------------------------------------------------------------------- 6 ---

async def part_debug_log(ng3):
    """The deferred-send retry timer with error_log at debug level (what an
    operator turns on to look at exactly such stalls): no worker crashes."""
    pids = sorted(ng3.worker_pids())
    c = await ws_connect_on("bob", nginx=ng3)
    lk = lock_conv(A)
    t = asyncio.ensure_future(c.request("send", timeout=15, **send_fields(A, "debug-1")))
    await asyncio.sleep(1.0)             # a few busy retries
    lk.rollback()
    lk.close()
    r = await t
    ok(r and r.get("ok"), "error_log debug: a send deferred behind a held conversation succeeds (%r)"
       % ((r or {}).get("error"),))
    is_(sorted(ng3.worker_pids()), pids, "error_log debug: no worker died (%s)"
        % [l for l in ng3.error_log().splitlines() if "exited on signal" in l][:1])
    await c.close()


loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)

ng = Nginx(pg, workers=2, http="chat_db_statement_timeout 30s;")
loop.run_until_complete(part_lock_hold(ng))
part_release_between_batches(ng)
is_(ng.stop(), 0, "nginx (statement timeout 30 s) quits cleanly")

ng2 = Nginx(pg, workers=2, http="chat_db_statement_timeout 2s;")
loop.run_until_complete(part_statement_timeout(ng2))
loop.run_until_complete(part_clock_timeout(ng2))
is_(ng2.stop(), 0, "nginx (statement timeout 2 s) quits cleanly")

ng3 = Nginx(pg, workers=2, log_level="debug")
loop.run_until_complete(part_debug_log(ng3))
done()
