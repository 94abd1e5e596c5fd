#!/usr/bin/python3
# Typing indicators (PROTOCOL 4: ephemeral `typing` events), two workers,
# chat_typing_timeout 3s:
#  1. a `typing start` reaches every other member's connections on both
#     workers exactly once -- never the typer's own connections (the one
#     that typed nor her other one), never a non-member; the event is
#     {kind, conversation_id, user, state} without a cursor; `stop` gives
#     one stop event, a `stop` while not typing gives none.
#  2. repeated starts are absorbed: 20 starts over 4 s (longer than the
#     timeout) give exactly one start event and no stop meanwhile (each
#     start refreshes the expiry); requests without "id" get no reply.
#  3. server expiry: a start without refresh is stopped by the server after
#     about the timeout (not before half of it, not much after it).
#  4. a committed message of the typer clears her typing state: a stop
#     reaches the others around the message.new, for a WebSocket send and
#     for a REST POST; a message while not typing gives no stop.
#  5. the connection that started typing closing (close handshake, or the
#     TCP connection aborted) stops it.
#  6. errors: typing by a non-member or into an unknown conversation is
#     `forbidden`, a bad state `bad_request`, an error to a request without
#     id is replied with id null; REST POST .../typing answers 204 (and the
#     events flow), 403 for a non-member, 400 for a bad state.
#  7. typing events carry no cursor and are not replayed to a client that
#     resumes with a cursor from before them (the message.new is).
#  8. a flood of 2000 pipelined typing frames from one client gives the
#     receivers at most a few events; the server keeps answering pings, the
#     flooder's own and another client's.
#
# Conversations are created with chat_create_conversation() before nginx
# starts (fixtures).
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

TIMEOUT = 3.0            # chat_typing_timeout
HALF = TIMEOUT / 2       # no expiry may come before this
LATE = TIMEOUT + 1.5     # the expiry's precision is about 1 s

pg = PgCluster()

G = db_create_conv("alice", ["alice", "bob", "carol"], "typing group")
F = db_create_conv("erin", ["erin", "alice"], "flood target")
M = db_create_conv("dave", ["dave", "mallory"], "dave's own")   # dave is a member elsewhere

ng = Nginx(pg, workers=2, http="chat_typing_timeout 3s;")

TA = token("alice")
TD = token("dave")


# ------------------------------------------------------------ helpers ----

def typing(c, conv=None, user=None, state=None, since=0, whole=False):
    """The typing events c received (from message index `since` on), of
    conversation conv / user / state when given."""
    out = []
    for m in conv_events(c.messages[since:], conv, kind="typing", whole=True):
        e = m["event"]
        if (user is None or e.get("user") == user) and (state is None or e.get("state") == state):
            out.append(m if whole else e)
    return out


def marks(clients):
    return {id(c): len(c.messages) for c in clients}


def counts(clients, mk, conv, user, state=None):
    return [len(typing(c, conv, user, state, since=mk[id(c)])) for c in clients]


async def arrivals(clients, pred, timeout):
    """When pred(c) first held for each client (time.monotonic()), polled
    every 20 ms for up to `timeout` s; None for a client it never held."""
    seen = {}
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        for i, c in enumerate(clients):
            if i not in seen and pred(c):
                seen[i] = now
        if len(seen) == len(clients) or now >= deadline:
            break
        await asyncio.sleep(0.02)
    return [seen.get(i) for i in range(len(clients))]


def code(r):
    return ((r or {}).get("error") or {}).get("code")


def empty_ok(r):
    return bool(r) and r.get("type") == "reply" and r.get("ok") is True and r.get("result") == {}


async def aapi(*a, **kw):
    """api() off the event loop (the clients keep reading meanwhile)."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: api(*a, **kw))


def has_fields(e, **want):
    return isinstance(e, dict) and all(e.get(k) == v for k, v in want.items())


async def main():
    pids = ng.worker_pids()
    is_(len(pids), 2, "nginx runs 2 workers")
    w1, w2 = pids

    a1 = await ws_join_on("alice", w1)
    a2 = await ws_join_on("alice", w2)
    b1 = await ws_join_on("bob", w1)
    b2 = await ws_join_on("bob", w2)
    c2 = await ws_join_on("carol", w2)
    d1 = await ws_join_on("dave", w1)
    d2 = await ws_join_on("dave", w2)
    recv = [b1, b2, c2]          # the other members of G, both workers
    own = [a1, a2]
    outsiders = [d1, d2]
    everyone = recv + own + outsiders

    # ---- 1. fan-out
    mk = marks(everyone)
    r = await a1.request("typing", conversation_id=G, state="start")
    ok(empty_ok(r), "typing start -> reply ok with result {} (%r)" % (r,))
    ok(await until(lambda: all(counts(recv, mk, G, "alice", "start")), 5),
       "the start reaches bob on both workers and carol")
    await asyncio.sleep(0.7)
    is_(counts(recv, mk, G, "alice", "start"), [1, 1, 1], "... exactly once on each connection")
    is_(counts(own, mk, None, None), [0, 0],
        "no typing event on alice's own connections (the typing one and her other one)")
    is_(counts(outsiders, mk, None, None), [0, 0], "no typing event to the non-member dave")
    ev = typing(b2, G, "alice", since=mk[id(b2)], whole=True)
    m0 = ev[0] if ev else {}
    ok(has_fields(m0.get("event"), kind="typing", conversation_id=G, user="alice", state="start"),
       "event is {kind: typing, conversation_id, user, state: start} (%r)" % (m0,))
    ok(m0.get("type") == "event" and "cursor" not in m0, "the typing event has no cursor")

    mk = marks(everyone)
    r = await a2.request("typing", conversation_id=G, state="stop")
    ok(empty_ok(r), "typing stop (from alice's other connection) -> ok {}")
    ok(await until(lambda: all(counts(recv, mk, G, "alice", "stop")), 5),
       "the stop reaches every other member's connection")
    r = await a1.request("typing", conversation_id=G, state="stop")
    ok(empty_ok(r), "a stop while not typing -> ok {}")
    await asyncio.sleep(0.7)
    is_(counts(recv, mk, G, "alice"), [1, 1, 1], "... one stop each; the stop while not typing gave none")
    is_(counts(own + outsiders, mk, None, None), [0, 0, 0, 0], "... none to alice or dave")

    # ---- 2. repeated starts are absorbed and refresh the expiry
    mk = marks(everyone)
    rmark = len(a1.received)
    with_id = 0
    bad_replies = []
    t_first = time.monotonic()
    for i in range(20):
        if i % 2:
            await a1.send({"type": "typing", "conversation_id": G, "state": "start"})
        else:
            r = await a1.request("typing", conversation_id=G, state="start")
            with_id += 1
            if not empty_ok(r):
                bad_replies.append(r)
        await asyncio.sleep(0.2)
    t_last = time.monotonic()
    note("20 starts over %.1f s" % (t_last - t_first))
    is_(bad_replies, [], "the 10 starts with an id got ok {}")
    replies = [m for m in a1.received[rmark:] if m.get("type") == "reply"]
    is_(len(replies), with_id, "the 10 starts without an id got no reply at all")
    is_(counts(recv, mk, G, "alice", "start"), [1, 1, 1],
        "20 starts within the timeout -> exactly one start event per connection")
    is_(counts(recv, mk, G, "alice", "stop"), [0, 0, 0],
        "no stop while the starts kept coming for longer than the timeout (each refreshed it)")
    t = await arrivals(recv, lambda c: typing(c, G, "alice", "stop", since=mk[id(c)]), LATE + 1)
    ok(all(t), "the server stopped it after the last start")
    if all(t):
        el = [x - t_last for x in t]
        ok(all(HALF <= x <= LATE for x in el),
           "... %.1f-%.1f s after the last start (timeout %.0f s)" % (min(el), max(el), TIMEOUT))

    # ---- 3. server expiry of a single start (carol types)
    others = [a1, a2, b1, b2]
    mk = marks(others + [c2])
    t0 = time.monotonic()
    r = await c2.request("typing", conversation_id=G, state="start")
    ok(empty_ok(r), "carol: start")
    ok(await until(lambda: all(counts(others, mk, G, "carol", "start")), 3),
       "carol's start reaches alice and bob on both workers")
    t = await arrivals(others, lambda c: typing(c, G, "carol", "stop", since=mk[id(c)]), LATE + 1)
    ok(all(t), "without refresh the server publishes carol's stop by itself")
    if all(t):
        el = [x - t0 for x in t]
        ok(all(HALF <= x <= LATE for x in el),
           "... %.1f-%.1f s after the start: not before half the timeout, not much after it"
           % (min(el), max(el)))
    is_(counts([c2], mk, None, "carol"), [0], "carol's own connection saw none of it")

    # ---- 4. a committed message clears the typer's state
    async def clear_on_message(label, cmid, send):
        mk = marks(everyone)
        r = await a1.request("typing", conversation_id=G, state="start")
        ts = await arrivals(recv, lambda c: typing(c, G, "alice", "start", since=mk[id(c)]), 3)
        ok(empty_ok(r) and all(ts), "%s: alice starts typing, the others see it" % label)
        t_start = time.monotonic()
        st = await send()
        ok(st, "%s: alice's message is stored" % label)

        def msg_new(c, whole=False):
            return conv_events(c.messages[mk[id(c)]:], G, cmid=cmid, whole=whole)

        tm, tstop = await asyncio.gather(
            arrivals(recv, msg_new, 5),
            arrivals(recv, lambda c: typing(c, G, "alice", "stop", since=mk[id(c)]), 5))
        ok(all(tm), "%s: the message.new reaches the others" % label)
        ok(all(tstop), "%s: a stop for alice reaches the others too" % label)
        if all(tm) and all(tstop):
            el = [s - t_start for s in tstop]
            ok(max(el) < HALF, "%s: ... %.2f s after the start, long before any expiry (%.1f s)"
               % (label, max(el), HALF))
            lag = [s - m for s, m in zip(tstop, tm)]
            ok(max(lag) <= 0.5, "%s: ... before or around the message.new (stop - message: "
               "at most %.2f s)" % (label, max(lag)))
            order = [("stop first" if c.messages.index(typing(c, G, "alice", "stop", since=mk[id(c)],
                                                             whole=True)[0])
                      < c.messages.index(msg_new(c, whole=True)[0]) else "message first")
                     for c in recv]
            note("%s: order at the receivers: %s" % (label, order))
        is_(counts(recv, mk, G, "alice", "stop"), [1, 1, 1], "%s: one stop each" % label)

    async def ws_send():
        r = await a2.request("send", conversation_id=G, client_msg_id="clear-ws-1", body="typed it")
        return bool(r and r.get("ok"))

    async def rest_send():
        st, _, _ = await aapi("POST", "/chat/api/conversations/%s/messages" % G, token=TA,
                              json={"client_msg_id": "clear-rest-1", "body": "typed it too"})
        return st in (200, 201)

    await clear_on_message("WebSocket send (from alice's other connection)", "clear-ws-1", ws_send)
    await clear_on_message("REST POST message", "clear-rest-1", rest_send)

    mk = marks(everyone)
    r = await a1.request("send", conversation_id=G, client_msg_id="no-typing-1", body="plain")
    ok(await until(lambda: all(conv_events(c.messages[mk[id(c)]:], G, cmid="no-typing-1")
                               for c in recv), 5), "a message while not typing is delivered")
    await asyncio.sleep(0.7)
    is_(counts(recv, mk, G, "alice"), [0, 0, 0], "... and gives no typing event")

    # ---- 5. the connection that started it closes
    for how in ("close handshake", "TCP abort"):
        a3 = await ws_join_on("alice", w2 if how == "close handshake" else w1)
        mk = marks(everyone)
        r = await a3.request("typing", conversation_id=G, state="start")
        ok(empty_ok(r) and await until(lambda: all(counts(recv, mk, G, "alice", "start")), 3),
           "%s: a third connection of alice starts typing" % how)
        t0 = time.monotonic()
        if how == "close handshake":
            await a3.close()
        else:
            a3.ws.transport.abort()
            await a3.wait_closed(5)
        t = await arrivals(recv, lambda c: typing(c, G, "alice", "stop", since=mk[id(c)]), LATE)
        ok(all(t) and max(t) - t0 < HALF,
           "%s: its close publishes the stop at once (%s s)"
           % (how, "%.2f" % (max(t) - t0) if all(t) else "missing"))
        await asyncio.sleep(0.3)
        is_(counts(recv, mk, G, "alice"), [2, 2, 2], "%s: one start and one stop, no more" % how)

    # ---- 6. errors, and REST
    mk = marks(everyone)
    r = await d1.request("typing", conversation_id=G, state="start")
    is_(code(r), "forbidden", "typing by a non-member -> forbidden")
    ok(r and r.get("ok") is False and isinstance((r.get("error") or {}).get("message"), str),
       "... an error reply with code and message")
    r = await d2.request("typing", conversation_id="999999999", state="start")
    is_(code(r), "forbidden", "typing into an unknown conversation -> forbidden")
    r = await a1.request("typing", conversation_id=G, state="maybe")
    is_(code(r), "bad_request", "state \"maybe\" -> bad_request")
    r = await a1.request("typing", conversation_id=G)
    is_(code(r), "bad_request", "no state -> bad_request")
    dm = len(d1.received)
    await d1.send({"type": "typing", "conversation_id": G, "state": "start"})
    ok(await until(lambda: any(m.get("type") == "reply" for m in d1.received[dm:]), 5),
       "an erroneous typing request without id is still replied")
    rr = [m for m in d1.received[dm:] if m.get("type") == "reply"][:1]
    ok(rr and "id" in rr[0] and rr[0]["id"] is None and code(rr[0]) == "forbidden",
       "... with id null and code forbidden (%r)" % (rr,))

    path = "/chat/api/conversations/%s/typing" % G
    st, _, b = await aapi("POST", path, token=TA, json={"state": "start"})
    is_(st, 204, "REST typing start -> 204")
    ok(await until(lambda: all(counts(recv, mk, G, "alice", "start")), 3),
       "... the others get alice's start")
    st, _, b = await aapi("POST", path, token=TA, json={"state": "stop"})
    is_(st, 204, "REST typing stop -> 204")
    ok(await until(lambda: all(counts(recv, mk, G, "alice", "stop")), 3),
       "... the others get alice's stop")
    st, _, b = await aapi("POST", path, token=TD, json={"state": "start"})
    is_(st, 403, "REST typing by a non-member -> 403")
    is_(code(b), "forbidden", "... code forbidden")
    st, _, b = await aapi("POST", path, token=TA, json={"state": "sideways"})
    is_(st, 400, "REST typing with a bad state -> 400")
    is_(code(b), "bad_request", "... code bad_request")
    await asyncio.sleep(0.5)
    is_(counts(recv, mk, G, "alice"), [2, 2, 2], "REST: exactly one start and one stop")
    is_(counts(recv, mk, G, "dave"), [0, 0, 0], "dave's refused typing reached nobody")
    is_(counts(own, mk, None, None), [0, 0], "alice's connections got nothing of her REST typing")

    # ---- 7. no cursor, never replayed
    b3 = await ws_join_on("bob", w2)
    cur0 = b3.hello["result"]["cursor"]
    r = await a1.request("typing", conversation_id=G, state="start")
    ok(await until(lambda: typing(b3, G, "alice", "start"), 3), "a new connection of bob sees a start")
    r = await a1.request("send", conversation_id=G, client_msg_id="replay-1", body="replayed")
    ok(await until(lambda: conv_events(b3, G, cmid="replay-1") and typing(b3, G, "alice", "stop"), 5),
       "... then the message and the stop")
    await b3.close()
    b4 = await ws_join_on("bob", w1, cursor=cur0)
    ok(await until(lambda: conv_events(b4, G, cmid="replay-1"), 5),
       "bob resuming from the cursor before them gets the message.new replayed")
    await asyncio.sleep(0.7)
    is_(typing(b4), [], "... and no typing event")

    # ---- 8. a flood of pipelined typing frames
    e1 = await ws_join_on("erin", w1)
    e2 = await ws_join_on("erin", w2)
    probe = await ws_join_on("carol", w1)
    loop = asyncio.get_running_loop()

    def flood():
        ws = RawWS(ng, timeout=15)
        h = ws.request("hello", token=TA)
        out = {"hello": h, "pong": None, "other": []}
        if not (h and h.get("ok")):
            return out
        frame = RawWS.frame(0x1, json.dumps({"type": "typing", "conversation_id": F, "state": "start"}))
        out["t0"] = time.monotonic()
        ws.sendall(frame * 2000)
        ws.send_json({"type": "ping", "id": "after-flood"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = ws.recv_json(max(0.01, deadline - time.monotonic()))
            if m is None:
                break
            if m.get("type") == "pong" and m.get("id") == "after-flood":
                out["pong"] = time.monotonic()
                break
            out["other"].append(m)
        ws.close()
        return out

    mk = marks([e1, e2])
    fl = loop.run_in_executor(None, flood)
    worst = 0.0
    probes = 0
    while not fl.done():
        t0 = time.monotonic()
        p = await ws_ping(probe, timeout=5)
        probes += 1
        worst = max(worst, time.monotonic() - t0) if p else 99.0
        await asyncio.sleep(0.05)
    out = await fl
    ok(out["hello"] and out["hello"].get("ok"), "flooder (alice, raw socket) joined")
    ok(out["pong"] is not None, "the flooder's ping after 2000 pipelined typing frames is answered "
       "(%.2f s after the flood went out)" % ((out["pong"] or 0) - out.get("t0", 0)))
    ok(worst < 2.0, "another client's pings were answered meanwhile (%d pings, slowest %.2f s)"
       % (probes, worst))
    replies = [m for m in out["other"] if m.get("type") == "reply"]
    note("flooder got %d replies and %d other messages before its pong"
         % (len(replies), len(out["other"]) - len(replies)))
    await asyncio.sleep(1.0)
    n = [len(typing(c, F, "alice", since=mk[id(c)])) for c in (e1, e2)]
    ok(all(1 <= x <= 3 for x in n), "the receivers on both workers got at most a few typing events "
       "for the 2000 frames (%r)" % (n,))
    is_([len(typing(c, F, "alice", "start", since=mk[id(c)])) for c in (e1, e2)], [1, 1],
        "... one start each")
    p = await ws_ping(e1, timeout=5)
    ok(p is not None, "a receiver's ping is answered after the flood")

    # ---- whole file
    allc = everyone + [b4, e1, e2, probe]
    bad = [m for c in allc for m in typing(c, whole=True)
           if m.get("type") != "event" or "cursor" in m
           or not {"kind", "conversation_id", "user", "state"} <= set(m["event"])
           or m["event"]["state"] not in ("start", "stop")]
    is_(bad[:3], [], "every typing event received is {type: event, event: {kind, conversation_id, "
        "user, state}} without a cursor")
    is_(sum(len(typing(c, user="alice")) for c in allc if c.hello["result"]["user"]["id"] == "alice"),
        0, "alice's own connections never got a typing event of hers")
    is_(sum(len(typing(c)) for c in outsiders), 0, "dave never got a typing event")

    for c in allc:
        await c.close()


asyncio.run(main())
done()
