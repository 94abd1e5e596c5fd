#!/usr/bin/python3
# A send whose batch is slow inside PostgreSQL does not hold up the sends
# queued behind it in the same worker.  At low rates a worker keeps one
# send batch in flight (tiny concurrent batches only compete for the CPU);
# here alice's batch blocks on purpose -- a test transaction holds an
# uncommitted row with her (sender, client_msg_id) in another conversation,
# so the batch waits in the unique index for that transaction -- and while
# it waits, bob's sends to another conversation are acked, stored and
# delivered.  When the test transaction rolls back, alice's send is stored
# once and acked.
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
ng = Nginx(pg, workers=1)       # one worker: one store, one send queue

rows = pg.query(
    "SELECT o_conv FROM chat_create_conversation('alice', 'direct', "
    "ARRAY['alice', 'carol'], NULL, NULL) "
    "UNION ALL SELECT o_conv FROM chat_create_conversation('bob', 'direct', "
    "ARRAY['bob', 'dave'], NULL, NULL) "
    "UNION ALL SELECT o_conv FROM chat_create_conversation('alice', 'direct', "
    "ARRAY['alice', 'erin'], NULL, NULL)")
conv_a, conv_b, conv_x = (str(r[0]) for r in rows)

# the test's transaction: an uncommitted row with alice's client_msg_id
held = pg.conn(autocommit=False)
with held.cursor() as cur:
    cur.execute("INSERT INTO chat_messages (conversation_id, seq, sender, "
                "client_msg_id, body) VALUES (%s, 1, 'alice', "
                "'held-1', 'not stored')", (int(conv_x),))


async def run():
    alice = await ws_connect(token=token("alice"))
    bob = await ws_connect(token=token("bob"))
    dave = await ws_connect(token=token("dave"))
    ok(all(c.hello and c.hello.get("ok") for c in (alice, bob, dave)),
       "alice, bob and dave are connected")

    a_send = asyncio.ensure_future(alice.request(
        "send", timeout=30, conversation_id=conv_a, client_msg_id="held-1",
        body="from alice"))

    # wait until alice's batch is inside PostgreSQL, waiting for the lock
    waiting = await until(lambda: pg.query(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE '%chat_send_stage%'")
        [0][0] == 1, timeout=10)
    ok(waiting, "alice's batch waits in PostgreSQL for the test transaction")
    if not waiting:
        diag(pg.query("SELECT state, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity WHERE backend_type = 'client backend'"))

    acks = []
    for i in range(20):
        acks.append(await bob.request("send", timeout=10,
                                      conversation_id=conv_b,
                                      client_msg_id="b-%d" % i,
                                      body="bob %d" % i))
    is_(sum(1 for a in acks if a and a.get("ok")), 20,
        "bob's 20 sends, one after the other, are acked meanwhile")
    ok(not a_send.done(), "... while alice's send still waits")

    got = await until(lambda: len(dave.events("message.new")) >= 20,
                      timeout=10)
    ok(got, "dave received bob's 20 messages meanwhile")
    is_([e["event"]["message"]["body"] for e in dave.events("message.new")],
        ["bob %d" % i for i in range(20)], "... in order")
    is_(pg.query("SELECT count(*) FROM chat_messages WHERE conversation_id = %s",
                 int(conv_b))[0][0], 20, "bob's 20 messages are stored")

    held.rollback()
    r = await a_send
    ok(r and r.get("ok"), "after the rollback alice's send is acked (%r)" % (r,))
    is_(pg.query("SELECT body, seq FROM chat_messages WHERE sender = 'alice' "
                 "AND client_msg_id = 'held-1'"), [("from alice", 1)],
        "alice's message is stored once, as seq 1")

    for c in (alice, bob, dave):
        await c.close()


asyncio.run(run())
held.close()

is_(ng.check_log(), [], "no alert, crit or emerg in error.log")
is_(ng.stop(), 0, "nginx quits cleanly")
done()
