#!/usr/bin/python3
# Exactly once across transports (PROTOCOL 3, 5): bob switches at random
# between WebSocket (?cursor= on the upgrade or hello.cursor), SSE
# (Last-Event-ID or ?cursor=) and long-poll chains, on either of two
# workers, always resuming from the last durable cursor he got -- leaving
# by a clean close or by dropping the TCP connection, polls dropped while
# held too -- while alice and carol send into his three conversations all
# the time from both workers.  In the end he got every message of each
# conversation once, in seq order, and every durable event once (no cursor
# twice, cursors only growing).  SEED=n repeats a run.
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
CONVS = [db_create_conv("alice", ["alice", "bob"], "a-b"),
         db_create_conv("carol", ["carol", "bob"], "c-b"),
         db_create_conv("alice", ["alice", "bob", "carol"], "group")]
ng = Nginx(pg, workers=2, http="chat_catchup_page 32;")
SWITCHES = 60


class Receiver:
    def __init__(self, rng):
        self.rng = rng
        self.durable = []          # every durable event, in the order got
        self.cursor = None
        self.counts = {}

    def take(self, msgs):
        for m in msgs:
            if m.get("type") == "event" and m.get("cursor"):
                self.durable.append(m)
                self.cursor = m["cursor"]
            elif m.get("type") == "resync_required":
                raise AssertionError("resync_required: %r" % m)

    async def ws(self, pids):
        pid = self.rng.choice(pids)
        if self.rng.random() < 0.5:
            c = await ws_connect_on("bob", pid, cursor=self.cursor)
            how = "ws-hello"
        else:
            c = None
            for _ in range(50):
                path = "/chat/ws" + ("?cursor=" + self.cursor if self.cursor else "")
                c = await ws_connect(token=token("bob"), bearer=True, path=path)
                w = await c.wait_event(lambda m: m.get("type") == "welcome", 10)
                if worker_of(c) == pid or not w:
                    break
                await c.close()
            how = "ws-upgrade"
        await asyncio.sleep(self.rng.uniform(0.1, 0.6))
        if self.rng.random() < 0.4:
            await ws_ping(c)
            c.ws.transport.abort()
            await c.wait_closed(5)
        else:
            await c.close()
        self.take(c.messages)
        return how

    async def sse(self):
        if self.rng.random() < 0.5 and self.cursor:
            c = await sse_connect("bob", last_event_id=self.cursor)
            how = "sse-last-event-id"
        else:
            c = await sse_connect("bob", cursor=self.cursor)
            how = "sse-cursor"
        assert c.hello, (c.status, c.body[:300])
        await asyncio.sleep(self.rng.uniform(0.1, 0.6))
        await c.close()
        self.take(c.messages)
        return how

    async def poll(self):
        for _ in range(self.rng.randint(1, 3)):
            if self.rng.random() < 0.2:
                # held, then dropped: what it would have answered is not had
                p = await PollRequest().start("bob", cursor=self.cursor, timeout_ms=2000)
                await asyncio.sleep(self.rng.uniform(0, 0.2))
                p.abort()
                continue
            st, _, b = await poll("bob", cursor=self.cursor, timeout_ms=self.rng.choice([0, 200, 1000]))
            assert st == 200, (st, b)
            self.take(b["events"])
            self.cursor = b["cursor"]
        return "poll"


async def main():
    seed = int(os.environ.get("SEED") or random.SystemRandom().randrange(1 << 31))
    diag("seed %d (SEED=%d repeats this run)" % (seed, seed))
    rng = random.Random(seed)
    pids = ng.worker_pids()
    rcv = Receiver(rng)

    # the starting point: a first poll
    st, _, b = await poll("bob", timeout_ms=0)
    rcv.cursor = b["cursor"]

    state = {"stop": False, "sent": 0}

    async def sender(user, convs, pid):
        c = await ws_connect_on(user, pid)
        i = 0
        while not state["stop"]:
            conv = convs[i % len(convs)]
            r = await c.request("send", conversation_id=conv, client_msg_id="%s-%d" % (user, i), body="m %d" % i)
            assert r and r.get("ok"), r
            state["sent"] += 1
            i += 1
            await asyncio.sleep(0.01)
        await c.close()
    senders = [asyncio.ensure_future(sender("alice", [CONVS[0], CONVS[2]], pids[0])),
               asyncio.ensure_future(sender("carol", [CONVS[1], CONVS[2]], pids[1]))]

    t0 = time.monotonic()
    for i in range(SWITCHES):
        kind = rng.choice(["ws", "sse", "poll"])
        if kind == "ws":
            how = await rcv.ws(pids)
        elif kind == "sse":
            how = await rcv.sse()
        else:
            how = await rcv.poll()
        rcv.counts[how] = rcv.counts.get(how, 0) + 1
    state["stop"] = True
    await asyncio.gather(*senders)
    note("%d switches in %.1f s: %s; %d messages sent"
         % (SWITCHES, time.monotonic() - t0, rcv.counts, state["sent"]))

    want = {c: [r[0] for r in pg.query("SELECT seq FROM chat_messages WHERE conversation_id = %s "
                                       "ORDER BY seq", c)] for c in CONVS}
    # the rest, by polls
    for _ in range(200):
        if all([e["seq"] for e in conv_events(rcv.durable, c)][-1:] == want[c][-1:] for c in CONVS):
            break
        await rcv.poll()
    for c in CONVS:
        got = [e["seq"] for e in conv_events(rcv.durable, c)]
        is_(got, want[c], "conversation %s: all %d messages, once, in seq order" % (c, len(want[c])))
    gs = [gseq(m["cursor"]) for m in rcv.durable]
    is_(gs, sorted(set(gs)), "every durable event once (%d), cursors only growing" % len(gs))
    ok(state["sent"] > 100, "under load: %d messages sent meanwhile" % state["sent"])

asyncio.run(main())
done()
