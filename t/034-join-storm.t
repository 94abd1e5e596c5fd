#!/usr/bin/python3
# A connect storm: 300 users open their WebSockets at once (half
# authenticate on the upgrade and get "welcome", half send hello), on both
# workers.  Every session joins with its own memberships -- each one then
# receives the message sent to its conversation and nothing else.  Then
# the storm again while the module's PostgreSQL connections are frozen
# (SIGSTOP): the joins that pile up meanwhile reach PostgreSQL in batches
# (the statement log shows a handful of membership queries, not one per
# connection), and every session still joins with its own memberships.
import asyncio
import os
import re
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

N = 300                     # users; N / 2 direct conversations

pg = PgCluster(settings={"log_min_duration_statement": "0"})
ng = Nginx(pg, workers=2)

pg.psql("SELECT chat_create_conversation('u' || (2 * i), 'direct', "
        "ARRAY['u' || (2 * i), 'u' || (2 * i + 1)], NULL, NULL) "
        "FROM generate_series(0, %d) i" % (N // 2 - 1))
convs = dict(pg.query("SELECT m.user_id, m.conversation_id::text "
                      "FROM chat_members m"))
is_(len(convs), N, "%d users, each in one direct conversation" % N)

log_start = len(pg.log_text())


async def connect(i):
    user = "u%d" % i
    if i % 2:
        c = await ws_connect(token=token(user), bearer=True, hello=False)
        w = await c.wait_event(lambda m: m.get("type") == "welcome", timeout=30)
        return c, bool(w)
    c = await ws_connect(token=token(user), timeout=30)
    return c, bool(c.hello and c.hello.get("ok"))


async def storm(label):
    res = await asyncio.gather(*(connect(i) for i in range(N)))
    clients = [c for c, _ in res]
    joined = sum(1 for _, good in res if good)
    is_(joined, N, "%s: every session joined (welcome or hello reply)" % label)

    pids = {c.hello["result"]["session_id"].split("-")[0]
            for c in clients if c.hello and c.hello.get("ok")}
    ok(len(pids) == 2, "%s: sessions on both workers (%s)" % (label, sorted(pids)))
    return clients


async def exchange(clients, label):
    # the even user of each pair sends one message to the pair
    acks = await asyncio.gather(*(
        clients[i].request("send", conversation_id=convs["u%d" % i],
                           client_msg_id="%s-%d" % (label, i),
                           body="%s %d" % (label, i))
        for i in range(0, N, 2)))
    is_(sum(1 for a in acks if a and a.get("ok")), N // 2,
        "%s: every send acked" % label)

    async def got(i):
        ev = await clients[i].wait_event(
            lambda m: m.get("type") == "event"
            and m["event"].get("kind") == "message.new", timeout=20)
        return (ev is not None
                and ev["event"]["conversation_id"] == convs["u%d" % i]
                and ev["event"]["message"]["body"]
                == "%s %d" % (label, i - i % 2))

    good = await asyncio.gather(*(got(i) for i in range(N)))
    is_(sum(good), N, "%s: every session received its conversation's "
        "message" % label)

    await asyncio.sleep(0.5)
    stray = [i for i, c in enumerate(clients)
             if len(c.events("message.new")) != 1]
    is_(stray, [], "%s: nobody received another conversation's message"
        % label)

    for c in clients:
        await c.close()


def membership_queries(start):
    log = pg.log_text()[start:]
    n = len(re.findall(r"execute chat_memberships", log))
    sizes = [len(re.findall(r'"u\d+"', x)) for x in
             re.findall(r"execute chat_memberships.*?\n.*?DETAIL:[^\n]*", log)]
    return n, sizes


async def run():
    global log_start
    clients = await storm("storm")
    await exchange(clients, "storm")
    n, sizes = membership_queries(log_start)
    note("membership queries: %d, users in each: %s" % (n, sizes))

    # the module's own backends: every client backend but ours
    backends = [int(r[0]) for r in pg.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'chat' "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")]
    ok(len(backends) >= 2, "the module's pool connections (%d)" % len(backends))

    log_start = len(pg.log_text())
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        task = asyncio.ensure_future(storm("frozen"))
        await asyncio.sleep(2)
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)
    clients = await task
    n, sizes = membership_queries(log_start)
    note("membership queries: %d, users in each: %s" % (n, sizes))
    ok(0 < n <= 24 and sum(sizes) == N,
       "frozen: the %d joins went to PostgreSQL as %d queries" % (N, n))
    ok(max(sizes or [0]) >= 50,
       "frozen: the joins that waited went out together (largest batch %d)"
       % max(sizes or [0]))
    await exchange(clients, "frozen")


asyncio.run(run())

is_(ng.check_log(), [], "no alert, crit or emerg in error.log")
is_(ng.stop(), 0, "nginx quits cleanly")
done()
