#!/usr/bin/python3
# The ephemeral channel is lossy by design and cannot hurt durable
# delivery (PROTOCOL §9, "When the ephemeral channel is full"): with
# chat_live_slots 16 and 2 workers,
#  1. a client typing in 60 conversations in one pipelined write (far more
#     records than the ring holds before the other worker reads) costs the
#     receiver on the other worker at most one start per conversation (some
#     may be lost), and the flooding connection's own typing states are
#     capped (it holds 8 at most: older ones are stopped);
#  2. messages sent right after, in every conversation, arrive exactly once
#     and in seq order on the other worker;
#  3. presence still works afterwards (a new contact's online reaches the
#     receiver), and the server stays responsive.
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
N = 60
CONVS = [db_create_conv("alice", ["alice", "bob"], "c%d" % i) for i in range(N)]
DAVE = db_create_conv("dave", ["dave", "bob"], "d")

ng = Nginx(pg, workers=2, http="chat_live_slots 16; chat_typing_timeout 30s;")


def kind(m, k):
    return m.get("type") == "event" and m.get("event", {}).get("kind") == k


async def main():
    pids = ng.worker_pids()
    bob = await ws_join_on("bob", pids[0], nginx=ng)
    alice = await ws_join_on("alice", pids[1], nginx=ng)
    await asyncio.sleep(0.5)

    # 1. one write with 60 typing starts
    frames = [json.dumps({"type": "typing", "conversation_id": c, "state": "start"})
              for c in CONVS]
    for f in frames:
        await alice.ws.send(f)
    await asyncio.sleep(1.5)

    starts = [m["event"]["conversation_id"] for m in bob.messages
              if kind(m, "typing") and m["event"]["state"] == "start"]
    stops = [m["event"]["conversation_id"] for m in bob.messages
             if kind(m, "typing") and m["event"]["state"] == "stop"]
    ok(len(starts) == len(set(starts)) and set(starts) <= set(CONVS),
       "typing flood: at most one start per conversation at the receiver "
       "(%d starts of %d, %d stops)" % (len(starts), N, len(stops)))
    live = pg.psql("SELECT 1")  # the store is fine
    is_(live, [["1"]], "the store answers")

    # the flooder holds at most 8 typing states: closing it stops at most 8
    before = len(bob.messages)
    await alice.close()
    await asyncio.sleep(1.5)
    closed_stops = [m for m in bob.messages[before:] if kind(m, "typing")
                    and m["event"]["state"] == "stop"]
    ok(len(closed_stops) <= 8,
       "closing the flooder stops at most the 8 typing states it holds (%d)"
       % len(closed_stops))

    # 2. messages in every conversation, exactly once, in order
    alice = await ws_join_on("alice", pids[1], nginx=ng)
    for i, c in enumerate(CONVS):
        r = await alice.request("send", conversation_id=c, client_msg_id="m-%d" % i,
                                body="after the flood %d" % i)
        if not (r and r.get("ok")):
            diag("send %d: %r" % (i, r))
    await until(lambda: len([m for m in bob.messages if kind(m, "message.new")]) >= N,
                timeout=10)
    got = [(m["event"]["conversation_id"], m["event"]["seq"]) for m in bob.messages
           if kind(m, "message.new")]
    is_(sorted(got), sorted((c, 1) for c in CONVS),
        "every message after the flood reached bob once")

    # 3. presence still flows
    before = len(bob.messages)
    dave = await ws_join_on("dave", pids[1], nginx=ng)
    ok(await until(lambda: any(kind(m, "presence") and m["event"]["user"] == "dave"
                               for m in bob.messages[before:]), timeout=5),
       "a contact's online still reaches bob after the flood")
    pong = await ws_ping(bob)
    ok(pong is not None, "bob's connection answers pings")
    await dave.close()
    await alice.close()
    await bob.close()

asyncio.run(main())
done()
