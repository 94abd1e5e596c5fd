#!/usr/bin/python3
# Receipts and unread counts (PROTOCOL 9), two workers, chat_receipt_flush
# 100ms; every user's connections sit on a chosen worker (ws_connect_on),
# the reader's and the sender's on different ones.
#  1. ack: a cursor marks delivered, per conversation, the latest
#     message.new this connection got at or before it (an intermediate
#     cursor too); the sender's connection on the other worker gets a
#     receipt event with exactly the positions that moved; an older cursor
#     moves nothing back and makes no event; a cursor of another database,
#     garbage, a missing or non-string cursor are bad_request; success is
#     replied only to requests with an id, errors always.
#  2. read over WebSocket and REST: read_seq moves, delivered_seq >=
#     read_seq, a receipt event reaches the sender and the reader's other
#     connection (other worker); a lower seq moves nothing; a seq past the
#     last message is cut to last_seq (a later message is unread);
#     non-members get forbidden / 403, an unknown conversation 404, a bad
#     seq bad_request / 400.
#  3. Coalescing: 200 pipelined read frames, then 200 paced over ~0.7 s,
#     each end in one exact position, with a handful of receipt events at
#     the other member (<= 10 in any 1 s; 1 for the burst, ~7 for the
#     paced ones with flushes of 100ms), positions only moving forward, one row update per event and
#     far fewer than 400 in all (a trigger's log, and
#     pg_stat_user_tables.n_tup_upd once the backends have reported).
#  4. Model check: a seeded random run (SEED=n repeats one; the seed is
#     printed) of sends, reads (WebSocket with and without id, REST), acks
#     and reconnects with a cursor, by alice/bob/carol in a group and a
#     direct conversation, connections on both workers.  Afterwards read_seq
#     and delivered_seq in the database equal the model exactly (a read past
#     the end is waited for before the next operation: the cut to last_seq
#     happens when the flush runs), delivered_seq >= read_seq everywhere, and unread_count (list and detail), receipts (detail) and
#     unread_total (/me) of every user equal the model (other
#     conversations: an independent count in SQL); every connection chain
#     saw each durable event once, cursors increasing, and every receipt
#     position stream only grows.
#  5. Receipt events are durable: a connection resuming from an older
#     cursor gets the receipt events it missed, with the same cursors and
#     payloads as the live ones, in order, exactly once (also from a cursor
#     between them).
#  6. Unread at scale: a user in 50 conversations with 2,000 unread
#     messages each (rows inserted in SQL before nginx starts) gets
#     unread_count 2000 for each in one list page and unread_total 100000;
#     the time of that request is printed, not asserted.
#
# Conversations are created with chat_create_conversation() before nginx
# starts (fixtures).
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

FLUSH = 0.1          # chat_receipt_flush
SETTLE = 4 * FLUSH   # long enough for a flush to have happened and arrived

pg = PgCluster()

D1 = db_create_conv("alice", ["alice", "bob"], None, kind="direct")   # parts 1, 2
G3 = db_create_conv("alice", ["alice", "bob"], "G3")                  # part 3
G5 = db_create_conv("bob", ["alice", "bob"], "G5")                    # part 5
G4 = db_create_conv("alice", ["alice", "bob", "carol"], "G4")         # part 4
D4 = db_create_conv("bob", ["bob", "carol"], None, kind="direct")     # part 4
BIG = [db_create_conv("vic", ["ursula", "vic"], "big%d" % i) for i in range(50)]  # part 6

N3 = 400       # messages of G3 (part 3): 200 reads at once, 200 paced
N6 = 2000      # messages of each BIG conversation (part 6)

# Messages written straight into the tables, as a send would leave them:
# gapless seqs, last_seq, the sender's positions at its last message.
# A trigger logs every row update of chat_members until part 3 has counted
# its own (pg_stat_user_tables lags: backends report at most once a
# second, idle ones within 10 s).
pg.psql("""
CREATE TABLE t073_upd (conv bigint, u text);
CREATE FUNCTION t073_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO t073_upd VALUES (NEW.conversation_id, NEW.user_id); RETURN NULL; END $$;
CREATE TRIGGER t073_count AFTER UPDATE ON chat_members
FOR EACH ROW EXECUTE FUNCTION t073_count();

INSERT INTO chat_messages (conversation_id, seq, sender, client_msg_id, body)
SELECT {g3}, s, 'alice', 'g3-' || s, 'g3 message ' || s FROM generate_series(1, {n3}) s;
UPDATE chat_conversations SET last_seq = {n3} WHERE id = {g3};
UPDATE chat_members SET delivered_seq = {n3}, read_seq = {n3}
WHERE conversation_id = {g3} AND user_id = 'alice';

INSERT INTO chat_messages (conversation_id, seq, sender, client_msg_id, body)
SELECT c, s, 'vic', 'big-' || c || '-' || s, 'big ' || s
FROM unnest(ARRAY[{big}]::bigint[]) c, generate_series(1, {n6}) s;
UPDATE chat_conversations SET last_seq = {n6} WHERE id IN ({big});
UPDATE chat_members SET delivered_seq = {n6}, read_seq = {n6}
WHERE conversation_id IN ({big}) AND user_id = 'vic';
ANALYZE;
""".format(g3=G3, n3=N3, big=",".join(BIG), n6=N6))

ng = Nginx(pg, workers=2, http="chat_receipt_flush %dms;" % int(FLUSH * 1000))
P = ng.worker_pids()
is_(len(P), 2, "nginx runs 2 workers")

db = pg.conn()


def q(sql, *params):
    with db.cursor() as cur:
        cur.execute(sql, params or None)
        return cur.fetchall() if cur.description else cur.rowcount


def pos(conv, user):
    """(delivered_seq, read_seq) of user in conv, from the database."""
    r = q("SELECT delivered_seq, read_seq FROM chat_members "
          "WHERE conversation_id = %s AND user_id = %s", int(conv), user)
    return tuple(r[0]) if r else None


def receipt_events(msgs, conv):
    """The whole receipt events of conv among msgs (a ChatClient or a list)."""
    return conv_events(msgs, conv, kind="receipt", whole=True)


def positions(ev):
    """{user: (delivered_seq, read_seq)} of one whole receipt event."""
    return {r.get("user"): (r.get("delivered_seq"), r.get("read_seq"))
            for r in (ev.get("event") or {}).get("receipts") or []}


def n_replies(c):
    return len([m for m in c.received if m.get("type") == "reply"])


async def quiet_success(c, frame, label):
    """A request without an id that succeeds: no reply before the pong of
    a ping sent after it."""
    n0 = n_replies(c)
    await c.send(frame)
    pong = await ws_ping(c)
    ok(pong is not None and n_replies(c) == n0,
       "%s without an id: no reply (success is silent)" % label)


async def wait_receipt(c, conv, want, since, timeout=3.0):
    """The first receipt event of conv on c after index `since` whose
    positions are `want` ({user: (d, r)}); None after timeout."""
    def find():
        for e in receipt_events(c.messages[since:], conv):
            if positions(e) == want:
                return e
        return None
    await until(lambda: find() is not None, timeout)
    return find()


def err_code(rep):
    return ((rep or {}).get("error") or {}).get("code")


# ------------------------------------------------------------ part 1 ----

async def part1():
    alice = await ws_connect_on("alice", P[0])
    bob = await ws_connect_on("bob", P[1])
    bob2 = await ws_connect_on("bob", P[0])      # bob's other device
    ok(session_pid(alice) != session_pid(bob), "alice and bob are on different workers")

    for i in range(3):
        r = await alice.request("send", conversation_id=D1, client_msg_id="p1-%d" % i,
                                body="hello %d" % i)
        ok(r and r.get("ok") and r["result"]["message"]["seq"] == i + 1,
           "alice sends seq %d" % (i + 1))
    await until(lambda: len(conv_events(bob, D1)) >= 3, 5)
    evs = conv_events(bob, D1, whole=True)
    is_([e["event"]["seq"] for e in evs], [1, 2, 3], "bob got message.new 1..3")
    cur = [e["cursor"] for e in evs]
    is_(pos(D1, "alice"), (3, 3), "the sender's positions moved with her sends (3, 3)")
    is_(pos(D1, "bob"), (0, 0), "bob's positions are 0 before any ack")

    # ack of the second message's cursor: delivered 2 (not 3)
    mark = len(alice.messages)
    r = await bob.request("ack", cursor=cur[1])
    is_(r and (r.get("ok"), r.get("result")), (True, {}), "ack with an id: ok, result {}")
    ok(await until(lambda: pos(D1, "bob") == (2, 0), 3),
       "ack of message 2's cursor: bob's delivered_seq is 2 (per conversation, the "
       "latest message.new at or before the cursor)")
    if pos(D1, "bob") != (2, 0):
        diag("  bob's positions in the database: %r" % (pos(D1, "bob"),))
    e = await wait_receipt(alice, D1, {"bob": (2, 0)}, mark, 2)
    ok(e is not None, "alice (other worker) got a receipt event {bob: delivered 2, read 0}")
    if e is None:
        diag("  receipt events at alice: %r" % [positions(x) for x in receipt_events(alice.messages[mark:], D1)])

    # ack of the last cursor: delivered 3
    mark = len(alice.messages)
    await quiet_success(bob, {"type": "ack", "cursor": cur[2]}, "ack")
    ok(await until(lambda: pos(D1, "bob") == (3, 0), 3), "ack of message 3's cursor: delivered_seq 3")
    e = await wait_receipt(alice, D1, {"bob": (3, 0)}, mark)
    ok(e is not None, "alice got a receipt event {bob: delivered 3, read 0}")
    ok(e is not None and e.get("cursor") and gseq(e["cursor"]) is not None
       and e["event"].get("conversation_id") == D1,
       "the receipt event is durable (has a cursor) and names the conversation")
    e2 = await wait_receipt(bob2, D1, {"bob": (3, 0)}, 0)
    ok(e2 is not None and e is not None and e2["cursor"] == e["cursor"],
       "bob's other connection got the same receipt event")

    # an older cursor moves nothing back and makes no event
    mark = len(alice.messages)
    r = await bob.request("ack", cursor=cur[0])
    ok(r and r.get("ok"), "ack of an older cursor is accepted")
    await asyncio.sleep(SETTLE)
    is_(pos(D1, "bob"), (3, 0), "... and does not move delivered_seq back")
    is_(receipt_events(alice.messages[mark:], D1), [], "... and makes no receipt event")

    # bad cursors
    epoch = cur[2].rsplit(".", 1)[0]
    other = "".join("%x" % ((int(ch, 16) + 1) % 16) if ch in "0123456789abcdef" else "x"
                    for ch in epoch)
    for label, fields in (("a cursor of another database", {"cursor": other + "." + str(gseq(cur[2]))}),
                          ("garbage", {"cursor": "garbage"}),
                          ("an empty cursor", {"cursor": ""}),
                          ("a cursor without its epoch", {"cursor": str(gseq(cur[2]))}),
                          ("a non-numeric position", {"cursor": epoch + ".x1"}),
                          ("a number", {"cursor": gseq(cur[2])}),
                          ("no cursor", {})):
        r = await bob.request("ack", **fields)
        is_(r and (r.get("ok"), err_code(r)), (False, "bad_request"), "ack with %s: bad_request" % label)
    # an error is replied even without an id
    n0 = n_replies(bob)
    await bob.send({"type": "ack", "cursor": "garbage"})
    await ws_ping(bob)
    new = [m for m in bob.received if m.get("type") == "reply"][n0:]
    ok(len(new) == 1 and new[0].get("ok") is False and err_code(new[0]) == "bad_request",
       "ack with garbage and no id: the bad_request error is replied all the same")
    is_(pos(D1, "bob"), (3, 0), "bad acks moved nothing")
    return alice, bob, bob2


# ------------------------------------------------------------ part 2 ----

async def part2(alice, bob, bob2):
    carol = await ws_connect_on("carol", P[1])

    # read over WebSocket
    ma, mb = len(alice.messages), len(bob2.messages)
    r = await bob.request("read", conversation_id=D1, seq=2)
    is_(r and (r.get("ok"), r.get("result")), (True, {}), "WS read with an id: ok, result {}")
    ok(await until(lambda: pos(D1, "bob") == (3, 2), 3), "WS read 2: bob's read_seq 2, delivered stays 3")
    ok(await wait_receipt(alice, D1, {"bob": (3, 2)}, ma) is not None,
       "the sender (alice, other worker) got receipt {bob: 3, 2}")
    ok(await wait_receipt(bob2, D1, {"bob": (3, 2)}, mb) is not None,
       "bob's other connection (other worker) got receipt {bob: 3, 2}")

    # read over REST
    ma, mb = len(alice.messages), len(bob2.messages)
    st, _, b = api("POST", "/chat/api/conversations/%s/read" % D1, token=token("bob"), json={"seq": 3})
    is_(st, 204, "REST read 3: 204")
    ok(await until(lambda: pos(D1, "bob") == (3, 3), 3), "REST read 3: bob's read_seq 3")
    ok(await wait_receipt(alice, D1, {"bob": (3, 3)}, ma) is not None, "alice got receipt {bob: 3, 3}")
    ok(await wait_receipt(bob2, D1, {"bob": (3, 3)}, mb) is not None,
       "bob's other connection got receipt {bob: 3, 3}")

    # a read that is not also delivered: read moves delivered with it
    ma = len(alice.messages)
    for i in range(2):
        r = await alice.request("send", conversation_id=D1, client_msg_id="p2-%d" % i, body="more %d" % i)
        ok(r and r.get("ok") and r["result"]["message"]["seq"] == 4 + i, "alice sends seq %d" % (4 + i))
    await asyncio.sleep(SETTLE)
    is_(receipt_events(alice.messages[ma:], D1), [], "a sender's own move by sending is not announced")
    r = await bob2.request("read", conversation_id=D1, seq=4)
    ok(r and r.get("ok"), "WS read 4 from bob's other device")
    ok(await until(lambda: pos(D1, "bob") == (4, 4), 3), "read 4 marks delivered 4 too (delivered >= read)")
    ok(await wait_receipt(alice, D1, {"bob": (4, 4)}, ma) is not None, "alice got receipt {bob: 4, 4}")
    ok(await wait_receipt(bob, D1, {"bob": (4, 4)}, 0) is not None,
       "bob's first connection got receipt {bob: 4, 4} from his other device's read")

    # lower seqs move nothing
    ma = len(alice.messages)
    await quiet_success(bob, {"type": "read", "conversation_id": D1, "seq": 1}, "read")
    st, _, _ = api("POST", "/chat/api/conversations/%s/read" % D1, token=token("bob"), json={"seq": 2})
    is_(st, 204, "REST read of a lower seq: 204")
    r = await bob.request("read", conversation_id=D1, seq=0)
    ok(r and r.get("ok"), "WS read 0: ok")
    await asyncio.sleep(SETTLE)
    is_(pos(D1, "bob"), (4, 4), "lower reads (WS 1, REST 2, WS 0) do not move read_seq back")
    is_(receipt_events(alice.messages[ma:], D1), [], "... and make no receipt event")

    # past the last message: cut to last_seq
    ma = len(alice.messages)
    r = await bob.request("read", conversation_id=D1, seq=1000)
    ok(r and r.get("ok"), "WS read 1000 (last seq is 5): ok")
    ok(await until(lambda: pos(D1, "bob") == (5, 5), 3), "read past the end: read_seq cut to last_seq 5")
    ok(await wait_receipt(alice, D1, {"bob": (5, 5)}, ma) is not None, "alice got receipt {bob: 5, 5}")
    st, _, _ = api("POST", "/chat/api/conversations/%s/read" % D1, token=token("bob"), json={"seq": 10 ** 12})
    is_(st, 204, "REST read 10^12: 204")
    await asyncio.sleep(SETTLE)
    is_(pos(D1, "bob"), (5, 5), "... read_seq still 5")
    r = await alice.request("send", conversation_id=D1, client_msg_id="p2-late", body="late")
    ok(r and r.get("ok") and r["result"]["message"]["seq"] == 6, "alice sends seq 6")
    st, _, b = api("GET", "/chat/api/conversations/%s" % D1, token=token("bob"))
    cv = (b or {}).get("conversation") or {} if isinstance(b, dict) else {}
    is_((st, cv.get("unread_count")), (200, 1),
        "the message after the cut is unread for bob (unread_count 1)")
    is_(cv.get("receipts"), [{"user": "alice", "delivered_seq": 6, "read_seq": 6},
                             {"user": "bob", "delivered_seq": 5, "read_seq": 5}],
        "GET /conversations/{id}: receipts of every member")
    st, _, b = api("GET", "/chat/api/conversations/%s" % D1, token=token("alice"))
    is_((st, ((b or {}).get("conversation") or {}).get("unread_count")), (200, 0),
        "alice (the sender) has unread_count 0")

    # who may not, and bad requests
    r = await carol.request("read", conversation_id=D1, seq=1)
    is_(r and (r.get("ok"), err_code(r)), (False, "forbidden"), "WS read by a non-member: forbidden")
    st, _, b = api("POST", "/chat/api/conversations/%s/read" % D1, token=token("carol"), json={"seq": 1})
    is_(st, 403, "REST read by a non-member: 403")
    st, _, b = api("POST", "/chat/api/conversations/987654321/read", token=token("bob"), json={"seq": 1})
    is_(st, 404, "REST read of an unknown conversation: 404")
    r = await bob.request("read", conversation_id="987654321", seq=1)
    is_(r and r.get("ok"), False, "WS read of an unknown conversation: an error (%s)" % err_code(r))
    for label, body in (("-1", {"seq": -1}), ("a string", {"seq": "3"}), ("missing", {}),
                        ("null", {"seq": None})):
        st, _, _ = api("POST", "/chat/api/conversations/%s/read" % D1, token=token("bob"), json=body)
        is_(st, 400, "REST read with seq %s: 400" % label)
        r = await bob.request("read", conversation_id=D1, **body)
        is_(r and (r.get("ok"), err_code(r)), (False, "bad_request"), "WS read with seq %s: bad_request" % label)
    n0 = n_replies(carol)
    await carol.send({"type": "read", "conversation_id": D1, "seq": 1})
    await ws_ping(carol)
    new = [m for m in carol.received if m.get("type") == "reply"][n0:]
    ok(len(new) == 1 and err_code(new[0]) == "forbidden", "forbidden read without an id: replied all the same")
    await asyncio.sleep(SETTLE)
    is_(pos(D1, "bob"), (5, 5), "refused reads moved nothing")
    is_(pos(D1, "carol"), None, "carol has no member row")
    await carol.close()


# ------------------------------------------------------------ part 3 ----

async def part3(alice, bob):
    def n_tup_upd():
        return q("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'chat_members'")[0][0]

    def logged():
        return q("SELECT count(*) FROM t073_upd")[0][0]

    async def stats_settled():
        t = time.monotonic()
        r = await until(lambda: n_tup_upd() >= logged(), 15, 0.2)
        note("pg_stat_user_tables caught up in %.1f s" % (time.monotonic() - t))
        return r

    ok(await stats_settled(), "n_tup_upd of chat_members counts every update so far (%d)" % logged())
    upd0, log0 = n_tup_upd(), logged()

    # 200 read frames at once
    ma = len(alice.messages)
    t0 = time.monotonic()
    for s in range(1, 200):
        await bob.send({"type": "read", "conversation_id": G3, "seq": s})
    r = await bob.request("read", conversation_id=G3, seq=200)
    t1 = time.monotonic()
    ok(r and r.get("ok"), "200 read frames pipelined (%.0f ms), the last one replied" % ((t1 - t0) * 1000))
    ok(await until(lambda: pos(G3, "bob") == (200, 200), 3), "final position exact: bob at (200, 200)")
    await asyncio.sleep(max(0, t1 + 1.0 - time.monotonic()))
    evs = receipt_events(alice.messages[ma:], G3)
    ok(1 <= len(evs) <= 10, "alice got %d receipt event(s) for 200 pipelined reads in 1 s (<= 10)" % len(evs))
    bobs = [positions(e).get("bob") for e in evs]
    is_(bobs[-1:], [(200, 200)], "the last receipt event carries bob's final position")

    # 200 reads paced over about 0.7 s: several flushes, one event each;
    # the arrival of every receipt event at alice is timed
    ma = len(alice.messages)
    arrivals = []
    stop = asyncio.Event()

    async def stamp():
        while not stop.is_set():
            for e in receipt_events(alice.messages[ma:], G3)[len(arrivals):]:
                arrivals.append((time.monotonic(), e))
            await asyncio.sleep(0.005)
    stamper = asyncio.ensure_future(stamp())
    t0 = time.monotonic()
    for s in range(201, N3 + 1):
        await bob.send({"type": "read", "conversation_id": G3, "seq": s, "id": "paced-%d" % s})
        await asyncio.sleep(max(0, t0 + (s - 200) * 0.0035 - time.monotonic()))
    t1 = time.monotonic()
    ok(await until(lambda: {"paced-%d" % s for s in range(201, N3 + 1)}
                   <= {m.get("id") for m in bob.received if m.get("type") == "reply"}, 5),
       "200 paced read frames (%.0f ms) all replied" % ((t1 - t0) * 1000))
    ok(await until(lambda: pos(G3, "bob") == (N3, N3), 3), "final position exact: bob at (%d, %d)" % (N3, N3))
    await until(lambda: any(positions(e).get("bob") == (N3, N3) for _, e in arrivals), 3)
    await asyncio.sleep(SETTLE)
    stop.set()
    await stamper
    evs2 = [e for _, e in arrivals]
    ts = [t for t, _ in arrivals]
    window = max([len([u for u in ts if t <= u < t + 1.0]) for t in ts] or [0])
    ok(1 <= len(evs2) and window <= 10,
       "alice got %d receipt events for 200 reads paced over %.0f ms, at most %d in any 1 s (<= 10)"
       % (len(evs2), (t1 - t0) * 1000, window))
    bobs = [positions(e).get("bob") for e in evs + evs2]
    is_(bobs[-1:], [(N3, N3)], "the last receipt event carries bob's final position")
    ok(all(b is not None for b in bobs) and bobs == sorted(bobs) and len(set(bobs)) == len(bobs)
       and all(d == r for d, r in bobs),
       "receipt events only move forward: %s" % bobs)
    ok(all(set(positions(e)) == {"bob"} for e in evs + evs2), "they carry only bob (the position that moved)")

    rows = q("SELECT count(*) FROM t073_upd WHERE conv = %s AND u = 'bob'", int(G3))[0][0]
    is_(rows, len(evs) + len(evs2), "one row update of bob's position per receipt event (%d for 400 reads)"
        % rows)
    ok(await stats_settled(), "n_tup_upd caught up again")
    d = n_tup_upd() - upd0
    ok(logged() - log0 <= d < 20, "pg_stat_user_tables: chat_members n_tup_upd grew by %d for "
       "400 reads (< 20)" % d)
    q("DROP TRIGGER t073_count ON chat_members")
    is_(q("SELECT count(*) FROM chat_events WHERE conversation_id = %s AND kind = 'receipt'", int(G3))[0][0],
        len(evs) + len(evs2), "chat_events holds exactly the receipt events alice got")


# ------------------------------------------------------------ part 5 ----

async def part5(alice, bob):
    def durable(msgs, after=None):
        return [m for m in msgs if m.get("type") == "event" and m.get("cursor")
                and (after is None or gseq(m["cursor"]) > gseq(after))]

    ax = await ws_connect_on("alice", P[1])
    for i in range(4):
        r = await bob.request("send", conversation_id=G5, client_msg_id="p5-%d" % i, body="p5 %d" % i)
        ok(r and r.get("ok"), "bob sends G5 seq %d" % (i + 1))
    ok(await until(lambda: len(conv_events(ax, G5)) == 4 and len(conv_events(alice, G5)) == 4, 5),
       "both alice connections got G5's 4 messages")
    cur0 = durable(ax.messages)[-1]["cursor"]
    await ax.close()

    # three receipt events alice's closed connection misses, one at a time
    steps = []
    mb = len(bob.messages)
    last_ev = conv_events(alice, G5, whole=True)[-1]
    r = await alice.request("ack", cursor=last_ev["cursor"])
    ok(r and r.get("ok"), "alice acks G5 on her other connection")
    steps.append(await wait_receipt(bob, G5, {"alice": (4, 0)}, mb))
    st, _, _ = api("POST", "/chat/api/conversations/%s/read" % G5, token=token("alice"), json={"seq": 2})
    is_(st, 204, "alice reads 2 over REST")
    steps.append(await wait_receipt(bob, G5, {"alice": (4, 2)}, mb))
    r = await alice.request("read", conversation_id=G5, seq=4)
    ok(r and r.get("ok"), "alice reads 4 over WS")
    steps.append(await wait_receipt(bob, G5, {"alice": (4, 4)}, mb))
    ok(all(steps), "bob got the three receipt events live")
    if not all(steps):
        return
    live = durable(alice.messages, cur0)
    ok([m["cursor"] for m in live] == [s["cursor"] for s in steps],
       "alice's open connection got the same three, and nothing else durable")
    is_(q("SELECT count(*) FROM chat_events WHERE conversation_id = %s AND kind = 'receipt'", int(G5))[0][0], 3,
        "chat_events holds the three receipt events")

    for label, frm, want in (("the cursor before them", cur0, live),
                             ("the cursor of the first", live[0]["cursor"], live[1:])):
        c = await ws_connect_on("alice", P[1], cursor=frm)
        await until(lambda: len(durable(c.messages)) >= len(want), 5)
        await asyncio.sleep(SETTLE)
        got = durable(c.messages)
        is_([(m["cursor"], m["event"]) for m in got], [(m["cursor"], m["event"]) for m in want],
            "resume from %s: the missed receipt events, same cursors and payloads, in order, once"
            % label)
        await c.close()


# ------------------------------------------------------------ part 4 ----

class Chain:
    """One logical device of a user on a worker: a chain of connections,
    each resuming from the cursor of the last durable event of the ones
    before."""

    def __init__(self, user, pid):
        self.user, self.pid = user, pid
        self.old = []
        self.c = None
        self.reconnects = 0

    async def open(self):
        self.c = await ws_connect_on(self.user, self.pid)
        self.cursor0 = self.c.hello["result"]["cursor"]
        await self.first_ack(self.cursor0)

    async def first_ack(self, cursor):
        # A connection that has never acked remembers only its last few
        # messages (NGX_CHAT_ACKS_FIRST, then the oldest is forgotten);
        # whether the server had handed a later one before an ack came is
        # a race the model cannot see.  Acking at once gives the connection
        # its full memory, which this run (40 messages) never fills.
        r = await self.c.request("ack", cursor=cursor)
        assert r and r.get("ok"), r

    def msgs(self):
        return self.old + (self.c.messages if self.c else [])

    def durable(self):
        return [m for m in self.msgs() if m.get("type") == "event" and m.get("cursor")]

    def cursor(self):
        d = self.durable()
        return d[-1]["cursor"] if d else self.cursor0

    async def reconnect(self, abort=False):
        if abort:
            # what was sent without an id is handled before the drop
            await ws_ping(self.c)
            self.c.ws.transport.abort()
            await self.c.wait_closed(5)
        else:
            await self.c.close()
        self.old += self.c.messages
        cur = self.cursor()      # of everything the closed connection got
        self.c = await ws_connect_on(self.user, self.pid, cursor=cur)
        await self.first_ack(cur)
        self.reconnects += 1


def sql_unread(user):
    """{conv: unread} of user counted from the messages themselves."""
    return {str(c): n for c, n in q("""
        SELECT mb.conversation_id,
               (SELECT count(*) FROM chat_messages m
                WHERE m.conversation_id = mb.conversation_id AND m.seq > mb.read_seq
                  AND m.sender <> mb.user_id AND NOT m.deleted)
        FROM chat_members mb WHERE mb.user_id = %s""", user)}


async def part4():
    seed = int(os.environ.get("SEED") or random.SystemRandom().randrange(1 << 31))
    diag("part 4: seed %d (SEED=%d repeats this run)" % (seed, seed))
    rng = random.Random(seed)
    users = ["alice", "bob", "carol"]
    members = {G4: ["alice", "bob", "carol"], D4: ["bob", "carol"]}
    convs_of = {u: [c for c in (G4, D4) if u in members[c]] for u in users}
    last = {G4: 0, D4: 0}
    msgs = {G4: [], D4: []}
    read = {(u, c): 0 for c in members for u in members[c]}
    delv = dict(read)
    chains = {u: [Chain(u, P[0]), Chain(u, P[1])] for u in users}
    for u in users:
        for ch in chains[u]:
            await ch.open()
    problems = []
    counts = {}
    N = 150
    t0 = time.monotonic()
    for i in range(N):
        x = rng.random()
        u = rng.choice(users)
        conv = rng.choice(convs_of[u])
        ch = rng.choice(chains[u])
        if x < 0.30:
            op = "send"
            r = await ch.c.request("send", conversation_id=conv, client_msg_id="m4-%d" % i,
                                   body="op %d by %s" % (i, u))
            if not (r and r.get("ok")):
                problems.append("op %d: send by %s failed: %r" % (i, u, r))
                continue
            s = r["result"]["message"]["seq"]
            if s != last[conv] + 1:
                problems.append("op %d: send got seq %d after %d" % (i, s, last[conv]))
            last[conv] = s
            msgs[conv].append((s, u))
            read[(u, conv)] = max(read[(u, conv)], s)
            delv[(u, conv)] = max(delv[(u, conv)], s)
        elif x < 0.62:
            if last[conv] and rng.random() < 0.8:
                s = rng.randint(0, last[conv])
            else:
                s = last[conv] + rng.randint(1, 5)
            want = max(read[(u, conv)], min(s, last[conv]))
            # A read is cut to the last message the worker that takes it
            # has seen on its bus: a message another worker committed a
            # moment ago may not be there yet.  Wait until both of the
            # reader's connections (one per worker) got the last one.
            if last[conv] and not await until(
                    lambda: all(max([e["seq"] for e in conv_events(c.msgs(), conv)] or [0])
                                >= last[conv] for c in chains[u]), 5):
                problems.append("op %d: %s's connections never got %s seq %d"
                                % (i, u, conv, last[conv]))
            how = rng.choice(["ws", "ws", "ws-noid", "rest", "rest"])
            op = "read-" + how
            if how == "ws":
                r = await ch.c.request("read", conversation_id=conv, seq=s)
                if not (r and r.get("ok")):
                    problems.append("op %d: WS read by %s: %r" % (i, u, r))
            elif how == "ws-noid":
                await ch.c.send({"type": "read", "conversation_id": conv, "seq": s})
            else:
                st, _, b = api("POST", "/chat/api/conversations/%s/read" % conv, token=token(u),
                               json={"seq": s})
                if st != 204:
                    problems.append("op %d: REST read by %s: %s %r" % (i, u, st, b))
            read[(u, conv)] = want
            delv[(u, conv)] = max(delv[(u, conv)], want)
            if s > last[conv]:
                # the cut is to the last seq when the flush runs: let this
                # one be written before a later send moves last_seq
                if not await until(lambda: pos(conv, u)[1] >= want, 3):
                    problems.append("op %d: read %d by %s (last %d) not written: %r"
                                    % (i, s, u, last[conv], pos(conv, u)))
        elif x < 0.85:
            op = "ack"
            d = [m for m in ch.c.messages if m.get("type") == "event" and m.get("cursor")]
            if not d:
                counts["ack-none"] = counts.get("ack-none", 0) + 1
                continue
            cur = d[-1]["cursor"] if rng.random() < 0.8 else rng.choice(d)["cursor"]
            # delivered: per conversation the latest message.new this
            # connection got at or before the cursor
            for c in convs_of[u]:
                got = [m["event"]["seq"] for m in conv_events(d, c, whole=True)
                       if gseq(m["cursor"]) <= gseq(cur)]
                if got:
                    delv[(u, c)] = max(delv[(u, c)], max(got))
            if rng.random() < 0.5:
                r = await ch.c.request("ack", cursor=cur)
                if not (r and r.get("ok")):
                    problems.append("op %d: ack by %s: %r" % (i, u, r))
            else:
                await ch.c.send({"type": "ack", "cursor": cur})
        else:
            op = "reconnect"
            await ch.reconnect(abort=rng.random() < 0.3)
        counts[op] = counts.get(op, 0) + 1
        if rng.random() < 0.1:
            await asyncio.sleep(rng.uniform(0, 0.15))
    note("part 4: %d ops in %.1f s: %s; messages G4 %d, D4 %d"
         % (N, time.monotonic() - t0, counts, last[G4], last[D4]))
    ok(not problems, "part 4: every operation answered as expected")
    for p in problems[:10]:
        diag("  " + p)

    def db_pos():
        return {k: pos(k[1], k[0]) for k in read}
    model = {k: (delv[k], read[k]) for k in read}
    await until(lambda: db_pos() == model, 3, 0.1)
    got = db_pos()
    is_({k: v[1] for k, v in got.items()}, read, "part 4: read_seq in the database equals the model exactly")
    is_({k: v[0] for k, v in got.items()}, delv,
        "part 4: delivered_seq in the database equals the model exactly (acks, reads, sends)")
    for k in sorted(read):
        if got.get(k) != model[k]:
            diag("  %s in %s: db (delivered, read) %s, model %s" % (k[0], k[1], got.get(k), model[k]))
    bad = q("SELECT conversation_id, user_id, delivered_seq, read_seq FROM chat_members "
            "WHERE delivered_seq < read_seq")
    is_(bad, [], "delivered_seq >= read_seq in every member row")
    bad = q("SELECT mb.conversation_id, mb.user_id, mb.delivered_seq, c.last_seq FROM chat_members mb "
            "JOIN chat_conversations c ON c.id = mb.conversation_id WHERE mb.delivered_seq > c.last_seq")
    is_(bad, [], "no position is past its conversation's last_seq")
    is_({c: q("SELECT last_seq FROM chat_conversations WHERE id = %s", int(c))[0][0] for c in last}, last,
        "last_seq of both conversations as sent")

    def model_unread(u, c):
        return sum(1 for s, snd in msgs[c] if s > read[(u, c)] and snd != u)

    for u in users:
        want = sql_unread(u)
        for c in convs_of[u]:
            if want.get(c) != model_unread(u, c):
                problems.append("model unread of %s in %s: %s, SQL count %s"
                                % (u, c, model_unread(u, c), want.get(c)))
            want[c] = model_unread(u, c)
        st, _, b = api("GET", "/chat/api/conversations?limit=50", token=token(u))
        lst = {cv["id"]: cv.get("unread_count") for cv in (b or {}).get("conversations", [])} \
            if st == 200 and isinstance(b, dict) else None
        is_(lst, want, "%s: GET /conversations unread_count of every conversation = model" % u)
        for c in convs_of[u]:
            st, _, b = api("GET", "/chat/api/conversations/%s" % c, token=token(u))
            cv = (b or {}).get("conversation") or {} if isinstance(b, dict) else {}
            is_((st, cv.get("unread_count")), (200, model_unread(u, c)),
                "%s: GET /conversations/%s unread_count = model (%d)" % (u, c, model_unread(u, c)))
            rc = {x.get("user"): x for x in cv.get("receipts") or []}
            dbp = {m: pos(c, m) for m in members[c]}
            ok(sorted(rc) == sorted(members[c])
               and all((rc[m].get("delivered_seq"), rc[m].get("read_seq")) == dbp[m]
                       and rc[m].get("read_seq") == read[(m, c)] for m in members[c]),
               "%s: GET /conversations/%s receipts = database = model" % (u, c))
        st, _, b = api("GET", "/chat/api/me", token=token(u))
        is_((st, (b or {}).get("unread_total") if isinstance(b, dict) else None),
            (200, sum(want.values())), "%s: GET /me unread_total = %d" % (u, sum(want.values())))
    ok(not problems, "the model's unread counts equal an independent count in SQL")
    for p in problems[:5]:
        diag("  " + p)

    # every chain: each durable event once, cursors increasing, message.new
    # gapless per conversation, receipt positions only growing
    await asyncio.sleep(SETTLE)
    bad = []
    for u in users:
        for k, ch in enumerate(chains[u]):
            d = ch.durable()
            gs = [gseq(m["cursor"]) for m in d]
            if any(b <= a for a, b in zip(gs, gs[1:])):
                bad.append("%s#%d: cursors not increasing" % (u, k))
            for c in convs_of[u]:
                seqs = [e["seq"] for e in conv_events(d, c)]
                if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
                    bad.append("%s#%d: message.new of %s not gapless: %s" % (u, k, c, seqs))
                if seqs and seqs[-1] != last[c]:
                    bad.append("%s#%d: last message.new of %s is %s, not %d" % (u, k, c, seqs[-1], last[c]))
                seen = {}
                for e in receipt_events(d, c):
                    for who, p in positions(e).items():
                        if who not in members[c] or p[0] < p[1] or p[1] > last[c]:
                            bad.append("%s#%d: bad receipt %r" % (u, k, e["event"]))
                        if who in seen and not (p[0] >= seen[who][0] and p[1] >= seen[who][1]
                                                and p != seen[who]):
                            bad.append("%s#%d: receipt of %s in %s did not move forward: %s -> %s"
                                       % (u, k, who, c, seen[who], p))
                        seen[who] = p
    n_rcpt = sum(len(receipt_events(ch.durable(), c)) for u in users for ch in chains[u] for c in convs_of[u])
    recon = sum(ch.reconnects for u in users for ch in chains[u])
    ok(not bad, "every connection chain (%d reconnects): durable events once, cursors increasing, "
       "messages gapless, %d receipt events only moving forward" % (recon, n_rcpt))
    for b in bad[:10]:
        diag("  " + b)
    for u in users:
        for ch in chains[u]:
            await ch.c.close()


# ------------------------------------------------------------ part 6 ----

def part6():
    tok = token("ursula")
    t0 = time.monotonic()
    st, _, b = api("GET", "/chat/api/conversations?limit=50", token=tok, timeout=30)
    dt = time.monotonic() - t0
    diag("part 6: GET /chat/api/conversations?limit=50 over 50 x %d unread messages: %.1f ms"
         % (N6, dt * 1000))
    cvs = (b or {}).get("conversations", []) if isinstance(b, dict) else []
    is_((st, len(cvs)), (200, 50), "ursula's list: 50 conversations in one page")
    is_(sorted(cv["id"] for cv in cvs), sorted(BIG), "... all of hers")
    is_({cv.get("unread_count") for cv in cvs}, {N6}, "... each with unread_count %d" % N6)
    t0 = time.monotonic()
    st, _, b = api("GET", "/chat/api/me", token=tok, timeout=30)
    diag("part 6: GET /chat/api/me: %.1f ms" % ((time.monotonic() - t0) * 1000))
    is_((st, (b or {}).get("unread_total") if isinstance(b, dict) else None), (200, 50 * N6),
        "ursula's unread_total: %d" % (50 * N6))
    st, _, b = api("GET", "/chat/api/conversations?limit=50", token=token("vic"), timeout=30)
    is_({cv.get("unread_count") for cv in (b or {}).get("conversations", [])} if st == 200 else None,
        {0}, "vic (the sender of all of them): unread_count 0 everywhere")

    st, _, _ = api("POST", "/chat/api/conversations/%s/read" % BIG[7], token=tok, json={"seq": 1500})
    is_(st, 204, "ursula reads 1500 of one conversation")
    ok(wait_for(lambda: pos(BIG[7], "ursula") == (1500, 1500), 3), "... written")
    st, _, b = api("GET", "/chat/api/conversations/%s" % BIG[7], token=tok)
    is_((st, ((b or {}).get("conversation") or {}).get("unread_count")), (200, N6 - 1500),
        "... its unread_count is %d" % (N6 - 1500))
    st, _, b = api("GET", "/chat/api/me", token=tok)
    is_((b or {}).get("unread_total") if isinstance(b, dict) else None, 50 * N6 - 1500,
        "... and unread_total %d" % (50 * N6 - 1500))


async def main():
    T = time.monotonic()
    alice, bob, bob2 = await part1()
    note("part 1 done at %.1f s" % (time.monotonic() - T))
    await part2(alice, bob, bob2)
    note("part 2 done at %.1f s" % (time.monotonic() - T))
    await part3(alice, bob)
    note("part 3 done at %.1f s" % (time.monotonic() - T))
    await part5(alice, bob)
    note("part 5 done at %.1f s" % (time.monotonic() - T))
    for c in (alice, bob, bob2):
        await c.close()
    await part4()
    note("part 4 done at %.1f s" % (time.monotonic() - T))
    part6()
    note("part 6 done at %.1f s" % (time.monotonic() - T))


asyncio.run(main())
db.close()
done()
