#!/usr/bin/python3
# Two workers store into the same conversations at the same time while a
# transaction elsewhere in the database stays open the whole run, holding a
# transaction id (a delivery horizon that waits for the oldest running
# transaction would stall behind it; ours must not).  Positions come in
# small chunks here (chat_gseq_chunk 512), so the run crosses several.
#
#   - every send is acked, per-conversation seq is gapless 1..N, each
#     (sender, client_msg_id) stored once, event positions unique;
#   - every member connection on either worker receives every message once,
#     in seq order per conversation, with cursors strictly increasing and
#     equal to the event's position in the store;
#   - a member whose TCP connection is cut (no close frame) in the middle
#     resumes from its last cursor on the other worker and ends with every
#     message once: nothing lost, nothing twice at the seam;
#   - all of that while the other transaction is still open.
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

SENDERS = 4
PER_SENDER = 300
IN_FLIGHT = 8                   # sends pipelined per connection

pg = PgCluster()
ng = Nginx(pg, workers=2, http="chat_gseq_chunk 512;")

MEMBERS = ["w%d" % i for i in range(SENDERS)] + ["r0", "r1"]
CONVS = [db_create_conv("w0", MEMBERS, "G%d" % i) for i in range(3)]

# the long writer: an open transaction that wrote to another table
pg.query("CREATE TABLE elsewhere (x int)")
long_tx = pg.conn(autocommit=False)
with long_tx.cursor() as cur:
    cur.execute("INSERT INTO elsewhere VALUES (1)")
    cur.execute("SELECT pg_current_xact_id()::text")
    long_xid = cur.fetchone()[0]
note("transaction %s stays open elsewhere in the database" % long_xid)


def long_tx_open():
    return pg.query("SELECT count(*) FROM pg_stat_activity "
                    "WHERE backend_xid::text = %s AND state = 'idle in transaction'",
                    long_xid)[0][0] == 1


async def sender(c, i, acks):
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(k):
        async with sem:
            r = await c.request("send", timeout=30, conversation_id=CONVS[(i + k) % 3],
                                client_msg_id="w%d-%d" % (i, k), body="w%d says %d" % (i, k))
            acks.append(r)

    await asyncio.gather(*[one(k) for k in range(PER_SENDER)])


def check_stream(label, msgs):
    """Per conversation: every message once in seq order; cursors strictly
    increasing over the whole stream and equal to the store's positions."""
    evs = conv_events(msgs, whole=True)
    for conv in CONVS:
        stream_ok("%s, conversation %s" % (label, conv),
                  [e for e in evs if e["event"]["conversation_id"] == conv], db_messages(conv))
    gs = [gseq(e["cursor"]) for e in evs]
    ok(all(b > a for a, b in zip(gs, gs[1:])), "%s: cursors strictly increasing (%d)"
       % (label, len(gs)))
    store = dict((str(mid), g) for mid, g in pg.query(
        "SELECT message_id, gseq FROM chat_events WHERE kind = 'message.new'"))
    bad = [e for e in evs if store.get(e["event"]["message"]["id"]) != gseq(e["cursor"])]
    is_(len(bad), 0, "%s: every cursor is its event's position in the store" % label)


async def run():
    pids = ng.worker_pids()
    ok(len(pids) == 2, "two workers %r" % (pids,))
    senders = [await ws_connect_on("w%d" % i, want_pid=pids[i % 2]) for i in range(SENDERS)]
    live = [await ws_connect_on("r0", want_pid=p) for p in pids]
    cut = await ws_connect_on("r1", want_pid=pids[0])

    acks = []
    tasks = [asyncio.ensure_future(sender(c, i, acks)) for i, c in enumerate(senders)]

    # cut r1's TCP connection in the middle of the run, no close frame
    total = SENDERS * PER_SENDER
    await until(lambda: len(cut.events("message.new")) >= total // 3, timeout=60)
    first = list(cut.messages)
    last = conv_events(first, whole=True)[-1]["cursor"]
    cut.ws.transport.abort()
    await cut.wait_closed(5)
    note("r1 cut after %d events at %s" % (len(conv_events(first)), last))
    resumed = await ws_connect_on("r1", want_pid=pids[1], cursor=last)

    await asyncio.gather(*tasks)
    is_(sum(1 for a in acks if a and a.get("ok")), total, "all %d sends acked" % total)

    everyone = live + [resumed]
    got = await until(lambda: all(len(c.events("message.new")) >= total - (
        len(conv_events(first)) if c is resumed else 0) for c in everyone), timeout=60)
    ok(got, "every member connection received the stream")
    await asyncio.sleep(0.5)      # anything extra (a duplicate) would show now
    ok(long_tx_open(), "... while the transaction elsewhere is still open")

    for conv in CONVS:
        seqs = [r[0] for r in db_messages(conv)]
        is_(seqs, list(range(1, len(seqs) + 1)), "conversation %s: seq 1..%d without gaps"
            % (conv, len(seqs)))
    is_(pg.query("SELECT count(*), count(DISTINCT (sender, client_msg_id)) FROM chat_messages"),
        [(total, total)], "each send stored once")
    is_(pg.query("SELECT count(*) - count(DISTINCT gseq) FROM chat_events")[0][0], 0,
        "event positions are unique")

    for c, p in zip(live, pids):
        check_stream("r0 on worker %d" % p, c.messages)
    check_stream("r1 across the cut", first + resumed.messages)

    for c in senders + everyone:
        await c.close()


asyncio.run(run())
long_tx.rollback()
long_tx.close()

is_(ng.check_log(), [], "no alert, crit or emerg in error.log")
is_(ng.stop(), 0, "nginx quits cleanly")
done()
