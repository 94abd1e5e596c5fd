#!/usr/bin/python3
# The notification outbox for the platform (PROTOCOL §9), with 2 workers
# and chat_notify_delay 1s:
#  1. a direct message to a recipient with no connection makes exactly one
#     row (reason "direct") for the recipient, none for the sender; the
#     platform reads it with a service token (GET /notifications, with the
#     message object) and acknowledges it (POST /notifications/ack); a user
#     token gets 403;
#  2. a message the recipient reads (or acks) before the delay makes none;
#  3. group: a message mentioning a member makes a "mention" row for that
#     member only; a reply to a member's message makes a "reply" row for
#     that member; mentions of non-members are dropped from the message;
#     a muted member (PATCH /conversations/{id}/settings) gets mentions
#     only: a direct message in a muted conversation makes no row;
#  4. exactly once across a SIGKILL of the sweeping worker and a
#     PostgreSQL restart while direct messages keep coming: every message
#     has exactly one row.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
D = db_create_conv("alice", ["alice", "bob"], None, kind="direct")
G = db_create_conv("alice", ["alice", "bob", "carol", "dave"], "G")
DM = db_create_conv("erin", ["erin", "bob"], None, kind="direct")   # bob mutes it

ng = Nginx(pg, workers=2, http="chat_notify_delay 1s; chat_receipt_flush 100ms;")
SVC = token("platform", role="service")


def rows(where="true"):
    return pg.query("SELECT user_id, message_id::text, reason FROM chat_notifications "
                    "WHERE " + where + " ORDER BY id")


def post(conv, user, cmid, body, **extra):
    b = {"client_msg_id": cmid, "body": body}
    b.update(extra)
    st, _, r = ng.api("POST", "/chat/api/conversations/%s/messages" % conv,
                      token=token(user), json=b)
    return st, (r or {}).get("message") if isinstance(r, dict) else None


def wait_rows(where, n, timeout=8):
    wait_for(lambda: len(rows(where)) >= n, timeout=timeout)
    return rows(where)


# ---------------------------------------------------------------- 1 --

st, m1 = post(D, "alice", "d-1", "are you there?")
is_(st, 201, "a direct message to bob (no connection)")
got = wait_rows("message_id = %s" % m1["id"], 1)
is_([tuple(r) for r in got], [("bob", m1["id"], "direct")],
    "one row for bob, reason direct, none for alice")
time.sleep(1.5)
is_(len(rows("message_id = %s" % m1["id"])), 1, "still one row after more sweeps")

st, _, b = ng.api("GET", "/chat/api/notifications", token=token("bob"))
is_(st, 403, "a user token cannot read the outbox")
st, _, b = ng.api("GET", "/chat/api/notifications?after=0&limit=10", token=SVC)
is_(st, 200, "the service reads the outbox")
ns = (b or {}).get("notifications") or []
mine = [n for n in ns if n.get("message", {}).get("id") == m1["id"]]
is_(len(mine), 1, "... the row is there once")
n = mine[0] if mine else {}
is_((n.get("user"), n.get("reason"), n.get("conversation_id"), n.get("message", {}).get("body")),
    ("bob", "direct", D, "are you there?"), "... with user, reason, conversation and message")
ok(isinstance(n.get("id"), str) and b.get("next") == ns[-1]["id"], "ids are strings; next is the last id")

st, _, b2 = ng.api("POST", "/chat/api/notifications/ack", token=SVC, json={"upto": n.get("id")})
is_((st, (b2 or {}).get("deleted")), (200, len([x for x in ns if int(x["id"]) <= int(n["id"])])),
    "ack deletes the rows up to it")
st, _, b3 = ng.api("GET", "/chat/api/notifications?after=0", token=SVC)
ok(all(int(x["id"]) > int(n["id"]) for x in (b3 or {}).get("notifications", [])),
   "acknowledged rows are gone")
st, _, _ = ng.api("POST", "/chat/api/notifications/ack", token=SVC, json={"upto": 5})
is_(st, 400, "ack: upto must be an id string")


# ---------------------------------------------------------------- 2 --

async def read_before_delay():
    bob = await ws_connect_on("bob", nginx=ng)
    st, m = post(D, "alice", "d-2", "read me")
    ev = await bob.wait_event(lambda e: e.get("event", {}).get("kind") == "message.new"
                              and e["event"]["message"]["id"] == m["id"], timeout=5)
    await bob.send({"type": "read", "conversation_id": D, "seq": m["seq"]})
    st2, m2 = post(D, "alice", "d-3", "ack me")
    ev2 = await bob.wait_event(lambda e: e.get("event", {}).get("kind") == "message.new"
                               and e["event"]["message"]["id"] == m2["id"], timeout=5)
    await bob.send({"type": "ack", "cursor": ev2["cursor"]})
    await asyncio.sleep(3)
    is_(rows("message_id IN (%s, %s)" % (m["id"], m2["id"])), [],
        "a message read, and one acked, before the delay make no row")
    await bob.close()

asyncio.run(read_before_delay())


# ---------------------------------------------------------------- 3 --

st, _, b = ng.api("PATCH", "/chat/api/conversations/%s/settings" % DM, token=token("bob"),
                  json={"muted": True})
is_((st, b), (200, {"settings": {"muted": True}}), "bob mutes his direct with erin")
st, _, b = ng.api("PATCH", "/chat/api/conversations/%s/settings" % DM, token=token("carol"),
                  json={"muted": True})
is_(st, 403, "settings of a conversation one is not in: 403")
st, _, b = ng.api("PATCH", "/chat/api/conversations/%s/settings" % DM, token=token("bob"),
                  json={"muted": "yes"})
is_(st, 400, "settings: muted must be a boolean")

st, g1 = post(G, "carol", "g-1", "hi @bob", mentions=["bob", "zed", "carol"])
is_(g1.get("mentions") if g1 else None, ["bob"],
    "mentions keep other members only (not the sender, not non-members)")
st, g2 = post(G, "dave", "g-2", "plain group message")
st, g3 = post(G, "alice", "g-3", "answering dave", reply_to=g2["id"])
st, e1 = post(DM, "erin", "e-1", "muted direct")
st, e2 = post(DM, "erin", "e-2", "muted but @bob", mentions=["bob"])
st, _ = post(G, "alice", "g-bad", "x", mentions="bob")
is_(st, 400, "mentions must be an array")

got = wait_rows("message_id IN (%s)" % ",".join(m["id"] for m in (g1, g2, g3, e1, e2)), 3)
time.sleep(1.5)
got = rows("message_id IN (%s)" % ",".join(m["id"] for m in (g1, g2, g3, e1, e2)))
is_(sorted(map(tuple, got)), sorted([("bob", g1["id"], "mention"), ("dave", g3["id"], "reply"),
                                     ("bob", e2["id"], "mention")]),
    "group: mention -> the mentioned member, reply -> the replied-to member, nothing else; "
    "muted direct: only the mention")


# ---------------------------------------------------------------- 4 --

async def storm():
    ids = []
    n = 0

    async def sender(stop):
        nonlocal n
        while not stop.is_set():
            n += 1
            try:
                st, m = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: post(D, "alice", "s-%d" % n, "storm %d" % n))
            except Exception:  # noqa: BLE001 -- a worker was killed under it
                st, m = None, None
            if st == 201 and m:
                ids.append(m["id"])
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    task = asyncio.create_task(sender(stop))
    await asyncio.sleep(2)
    # the sweeper is worker slot 0: kill every worker once, one by one
    for pid in ng.worker_pids():
        ng.kill_worker(pid)
        await asyncio.sleep(1.5)
    pg.restart()
    await asyncio.sleep(3)
    stop.set()
    await task
    return ids

ids = asyncio.run(storm())
ok(len(ids) > 50, "%d direct messages stored during the kills and the restart" % len(ids))
where = "message_id IN (%s)" % ",".join(ids)
wait_for(lambda: len(rows(where)) >= len(ids), timeout=20)
time.sleep(2)
per = pg.query("SELECT message_id::text, count(*) FROM chat_notifications WHERE " + where
               + " GROUP BY 1")
is_((len(per), max(c for _, c in per) if per else 0), (len(ids), 1),
    "every message stored has exactly one row for bob")

done()
