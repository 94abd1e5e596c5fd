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
import functools
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

PER_SENDER = 800
WINDOW = 32

pg = PgCluster()

G = db_create_conv("alice", ["alice", "bob", "carol", "dave", "erin", "frank"], "G")


# catch-ups of thousands of events: frames up to 4 MiB
connect = functools.partial(ws_connect_on, max_size=2 ** 22)

# the test names of stream_ok()
EXACT = "%s: %d messages, each once, in seq order"


def g_events(c):
    """The message.new events of G among c's messages (whole messages, as received)."""
    return conv_events(c, G, whole=True)


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
    ok(sorted({session_pid(c) for c in senders}) == sorted(pids), "senders on both workers")

    c = await connect("erin")
    cursor0 = c.hello["result"]["cursor"]
    await c.close()

    acked, errors = {}, []
    total = PER_SENDER * len(senders)
    t0 = time.monotonic()
    bursts = asyncio.ensure_future(asyncio.gather(*[
        burst(s, "w%d-%d" % (session_pid(s), n), PER_SENDER, acked, errors)
        for n, s in enumerate(senders)]))

    # a client resumes from before the burst while it is under way
    await until(lambda: len(acked) >= total // 3, 60, interval=0.1)
    mid = await connect("frank", cursor=cursor0)
    ok(mid.hello["result"]["cursor"] == cursor0, "frank resumes mid-burst from the old cursor")

    await asyncio.wait_for(bursts, 120)
    note("%d sends in %.1f s" % (len(acked), time.monotonic() - t0))
    is_(errors, [], "every send of the burst succeeded")
    is_(len(acked), total, "%d messages acknowledged" % total)

    db = db_messages(G, ("seq", "id"))
    is_(len(db), total, "%d messages stored" % total)
    is_(sorted(mid_ for _, mid_ in db), sorted(acked.values()), "stored = acknowledged")

    # after the burst, from before it
    late = await connect("erin", cursor=cursor0)
    ok(late.hello["result"]["cursor"] == cursor0, "erin resumes after the burst from the old cursor")

    everyone = list(live.items()) + [(("frank (resumed mid-burst)", 0), mid),
                                     (("erin (resumed after the burst)", 0), late)]
    await until(lambda: all(len(g_events(c)) >= total for _, c in everyone), 90, interval=0.1)
    await asyncio.sleep(1.0)
    for (u, pid), c in everyone:
        name = "%s on worker %d (live)" % (u, pid) if pid else u
        ok(not c.closed, "%s: still connected (close code %r)" % (name, c.close_code))
        stream_ok(name, g_events(c), db, fmt=EXACT)

    # resuming from cursors further back and closer than half the ring
    ref = g_events(live[("carol", pids[0])])
    if len(ref) == total:
        for back in (700, 400, 1, 0):
            cur = ref[total - back - 1]["cursor"]
            c = await connect("erin", cursor=cur)
            want = db[total - back:]
            await until(lambda: len(g_events(c)) >= back, 30, interval=0.1)
            await asyncio.sleep(0.5 if back else 1.0)
            stream_ok("resumed %d events back" % back, g_events(c), want, fmt=EXACT)
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
    senders_r = [s for s in senders if session_pid(s) == running]
    acked2, errors2 = {}, []
    os.kill(stalled, signal.SIGSTOP)
    note("worker %d stopped (SIGSTOP)" % stalled)
    try:
        per = total // len(senders_r)
        await asyncio.wait_for(asyncio.gather(*[
            burst(s, "stall-%d" % n, per, acked2, errors2) for n, s in enumerate(senders_r)]), 120)
        is_(errors2, [], "worker %d alone stored %d more messages" % (running, per * len(senders_r)))
        db = db_messages(G, ("seq", "id"))
        total2 = len(db)
        is_(total2, first + per * len(senders_r), "%d messages stored in all" % total2)
        ok(total2 - first > 1024 * 2, "more than twice the ring went by the stalled worker")
        on_running = [(k, c) for k, c in live.items() if k[1] == running]
        await until(lambda: all(len(g_events(c)) >= total2 for _, c in on_running), 60,
                    interval=0.1)
        for (u, pid), c in on_running:
            stream_ok("%s on the running worker %d" % (u, pid), g_events(c), db, fmt=EXACT)
    finally:
        os.kill(stalled, signal.SIGCONT)
    note("worker %d continued (SIGCONT)" % stalled)
    on_stalled = [(k, c) for k, c in live.items() if k[1] == stalled]
    t0 = time.monotonic()
    await until(lambda: all(len(g_events(c)) >= total2 for _, c in on_stalled), 60, interval=0.1)
    note("the stalled worker's clients caught up in %.1f s" % (time.monotonic() - t0))
    await asyncio.sleep(1.0)
    for (u, pid), c in on_stalled:
        ok(not c.closed, "%s on the stalled worker: still connected (close code %r)" % (u, c.close_code))
        stream_ok("%s on the stalled worker %d (fell behind the ring)" % (u, pid), g_events(c), db,
                  fmt=EXACT)

    # and a late resume over all of it
    c = await connect("erin", cursor=cursor0)
    await until(lambda: len(g_events(c)) >= total2, 60, interval=0.1)
    await asyncio.sleep(0.5)
    stream_ok("erin resumed from before everything", g_events(c), db, fmt=EXACT)
    await c.close()

    for c in list(live.values()) + senders:
        await c.close()


loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
ng = Nginx(pg, workers=2, http="chat_bus_slots 1024;")
loop.run_until_complete(main(ng))
is_(ng.stop(), 0, "nginx quits cleanly")
done()
