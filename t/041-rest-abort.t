#!/usr/bin/python3
# REST requests whose client goes away while PostgreSQL works for them.
# The database is made slow with a lock the test holds; requests are sent
# on raw sockets to a reuseport listener (so both workers get some) and the
# sockets are closed before any answer comes.
#  1. Sends: a row lock on conversation A holds 50 POST .../messages.  Each
#     client abort is noticed at once (nginx logs the close while the lock
#     is still held), other requests keep working meanwhile, and after the
#     release every one of the 50 messages is stored exactly once.
#  2. Queries: a table lock on chat_members holds 50 requests (list, one
#     conversation, history, create group) in flight and in the worker's
#     queue.  Aborts are noticed at once; after the release the groups
#     created for clients that left are there once each and their
#     conversation.created events reach a member on both workers.
#  3. The same workers are still running (no crash, no worker exit) and
#     the API works; done() fails the file on any [alert].
import asyncio
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

N = 50

pg = PgCluster()
A = db_create_conv("alice", ["alice", "bob"], "A")
B = db_create_conv("alice", ["alice", "bob"], "B")

port2 = free_port()
ng = Nginx(pg, workers=2, server="listen 127.0.0.1:%d reuseport;" % port2)
pids = sorted(ng.worker_pids())
is_(len(pids), 2, "two workers")

TA = token("alice")
TB = token("bob")

CLOSED_RE = re.compile(r"\d+#\d+: \*\d+ client prematurely closed connection")


def open_request(method, path, tok, body=None):
    """Sends one request on a new connection to the reuseport listener and
    returns the socket, unanswered."""
    data = json.dumps(body).encode() if body is not None else b""
    head = "%s %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n" % (
        method, path, tok)
    if body is not None:
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    s = socket.create_connection(("127.0.0.1", port2), timeout=5)
    s.sendall(head.encode() + b"\r\n" + data)
    return s


def unanswered(socks, wait=0.3):
    """How many of the sockets got any byte back within `wait` seconds."""
    time.sleep(wait)
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1):
                n += 1
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def closes_since(mark):
    """pids of the workers that logged a client close after offset mark,
    with their counts."""
    out = {}
    for m in re.finditer(r"(\d+)#\d+: \*\d+ client prematurely closed connection",
                         ng.error_log()[mark:]):
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + 1
    return out


def others_work(label):
    st_me = [api("GET", "/chat/api/me", token=TA)[0] for _ in range(6)]
    is_(st_me, [200] * 6, "%s: GET /me answers on both workers" % label)


def api_works(label):
    st, _, b = api("POST", "/chat/api/conversations/%s/messages" % B, token=TA,
                   json={"client_msg_id": "after-%s" % label, "body": "still here"})
    is_(st, 201, "%s: a send to B is stored" % label)
    st, _, b = api("GET", "/chat/api/conversations?limit=5", token=TA)
    is_(st, 200, "%s: listing conversations works" % label)


# ---------------------------------------------------------------- 1 --

lk = db_lock("SELECT id FROM chat_conversations WHERE id = %s FOR UPDATE", int(A))
mark = len(ng.error_log())

socks = [open_request("POST", "/chat/api/conversations/%s/messages" % A, TA,
                      {"client_msg_id": "gone-%d" % i, "body": "sent and left %d" % i})
         for i in range(N)]
is_(unanswered(socks, 1.0), 0, "sends: none of the %d sends to the locked A is answered" % N)
for s in socks:
    s.close()

got = wait_for(lambda: sum(closes_since(mark).values()) >= N and closes_since(mark), timeout=10)
ok(got and sum(got.values()) == N,
   "sends: all %d client closes are noticed while the lock is held (%r)" % (N, got))
is_(sorted(got or {}), pids, "sends: on both workers")
others_work("sends, lock held")
st, _, b = api("POST", "/chat/api/conversations/%s/messages" % B, token=TA,
               json={"client_msg_id": "b-during", "body": "B is not locked"})
is_(st, 201, "sends, lock held: a send to B is stored meanwhile")
is_(db_messages(A), [], "sends: nothing is stored in A while it is locked")

lk.rollback()
lk.close()

wait_for(lambda: len(db_messages(A)) >= N, timeout=20)
rows = db_messages(A)
keys = by_sender_cmid(rows)
is_(len(rows), N, "sends: after the release A holds %d messages" % N)
is_(sorted(k[1] for k in keys), sorted("gone-%d" % i for i in range(N)),
    "sends: one for each send whose client left")
ok(all(len(v) == 1 for v in keys.values()), "sends: each stored exactly once")
is_([r[0] for r in rows], list(range(1, N + 1)), "sends: seq 1..%d without gaps" % N)
time.sleep(0.5)
is_(len(db_messages(A)), N, "sends: and no more later")
api_works("sends")

# ---------------------------------------------------------------- 2 --


async def listen_bob():
    return await ws_spread("bob", pids, per_worker=1)

loop = asyncio.new_event_loop()
bobs = loop.run_until_complete(listen_bob())
ok(len(bobs) == 2, "queries: bob listens on both workers")

lk = pg.conn(autocommit=False)
with lk.cursor() as cur:
    cur.execute("LOCK TABLE chat_members IN ACCESS EXCLUSIVE MODE")
mark = len(ng.error_log())

socks, titles = [], []
for i in range(N):
    k = i % 4
    if k == 0:
        socks.append(open_request("GET", "/chat/api/conversations", TA))
    elif k == 1:
        socks.append(open_request("GET", "/chat/api/conversations/%s" % A, TA))
    elif k == 2:
        socks.append(open_request("GET", "/chat/api/conversations/%s/messages?limit=5" % A, TA))
    else:
        titles.append("gone-g-%d" % i)
        socks.append(open_request("POST", "/chat/api/conversations", TA,
                                  {"kind": "group", "members": ["bob"], "title": titles[-1]}))
is_(unanswered(socks, 1.0), 0, "queries: none of the %d requests is answered under the lock" % N)
for s in socks:
    s.close()

got = wait_for(lambda: sum(closes_since(mark).values()) >= N and closes_since(mark), timeout=10)
ok(got and sum(got.values()) == N,
   "queries: all %d client closes are noticed while the lock is held (%r)" % (N, got))
is_(sorted(got or {}), pids, "queries: on both workers")
others_work("queries, lock held")

lk.rollback()
lk.close()


def created():
    return pg.query("SELECT title, count(*) FROM chat_conversations WHERE title LIKE 'gone-g-%%' "
                    "GROUP BY title")


wait_for(lambda: len(created()) >= len(titles), timeout=20)
rows = created()
is_(sorted(t for t, _ in rows), sorted(titles),
    "queries: every group created for a client that left exists (%d)" % len(titles))
ok(all(n == 1 for _, n in rows), "queries: each once")


def gone_titles(c):
    """Titles of the gone-g-* groups of the conversation.created events a
    ChatClient got."""
    return sorted(t for t in ((e.get("conversation") or {}).get("title") or ""
                              for e in conv_events(c, kind="conversation.created"))
                  if t.startswith("gone-g-"))


async def events():
    await until(lambda: all(len(gone_titles(c)) >= len(titles) for c in bobs), timeout=10)
    out = [gone_titles(c) for c in bobs]
    for c in bobs:
        await c.close()
    return out

for pid, got_titles in zip(pids, loop.run_until_complete(events())):
    is_(got_titles, sorted(titles),
        "queries: bob on worker %d got conversation.created for each of them" % pid)
loop.close()
api_works("queries")

# ---------------------------------------------------------------- 3 --

is_(sorted(ng.worker_pids()), pids, "the same two workers are still running")
ok(not re.search(r"exited on signal|worker process \d+ exited", ng.error_log()),
   "no worker exited")
others_work("at the end")

done()
