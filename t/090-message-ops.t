#!/usr/bin/python3
# Edits, deletes and reactions (PROTOCOL 4, 6; schema 5), two workers,
# chat_edit_window 3s:
#  1. edit (WebSocket and PATCH /messages/{id}): the new body and edited_at;
#     message.edited reaches every member connection on WebSocket (both
#     workers), SSE and long-poll, never a non-member; the replaced text is
#     kept in chat_message_edits, never served; the same body again is 200
#     with no event.  Errors: another's message, a non-member, an unknown
#     id, an empty / missing / too long body, a deleted message, past the
#     edit window -- over REST (status + code) and WebSocket (code).
#  2. delete (WebSocket, DELETE /messages/{id}, a service token): a
#     tombstone (body "", deleted true, seq kept), message.deleted on every
#     transport; the body, its edits, reactions and outbox rows are gone
#     from the database; history shows the tombstone; a resume from before
#     the message never shows the old text; deleting again is 200 with no
#     event.  Errors: another user's message, a non-member.
#  3. reactions: POST 201 (event) / 200 again (none); DELETE ?emoji= 200
#     (event) / 200 again (none); WebSocket react/unreact; counts and "me"
#     on history's message objects; emoji validation; a non-member, a
#     service token, a deleted message; at most 20 per user per message.
#  4. threads: a parent's reply_count and last_reply in history (deleted
#     replies not counted); GET /messages/{id}/replies pages like history;
#     a non-member 403, an unknown message 404.
import asyncio
import os
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob", "carol"], "ops group")
O = db_create_conv("dave", ["dave", "erin"], "other")
ng = Nginx(pg, workers=2, http="chat_edit_window 3s;\nchat_max_message_size 4k;")
SVC = token("platform", role="service")
T0 = time.monotonic()


def rest(method, path, user=None, tok=None, **kw):
    return api(method, "/chat/api" + path, token=tok or token(user), **kw)


def kinds(msgs, kind):
    return [m["event"] for m in msgs if m.get("type") == "event" and m["event"].get("kind") == kind]


class Watch:
    """bob on a WebSocket per worker, an SSE stream and a poll chain;
    carol on a WebSocket; dave (not a member) on a WebSocket."""

    async def open(self):
        P = ng.worker_pids()
        self.ws = [await ws_connect_on("bob", p) for p in P]
        self.sse = await sse_connect("bob")
        self.carol = await ws_connect_on("carol")
        self.dave = await ws_connect_on("dave")
        _, _, b = await poll("bob", timeout_ms=0)
        self.cursor = b["cursor"]
        self.polled = []
        return self

    async def poll_all(self):
        while True:
            st, _, b = await poll("bob", cursor=self.cursor, timeout_ms=300)
            self.polled += b["events"]
            self.cursor = b["cursor"]
            if not b["events"]:
                return

    async def got(self, kind, pred, n=1):
        """Every bob transport and carol got n events of kind matching pred."""
        await self.poll_all()
        clients = self.ws + [self.sse, self.carol]
        good = await until(lambda: all(len([e for e in kinds(c.messages, kind) if pred(e)]) == n
                                       for c in clients), 5)
        good = good and len([e for e in kinds(self.polled, kind) if pred(e)]) == n
        return good and not [e for e in kinds(self.dave.messages, kind) if pred(e)]


async def part1(w, a):
    r = await a.request("send", conversation_id=G, client_msg_id="e1", body="first text")
    m = r["result"]["message"]
    mid = m["id"]
    r = await a.request("edit", message_id=mid, body="second text")
    ok(r["ok"] and r["result"]["message"]["body"] == "second text" and r["result"]["message"]["edited_at"],
       "WebSocket edit: the new body and edited_at")
    st, _, b = rest("PATCH", "/messages/%s" % mid, "alice", json={"body": "third text"})
    is_((st, b["message"]["body"], b["message"]["seq"]), (200, "third text", m["seq"]),
        "PATCH /messages/{id}: 200, the new body, the same seq")
    ok(await w.got("message.edited", lambda e: e["message"]["id"] == mid, 2),
       "message.edited x2 on both WebSockets, SSE, long-poll and carol's; not to a non-member")
    last = [e for e in kinds(w.ws[0].messages, "message.edited") if e["message"]["id"] == mid][-1]
    is_(last["message"]["body"], "third text", "the event carries the edited message")
    rows = pg.query("SELECT body FROM chat_message_edits WHERE message_id = %s ORDER BY replaced_at", int(mid))
    is_([x[0] for x in rows], ["first text", "second text"], "the replaced versions are kept for moderation")
    st, _, h = rest("GET", "/conversations/%s/messages" % G, "bob")
    ok("first text" not in str(h) and "second text" not in str(h), "and never served in history")
    st, _, b = rest("PATCH", "/messages/%s" % mid, "alice", json={"body": "third text"})
    is_(st, 200, "the same body again: 200")
    await asyncio.sleep(0.4)
    ok(await w.got("message.edited", lambda e: e["message"]["id"] == mid, 2), "and no event")

    for (who, body, want, name) in [
            ("bob", {"body": "x"}, (403, "forbidden"), "another's message"),
            ("dave", {"body": "x"}, (403, "forbidden"), "a non-member"),
            ("alice", {"body": ""}, (400, "bad_request"), "an empty body"),
            ("alice", {}, (400, "bad_request"), "no body"),
            ("alice", {"body": 5}, (400, "bad_request"), "a body that is not a string"),
            ("alice", {"body": "x" * 5000}, (413, "too_large"), "a body over chat_max_message_size")]:
        st, _, b = rest("PATCH", "/messages/%s" % mid, who, json=body)
        is_((st, b["error"]["code"]), want, "edit, %s: %d %s" % (name, want[0], want[1]))
    st, _, b = rest("PATCH", "/messages/999999", "alice", json={"body": "x"})
    is_((st, b["error"]["code"]), (404, "not_found"), "edit of an unknown message: 404")
    st, _, b = rest("PATCH", "/messages/abc", "alice", json={"body": "x"})
    is_(st, 404, "a malformed message id: 404")
    st, _, b = rest("PUT", "/messages/%s" % mid, "alice", json={"body": "x"})
    is_(st, 405, "PUT: 405")
    r = await w.carol.request("edit", message_id=mid, body="x")
    is_((r["ok"], r["error"]["code"]), (False, "forbidden"), "WebSocket edit of another's message: forbidden")
    r = await a.request("edit", message_id=mid)
    is_(r["error"]["code"], "bad_request", "WebSocket edit without body: bad_request")
    r = await a.request("edit", body="x")
    is_(r["error"]["code"], "bad_request", "WebSocket edit without message_id: bad_request")
    # the window
    r = await a.request("send", conversation_id=G, client_msg_id="e2", body="old one")
    old = r["result"]["message"]["id"]
    await asyncio.sleep(3.3)
    st, _, b = rest("PATCH", "/messages/%s" % old, "alice", json={"body": "late"})
    is_((st, b["error"]["code"]), (403, "forbidden"), "past chat_edit_window: 403")
    return mid


async def part2(w, a, mid):
    # a reaction, an outbox row and an edit on the message to delete
    rest("POST", "/messages/%s/reactions" % mid, "bob", json={"emoji": "👍"})
    pg.query("INSERT INTO chat_notifications (user_id, conversation_id, message_id, reason) "
             "VALUES ('bob', %s, %s, 'mention')", G, int(mid))
    cur0 = w.sse.hello["cursor"]
    st, _, b = rest("DELETE", "/messages/%s" % mid, "bob")
    is_((st, b["error"]["code"]), (403, "forbidden"), "delete of another user's message: 403")
    st, _, b = rest("DELETE", "/messages/%s" % mid, "dave")
    is_((st, b["error"]["code"]), (403, "forbidden"), "delete by a non-member: 403")
    r = await a.request("delete", message_id=mid)
    m = r["result"]["message"]
    is_((m["deleted"], m["body"]), (True, ""), "WebSocket delete: a tombstone")
    ok(await w.got("message.deleted", lambda e: e["message"]["id"] == mid),
       "message.deleted on every transport, not to a non-member")
    row = pg.query("SELECT body, deleted, attachments::text, seq FROM chat_messages WHERE id = %s", int(mid))[0]
    is_(row[:3], ("", True, "[]"), "in the database: the row is a tombstone (body '', no attachments)")
    is_(pg.query("SELECT count(*) FROM chat_message_edits WHERE message_id = %s", int(mid))[0][0], 0,
        "its edit history is gone")
    is_(pg.query("SELECT count(*) FROM chat_reactions WHERE message_id = %s", int(mid))[0][0], 0,
        "its reactions are gone")
    is_(pg.query("SELECT count(*) FROM chat_notifications WHERE message_id = %s", int(mid))[0][0], 0,
        "its outbox rows are gone")
    texts = ["first text", "second text", "third text"]
    dump = str(pg.query("SELECT * FROM chat_events")) + str(pg.query("SELECT * FROM chat_messages"))
    ok(not any(t in dump for t in texts), "no text of it left in chat_messages or chat_events")
    st, _, h = rest("GET", "/conversations/%s/messages" % G, "bob")
    tomb = [x for x in h["messages"] if x["id"] == mid]
    ok(tomb and tomb[0]["deleted"] and tomb[0]["body"] == "" and tomb[0]["seq"] == row[3],
       "history: the tombstone keeps its seq")
    # a resume from before the message
    c = await sse_connect("bob", cursor=cur0)
    await c.wait(lambda c: kinds(c.messages, "message.deleted"), 5)
    ok(not any(t in c.body.decode() for t in texts), "a resume from before: every event of it shows the tombstone")
    await c.close()
    st, _, b = rest("DELETE", "/messages/%s" % mid, "alice")
    is_((st, b["message"]["deleted"]), (200, True), "deleting again: 200")
    r = await a.request("send", conversation_id=G, client_msg_id="d2", body="by the platform")
    mid2 = r["result"]["message"]["id"]
    st, _, b = rest("DELETE", "/messages/%s" % mid2, tok=SVC)
    is_((st, b["message"]["deleted"]), (200, True), "a service token deletes any message")
    st, _, b = rest("PATCH", "/messages/%s" % mid, "alice", json={"body": "x"})
    is_((st, b["error"]["code"]), (409, "conflict"), "editing a deleted message: 409")
    await asyncio.sleep(0.4)
    ok(await w.got("message.deleted", lambda e: e["message"]["id"] == mid), "deleting again made no event")


async def part3(w, a):
    r = await a.request("send", conversation_id=G, client_msg_id="r1", body="react to me")
    mid = r["result"]["message"]["id"]
    path = "/messages/%s/reactions" % mid
    st, _, b = rest("POST", path, "bob", json={"emoji": "👍"})
    is_((st, b["reactions"]), (201, [{"emoji": "👍", "count": 1, "me": True}]), "POST reaction: 201 with the counts")
    st, _, b = rest("POST", path, "bob", json={"emoji": "👍"})
    is_(st, 200, "the same again: 200")
    r = await w.carol.request("react", message_id=mid, emoji="👍")
    is_(r["result"]["reactions"], [{"emoji": "👍", "count": 2, "me": True}], "WebSocket react: the counts")
    ok(await w.got("reaction.added", lambda e: e["message_id"] == mid and e["emoji"] == "👍", 2),
       "reaction.added x2 on every transport (not for the repeat), not to a non-member")
    ev = [e for e in kinds(w.ws[0].messages, "reaction.added") if e["message_id"] == mid]
    is_(sorted(e["user"] for e in ev), ["bob", "carol"], "events name the user")
    st, _, h = rest("GET", "/conversations/%s/messages" % G, "bob")
    mm = [x for x in h["messages"] if x["id"] == mid][0]
    is_(mm["reactions"], [{"emoji": "👍", "count": 2, "me": True}], "history: counts and me (bob)")
    st, _, h = rest("GET", "/conversations/%s/messages" % G, "alice")
    mm = [x for x in h["messages"] if x["id"] == mid][0]
    is_(mm["reactions"], [{"emoji": "👍", "count": 2, "me": False}], "history: me is false for alice")
    st, _, b = rest("DELETE", path + "?emoji=" + urllib.parse.quote("👍"), "bob")
    is_((st, b["reactions"]), (200, [{"emoji": "👍", "count": 1, "me": False}]), "DELETE ?emoji=: 200, the counts")
    st, _, b = rest("DELETE", path + "?emoji=" + urllib.parse.quote("👍"), "bob")
    is_(st, 200, "again: 200")
    r = await w.carol.request("unreact", message_id=mid, emoji="👍")
    ok(r["ok"] and r["result"]["reactions"] == [], "WebSocket unreact")
    ok(await w.got("reaction.removed", lambda e: e["message_id"] == mid, 2),
       "reaction.removed x2 on every transport")

    for e in ["👍🏽", "❤️", "1️⃣", "🇫🇷", "👨‍👩‍👧", "✅", "🫠"]:
        st, _, b = rest("POST", path, "alice", json={"emoji": e})
        is_(st, 201, "emoji %r accepted" % e)
    for e in ["abc", "", " ", "1", "a👍", "👍" * 9, "\u200d👍", "<b>", "\u0301"]:
        st, _, b = rest("POST", path, "alice", json={"emoji": e})
        is_((st, b["error"]["code"]), (400, "bad_request"), "emoji %r refused" % e)
    st, _, b = rest("POST", path, "alice", json={})
    is_(st, 400, "no emoji: 400")
    st, _, b = rest("DELETE", path, "alice")
    is_(st, 400, "DELETE without ?emoji=: 400")
    st, _, b = rest("DELETE", path + "?emoji=%FF", "alice")
    is_(st, 400, "DELETE with an emoji that is not UTF-8: 400")
    st, _, b = rest("POST", path, "dave", json={"emoji": "👍"})
    is_((st, b["error"]["code"]), (403, "forbidden"), "a non-member: 403")
    st, _, b = rest("POST", path, tok=SVC, json={"emoji": "👍"})
    is_((st, b["error"]["code"]), (403, "forbidden"), "a service token: 403")
    st, _, b = rest("POST", "/messages/999999/reactions", "alice", json={"emoji": "👍"})
    is_(st, 404, "an unknown message: 404")
    many = ["😀", "😁", "😂", "🤣", "😃", "😄", "😅", "😆", "😉", "😊", "😋", "😎", "😍", "😘", "🥰",
            "😗", "😙", "😚", "🙂", "🤗", "🤩"]
    codes = [rest("POST", path, "bob", json={"emoji": e})[0] for e in many]
    is_((codes[:20], codes[20]), ([201] * 20, 409), "20 reactions of one user on a message, the 21st: 409")
    r = await a.request("delete", message_id=mid)
    st, _, b = rest("POST", path, "bob", json={"emoji": "👍"})
    is_((st, b["error"]["code"]), (409, "conflict"), "reacting to a deleted message: 409")


async def part4(w, a):
    r = await a.request("send", conversation_id=G, client_msg_id="t0", body="a question")
    parent = r["result"]["message"]
    replies = []
    for i, who in enumerate([a, w.carol, a]):
        r = await who.request("send", conversation_id=G, client_msg_id="t%d" % (i + 1),
                              body="answer %d" % i, reply_to=parent["id"])
        replies.append(r["result"]["message"])
    await a.request("delete", message_id=replies[2]["id"])
    st, _, h = rest("GET", "/conversations/%s/messages?limit=10" % G, "bob")
    pm = [m for m in h["messages"] if m["id"] == parent["id"]][0]
    is_((pm["reply_count"], pm["last_reply"]["id"], pm["last_reply"]["sender"]),
        (2, replies[1]["id"], "carol"), "history: the parent's reply_count and last reply (a deleted one not counted)")
    is_([m["reply_count"] for m in h["messages"] if m["id"] == replies[0]["id"]], [0], "a reply without replies: 0")
    st, _, b = rest("GET", "/messages/%s/replies" % parent["id"], "bob")
    is_((st, [m["id"] for m in b["messages"]], b["next"]),
        (200, [x["id"] for x in reversed(replies)], None), "GET /messages/{id}/replies: newest first, the tombstone too")
    st, _, b = rest("GET", "/messages/%s/replies?limit=1" % parent["id"], "bob")
    is_((len(b["messages"]), b["next"]), (1, replies[2]["seq"]), "limit=1: one, next its seq")
    st, _, b = rest("GET", "/messages/%s/replies?before_seq=%d" % (parent["id"], b["next"]), "bob")
    is_([m["id"] for m in b["messages"]], [replies[1]["id"], replies[0]["id"]], "before_seq: the older ones")
    st, _, b = rest("GET", "/messages/%s/replies?after_seq=0" % parent["id"], "bob")
    is_([m["id"] for m in b["messages"]], [x["id"] for x in replies], "after_seq=0: oldest first")
    st, _, b = rest("GET", "/messages/%s/replies" % parent["id"], "dave")
    is_(st, 403, "replies: a non-member 403")
    st, _, b = rest("GET", "/messages/999999/replies", "bob")
    is_((st, b["error"]["message"]), (404, "no such message"), "replies of an unknown message: 404")
    st, _, b = rest("GET", "/messages/%s/replies?limit=0" % parent["id"], "bob")
    is_(st, 400, "replies: limit=0 400")
    r = await a.request("send", conversation_id=O, client_msg_id="t-x", body="x", reply_to=parent["id"])
    ok(r and not r["ok"], "a reply_to in another conversation is refused")


async def main():
    w = await Watch().open()
    a = await ws_connect_on("alice")
    mid = await part1(w, a)
    note("part 1 done at %.1f s" % (time.monotonic() - T0))
    await part2(w, a, mid)
    note("part 2 done at %.1f s" % (time.monotonic() - T0))
    await part3(w, a)
    note("part 3 done at %.1f s" % (time.monotonic() - T0))
    await part4(w, a)
    note("part 4 done at %.1f s" % (time.monotonic() - T0))

asyncio.run(main())
done()
