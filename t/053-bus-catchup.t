#!/usr/bin/python3
# The bus ring is a cache.  With a tiny ring (chat_bus_slots 1024) a burst
# of 3200 messages from four connections on both workers:
#  - live clients on both workers get every message once, in order;
#  - a client that resumes with a cursor from before the burst (in the
#    middle of the burst, and after it) gets every message once, in order,
#    served from PostgreSQL;
#  - resuming from cursors 700, 400 and 1 events back, and from the last
#    one, gives exactly the events after the cursor (store and ring paths);
#  - a worker that is stopped (SIGSTOP) while the other stores 3200 more
#    messages falls three rings behind: once it runs again its clients get
#    every message once, in order, from the store, without being cut.
#
# Conversations are created with the schema's own chat_create_conversation()
# before nginx starts (fixtures).
import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

PER_SENDER = 800
WINDOW = 32

pg = PgCluster()


def create_conv(creator, members, title):
    rows = pg.query("SELECT o_conv FROM chat_create_conversation(%s, 'group', %s, %s, NULL)",
                    creator, list(members), title)
    return str(rows[0][0])


G = create_conv("alice", ["alice", "bob", "carol", "dave", "erin", "frank"], "G")


def db_messages(conv):
    return [(seq, str(mid)) for seq, mid in pg.query(
        "SELECT seq, id FROM chat_messages WHERE conversation_id = %s ORDER BY seq", int(conv))]


def wpid(c):
    return int(c.hello["result"]["session_id"].split("-")[0])


async def connect(user, want_pid=None, cursor=None, tries=100):
    for _ in range(tries):
        c = await ws_connect(token=token(user), cursor=cursor, max_size=2 ** 22)
        if not (c.hello and c.hello.get("ok")):
            raise RuntimeError("hello failed: %r" % (c.hello,))
        if want_pid is None or wpid(c) == want_pid:
            return c
        await c.close()
    raise RuntimeError("no connection landed on worker %s" % want_pid)


def g_events(c):
    return [m for m in c.messages
            if m.get("type") == "event" and isinstance(m.get("event"), dict)
            and m["event"].get("kind") == "message.new"
            and m["event"].get("conversation_id") == G]


async def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.1)
    return bool(pred())


def stream_ok(name, events, want):
    got = [(e["event"]["seq"], e["event"]["message"]["id"]) for e in events]
    if got == want:
        return ok(True, "%s: %d messages, each once, in seq order" % (name, len(want)))
    seqs = [s for s, _ in got]
    dups = sorted({s for s in seqs if seqs.count(s) > 1})
    missing = sorted(set(s for s, _ in want) - set(seqs))
    ok(False, "%s: %d messages, each once, in seq order" % (name, len(want)))
    diag("  got %d events (seq %s..%s); duplicated seqs %s; missing seqs %s (%d); out of order: %s"
         % (len(got), seqs[:1], seqs[-1:], dups[:10], missing[:10], len(missing),
            seqs != sorted(seqs)))
    return False


async def burst(c, prefix, n, acked, errors):
    sem = asyncio.Semaphore(WINDOW)

    async def one(k):
        async with sem:
            cmid = "%s-%d" % (prefix, k)
            r = await c.request("send", timeout=120, conversation_id=G, client_msg_id=cmid,
                                body="%s message %d" % (prefix, k))
            if r and r.get("ok"):
                acked[cmid] = r["result"]["message"]["id"]
            else:
                errors.append((cmid, r))

    await asyncio.gather(*[one(k) for k in range(n)])


async def main(ng):
    pids = ng.worker_pids()
    is_(len(pids), 2, "two workers")

    live = {(u, pid): await connect(u, pid) for pid in pids for u in ("carol", "dave")}
    senders = [await connect(u, pid) for pid in pids for u in ("alice", "bob")]
    ok(sorted({wpid(c) for c in senders}) == sorted(pids), "senders on both workers")

    c = await connect("erin")
    cursor0 = c.hello["result"]["cursor"]
    await c.close()

    acked, errors = {}, []
    total = PER_SENDER * len(senders)
    t0 = time.monotonic()
    bursts = asyncio.ensure_future(asyncio.gather(*[
        burst(s, "w%d-%d" % (wpid(s), n), PER_SENDER, acked, errors) for n, s in enumerate(senders)]))

    # a client resumes from before the burst while it is under way
    await wait_until(lambda: len(acked) >= total // 3, 60)
    mid = await connect("frank", cursor=cursor0)
    ok(mid.hello["result"]["cursor"] == cursor0, "frank resumes mid-burst from the old cursor")

    await asyncio.wait_for(bursts, 120)
    note("%d sends in %.1f s" % (len(acked), time.monotonic() - t0))
    is_(errors, [], "every send of the burst succeeded")
    is_(len(acked), total, "%d messages acknowledged" % total)

    db = db_messages(G)
    is_(len(db), total, "%d messages stored" % total)
    is_(sorted(mid_ for _, mid_ in db), sorted(acked.values()), "stored = acknowledged")

    # after the burst, from before it
    late = await connect("erin", cursor=cursor0)
    ok(late.hello["result"]["cursor"] == cursor0, "erin resumes after the burst from the old cursor")

    everyone = list(live.items()) + [(("frank (resumed mid-burst)", 0), mid),
                                     (("erin (resumed after the burst)", 0), late)]
    await wait_until(lambda: all(len(g_events(c)) >= total for _, c in everyone), 90)
    await asyncio.sleep(1.0)
    for (u, pid), c in everyone:
        name = "%s on worker %d (live)" % (u, pid) if pid else u
        ok(not c.closed, "%s: still connected (close code %r)" % (name, c.close_code))
        stream_ok(name, g_events(c), db)

    # resuming from cursors further back and closer than half the ring
    ref = g_events(live[("carol", pids[0])])
    if len(ref) == total:
        for back in (700, 400, 1, 0):
            cur = ref[total - back - 1]["cursor"]
            c = await connect("erin", cursor=cur)
            want = db[total - back:]
            await wait_until(lambda: len(g_events(c)) >= back, 30)
            await asyncio.sleep(0.5 if back else 1.0)
            stream_ok("resumed %d events back" % back, g_events(c), want)
            await c.close()
    else:
        skip("reference stream incomplete", 4)

    for c in (mid, late):
        await c.close()

    # ---- a worker stalls (SIGSTOP) while the other stores 3200 messages:
    # the ring wraps three times over its position, so when it runs again
    # it can only catch up from the store
    stalled, running = pids
    first = total
    senders_r = [s for s in senders if wpid(s) == running]
    acked2, errors2 = {}, []
    os.kill(stalled, signal.SIGSTOP)
    note("worker %d stopped (SIGSTOP)" % stalled)
    try:
        per = total // len(senders_r)
        await asyncio.wait_for(asyncio.gather(*[
            burst(s, "stall-%d" % n, per, acked2, errors2) for n, s in enumerate(senders_r)]), 120)
        is_(errors2, [], "worker %d alone stored %d more messages" % (running, per * len(senders_r)))
        db = db_messages(G)
        total2 = len(db)
        is_(total2, first + per * len(senders_r), "%d messages stored in all" % total2)
        ok(total2 - first > 1024 * 2, "more than twice the ring went by the stalled worker")
        on_running = [(k, c) for k, c in live.items() if k[1] == running]
        await wait_until(lambda: all(len(g_events(c)) >= total2 for _, c in on_running), 60)
        for (u, pid), c in on_running:
            stream_ok("%s on the running worker %d" % (u, pid), g_events(c), db)
    finally:
        os.kill(stalled, signal.SIGCONT)
    note("worker %d continued (SIGCONT)" % stalled)
    on_stalled = [(k, c) for k, c in live.items() if k[1] == stalled]
    t0 = time.monotonic()
    await wait_until(lambda: all(len(g_events(c)) >= total2 for _, c in on_stalled), 60)
    note("the stalled worker's clients caught up in %.1f s" % (time.monotonic() - t0))
    await asyncio.sleep(1.0)
    for (u, pid), c in on_stalled:
        ok(not c.closed, "%s on the stalled worker: still connected (close code %r)" % (u, c.close_code))
        stream_ok("%s on the stalled worker %d (fell behind the ring)" % (u, pid), g_events(c), db)

    # and a late resume over all of it
    c = await connect("erin", cursor=cursor0)
    await wait_until(lambda: len(g_events(c)) >= total2, 60)
    await asyncio.sleep(0.5)
    stream_ok("erin resumed from before everything", g_events(c), db)
    await c.close()

    for c in list(live.values()) + senders:
        await c.close()


loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
ng = Nginx(pg, workers=2, http="chat_bus_slots 1024;")
loop.run_until_complete(main(ng))
is_(ng.stop(), 0, "nginx quits cleanly")
done()
