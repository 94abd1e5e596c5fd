#!/usr/bin/python3
# Sending: idempotency of (sender, client_msg_id) over WebSocket and REST
# (also concurrent duplicates from connections on both workers), conflict
# when a client_msg_id is reused for another conversation, forbidden for a
# non-member, not_found for an unknown conversation, the sender is always
# the token's user, and validation errors answer bad_request while the
# connection stays usable.
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403


# ------------------------------------------------------------- helpers ----

def rows(where, *args):
    return pg.query("SELECT count(*) FROM chat_messages WHERE " + where, *args)[0][0]


def nmsgs(conv):
    return rows("conversation_id = %s", int(conv))


def err_code(r):
    return (r or {}).get("error", {}).get("code") if r and not r.get("ok") else None


def mid(r):
    try:
        return r["result"]["message"]["id"], r["result"]["message"]["seq"]
    except (TypeError, KeyError):
        return None


async def reply_null_id(c, timeout=5):
    """The reply to a request the server could not read an id from."""
    ok_ = await until(lambda: None in c._replies, timeout)
    return c._replies.pop(None) if ok_ else None


def post_msg(conv, tok, body):
    return api("POST", "/chat/api/conversations/%s/messages" % conv, token=tok, json=body)


# --------------------------------------------------------------- setup ----

pg = PgCluster()
ng = Nginx(pg, workers=2)
pids = ng.worker_pids()

TA, TB, TC, TM = token("alice"), token("bob"), token("carol"), token("mallory")


D = rest_create_conv("alice", "direct", ["bob"])
D2 = rest_create_conv("alice", "direct", ["carol"])
G = rest_create_conv("alice", "group", ["bob", "carol"])


async def main():
    A = await ws_spread("alice", pids, per_worker=2)
    B = await ws_spread("bob", pids, per_worker=1)
    is_({session_pid(c) for c in A}, set(pids), "alice's 4 connections are on both workers")
    a0, a1 = A[0], A[-1]     # on different workers

    # ---- WebSocket: the same send twice ----
    r1 = await a0.request("send", conversation_id=D, client_msg_id="dup-1", body="hello")
    r2 = await a0.request("send", conversation_id=D, client_msg_id="dup-1", body="hello")
    r3 = await a1.request("send", conversation_id=D, client_msg_id="dup-1", body="changed")
    ok(r1 and r1.get("ok"), "first send ok")
    ok(r2 and r2.get("ok"), "the same send again is ok (a retry)")
    is_(mid(r2), mid(r1), "the retry's reply carries the same message id and seq")
    is_(mid(r3), mid(r1), "a retry from another connection on the other worker: same id and seq")
    is_((r3 or {}).get("result", {}).get("message", {}).get("body"), "hello",
        "a retry replies with the original message (original body)")
    is_(rows("sender = 'alice' AND client_msg_id = 'dup-1'"), 1, "DB: one row for (alice, dup-1)")
    is_(nmsgs(D), 1, "DB: the conversation holds one message")
    await until(lambda: all(len(conv_events(c, D)) >= 1 for c in B + A), 15)
    await asyncio.sleep(0.5)
    is_([len(conv_events(c, D, cmid="dup-1")) for c in B], [1] * len(B),
        "each of bob's connections got message.new once")
    is_([len(conv_events(c, D, cmid="dup-1")) for c in A], [1] * len(A),
        "each of alice's connections got message.new once")

    # the same client_msg_id of another sender is another message
    rb = await B[0].request("send", conversation_id=D, client_msg_id="dup-1", body="bob's")
    ok(rb and rb.get("ok") and mid(rb) != mid(r1) and mid(rb)[1] == 2,
       "bob may use the same client_msg_id: a new message, seq 2")
    is_(rb["result"]["message"]["sender"] if rb and rb.get("ok") else None, "bob",
        "... sent by bob")

    # ---- REST: 201 then 200 ----
    st1, _, b1 = post_msg(D, TA, {"client_msg_id": "rest-1", "body": "via rest"})
    st2, _, b2 = post_msg(D, TA, {"client_msg_id": "rest-1", "body": "via rest"})
    is_(st1, 201, "REST send: 201 Created")
    is_(st2, 200, "REST retry: 200")
    ok(isinstance(b1, dict) and isinstance(b2, dict) and b1.get("message")
       and b1["message"].get("id") == b2.get("message", {}).get("id")
       and b1["message"].get("seq") == b2["message"].get("seq"),
       "REST retry returns the same message id and seq")
    is_(rows("sender = 'alice' AND client_msg_id = 'rest-1'"), 1, "DB: one row for rest-1")
    r4 = await a1.request("send", conversation_id=D, client_msg_id="rest-1", body="via ws")
    is_(mid(r4), (b1["message"]["id"], b1["message"]["seq"]) if isinstance(b1, dict)
        and b1.get("message") else "?", "WS retry of a REST send: the same message")
    st3, _, b3 = post_msg(D, TA, {"client_msg_id": "dup-1", "body": "hello"})
    is_(st3, 200, "REST retry of a WS send: 200")
    is_((b3 or {}).get("message", {}).get("id") if isinstance(b3, dict) else None,
        mid(r1)[0] if mid(r1) else "?", "... with the WS message's id")
    is_(nmsgs(D), 3, "DB: 3 messages in the conversation")

    # ---- concurrent duplicates from connections on both workers ----
    before = nmsgs(G)
    res = await asyncio.gather(*[c.request("send", conversation_id=G,
                                           client_msg_id="cc-%d" % k, body="cc %d" % k,
                                           timeout=30)
                                 for k in range(20) for c in A])
    ok(all(r and r.get("ok") for r in res), "80 concurrent sends (20 ids x 4 connections) ok")
    same = all(len({mid(res[k * len(A) + j]) for j in range(len(A))}) == 1 for k in range(20))
    ok(same, "for each client_msg_id every connection got the same message id and seq")
    is_(pg.query("SELECT count(*), count(DISTINCT client_msg_id) FROM chat_messages "
                 "WHERE sender = 'alice' AND client_msg_id LIKE 'cc-%%'"),
        [(20, 20)], "DB: exactly one row per client_msg_id")
    is_(nmsgs(G) - before, 20, "DB: the conversation grew by 20")
    is_([r[0] for r in pg.query("SELECT seq FROM chat_messages WHERE conversation_id = %s "
                                "ORDER BY seq", int(G))],
        list(range(1, nmsgs(G) + 1)), "DB: seq gapless")

    # concurrent REST duplicates (and one WS copy) of the same id
    def rest_dup(k):
        return post_msg(G, TA, {"client_msg_id": "rc-%d" % k, "body": "rc %d" % k})
    jobs = []
    for k in range(10):
        for _ in range(3):
            jobs.append(asyncio.to_thread(rest_dup, k))
    wsjobs = [A[k % len(A)].request("send", conversation_id=G, client_msg_id="rc-%d" % k,
                                    body="rc %d" % k, timeout=30) for k in range(10)]
    out = await asyncio.gather(*(jobs + wsjobs))
    rest, wsr = out[:30], out[30:]
    good = True
    for k in range(10):
        group = rest[k * 3:(k + 1) * 3]
        sts = sorted(g[0] for g in group)
        ids = {(g[2].get("message", {}) or {}).get("id") if isinstance(g[2], dict) else None
               for g in group}
        wid = mid(wsr[k])
        ids.add(wid[0] if wid else None)
        if not (sts in ([200, 200, 200], [200, 200, 201]) and len(ids) == 1 and None not in ids):
            good = False
            diag("rc-%d: statuses %s ids %s" % (k, sts, ids))
    ok(good, "concurrent REST+WS duplicates: at most one 201, the rest 200, one message id")
    is_(pg.query("SELECT count(*), count(DISTINCT client_msg_id) FROM chat_messages "
                 "WHERE sender = 'alice' AND client_msg_id LIKE 'rc-%%'"),
        [(10, 10)], "DB: one row per REST client_msg_id")
    # every connection of every member saw each of those messages once
    want = ["cc-%d" % k for k in range(20)] + ["rc-%d" % k for k in range(10)]

    def seen_all():
        return all(len(conv_events(c, G, cmid=w)) >= 1 for c in A + B for w in want)
    ok(await until(seen_all, 20), "all members' connections got the 30 messages")
    await asyncio.sleep(0.5)
    counts = {(i, w): len(conv_events(c, G, cmid=w)) for i, c in enumerate(A + B) for w in want}
    is_(sorted(set(counts.values())), [1],
        "... each exactly once despite the duplicate sends")

    # ---- the lost ack: the connection dies right after the send, the
    # client retries on another connection (on the other worker) ----
    before = nmsgs(G)
    retr = []
    for k in range(15):
        v = await ws_connect(token=TA)
        await v.send({"type": "send", "id": 1, "conversation_id": G,
                      "client_msg_id": "lost-%d" % k, "body": "lost ack %d" % k})
        if k % 3:
            await asyncio.sleep(0.002 * k)
        v.ws.transport.abort()
        retr.append(A[k % len(A)].request("send", conversation_id=G,
                                          client_msg_id="lost-%d" % k,
                                          body="lost ack %d" % k, timeout=30))
        await v.wait_closed(5)
    res = await asyncio.gather(*retr)
    ok(all(r and r.get("ok") for r in res), "every retry after a lost ack is answered ok")
    is_(pg.query("SELECT count(*), count(DISTINCT client_msg_id) FROM chat_messages "
                 "WHERE sender = 'alice' AND client_msg_id LIKE 'lost-%%'"), [(15, 15)],
        "DB: exactly one row per client_msg_id")
    is_(sorted(mid(r) for r in res) == sorted(
        (str(i), s_) for i, s_ in pg.query(
            "SELECT id, seq FROM chat_messages WHERE client_msg_id LIKE 'lost-%%'")), True,
        "the retries' replies name the stored messages")
    is_(nmsgs(G) - before, 15, "DB: the conversation grew by 15")
    lost = ["lost-%d" % k for k in range(15)]
    ok(await until(lambda: all(len(conv_events(c, G, cmid=w)) >= 1
                               for c in A + B for w in lost), 20),
       "every member connection got the 15 messages")
    await asyncio.sleep(0.5)
    is_(sorted({len(conv_events(c, G, cmid=w)) for c in A + B for w in lost}), [1],
        "... each exactly once")

    # ---- conflict: the client_msg_id used for another conversation ----
    rc = await a0.request("send", conversation_id=D2, client_msg_id="dup-1", body="x")
    is_(err_code(rc), "conflict", "WS: client_msg_id reused for another conversation -> conflict")
    st, _, b = post_msg(D2, TA, {"client_msg_id": "rest-1", "body": "x"})
    is_(st, 409, "REST: reuse for another conversation -> 409")
    is_((b or {}).get("error", {}).get("code") if isinstance(b, dict) else None, "conflict",
        "REST: error code conflict")
    is_(nmsgs(D2), 0, "DB: nothing stored in the other conversation")

    # ---- a non-member ----
    Mc = await ws_connect(token=TM)
    rf = await Mc.request("send", conversation_id=D, client_msg_id="m-1", body="intrude")
    is_(err_code(rf), "forbidden", "WS: non-member send -> forbidden")
    st, _, b = post_msg(G, TM, {"client_msg_id": "m-2", "body": "intrude"})
    is_(st, 403, "REST: non-member send -> 403")
    is_((b or {}).get("error", {}).get("code") if isinstance(b, dict) else None, "forbidden",
        "REST: error code forbidden")
    is_(rows("sender = 'mallory'"), 0, "DB: nothing stored for the non-member")
    rf2 = await Mc.request("send", conversation_id=D, client_msg_id="m-1", body="again")
    is_(err_code(rf2), "forbidden", "WS: the non-member's retry is still forbidden")

    # ---- unknown conversation ----
    rn = await a0.request("send", conversation_id="987654321", client_msg_id="nf-1", body="x")
    is_(err_code(rn), "not_found", "WS: unknown conversation -> not_found")
    st, _, b = post_msg("987654321", TA, {"client_msg_id": "nf-2", "body": "x"})
    is_(st, 404, "REST: unknown conversation -> 404")
    is_((b or {}).get("error", {}).get("code") if isinstance(b, dict) else None, "not_found",
        "REST: error code not_found")
    is_(rows("client_msg_id LIKE 'nf-%%'"), 0, "DB: nothing stored")
    rn2 = await a0.request("send", conversation_id="987654321", client_msg_id="nf-1", body="x")
    is_(err_code(rn2), "not_found", "WS: the failed client_msg_id was not consumed")

    # ---- the sender is the token's user ----
    rs = await a0.request("send", conversation_id=D, client_msg_id="spoof-1", body="s",
                          sender="bob", seq=1000, created_at="1999-01-01T00:00:00.000Z")
    ok(rs and rs.get("ok"), "a send with a 'sender' field is accepted")
    is_((rs or {}).get("result", {}).get("message", {}).get("sender"), "alice",
        "reply: sender is the token's user")
    is_(pg.query("SELECT sender, seq FROM chat_messages WHERE client_msg_id = 'spoof-1'"),
        [("alice", nmsgs(D))], "DB: stored with sender alice (and the next seq)")
    ok(await until(lambda: conv_events(B[0], D, cmid="spoof-1"), 15), "bob got the event")
    ev = conv_events(B[0], D, cmid="spoof-1")
    is_(ev[0]["message"]["sender"] if ev else None, "alice", "event: sender alice")
    st, _, b = post_msg(D, TA, {"client_msg_id": "spoof-2", "body": "s", "sender": "bob"})
    is_(st, 201, "REST send with a 'sender' field: 201")
    is_(pg.query("SELECT sender FROM chat_messages WHERE client_msg_id = 'spoof-2'"),
        [("alice",)], "DB: REST stored sender alice")
    is_(rows("sender = 'bob' AND client_msg_id LIKE 'spoof%%'"), 0,
        "DB: nothing stored as bob")

    # ---- validation: bad_request, the connection stays usable ----
    n_before = pg.query("SELECT count(*) FROM chat_messages")[0][0]
    bad = [
        ("missing body", dict(conversation_id=D, client_msg_id="v-1")),
        ("null body", dict(conversation_id=D, client_msg_id="v-2", body=None)),
        ("numeric body", dict(conversation_id=D, client_msg_id="v-3", body=42)),
        ("missing conversation_id", dict(client_msg_id="v-4", body="x")),
        ("numeric conversation_id", dict(conversation_id=int(D), client_msg_id="v-5", body="x")),
        ("object conversation_id", dict(conversation_id={"id": D}, client_msg_id="v-6", body="x")),
        ("array conversation_id", dict(conversation_id=[D], client_msg_id="v-7", body="x")),
        ("boolean conversation_id", dict(conversation_id=True, client_msg_id="v-8", body="x")),
        ("non-numeric conversation_id", dict(conversation_id="abc", client_msg_id="v-9", body="x")),
        ("negative conversation_id", dict(conversation_id="-1", client_msg_id="v-10", body="x")),
        ("zero conversation_id", dict(conversation_id="0", client_msg_id="v-11", body="x")),
        ("missing client_msg_id", dict(conversation_id=D, body="x")),
        ("empty client_msg_id", dict(conversation_id=D, client_msg_id="", body="x")),
        ("numeric client_msg_id", dict(conversation_id=D, client_msg_id=12, body="x")),
        ("too long client_msg_id", dict(conversation_id=D, client_msg_id="c" * 129, body="x")),
        ("bad format value", dict(conversation_id=D, client_msg_id="v-12", body="x", format="html")),
        ("numeric format", dict(conversation_id=D, client_msg_id="v-13", body="x", format=1)),
        ("numeric reply_to", dict(conversation_id=D, client_msg_id="v-14", body="x",
                                  reply_to=int(mid(r1)[0]) if mid(r1) else 1)),
        ("attachments not an array", dict(conversation_id=D, client_msg_id="v-15", body="x",
                                          attachments="a")),
    ]
    for name, fields in bad:
        r = await a0.request("send", **fields)
        is_(err_code(r), "bad_request", "WS send with %s -> bad_request" % name)
    # reply_to a message of another conversation
    other = pg.query("SELECT id::text FROM chat_messages WHERE conversation_id = %s LIMIT 1",
                     int(G))[0][0]
    r = await a0.request("send", conversation_id=D, client_msg_id="v-16", body="x",
                         reply_to=other)
    is_(err_code(r), "bad_request", "WS send replying to another conversation's message "
        "-> bad_request")
    # not a request object at all
    await a0.send("{this is not json")
    r = await reply_null_id(a0)
    is_(err_code(r), "bad_request", "invalid JSON -> bad_request reply (id null)")
    await a0.send("[1,2,3]")
    r = await reply_null_id(a0)
    is_(err_code(r), "bad_request", "a JSON array -> bad_request reply")
    r = await a0.request("sned", conversation_id=D, client_msg_id="v-17", body="x")
    is_(err_code(r), "bad_request", "unknown request type -> bad_request")
    await a0.send(json.dumps({"id": 77, "conversation_id": D, "body": "x"}))
    r = await until(lambda: 77 in a0._replies, 5) and a0._replies.pop(77)
    is_(err_code(r or None), "bad_request", "a request without type -> bad_request")
    is_(pg.query("SELECT count(*) FROM chat_messages")[0][0], n_before,
        "DB: no invalid send stored anything")
    ok(not a0.closed, "the connection is still open after all of it")
    await a0.send({"type": "ping", "id": "p-1"})
    pong = await a0.wait_event(lambda m: m.get("type") == "pong", 5)
    is_((pong or {}).get("id"), "p-1", "ping -> pong on the same connection")
    r = await a0.request("send", conversation_id=D, client_msg_id="v-ok", body="still fine",
                         format="markdown")
    ok(r and r.get("ok") and r["result"]["message"]["format"] == "markdown",
       "a valid send (format markdown) after the errors works")

    # REST validation
    for name, body in (("missing body", {"client_msg_id": "rv-1"}),
                       ("numeric client_msg_id", {"client_msg_id": 5, "body": "x"}),
                       ("bad format", {"client_msg_id": "rv-2", "body": "x", "format": "html"}),
                       ("numeric body", {"client_msg_id": "rv-3", "body": 5})):
        st, _, b = post_msg(D, TA, body)
        is_(st, 400, "REST send with %s -> 400" % name)
    st, _, b = api("POST", "/chat/api/conversations/%s/messages" % D, token=TA,
                   body="{not json", headers={"Content-Type": "application/json"})
    is_(st, 400, "REST send with invalid JSON -> 400")
    is_(rows("client_msg_id LIKE 'rv-%%'"), 0, "DB: nothing stored by the bad REST sends")

    # ---- size limits (chat_max_message_size 64k: the frame is the limit) ----
    big = "b" * 60000
    r = await a1.request("send", conversation_id=D, client_msg_id="big-ok", body=big, timeout=20)
    ok(r and r.get("ok"), "a 60000-byte body fits")
    is_(pg.query("SELECT length(body) FROM chat_messages WHERE client_msg_id = 'big-ok'"),
        [(60000,)], "DB: stored whole")
    # REST takes the same bodies as WebSocket (PROTOCOL 6: "same body"; README:
    # chat_max_message_size is the REST body limit)
    for n in (30000, 60000):
        st, _, b = post_msg(D, TA, {"client_msg_id": "big-rest-%d" % n, "body": "r" * n})
        if not is_(st, 201, "REST: a %d-byte body (under chat_max_message_size 64k) is "
                   "stored: 201" % n):
            diag("  answer: %r" % (b,))
    is_(pg.query("SELECT length(body) FROM chat_messages WHERE client_msg_id LIKE "
                 "'big-rest-%%' ORDER BY 1"), [(30000,), (60000,)], "DB: stored whole")
    st, _, b = post_msg(D, TA, {"client_msg_id": "big-rest", "body": "r" * 70000})
    is_(st, 413, "REST: oversize body -> 413")
    is_((b or {}).get("error", {}).get("code") if isinstance(b, dict) else None, "too_large",
        "REST: error code too_large")
    victim = await ws_connect(token=TA)
    await victim.send(json.dumps({"type": "send", "id": 1, "conversation_id": D,
                                  "client_msg_id": "big-ws", "body": "w" * 70000}))
    cl = await victim.wait_closed(10)
    is_(cl and cl[0], 1009, "WS: a message over chat_max_message_size closes 1009 "
        "(PROTOCOL 4)")
    is_(rows("client_msg_id IN ('big-ws', 'big-rest')"), 0, "DB: oversize sends not stored")
    p = await a1.request("send", conversation_id=D, client_msg_id="after-big", body="ok")
    ok(p and p.get("ok"), "alice's other connections are unaffected")
    ok(not any(c.closed for c in A + B), "no other connection was closed")

    for c in A + B + [Mc]:
        await c.close()


asyncio.run(main())
done()
