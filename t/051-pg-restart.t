#!/usr/bin/python3
# PostgreSQL goes away and comes back.
#  1. Fast stop: connected clients (hello done, on both workers) keep their
#     WebSocket connections (ping still answered); a send is answered
#     `unavailable` + retry_after_ms at once; REST answers 503 +
#     retry_after_ms; a new hello is answered `unavailable` instead of
#     hanging.  After pg.start() on the same port the module reconnects by
#     itself within a few seconds and sends succeed on both workers.
#  2. Immediate restart and a crash (SIGKILL of every PostgreSQL process)
#     while sender loops run on both workers, each retrying on `unavailable`
#     with the same client_msg_id: in the end the database has exactly one
#     row per client_msg_id, every acknowledged message is there, live
#     clients got every message once and in order, and clients that
#     reconnect with their cursor get exactly the events they missed.
#  3. Bounded queue (chat_db_pool_size 1, chat_db_queue_size 4): with every
#     commit stalled (the test holds chat_clock FOR UPDATE) a burst of sends
#     and of REST reads gets `unavailable` / 503 at once for the overflow;
#     the accepted ones complete after the release.
#
# Conversations are created with the schema's own chat_create_conversation()
# before nginx starts (fixtures).
import asyncio
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

PROMPT = 2.0         # an `unavailable` answer must come at least this fast
RECONNECT_MAX = 8.0  # chat_db_retry_max is 5 s by default

pg = PgCluster()

G = db_create_conv("alice", ["alice", "bob", "carol", "dave", "erin", "frank"], "G")
# one per worker for the bounded-queue burst: a batch that waits on the clock
# holds its conversations, so the other worker would see them "busy" rather
# than stall on the clock itself
Q = [db_create_conv("alice", ["alice", "bob"], "Q%d" % i) for i in range(2)]


def g_events(msgs):
    """The message.new events of G among msgs (whole messages, as received)."""
    return conv_events(msgs, G, whole=True)


def last_cursor(c):
    cur = [m["cursor"] for m in c.messages if m.get("type") == "event" and m.get("cursor")]
    return cur[-1] if cur else c.hello["result"]["cursor"]


class Sender:
    """Sends to G in a loop; on `unavailable` waits retry_after_ms and sends
    the same client_msg_id again."""

    def __init__(self, name, user, pid):
        self.name, self.user, self.pid = name, user, pid
        self.acked = {}          # cmid -> message id
        self.unavailable = 0
        self.slow = []           # `unavailable` answers that took > PROMPT
        self.noreply = []        # requests with no answer in 10 s
        self.bad = []            # unexpected errors / unavailable without retry_after_ms
        self.closed = []
        self.c = None

    async def run(self, stop):
        self.c = await ws_connect_on(self.user, self.pid)
        i = 0
        while not stop.is_set():
            i += 1
            cmid = "%s-%d" % (self.name, i)
            give_up = None
            while True:
                t0 = time.monotonic()
                r = await request_or_none(self.c, "send", timeout=10, conversation_id=G,
                                          client_msg_id=cmid, body="%s says %d" % (self.user, i))
                dt = time.monotonic() - t0
                if r is None:
                    if self.c.closed:
                        self.closed.append((cmid, self.c.close_code))
                        self.c = await ws_connect_on(self.user)
                    else:
                        self.noreply.append(cmid)
                    continue
                if r.get("ok"):
                    self.acked[cmid] = r["result"]["message"]["id"]
                    break
                err = r.get("error") or {}
                if err.get("code") != "unavailable":
                    self.bad.append((cmid, r))
                    break
                self.unavailable += 1
                if dt > PROMPT:
                    self.slow.append((cmid, round(dt, 2)))
                ra = err.get("retry_after_ms")
                if not (isinstance(ra, int) and ra > 0):
                    self.bad.append((cmid, r))
                    ra = 200
                if stop.is_set():
                    give_up = give_up or time.monotonic() + 30
                    if time.monotonic() > give_up:
                        self.bad.append((cmid, "still unavailable 30 s after the end"))
                        break
                await asyncio.sleep(min(ra, 500) / 1000.0)
            await asyncio.sleep(0.08)


async def probe_down(ng, probes):
    """Checks made while PostgreSQL is stopped."""
    loop = asyncio.get_event_loop()
    for pid, c in probes.items():
        t0 = time.monotonic()
        p = await ws_ping(c, timeout=5)
        ok(p is not None and time.monotonic() - t0 < PROMPT,
           "PostgreSQL down, worker %d: ping still answered" % pid)
        t0 = time.monotonic()
        r = await c.request("send", timeout=10, conversation_id=G,
                            client_msg_id="probe-down-%d" % pid, body="while down")
        dt = time.monotonic() - t0
        err = (r or {}).get("error") or {}
        ok(r is not None and r.get("ok") is False and err.get("code") == "unavailable",
           "PostgreSQL down, worker %d: send answered unavailable (%r)" % (pid, r))
        ok(isinstance(err.get("retry_after_ms"), int) and err["retry_after_ms"] > 0,
           "... with retry_after_ms (%r)" % (err.get("retry_after_ms"),))
        ok(dt < PROMPT, "... at once (%.3f s)" % dt)

    tok = token("bob")

    def rest_all():
        out = []
        for _ in range(4):
            t0 = time.monotonic()
            out.append(("GET conversations",) + ng.api("GET", "/chat/api/conversations", token=tok)[::2]
                       + (time.monotonic() - t0,))
            t0 = time.monotonic()
            out.append(("POST message",) + ng.api(
                "POST", "/chat/api/conversations/%s/messages" % G, token=tok,
                json={"client_msg_id": "rest-down", "body": "x"})[::2] + (time.monotonic() - t0,))
        return out

    res = await loop.run_in_executor(None, rest_all)
    bad = [(what, st, body) for what, st, body, dt in res
           if not (st == 503 and isinstance(body, dict)
                   and (body.get("error") or {}).get("code") == "unavailable"
                   and isinstance((body.get("error") or {}).get("retry_after_ms"), int))]
    is_(bad, [], "PostgreSQL down: REST answers 503 unavailable with retry_after_ms (8 requests)")
    ok(max(dt for _, _, _, dt in res) < PROMPT, "... at once (max %.3f s)" % max(dt for *_, dt in res))

    # a new client: hello is answered, not left hanging
    t0 = time.monotonic()
    c = await ws_connect(nginx=ng, token=token("frank"), timeout=10)
    h = c.hello
    err = (h or {}).get("error") or {}
    ok(h is not None and h.get("ok") is False and err.get("code") == "unavailable"
       and isinstance(err.get("retry_after_ms"), int),
       "PostgreSQL down: a new hello is answered unavailable with retry_after_ms (%r, %.2f s)"
       % (h, time.monotonic() - t0))
    await c.close()


async def part_restarts(ng):
    pids = ng.worker_pids()
    is_(len(pids), 2, "two workers")
    stop = asyncio.Event()

    receivers = {pid: await ws_connect_on("carol", pid) for pid in pids}
    probes = {pid: await ws_connect_on("alice", pid) for pid in pids}
    dave = await ws_connect_on("dave")
    dave_cursor = dave.hello["result"]["cursor"]
    await dave.close()
    erin = await ws_connect_on("erin")

    senders = [Sender("s%d-%s" % (n, u), u, pid) for n, pid in enumerate(pids) for u in ("alice", "bob")]
    tasks = [asyncio.ensure_future(s.run(stop)) for s in senders]

    async def progress(n, timeout):
        base = [len(s.acked) for s in senders]
        return await until(lambda: all(len(s.acked) >= b + n for s, b in zip(senders, base)), timeout)

    ok(await progress(3, 10), "senders on both workers are flowing")

    # ---- 1. fast stop, checks while down, start
    note("PostgreSQL: fast stop")
    pg.stop(mode="fast")
    await asyncio.sleep(1.0)
    await probe_down(ng, probes)
    await asyncio.sleep(3.0)
    closed = [pid for pid, c in list(receivers.items()) + list(probes.items()) if c.closed]
    is_(closed, [], "PostgreSQL down 4 s: every connected client is still connected")
    pg.start()
    t_up = time.monotonic()
    note("PostgreSQL: started again")
    back = {}
    for pid, c in probes.items():
        k = 0
        while time.monotonic() - t_up < 20:
            k += 1
            r = await c.request("send", timeout=10, conversation_id=G,
                                client_msg_id="probe-up-%d-%d" % (pid, k), body="back")
            if r and r.get("ok"):
                back[pid] = time.monotonic() - t_up
                break
            await asyncio.sleep(0.1)
    for pid in pids:
        ok(pid in back and back[pid] < RECONNECT_MAX,
           "worker %d reconnected to PostgreSQL by itself: a send succeeds %.1f s after the start"
           % (pid, back.get(pid, -1)))
    ok(await progress(3, 10), "after the fast restart the senders flow again")

    # ---- 2. immediate restart while traffic flows; erin is away meanwhile
    erin_cursor = last_cursor(erin)
    erin_before = list(erin.messages)
    await erin.close()
    note("PostgreSQL: immediate restart under traffic")
    loop = asyncio.get_event_loop()
    await loop.run_in_executor(None, lambda: pg.restart(mode="immediate"))
    ok(await progress(3, 15), "after the immediate restart the senders flow again")
    erin = await ws_connect_on("erin", cursor=erin_cursor)
    ok(erin.hello["result"]["cursor"] == erin_cursor, "erin resumes from her cursor")

    # ---- 3. crash: SIGKILL every PostgreSQL process, start again
    note("PostgreSQL: SIGKILL under traffic")
    await loop.run_in_executor(None, pg.kill)
    await asyncio.sleep(1.5)
    await loop.run_in_executor(None, pg.start)
    ok(await progress(3, 15), "after the crash the senders flow again")
    await asyncio.sleep(1.0)

    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    # ---- the accounting
    unavailable = sum(s.unavailable for s in senders)
    ok(unavailable > 0, "the senders saw the outages (%d unavailable answers)" % unavailable)
    is_([x for s in senders for x in s.slow], [], "every `unavailable` came within %.0f s" % PROMPT)
    is_([x for s in senders for x in s.noreply], [], "every send was answered (none hung for 10 s)")
    is_([x for s in senders for x in s.bad], [],
        "no unexpected errors; every `unavailable` carried retry_after_ms")
    is_([x for s in senders for x in s.closed], [], "no sender connection was closed")

    db = db_messages(G)
    rows = by_sender_cmid(db)
    acked = {(s.user, cmid): mid for s in senders for cmid, mid in s.acked.items()}
    is_(sorted(k for k, v in rows.items() if len(v) > 1), [], "one row per client_msg_id")
    missing = sorted(k for k in acked if k not in rows)
    is_(missing, [], "every acknowledged message is in the database (%d acked)" % len(acked))
    wrong = sorted(k for k in acked if k in rows and rows[k] != [acked[k]])
    is_(wrong, [], "with the id that was acknowledged")
    extra = sorted(k for k in rows if k[1].startswith("s") and k not in acked)
    is_(extra, [], "the sender loops' rows are exactly the acknowledged ones")
    is_([seq for seq, *_ in db], list(range(1, len(db) + 1)), "G's seqs are 1..%d without gaps" % len(db))

    n = len(db)
    for pid, c in receivers.items():
        await until(lambda: len(g_events(c.messages)) >= n, 15)
    await until(lambda: len(g_events(erin_before + erin.messages)) >= n, 15)
    await asyncio.sleep(0.5)
    for pid, c in receivers.items():
        ok(not c.closed, "worker %d: the live client stayed connected through the outages" % pid)
        stream_ok("worker %d live client" % pid, g_events(c.messages), db)
    stream_ok("erin (away during the immediate restart, resumed with her cursor)",
              g_events(erin_before + erin.messages), db)

    dave = await ws_connect_on("dave", cursor=dave_cursor)
    await until(lambda: len(g_events(dave.messages)) >= n, 15)
    await asyncio.sleep(0.5)
    stream_ok("dave (resumed with a cursor from before everything)", g_events(dave.messages), db)

    st, _, body = ng.api("GET", "/chat/api/conversations", token=token("bob"))
    is_(st, 200, "REST works again")
    for c in list(receivers.values()) + list(probes.values()) + [erin, dave] + [s.c for s in senders]:
        await c.close()


async def part_bounded_queue(ng2):
    pids = ng2.worker_pids()
    burst = 20
    senders = {pid: await ws_connect_on("alice", pid, nginx=ng2) for pid in pids}
    conv = dict(zip(pids, Q))

    lk = db_lock("LOCK TABLE chat_events IN SHARE MODE; SELECT 1")
    t_lock = time.monotonic()
    note("chat_clock locked by the test: every commit stalls")

    tasks = {}
    sent_at = {}
    for pid, c in senders.items():
        for k in range(burst):
            cmid = "burst-%d-%d" % (pid, k)
            sent_at[cmid] = time.monotonic()
            tasks[cmid] = (pid, asyncio.ensure_future(
                c.request("send", timeout=30, conversation_id=conv[pid], client_msg_id=cmid,
                          body="burst")))
            await asyncio.sleep(0)

    # REST reads queue for the single pool connection too
    pool = concurrent.futures.ThreadPoolExecutor(12)
    loop = asyncio.get_event_loop()

    def rest_get():
        t0 = time.monotonic()
        st, _, body = ng2.api("GET", "/chat/api/conversations/%s/messages?limit=5" % G,
                              token=token("bob"), timeout=30)
        return st, body, time.monotonic() - t0

    rest = [loop.run_in_executor(pool, rest_get) for _ in range(12)]

    answered_at = {}
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        for cmid, (pid, t) in tasks.items():
            if t.done() and cmid not in answered_at:
                answered_at[cmid] = time.monotonic()
        await asyncio.sleep(0.01)
    answered = {cmid: tasks[cmid][1].result() for cmid in answered_at}
    for pid in pids:
        mine = {k: v for k, v in answered.items() if tasks[k][0] == pid}
        unav = [k for k, v in mine.items() if v and v.get("ok") is False
                and (v.get("error") or {}).get("code") == "unavailable"
                and isinstance((v.get("error") or {}).get("retry_after_ms"), int)]
        others = [v for k, v in mine.items() if k not in unav]
        is_(others, [], "worker %d: while commits stall, nothing but `unavailable` + retry_after_ms is answered" % pid)
        ok(len(unav) >= burst - 8,
           "worker %d: the overflow of a burst of %d sends is refused at once (%d unavailable; "
           "pool 1 + queue 4 hold at most 8)" % (pid, burst, len(unav)))
    done_rest = [f.result() for f in rest if f.done()]
    n503 = [x for x in done_rest if x[0] == 503 and isinstance(x[1], dict)
            and isinstance((x[1].get("error") or {}).get("retry_after_ms"), int)]
    is_([x for x in done_rest if x[0] != 503], [], "REST during the stall: only 503s so far")
    ok(len(n503) >= 12 - 8, "REST: the overflow of 12 reads gets 503 + retry_after_ms at once (%d)" % len(n503))
    ok(all(dt < 1.0 for _, _, dt in n503), "... within 1 s")
    late = [(k, round(answered_at[k] - sent_at[k], 2)) for k in answered
            if answered_at[k] - sent_at[k] > 1.0]
    is_(late, [], "the refused sends were answered within 1 s")
    note("stall held %.1f s" % (time.monotonic() - t_lock))

    lk.rollback()
    lk.close()
    note("chat_clock released")

    res = {}
    for cmid, (pid, t) in tasks.items():
        try:
            res[cmid] = await asyncio.wait_for(asyncio.shield(t), 10)
        except asyncio.TimeoutError:
            res[cmid] = None
    accepted = {k: v for k, v in res.items() if k not in answered}
    bad = {k: v for k, v in accepted.items() if not (v and v.get("ok"))}
    is_(bad, {}, "the accepted sends (%d) all succeed after the release" % len(accepted))
    for pid in pids:
        n = len([k for k in accepted if tasks[k][0] == pid])
        ok(1 <= n <= 8, "worker %d: %d sends were held (bounded by pool + queue)" % (pid, n))
    rest_res = await asyncio.gather(*rest)
    is_([x[0] for x in rest_res if x[0] not in (200, 503)], [], "the held REST reads complete after the release")
    ok(any(x[0] == 200 for x in rest_res), "... some of them with 200")
    pool.shutdown()

    after = {k for q in Q for _, _, _, k in db_messages(q)}
    is_(sorted(after), sorted(k for k, v in res.items() if v and v.get("ok")),
        "the database holds exactly the acknowledged burst sends")

    for pid, c in senders.items():
        r = await c.request("send", timeout=5, conversation_id=conv[pid],
                            client_msg_id="after-%d" % pid, body="x")
        ok(r and r.get("ok"), "worker %d: sends work normally after the stall" % pid)
        await c.close()


loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)

ng = Nginx(pg, workers=2)
loop.run_until_complete(part_restarts(ng))
is_(ng.stop(), 0, "nginx quits cleanly")

ng2 = Nginx(pg, workers=2, http="chat_db_pool_size 1;\nchat_db_queue_size 4;")
loop.run_until_complete(part_bounded_queue(ng2))
done()
