#!/usr/bin/python3
# Long-poll (GET /chat/poll?cursor=&timeout_ms=, PROTOCOL 5), two workers,
# chat_catchup_page 16:
#  1. errors: no credentials / an expired token -> 401 JSON; a bad
#     timeout_ms -> 400; POST -> 405.
#  2. a first poll without a cursor and timeout_ms=0 answers at once:
#     {"events":[],"cursor":...}, JSON, not cacheable.
#  3. a poll held on one worker is answered with a message committed on
#     the other (both ways), with the event's cursor.
#  4. events waiting after the cursor are answered at once, a page (16) at
#     a time; chained polls give all 40, in order, once.
#  5. chained polls while messages are sent all the time lose nothing and
#     duplicate nothing.
#  6. nothing to say: answered at the timeout with no events and the same
#     cursor.
#  7. a client that goes away is cleaned up at once: 3 held polls dropped,
#     3 new ones are held (chat_max_connections_per_user 3); a 4th is 429.
#  8. an unknown cursor: the answer holds resync_required and its cursor.
#  9. a token that expires while the poll is held: 401 token_expired.
# 10. what a poll answered counts as delivered (delivered_seq).
# 11. reload: a held poll is answered at once (200, its cursor); polling on
#     through the reload loses nothing sent around it.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob"], "poll group")
ng = Nginx(pg, workers=2, http="""
chat_catchup_page 16;
chat_max_connections_per_user 3;
chat_jwt_leeway 1;
""")
T0 = time.monotonic()


def seqs_of(events, conv=G):
    return [e["seq"] for e in conv_events(events, conv)]


async def send(c, n, prefix):
    out = []
    for i in range(n):
        r = await c.request("send", conversation_id=G, client_msg_id="%s-%d" % (prefix, i),
                            body="%s %d" % (prefix, i))
        assert r and r.get("ok"), r
        out.append(r["result"]["message"]["seq"])
    return out


async def chain(cursor, until_seq, timeout_ms=2000, limit=200):
    """Polls from cursor on until a message.new with seq until_seq came;
    returns (all events, last cursor, number of polls)."""
    events, n = [], 0
    while n < limit:
        st, _, b = await poll("bob", cursor=cursor, timeout_ms=timeout_ms)
        n += 1
        assert st == 200, (st, b)
        events += b["events"]
        cursor = b["cursor"]
        if until_seq in seqs_of(b["events"]) or (seqs_of(events) and seqs_of(events)[-1] >= until_seq):
            break
    return events, cursor, n


async def settle(cursor):
    """Polls until nothing more comes (the receipt events a poll's answer
    causes): the cursor after them."""
    for _ in range(20):
        st, _, b = await poll("bob", cursor=cursor, timeout_ms=700)
        if not b["events"]:
            return cursor
        cursor = b["cursor"]
    return cursor


async def main():
    st, h, b = await poll(None)
    is_((st, b["error"]["code"]), (401, "unauthorized"), "no credentials: 401 unauthorized")
    st, h, b = await poll(token_=token("bob", exp_in=-100))
    is_((st, b["error"]["code"]), (401, "token_expired"), "an expired token: 401 token_expired")
    for bad in ("abc", "-5", "99999999999"):
        st, h, b = await poll("bob", timeout_ms=bad)
        is_((st, b["error"]["code"]), (400, "bad_request"), "timeout_ms=%s: 400" % bad)
    st, h, b = await ahttp("POST", "/chat/poll", token=token("bob"))
    is_(st, 405, "POST: 405")

    # 2
    st, h, b = await poll("bob", timeout_ms=0)
    is_((st, b["events"]), (200, []), "first poll, timeout_ms=0: answered at once, no events")
    ok(gseq(b["cursor"]) is not None, "with a cursor (%s)" % b["cursor"])
    ok("application/json" in h.get("content-type", "") and h.get("cache-control") == "no-store",
       "JSON, Cache-Control: no-store")
    cur = b["cursor"]
    note("part 2 done at %.1f s" % (time.monotonic() - T0))

    # 3
    P = ng.worker_pids()
    a = {p: await ws_connect_on("alice", p) for p in P}
    for k in range(2):
        cur = await settle(cur)
        for _ in range(20):
            pr = await PollRequest().start("bob", cursor=cur, timeout_ms=10000)
            await asyncio.sleep(0.1)
            if pr.pid() == P[k]:
                break
            pr.abort()
        held = pr.pid()
        other = [p for p in P if p != held][0]
        s = await send(a[other], 1, "p3-%d" % k)
        st, _, b = await pr.result(10)
        is_((st, seqs_of(b["events"])), (200, s),
            "a poll held on worker %d got the message committed on worker %d" % (P.index(held), P.index(other)))
        ok(b["cursor"] == b["events"][-1]["cursor"], "the answer's cursor is its last event's")
        cur = b["cursor"]
    note("part 3 done at %.1f s" % (time.monotonic() - T0))

    # 4
    s = await send(a[P[0]], 40, "p4")
    t = time.monotonic()
    st, _, b = await poll("bob", cursor=cur, timeout_ms=20000)
    ok(st == 200 and time.monotonic() - t < 10, "events waiting: answered at once (%.2f s)" % (time.monotonic() - t))
    is_(seqs_of(b["events"]), s[:16], "a page of 16")
    events, cur, n = await chain(b["cursor"], s[-1])
    is_(seqs_of(b["events"]) + seqs_of(events), s, "chained polls: all 40, in order, once (%d polls)" % (n + 1))
    note("part 4 done at %.1f s" % (time.monotonic() - T0))

    # 5
    sent = []

    async def sender():
        for i in range(150):
            r = await a[P[i % 2]].request("send", conversation_id=G, client_msg_id="p5-%d" % i, body="x")
            sent.append(r["result"]["message"]["seq"])
            await asyncio.sleep(0.005)
    t = asyncio.ensure_future(sender())
    events, n = [], 0
    while not (t.done() and sent and seqs_of(events)[-1:] == sent[-1:]):
        st, _, b = await poll("bob", cursor=cur, timeout_ms=1000)
        assert st == 200, (st, b)
        events += b["events"]
        cur = b["cursor"]
        n += 1
        if n > 500:
            break
    await t
    is_(seqs_of(events), sent, "%d polls while 150 messages were sent: every one once, in order" % n)
    cursors = [gseq(e["cursor"]) for e in events if e.get("cursor")]
    is_(cursors, sorted(set(cursors)), "no durable event twice across the polls")
    note("part 5 done at %.1f s" % (time.monotonic() - T0))

    # 6
    cur = await settle(cur)
    t = time.monotonic()
    st, _, b = await poll("bob", cursor=cur, timeout_ms=1000)
    el = time.monotonic() - t
    is_((st, [e for e in b["events"] if e.get("cursor")], b["cursor"]), (200, [], cur),
        "nothing new: no durable events, the same cursor")
    ok(el >= 0.9, "answered at the timeout (%.2f s)" % el)

    # 7
    cur = await settle(cur)
    held = [await PollRequest().start("bob", cursor=cur, timeout_ms=20000) for _ in range(3)]
    await asyncio.sleep(0.5)
    ok(not any(p.task.done() for p in held), "3 polls held")
    for p in held:
        p.abort()
    await asyncio.sleep(0.3)
    held = [await PollRequest().start("bob", cursor=cur, timeout_ms=20000) for _ in range(3)]
    await asyncio.sleep(0.5)
    ok(not any(p.task.done() for p in held), "after dropping them, 3 new polls are held: the dropped ones are gone")
    st, _, b = await poll("bob", cursor=cur, timeout_ms=20000)
    is_((st, b["error"]["code"]), (429, "rate_limited"), "a 4th: 429 rate_limited")
    for p in held:
        p.abort()
    await asyncio.sleep(0.3)
    note("part 7 done at %.1f s" % (time.monotonic() - T0))

    # 8
    st, _, b = await poll("bob", cursor="nonsense.5", timeout_ms=5000)
    rs = [e for e in b["events"] if e.get("type") == "resync_required"]
    ok(st == 200 and rs and b["cursor"] == rs[0]["cursor"], "an unknown cursor: resync_required, with its cursor")

    # 9
    st, _, b = await poll(token_=token("bob", exp_in=2), cursor=cur, timeout_ms=10000)
    is_((st, b["error"]["code"]), (401, "token_expired"), "a token that expires while held: 401 token_expired")
    note("part 9 done at %.1f s" % (time.monotonic() - T0))

    # 10
    s = await send(a[P[0]], 1, "p10")
    st, _, b = await poll("bob", cursor=cur, timeout_ms=5000)
    cur = b["cursor"]
    ok(await until(lambda: pg.query("SELECT delivered_seq FROM chat_members WHERE conversation_id = %s "
                                    "AND user_id = 'bob'", G)[0][0] >= s[-1], 5),
       "what a poll answered counts as delivered (delivered_seq %d)" % s[-1])

    # 11
    for c in a.values():
        await c.close()
    base = pg.query("SELECT last_seq FROM chat_conversations WHERE id = %s", G)[0][0]
    # erin is in no conversation: her poll is only answered by the reload
    pr = await PollRequest().start("erin", timeout_ms=20000)
    await asyncio.sleep(0.3)
    state = {"stop": False}

    async def sender2():
        i = 0
        while not state["stop"]:
            try:
                c = await ws_connect_on("alice", timeout=20)
                while not state["stop"]:
                    r = await c.request("send", conversation_id=G, client_msg_id="p11-%d" % i, body="r")
                    i += 1
                    if not (r and r.get("ok")):
                        break
                    await asyncio.sleep(0.02)
                await c.close()
            except Exception:  # noqa: BLE001 -- the worker went away
                await asyncio.sleep(0.1)
    t = asyncio.ensure_future(sender2())
    await asyncio.sleep(0.5)
    t1 = time.monotonic()
    reload = asyncio.ensure_future(asyncio.to_thread(ng.reload))
    st, _, b = await pr.result(10)
    ok(st == 200 and not b["events"] and gseq(b["cursor"]) and time.monotonic() - t1 < 5,
       "reload: a held poll is answered 200 at once, with its cursor (%.2f s)" % (time.monotonic() - t1))
    await reload
    await asyncio.sleep(1.0)
    state["stop"] = True
    await t
    want = [r[0] for r in pg.query("SELECT seq FROM chat_messages WHERE conversation_id = %s "
                                   "AND seq > %s ORDER BY seq", G, base)]
    more, cur, n = await chain(cur, want[-1])
    is_(seqs_of(more), want, "polling on after the reload: all %d messages, once, in order" % len(want))
    note("part 11 done at %.1f s" % (time.monotonic() - T0))

asyncio.run(main())
done()
