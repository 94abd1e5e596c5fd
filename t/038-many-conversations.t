#!/usr/bin/python3
# A user in 5,000 conversations: the join, live delivery and a catch-up
# that spans hundreds of them (out of the ring and out of the store) are
# correct, and the workers keep answering everybody else meanwhile (the
# subscription lookups are a binary search, and the zone mutex is held for
# a bounded stretch).  Times are reported, not asserted (bench/ has goals).
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

N = 5000

pg = PgCluster()
ng_store = Nginx(pg, workers=2, http="chat_bus_slots 1024;\nchat_catchup_page 64;")
ng = Nginx(pg, workers=2)

t0 = time.monotonic()
pg.query("SELECT count(*) FROM (SELECT chat_create_conversation('busy', 'group', "
         "ARRAY['busy', 'pal'], 'room ' || i, NULL) FROM generate_series(1, %s) i) x", N)
convs = [str(r[0]) for r in pg.query(
    "SELECT c.id FROM chat_conversations c JOIN chat_members m ON m.conversation_id = c.id "
    "AND m.user_id = 'busy' ORDER BY c.id")]
is_(len(convs), N, "busy is a member of %d conversations" % N)
note("fixture: %.1f s" % (time.monotonic() - t0))

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


async def pinger(nginx, stop, rtts):
    """Another user pings on both workers while busy joins and resumes."""
    pids = nginx.worker_pids()
    cs = [await ws_connect_on("pinger", want_pid=p, nginx=nginx) for p in pids]
    stop["ready"] = True
    i = 0
    while stop["on"]:
        for c in cs:
            i += 1
            t = time.monotonic()
            await c.send({"type": "ping", "id": i})
            m = await c.wait_event(lambda m, i=i: m.get("type") == "pong" and m.get("id") == i,
                                   timeout=10)
            rtts.append(time.monotonic() - t if m else 10.0)
        await asyncio.sleep(0.01)
    for c in cs:
        await c.close()


async def case(nginx, label, k):
    stop = {"on": True}
    rtts = []
    task = asyncio.ensure_future(pinger(nginx, stop, rtts))
    # the pings must run the whole time: wait until they do
    await until(lambda: stop.get("ready") and len(rtts) >= 4, timeout=30)

    t = time.monotonic()
    c = await ws_connect_on("busy", nginx=nginx, timeout=30)
    joined = time.monotonic() - t
    ok(c.hello and c.hello["ok"], "%s: busy joined" % label)
    diag("%s: join of a user in %d conversations took %.1f ms" % (label, N, joined * 1000))

    pal = await ws_connect_on("pal", nginx=nginx)
    picks = [convs[0], convs[N // 2], convs[-1]]
    for j, cv in enumerate(picks):
        r = await pal.request("send", conversation_id=cv, client_msg_id="%s-live-%d" % (label, j),
                              body="live")
        ok(r and r["ok"], "%s: pal sends to conversation #%d" % (label, j))
    # (one database serves both nginx: the other's events may come too)
    mine = lambda c, tag: [e for e in conv_events(c, whole=True)  # noqa: E731
                           if e["event"]["message"]["client_msg_id"].startswith(label + tag)]
    await until(lambda: len(mine(c, "-live-")) >= 3, timeout=10)
    got = sorted(e["event"]["conversation_id"] for e in mine(c, "-live-"))
    is_(got, sorted(picks), "%s: busy gets the first, middle and last conversation's message live"
        % label)
    cursor = mine(c, "-live-")[-1]["cursor"]
    await c.close()

    # k messages over k conversations while busy is away, then a resume
    some = random.Random(7).sample(convs, k)
    acked = 0
    for j in range(0, k, 40):
        reps = await asyncio.gather(*[
            pal.request("send", conversation_id=cv, client_msg_id="%s-away-%d" % (label, j + i),
                        body="away %d" % (j + i), timeout=30)
            for i, cv in enumerate(some[j:j + 40])])
        acked += sum(1 for r in reps if r and r["ok"])
    is_(acked, k, "%s: %d sends acked while busy is away" % (label, k))
    want = [r[0] for r in pg.query(
        "SELECT m.id::text FROM chat_messages m JOIN chat_events e ON e.conversation_id = "
        "m.conversation_id AND e.kind = 'message.new' AND (coalesce(e.message_id::text, e.payload::jsonb -> 'message' ->> 'id')) "
        "= m.id::text WHERE m.sender = 'pal' AND m.client_msg_id LIKE %s ORDER BY e.gseq",
        "%s-away-%%" % label)]
    is_(len(want), k, "%s: %d messages stored in %d conversations" % (label, k, k))

    t = time.monotonic()
    c = await ws_connect_on("busy", nginx=nginx, cursor=cursor, timeout=30)
    await until(lambda: len(mine(c, "-away-")) >= k, timeout=60)
    took = time.monotonic() - t
    ids = [e["event"]["message"]["id"] for e in mine(c, "-away-")]
    is_(ids, want, "%s: the resume delivers all %d, each once, in commit order" % (label, k))
    diag("%s: resume over %d conversations took %.1f ms" % (label, k, took * 1000))
    await c.close()
    await pal.close()

    stop["on"] = False
    await task
    rtts.sort()
    ok(len(rtts) > 10, "%s: the other user kept pinging (%d pings)" % (label, len(rtts)))
    ok(rtts[-1] < 10.0, "%s: every ping answered" % label)
    diag("%s: ping round trips meanwhile: p50 %.1f ms, max %.1f ms"
         % (label, rtts[len(rtts) // 2] * 1000, rtts[-1] * 1000))


run(case(ng, "ring", 400))
run(case(ng_store, "store", 1500))
done()
