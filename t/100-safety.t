#!/usr/bin/python3
# Safety and the service API (schema 8), two workers:
#  1. Blocks: POST/GET/DELETE /blocks.  A blocked user cannot send in the
#     direct conversation with the blocker (WebSocket and REST: "blocked"),
#     nor open one; the blocker still can.  In a group nothing is refused.
#     The blocker's outbox gets nothing of the blocked user's (a mention),
#     and still gets another member's.  Unblocking lets the sends through.
#  2. Reports: a member reports a message with a snapshot of it and of the
#     messages around it, kept after the sender deletes it; once per user
#     and message; non-members and bad input refused.  A service token
#     lists them (by status, paged) and resolves them; users get 403.
#  3. The service API: a gig conversation made for users; system messages
#     (format "system", under the service's subject, not a member) reach
#     the members live and are stored once per client_msg_id; users cannot
#     send format "system".  Archiving is a service token's: members get
#     conversation.updated, every send, edit and reaction is refused
#     ("archived") on every transport that sends, history stays readable;
#     unarchived, sends pass again.  Every service endpoint refuses users.
#  4. Erasing a user: their bodies, old edits and report snapshots are
#     gone from the whole database (pg_dump), their reactions and
#     memberships too; the others' history shows tombstones; the erased
#     user's open connections are closed (1008) on every worker, and its
#     old token can no longer send.
import asyncio
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob", "carol"], "gig team")
D = db_create_conv("alice", ["alice", "bob"], None, kind="direct")
ng = Nginx(pg, workers=2, http="chat_notify_delay 200ms;")
SVC = token("platform", role="service")


def rest(method, path, user=None, tok=None, **kw):
    return api(method, "/chat/api" + path, token=tok or token(user), **kw)


def post(user, conv, cmid, body, tok=None, **kw):
    return rest("POST", "/conversations/%s/messages" % conv, user, tok,
                json=dict(client_msg_id=cmid, body=body, **kw))


def err(b):
    return b.get("error", {}).get("code") if isinstance(b, dict) else None


async def main():
    P = ng.worker_pids()
    a = await ws_connect_on("alice", P[0])
    b = await ws_connect_on("bob", P[1])

    # ---- 1. blocks
    st, _, body = rest("POST", "/blocks", "bob", json={"user": "alice"})
    is_(st, 200, "block: 200")
    is_([x["user"] for x in body["blocks"]], ["alice"], "block: the list names alice")
    st, _, body = rest("POST", "/blocks", "bob", json={"user": "alice"})
    is_((st, len(body["blocks"])), (200, 1), "block again: the same one block")
    st, _, body = rest("GET", "/blocks", "bob")
    is_([x["user"] for x in body["blocks"]], ["alice"], "GET /blocks")
    st, _, body = rest("GET", "/blocks", "alice")
    is_(body["blocks"], [], "the blocked user's own list is empty")
    is_(rest("POST", "/blocks", "bob", json={"user": "bob"})[0], 400, "blocking oneself: 400")
    is_(rest("POST", "/blocks", "bob", json={"user": 5})[0], 400, "a user that is not a string: 400")
    is_(rest("POST", "/blocks", "bob", json={"user": "x" * 300})[0], 400, "an overlong user id: 400")
    is_(rest("PUT", "/blocks", "bob", json={"user": "x"})[0], 405, "PUT /blocks: 405")
    codes = [rest("POST", "/blocks", "zed", json={"user": "u%d" % i})[0] for i in range(300)]
    is_((codes[:256].count(200), codes[256:].count(409)), (256, 44),
        "a user blocks at most 256: the rest, far past it, get 409 limit")
    is_(pg.query("SELECT count(*) FROM chat_blocks WHERE blocker = 'zed'")[0][0], 256, "256 stored")
    is_(rest("POST", "/blocks", "zed", json={"user": "u5"})[0], 200, "blocking one of them again still answers")

    r = await a.request("send", conversation_id=D, client_msg_id="blk-ws", body="hi bob")
    is_(err(r), "blocked", "the blocked user's WebSocket send in the direct conversation: blocked")
    st, _, body = post("alice", D, "blk-rest", "hi bob")
    is_((st, err(body)), (403, "blocked"), "... and its REST send: 403 blocked")
    is_(pg.query("SELECT count(*) FROM chat_messages WHERE conversation_id = %s", D)[0][0], 0,
        "nothing of them is stored")
    r = await b.request("send", conversation_id=D, client_msg_id="blk-bob", body="I still can")
    ok(r and r.get("ok"), "the blocker still sends in it")
    mb = r["result"]["message"]["id"]
    r = await a.request("react", message_id=mb, emoji="👍")
    is_(err(r), "blocked", "the blocked user reacting in it: blocked")
    r = await a.request("unreact", message_id=mb, emoji="👍")
    ok(r and r.get("ok"), "(unreacting is not refused)")

    st, _, body = rest("POST", "/conversations", "alice", json={"kind": "direct", "members": ["bob"]})
    is_((st, err(body)), (403, "blocked"), "the blocked user opening a direct conversation: 403 blocked")
    rest("POST", "/blocks", "carol", json={"user": "dave"})
    st, _, body = rest("POST", "/conversations", "dave", json={"kind": "direct", "members": ["carol"]})
    is_((st, err(body)), (403, "blocked"), "... a new one: 403 blocked")
    is_(pg.query("SELECT count(*) FROM chat_conversations WHERE direct_key = 'carol dave'")[0][0], 0,
        "and it is not made")
    st, _, body = rest("POST", "/conversations", "carol", json={"kind": "direct", "members": ["dave"]})
    ok(st in (200, 201) and body["conversation"]["kind"] == "direct", "the blocker opens one with the blocked user")

    # a group takes everything; the blocker's outbox gets nothing of the blocked user's
    r = await a.request("send", conversation_id=G, client_msg_id="grp-1", body="@bob look", mentions=["bob"])
    ok(r and r.get("ok"), "in a group the blocked user's send is stored")
    ev = await b.wait_event(lambda m: (m.get("event") or {}).get("message", {}).get("client_msg_id") == "grp-1")
    ok(ev is not None, "... and delivered to the blocker (its client may hide it)")
    c = await ws_connect_on("carol", P[0])
    r = await c.request("send", conversation_id=G, client_msg_id="grp-2", body="@bob too", mentions=["bob"])
    mid2 = r["result"]["message"]["id"]
    got = wait_for(lambda: pg.query("SELECT message_id::text FROM chat_notifications WHERE user_id = 'bob'"),
                   timeout=20)
    is_([x[0] for x in got], [mid2], "the blocker's outbox: carol's mention only, not the blocked user's")

    # typing and presence of the blocked user do not reach the blocker (bob
    # was connected before the block, on the other worker; carol sees them)
    def typing_of(m, who):
        e = m.get("event") or {}
        return e.get("kind") == "typing" and e.get("user") == who and e.get("state") == "start"

    def presence_of(m, who, status):
        e = m.get("event") or {}
        return e.get("kind") == "presence" and e.get("user") == who and e.get("status") == status

    await a.request("typing", conversation_id=G, state="start")
    ok(await c.wait_event(lambda m: typing_of(m, "alice"), timeout=5), "carol sees the blocked user typing")
    ok(not await b.wait_event(lambda m: typing_of(m, "alice"), timeout=1), "the blocker does not")
    await a.request("presence", status="away")
    ok(await c.wait_event(lambda m: presence_of(m, "alice", "away"), timeout=5), "carol sees her presence")
    ok(not await b.wait_event(lambda m: presence_of(m, "alice", "away"), timeout=1), "the blocker does not")
    await a.request("typing", conversation_id=G, state="stop")
    r = await b.request("presence_sub", users=["alice", "carol"])
    is_(sorted(p["user"] for p in (r.get("result") or {}).get("presence", [])), ["carol"],
        "presence_sub: the blocker's snapshot leaves the blocked user out")
    st, _, body = rest("GET", "/presence?users=alice,carol", "bob")
    is_((st, [p["user"] for p in body.get("presence", [])]), (200, ["carol"]),
        "GET /presence: the blocker is not told about the blocked user")
    st, _, body = rest("GET", "/presence?users=alice,carol", "carol")
    is_([p["user"] for p in body.get("presence", [])], ["alice", "carol"], "(others are)")
    b2 = await ws_connect_on("bob", P[0])
    await a.request("typing", conversation_id=G, state="start")
    ok(await c.wait_event(lambda m: typing_of(m, "alice"), timeout=5), "(typing again)")
    ok(not await b2.wait_event(lambda m: typing_of(m, "alice"), timeout=1),
       "a connection of the blocker made after the block does not see it either")
    await a.request("typing", conversation_id=G, state="stop")
    await a.request("presence", status="online")

    st, _, body = rest("DELETE", "/blocks/alice", "bob")
    is_((st, body["blocks"]), (200, []), "DELETE /blocks/alice: the list is empty")
    await asyncio.sleep(0.3)
    await a.request("typing", conversation_id=G, state="start")
    ok(await b.wait_event(lambda m: typing_of(m, "alice"), timeout=5)
       and await b2.wait_event(lambda m: typing_of(m, "alice"), timeout=5),
       "unblocked: both of the blocker's connections see her typing again")
    await a.request("typing", conversation_id=G, state="stop")
    await b2.close()
    r = await a.request("send", conversation_id=D, client_msg_id="blk-ws-2", body="hi again")
    ok(r and r.get("ok"), "unblocked: the send passes")

    # ---- 2. reports
    ids = []
    for i in range(5):
        r = await a.request("send", conversation_id=G, client_msg_id="rep-%d" % i, body="report-ctx-%d" % i)
        ids.append(r["result"]["message"]["id"])
    st, _, body = rest("POST", "/reports", "bob", json={"message_id": ids[2], "reason": "harassment",
                                                       "note": "<b>rude</b>"})
    is_(st, 201, "a member reports a message: 201")
    rep = body["report"]
    is_((rep["message_id"], rep["reporter"], rep["sender"], rep["reason"], rep["status"], rep["note"]),
        (ids[2], "bob", "alice", "harassment", "open", "<b>rude</b>"), "the report's fields")
    is_(rep["snapshot"]["message"]["body"], "report-ctx-2", "its snapshot has the message")
    is_([m["body"] for m in rep["snapshot"]["context"]][-4:],
        ["report-ctx-0", "report-ctx-1", "report-ctx-3", "report-ctx-4"],
        "and the messages around it, in order")
    ok(len(rep["snapshot"]["context"]) <= 6, "at most 3 on each side")
    st, _, body = rest("POST", "/reports", "bob", json={"message_id": ids[2], "reason": "spam"})
    is_((st, body["report"]["id"], body["report"]["status"]), (200, rep["id"], "open"),
        "reporting it again: the same report")
    ok("snapshot" not in body["report"] and "resolution" not in body["report"],
       "... by its id and status only (no snapshot, no resolution)")
    is_(rest("POST", "/reports", "dave", json={"message_id": ids[2], "reason": "spam"})[0], 404,
        "a non-member reports: 404")
    is_(rest("POST", "/reports", "bob", json={"message_id": ids[1], "reason": "meh"})[0], 400, "a bad reason: 400")
    is_(rest("POST", "/reports", "bob", json={"message_id": ids[1], "reason": "spam", "note": "n" * 2001})[0],
        400, "a note over 2000 bytes: 400")
    is_(rest("POST", "/reports", "bob", json={"message_id": "x", "reason": "spam"})[0], 400, "a bad id: 400")
    st, _, _ = rest("DELETE", "/messages/%s" % ids[2], "alice")
    is_(st, 200, "the sender deletes the reported message")
    st, _, body = rest("GET", "/reports?status=open", tok=SVC)
    mine = [x for x in body["reports"] if x["id"] == rep["id"]]
    is_(len(mine), 1, "the service lists the open report")
    is_(mine[0]["snapshot"]["message"]["body"], "report-ctx-2", "... its snapshot outlives the delete")
    rest("POST", "/reports", "carol", json={"message_id": ids[3], "reason": "spam"})
    st, _, body = rest("GET", "/reports?limit=1", tok=SVC)
    is_((st, len(body["reports"])), (200, 1), "limit=1: one report")
    st, _, body2 = rest("GET", "/reports?limit=1&after=%s" % body["next"], tok=SVC)
    ok(body2["reports"] and int(body2["reports"][0]["id"]) > int(body["reports"][0]["id"]),
       "after=next: the following page")
    is_(rest("GET", "/reports?status=bogus", tok=SVC)[0], 400, "a bad status filter: 400")
    st, _, body = rest("PATCH", "/reports/%s" % rep["id"], tok=SVC,
                       json={"status": "resolved", "resolution": "warned the sender"})
    is_((st, body["report"]["status"], body["report"]["resolution"], body["report"]["resolved_by"]),
        (200, "resolved", "warned the sender", "platform"), "the service resolves it")
    st, _, body = rest("GET", "/reports?status=open", tok=SVC)
    ok(rep["id"] not in [x["id"] for x in body["reports"]], "it is no longer open")
    is_(rest("PATCH", "/reports/999999", tok=SVC, json={"status": "resolved"})[0], 404, "an unknown report: 404")
    is_(rest("PATCH", "/reports/%s" % rep["id"], tok=SVC, json={"status": "done"})[0], 400, "a bad status: 400")

    # ---- 3. the service API
    st, _, body = rest("POST", "/conversations", tok=SVC,
                       json={"kind": "group", "title": "Gig 77", "members": ["alice", "bob"],
                             "context": {"gig_id": "77"}})
    ok(st in (200, 201), "the service makes a gig conversation")
    S = body["conversation"]["id"]
    is_((body["conversation"]["context"], body["conversation"]["members"], body["conversation"]["archived"]),
        ({"gig_id": "77"}, ["alice", "bob"], False), "with its context and members, not archived")
    await a.wait_event(lambda m: (m.get("event") or {}).get("conversation_id") == S)
    st, _, body = post(None, S, "sys-1", "Contract started", tok=SVC)
    is_(st, 201, "the service posts a system message")
    msg = body["message"]
    is_((msg["format"], msg["sender"]), ("system", "platform"), "format system, under the service's subject")
    ev = await a.wait_event(lambda m: (m.get("event") or {}).get("message", {}).get("client_msg_id") == "sys-1")
    ok(ev and ev["event"]["message"]["format"] == "system", "a member gets it live")
    st, _, body = post(None, S, "sys-1", "Contract started", tok=SVC)
    is_((st, body["message"]["id"]), (200, msg["id"]), "the same client_msg_id again: the same message")
    is_(post(None, S, "sys-2", "x", tok=SVC, format="text")[0], 400, "the service posting format text: 400")
    r = await a.request("send", conversation_id=S, client_msg_id="fake-sys", body="I am system", format="system")
    is_(err(r), "bad_request", "a user sending format system over the WebSocket: bad_request")
    is_(post("alice", S, "fake-sys-2", "x", format="system")[0], 400, "... over REST: 400")

    st, _, body = rest("PATCH", "/conversations/%s" % S, "alice", json={"archived": True})
    is_((st, err(body)), (403, "forbidden"), "a user archiving: 403")
    is_(rest("PATCH", "/conversations/%s" % S, tok=SVC, json={"archived": "yes"})[0], 400, "archived not a boolean: 400")
    r = await a.request("send", conversation_id=S, client_msg_id="pre-arch", body="last words")
    pre = r["result"]["message"]["id"]
    st, _, body = rest("PATCH", "/conversations/%s" % S, tok=SVC, json={"archived": True})
    is_((st, body["conversation"]["archived"]), (200, True), "the service archives the conversation")
    ev = await b.wait_event(lambda m: (m.get("event") or {}).get("kind") == "conversation.updated"
                            and m["event"]["conversation_id"] == S)
    ok(ev and ev["event"]["conversation"]["archived"] is True, "members get conversation.updated, archived")
    r = await a.request("send", conversation_id=S, client_msg_id="arch-ws", body="no")
    is_(err(r), "archived", "WebSocket send: archived")
    st, _, body = post("alice", S, "arch-rest", "no")
    is_((st, err(body)), (403, "archived"), "REST send: 403 archived")
    st, _, body = post(None, S, "arch-sys", "no", tok=SVC)
    is_((st, err(body)), (403, "archived"), "a system message too: nobody sends")
    r = await a.request("edit", message_id=pre, body="changed")
    is_(err(r), "archived", "an edit: archived")
    st, _, body = rest("POST", "/conversations/%s/members" % S, "bob", json={"members": ["carol"]})
    ok(st in (403,) and err(body) in ("archived", "forbidden"), "adding members: refused (%s)" % err(body))
    st, _, body = rest("POST", "/messages/%s/reactions" % pre, "bob", json={"emoji": "👍"})
    is_((st, err(body)), (403, "archived"), "a reaction: 403 archived")
    st, _, body = rest("GET", "/conversations/%s/messages" % S, "bob")
    ok(st == 200 and pre in [m["id"] for m in body["messages"]], "history is still read")
    st, _, body = rest("PATCH", "/conversations/%s" % S, tok=SVC, json={"archived": False})
    is_((st, body["conversation"]["archived"]), (200, False), "unarchived")
    r = await a.request("send", conversation_id=S, client_msg_id="post-arch", body="back")
    ok(r and r.get("ok"), "sends pass again")

    for method, path, js in [("GET", "/reports", None), ("PATCH", "/reports/1", {"status": "open"}),
                             ("DELETE", "/users/bob", None), ("GET", "/notifications", None)]:
        st, _, body = rest(method, path, "carol", json=js)
        is_((st, err(body)), (403, "forbidden"), "%s %s as a user: 403" % (method, path))

    # ---- 4. erasing a user
    r = await a.request("send", conversation_id=G, client_msg_id="erase-1", body="SECRET-ONE original")
    e1 = r["result"]["message"]["id"]
    r = await a.request("edit", message_id=e1, body="SECRET-TWO edited")
    ok(r and r.get("ok"), "alice edits (the old text is kept as an edit)")
    await a.request("send", conversation_id=D, client_msg_id="erase-2", body="SECRET-THREE direct")
    await b.request("react", message_id=e1, emoji="😀")
    await a.request("react", message_id=mid2, emoji="👍")
    st, _, body = rest("POST", "/reports", "carol", json={"message_id": e1, "reason": "scam"})
    ok(st == 201 and "SECRET-TWO" in body["report"]["snapshot"]["message"]["body"], "a report holds her text")
    a2 = await ws_connect_on("alice", P[1])
    st, _, body = rest("DELETE", "/users/alice", tok=SVC)
    is_(st, 200, "the service erases alice")
    got = [await x.wait_closed(10) for x in (a, a2)]
    is_([g and g[0] for g in got], [1008, 1008], "her connections on both workers are closed (1008)")
    ok(body["erased"]["messages"] >= 8 and body["erased"]["conversations"] == 3
       and body["erased"]["reactions"] == 1, "it says what it erased: %s" % body["erased"])
    dump = subprocess.run(["runuser", "-u", "postgres", "--", pg.bindir + "/pg_dump", "--data-only",
                           "-h", pg.sockdir, "-p", str(pg.port), "chat"],
                          capture_output=True, text=True, check=True).stdout
    ok("COPY public.chat_messages" in dump, "pg_dump read the messages table")
    for s in ("SECRET-ONE", "SECRET-TWO", "SECRET-THREE", "report-ctx-0", "hi again", "last words"):
        ok(s not in dump, "no %r anywhere in the database" % s)
    ok("I still can" in dump, "the others' bodies stay")
    is_(pg.query("SELECT count(*) FROM chat_members WHERE user_id = 'alice'")[0][0], 0, "she is in no conversation")
    is_(pg.query("SELECT count(*) FROM chat_reactions WHERE user_id = 'alice'")[0][0], 0, "her reactions are gone")
    st, _, body = rest("GET", "/conversations/%s/messages" % G, "bob")
    hers = [m for m in body["messages"] if m["sender"] == "alice"]
    ok(hers and all(m["body"] == "" and m["deleted"] for m in hers), "bob's history shows her messages as tombstones")
    st, _, body = post("alice", G, "after-erase", "back?")
    is_((st, err(body)), (403, "forbidden"), "her old token can no longer send")
    st, _, body = rest("DELETE", "/users/alice", tok=SVC)
    is_((st, body["erased"]["messages"]), (200, 0), "erasing again: nothing left")

    for x in (b, c):
        await x.close()


asyncio.run(main())
ng.stop()
pg.stop()
done()
