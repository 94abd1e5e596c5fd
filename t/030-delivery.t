#!/usr/bin/python3
# Delivery across workers: a 1:1 and a group of 5, every user with 3
# WebSocket connections spread over both nginx workers.  Every connection
# of every member gets every message of the conversation exactly once, in
# seq order, seq 1..N without gaps -- with one sender at a time and with
# many concurrent senders.  A conversation created over REST while its
# members are connected reaches them live (conversation.created) and its
# messages follow without a reconnect.  A non-member gets nothing of it.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403


# --------------------------------------------------------------- setup ----

pg = PgCluster()
ng = Nginx(pg, workers=2)
pids = ng.worker_pids()
is_(len(pids), 2, "nginx runs 2 workers")

GROUP = ["alice", "bob", "carol", "dave", "erin"]
USERS = GROUP + ["mallory"]


D = rest_create_conv("alice", "direct", ["bob"])
G = rest_create_conv("carol", "group", [u for u in GROUP if u != "carol"], title="five")
M = rest_create_conv("mallory", "direct", ["erin"])   # mallory's own, to show she is live

MEMBERS = {D: {"alice", "bob"}, G: set(GROUP), M: {"mallory", "erin"}}


def check_conv(conns, conv, label):
    """Every connection of every member holds the conversation's messages
    exactly once in seq order 1..N matching the DB; non-members hold none."""
    rows = db_messages(conv, ("seq", "id", "sender", "body"))
    n = len(rows)
    ok(n > 0 and [r[0] for r in rows] == list(range(1, n + 1)),
       "%s: DB seq is 1..%d without gaps" % (label, n))
    want_ids = [r[1] for r in rows]
    bad = []
    for u, cs in conns.items():
        for i, c in enumerate(cs):
            evs = conv_events(c, conv)
            if u in MEMBERS[conv]:
                seqs = [e.get("seq") for e in evs]
                ids = [e.get("message", {}).get("id") for e in evs]
                inner = [e.get("message", {}).get("seq") for e in evs]
                if seqs != list(range(1, n + 1)) or ids != want_ids or inner != seqs:
                    bad.append("%s#%d(%s): got %d events, seqs %s" % (
                        u, i, c.hello["result"]["session_id"], len(evs),
                        _brief(seqs, n)))
            elif evs:
                bad.append("%s#%d is not a member but got %d events" % (u, i, len(evs)))
    ok(not bad, "%s: every member connection got all %d messages once, in seq order; "
       "non-members none" % (label, n))
    for b in bad[:10]:
        diag("  " + b)
    # the message bodies/senders in the events are the stored ones
    byseq = {r[0]: r for r in rows}
    mism = 0
    for u, cs in conns.items():
        if u not in MEMBERS[conv]:
            continue
        for c in cs:
            for e in conv_events(c, conv):
                r = byseq.get(e.get("seq"))
                m = e.get("message", {})
                if not r or m.get("sender") != r[2] or m.get("body") != r[3] \
                        or m.get("conversation_id") != conv:
                    mism += 1
    is_(mism, 0, "%s: event payloads (sender, body, conversation_id) match the DB" % label)


def _brief(seqs, n):
    if len(seqs) <= 12:
        return str(seqs)
    dup = len(seqs) - len(set(seqs))
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    return "%s... (dups %d, missing %s)" % (seqs[:8], dup, missing[:10])


def check_cursors(conns, label):
    bad = []
    for u, cs in conns.items():
        for i, c in enumerate(cs):
            gs = [gseq(m.get("cursor")) for m in c.messages
                  if m.get("type") == "event" and "cursor" in m]
            if any(g is None for g in gs) or any(b <= a for a, b in zip(gs, gs[1:])):
                bad.append("%s#%d: cursors not strictly increasing: %s" % (u, i, gs[:20]))
    ok(not bad, "%s: every connection's event cursors strictly increase "
       "(no event twice)" % label)
    for b in bad[:5]:
        diag("  " + b)


async def wait_all(conns, conv, n, timeout=30):
    members = MEMBERS[conv]

    def done_():
        return all(len(conv_events(c, conv)) >= n
                   for u, cs in conns.items() if u in members for c in cs)
    r = await until(done_, timeout)
    await asyncio.sleep(0.3)   # a duplicate would arrive now
    return r


async def main():
    conns = {}
    for u in USERS:
        conns[u] = await ws_spread(u, pids, per_worker=1, extra=1, name=u.capitalize())

    allc = [c for cs in conns.values() for c in cs]
    is_(len(allc), 3 * len(USERS), "3 connections per user (%d)" % len(allc))
    used = {session_pid(c) for c in allc}
    is_(used, set(pids), "sessions exist on both workers %s" % sorted(pids))
    ok(all({session_pid(c) for c in conns[u]} == set(pids) for u in USERS),
       "every user has connections on both workers")
    ok(all(c.hello["result"]["user"]["id"] == u for u in USERS for c in conns[u]),
       "hello result names the token's user")

    # ---- 1. one sender at a time, senders alternate ----
    senders_d = ["alice", "bob"]
    replies = []
    for i in range(12):
        u = senders_d[i % 2]
        c = conns[u][i % 3]
        replies.append(await c.request("send", conversation_id=D,
                                       client_msg_id="d-seq-%d" % i,
                                       body="direct %d from %s" % (i, u)))
    for i in range(15):
        u = GROUP[i % 5]
        c = conns[u][i % 3]
        replies.append(await c.request("send", conversation_id=G,
                                       client_msg_id="g-seq-%d" % i,
                                       body="group %d from %s" % (i, u)))
    for i in range(4):
        u = ["mallory", "erin"][i % 2]
        replies.append(await conns[u][0].request("send", conversation_id=M,
                                                 client_msg_id="m-seq-%d" % i,
                                                 body="m %d" % i))
    ok(all(r and r.get("ok") for r in replies), "31 sequential sends acknowledged")
    is_([r["result"]["message"]["seq"] for r in replies[:12]], list(range(1, 13)),
        "direct: sequential sends get seq 1..12")
    is_([r["result"]["message"]["seq"] for r in replies[12:27]], list(range(1, 16)),
        "group: sequential sends get seq 1..15")
    ok(await wait_all(conns, D, 12), "direct: all member connections received 12")
    ok(await wait_all(conns, G, 15), "group: all member connections received 15")
    ok(await wait_all(conns, M, 4), "mallory's direct: delivered")
    check_conv(conns, D, "sequential direct")
    check_conv(conns, G, "sequential group")
    check_conv(conns, M, "mallory direct")

    # the sending connection got its reply and the event of its own message
    sc = conns["alice"][0]
    mine = [e for e in conv_events(sc, D) if e["message"]["client_msg_id"] == "d-seq-0"]
    is_(len(mine), 1, "the sending connection also got message.new of its own send once")
    is_(mine[0]["message"]["id"] if mine else None, replies[0]["result"]["message"]["id"],
        "... with the id of the send reply")

    # ---- 2. concurrent senders ----
    t0 = time.monotonic()
    reqs = []
    for u in GROUP:
        for k, c in enumerate(conns[u]):
            for j in range(8):
                reqs.append(c.request("send", conversation_id=G,
                                      client_msg_id="g-con-%s-%d-%d" % (u, k, j),
                                      body="concurrent %s/%d/%d" % (u, k, j), timeout=30))
    for u in ("alice", "bob"):
        for k, c in enumerate(conns[u]):
            for j in range(10):
                reqs.append(c.request("send", conversation_id=D,
                                      client_msg_id="d-con-%s-%d-%d" % (u, k, j),
                                      body="dcon %s/%d/%d" % (u, k, j), timeout=30))
    res = await asyncio.gather(*reqs)
    ng_ = len(GROUP) * 3 * 8
    nd_ = 2 * 3 * 10
    ok(all(r and r.get("ok") for r in res),
       "%d concurrent sends from %d connections acknowledged (%.1fs)"
       % (len(res), len(GROUP) * 3, time.monotonic() - t0))
    gseqs = sorted(r["result"]["message"]["seq"] for r in res[:ng_] if r and r.get("ok"))
    dseqs = sorted(r["result"]["message"]["seq"] for r in res[ng_:] if r and r.get("ok"))
    is_(gseqs, list(range(16, 16 + ng_)), "group: concurrent sends got distinct seqs 16..%d"
        % (15 + ng_))
    is_(dseqs, list(range(13, 13 + nd_)), "direct: concurrent sends got distinct seqs 13..%d"
        % (12 + nd_))
    ok(await wait_all(conns, G, 15 + ng_), "group: all member connections received %d"
       % (15 + ng_))
    ok(await wait_all(conns, D, 12 + nd_), "direct: all member connections received %d"
       % (12 + nd_))
    check_conv(conns, G, "concurrent group")
    check_conv(conns, D, "concurrent direct")

    # every reply's message is the one the other connections saw
    g_by_id = {e["message"]["id"]: e["seq"] for e in conv_events(conns["dave"][1], G)}
    ok(all(g_by_id.get(r["result"]["message"]["id"]) == r["result"]["message"]["seq"]
           for r in res[:ng_] if r and r.get("ok")),
       "group: reply ids/seqs equal the delivered events'")

    # ---- 3. conversations created over REST while members are connected ----
    G2 = rest_create_conv("carol", "group", ["alice", "dave"], title="g2")
    MEMBERS[G2] = {"carol", "alice", "dave"}
    svc = token("platform", role="service")
    st, _, b = api("POST", "/chat/api/conversations", token=svc,
                   json={"kind": "group", "members": ["bob", "erin"], "title": "svc"})
    is_(st, 201, "service creates a group for bob and erin")
    S = b["conversation"]["id"] if isinstance(b, dict) and "conversation" in b else "0"
    MEMBERS[S] = {"bob", "erin"}
    DBE = rest_create_conv("bob", "direct", ["erin"])
    MEMBERS[DBE] = {"bob", "erin"}

    def got_created(conv):
        members = MEMBERS[conv]
        return all(len(conv_events(c, conv, "conversation.created")) >= 1
                   for u, cs in conns.items() if u in members for c in cs)

    for conv, label in ((G2, "group g2"), (S, "service group"), (DBE, "direct bob-erin")):
        ok(await until(lambda: got_created(conv), 15),
           "%s: conversation.created reached every connection of every member live" % label)
    await asyncio.sleep(0.3)
    for conv, label in ((G2, "group g2"), (S, "service group"), (DBE, "direct bob-erin")):
        bad = []
        for u, cs in conns.items():
            for i, c in enumerate(cs):
                evs = conv_events(c, conv, "conversation.created")
                want = 1 if u in MEMBERS[conv] else 0
                if len(evs) != want:
                    bad.append("%s#%d got %d" % (u, i, len(evs)))
                for e in evs:
                    cv = e.get("conversation") or {}
                    if cv.get("id") != conv or sorted(cv.get("members") or []) \
                            != sorted(MEMBERS[conv]):
                        bad.append("%s#%d: bad conversation object %r" % (u, i, cv))
        ok(not bad, "%s: conversation.created exactly once per member connection, "
           "none for others, with id and members" % label)
        for x in bad[:6]:
            diag("  " + x)

    # their messages follow without reconnecting
    reqs = []
    for u in ("carol", "alice", "dave"):
        for j in range(6):
            reqs.append(conns[u][j % 3].request(
                "send", conversation_id=G2, client_msg_id="g2-%s-%d" % (u, j),
                body="g2 %s %d" % (u, j), timeout=30))
    for u in ("bob", "erin"):
        for j in range(5):
            reqs.append(conns[u][j % 3].request(
                "send", conversation_id=S, client_msg_id="s-%s-%d" % (u, j),
                body="s %s %d" % (u, j), timeout=30))
            reqs.append(conns[u][(j + 1) % 3].request(
                "send", conversation_id=DBE, client_msg_id="dbe-%s-%d" % (u, j),
                body="dbe %s %d" % (u, j), timeout=30))
    res = await asyncio.gather(*reqs)
    ok(all(r and r.get("ok") for r in res), "sends into the new conversations acknowledged")
    ok(await wait_all(conns, G2, 18), "g2: all member connections received 18")
    ok(await wait_all(conns, S, 10), "service group: all member connections received 10")
    ok(await wait_all(conns, DBE, 10), "direct bob-erin: all member connections received 10")
    check_conv(conns, G2, "new group g2")
    check_conv(conns, S, "new service group")
    check_conv(conns, DBE, "new direct bob-erin")

    # ---- a sender that vanishes right after sending: whatever was stored
    # is delivered to every member connection once, seq stays gapless ----
    for k in range(3):
        v = await ws_connect(token=token("dave"))
        for j in range(5):
            await v.send({"type": "send", "id": j + 1, "conversation_id": G,
                          "client_msg_id": "vanish-%d-%d" % (k, j), "body": "bye %d" % j})
        v.ws.transport.abort()
        await v.wait_closed(5)
    await asyncio.sleep(1.0)
    n_g = len(db_messages(G))
    stored = pg.query("SELECT count(*) FROM chat_messages WHERE client_msg_id LIKE 'vanish-%%'")
    note("sends of vanished connections stored: %s of 15" % stored[0][0])
    ok(await wait_all(conns, G, n_g), "group: all member connections received %d" % n_g)
    check_conv(conns, G, "group after vanished senders")

    # ---- 4. non-members got nothing; totals are exact ----
    mal = conns["mallory"]
    foreign = [m for c in mal for m in c.messages
               if m.get("type") == "event"
               and (m.get("event") or {}).get("conversation_id") != M]
    is_(len(foreign), 0, "mallory (non-member) got no event of any other conversation")
    is_([len(conv_events(c, M)) for c in mal], [4, 4, 4],
        "mallory got her own conversation's messages (she is live)")
    bad = []
    for u, cs in conns.items():
        want = sum(len(db_messages(cv)) for cv, mem in MEMBERS.items() if u in mem) \
            + sum(1 for cv in (G2, S, DBE) if u in MEMBERS[cv])
        for i, c in enumerate(cs):
            got = len([m for m in c.messages if m.get("type") == "event" and "cursor" in m])
            if got != want:
                bad.append("%s#%d: %d durable events, want %d" % (u, i, got, want))
    ok(not bad, "every connection got exactly the durable events of its conversations")
    for x in bad[:6]:
        diag("  " + x)
    check_cursors(conns, "all")
    unk = [m for c in allc for m in c.messages
           if m.get("type") not in ("event",)]
    is_(unk, [], "no unexpected non-event messages (resync_required, errors) on any connection")

    for c in allc:
        await c.close()


asyncio.run(main())
done()
