#!/usr/bin/python3
# Members join and leave (PROTOCOL 6; schema 6), two workers, a ring of
# 1024 slots (so that a long resume reads the store):
#  1. POST /conversations/{id}/members: member.added reaches the old members
#     and the new one, whose connections (WebSocket on both workers, SSE)
#     get the conversation's messages from then on, live.  Who may: the
#     creator, a service token; not another member, not a non-member; a
#     direct conversation's members are fixed; bad input 400; unknown 404.
#  2. PATCH /conversations/{id} (title, history): conversation.updated;
#     history "since_join": the member added later reads only what came
#     after it joined (a service token reads all); "all": everything.
#  3. DELETE /conversations/{id}/members/{user}: member.removed reaches the
#     removed member on every connection (WebSocket both workers, SSE, a
#     held poll), then nothing more of the conversation -- live, or by
#     resuming from a cursor of before the removal from the ring and from
#     the store (a resume gets the events up to its member.removed, never
#     one after); it cannot send, read history or see the conversation.
#  4. Added again: a resume from before the removal gets the first span,
#     its member.removed, then member.added and what follows -- never the
#     messages of the time in between.
#  5. A member leaves by itself; another member cannot remove it.
#  6. Removed and added again within what the ring holds: a resume from
#     before gets the removal, the re-adding and what follows, never the
#     messages between.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob"], "gig team")
D = db_create_conv("alice", ["alice", "carol"], None, kind="direct")
ng = Nginx(pg, workers=2, http="chat_bus_slots 1024;")
SVC = token("platform", role="service")
T0 = time.monotonic()


def rest(method, path, user=None, tok=None, **kw):
    return api(method, "/chat/api" + path, token=tok or token(user), **kw)


def seqs(msgs, conv=G):
    return [e["seq"] for e in conv_events(msgs, conv)]


def kinds(msgs, kind, conv=G):
    return [m["event"] for m in msgs if m.get("type") == "event"
            and m["event"].get("kind") == kind and m["event"].get("conversation_id") == conv]


async def send(c, n, prefix):
    out = []
    for i in range(n):
        r = await c.request("send", conversation_id=G, client_msg_id="%s-%d" % (prefix, i), body=prefix)
        assert r and r.get("ok"), r
        out.append(r["result"]["message"]["seq"])
    return out


def removed(msgs, user, conv=G):
    return [e for e in kinds(msgs, "member.removed", conv) if user in e["members"]]


def db_seqs(after=0):
    return [r[0] for r in pg.query("SELECT seq FROM chat_messages WHERE conversation_id = %s AND seq > %s "
                                   "ORDER BY seq", G, after)]


async def main():
    P = ng.worker_pids()
    a = await ws_connect_on("alice", P[0])
    early = await send(a, 5, "before-carol")

    # ---- 1
    carol = [await ws_connect_on("carol", p) for p in P]
    carol_sse = await sse_connect("carol")
    bob = await ws_connect_on("bob", P[1])
    for (who, tok, body, want, name) in [
            ("bob", None, {"members": ["dave"]}, (403, "forbidden"), "another member"),
            ("erin", None, {"members": ["dave"]}, (403, "forbidden"), "a non-member"),
            ("alice", None, {"members": []}, (400, "bad_request"), "an empty list"),
            ("alice", None, {"members": "carol"}, (400, "bad_request"), "not a list"),
            ("alice", None, {"members": ["bad id"]}, (400, "bad_request"), "a bad user id"),
            ("alice", None, {}, (400, "bad_request"), "no members")]:
        st, _, b = rest("POST", "/conversations/%s/members" % G, who, tok, json=body)
        is_((st, b["error"]["code"]), want, "add members, %s: %d %s" % (name, want[0], want[1]))
    st, _, b = rest("POST", "/conversations/%s/members" % D, "alice", json={"members": ["dave"]})
    is_((st, b["error"]["code"]), (400, "bad_request"), "a direct conversation's members are fixed")
    st, _, b = rest("POST", "/conversations/99999/members", "alice", json={"members": ["dave"]})
    is_(st, 404, "an unknown conversation: 404")
    st, _, b = rest("POST", "/conversations/%s/members" % G, "alice", json={"members": ["carol", "alice"]})
    is_((st, sorted(b["conversation"]["members"])), (200, ["alice", "bob", "carol"]),
        "the creator adds carol: 200, the members")
    everyone = carol + [carol_sse, a, bob]
    ok(await until(lambda: all(len(kinds(c.messages, "member.added")) == 1 for c in everyone), 5),
       "member.added reaches alice, bob and carol's 3 connections (both workers, SSE), once")
    ev = kinds(a.messages, "member.added")[0]
    is_((ev["members"], ev["by"]), (["carol"], "alice"), "it names who was added and by whom")
    s1 = await send(a, 3, "after-carol")
    ok(await until(lambda: all(seqs(c.messages) == s1 for c in carol + [carol_sse]), 5),
       "carol's connections get the conversation's messages from then on, live")
    st, _, b = rest("POST", "/conversations/%s/members" % G, tok=SVC, json={"members": ["dave"]})
    is_(st, 200, "a service token adds dave")
    st, _, b = rest("POST", "/conversations/%s/members" % G, "alice", json={"members": ["dave"]})
    is_(st, 200, "adding a member again: 200")
    note("part 1 done at %.1f s" % (time.monotonic() - T0))

    # ---- 2
    st, _, b = rest("PATCH", "/conversations/%s" % G, "bob", json={"title": "x"})
    is_((st, b["error"]["code"]), (403, "forbidden"), "another member cannot change the conversation")
    st, _, b = rest("PATCH", "/conversations/%s" % G, "alice", json={"history": "sometimes"})
    is_(st, 400, "a bad history value: 400")
    st, _, b = rest("PATCH", "/conversations/%s" % G, "alice", json={})
    is_(st, 400, "nothing to change: 400")
    st, _, b = rest("PATCH", "/conversations/%s" % G, "alice", json={"title": "gig team 2", "history": "since_join"})
    is_((st, b["conversation"]["title"], b["conversation"]["history"]), (200, "gig team 2", "since_join"),
        "PATCH title and history")
    ok(await until(lambda: kinds(bob.messages, "conversation.updated") and kinds(carol[0].messages,
                                                                                 "conversation.updated"), 5),
       "conversation.updated reaches the members")
    st, _, h = rest("GET", "/conversations/%s/messages?after_seq=0" % G, "carol")
    is_([m["seq"] for m in h["messages"]], s1, "since_join: carol reads only what came after she joined")
    st, _, h = rest("GET", "/conversations/%s/messages?after_seq=0" % G, tok=SVC)
    is_([m["seq"] for m in h["messages"]], early + s1, "a service token reads all of it")
    st, _, h = rest("GET", "/conversations/%s/messages?after_seq=0" % G, "bob")
    is_([m["seq"] for m in h["messages"]], early + s1, "bob, a member from the start, reads all of it")
    rest("POST", "/conversations/%s/members" % G, "alice", json={"members": ["frank"]})
    st, _, lst = rest("GET", "/conversations", "frank")
    mine = [c for c in lst["conversations"] if c["id"] == G]
    is_(mine and mine[0]["last_message"], None,
        "since_join: a member added after the last message has no last_message in its list")
    rest("DELETE", "/conversations/%s/members/frank" % G, "alice")
    rest("PATCH", "/conversations/%s" % G, "alice", json={"history": "all"})
    st, _, h = rest("GET", "/conversations/%s/messages?after_seq=0" % G, "carol")
    is_([m["seq"] for m in h["messages"]], early + s1, "history \"all\": carol reads everything")
    note("part 2 done at %.1f s" % (time.monotonic() - T0))

    # ---- 3
    bob2 = await ws_connect_on("bob", P[0])
    bob_sse = await sse_connect("bob")
    await asyncio.sleep(0.3)
    # a cursor of bob's from before the 3 messages after carol joined
    before = [m for m in bob.messages if m.get("cursor")
              and m["event"].get("kind") == "member.added"][0]["cursor"]
    latest = [m for m in bob.messages if m.get("cursor")][-1]["cursor"]
    held = await PollRequest().start("bob", cursor=latest, timeout_ms=10000)
    await asyncio.sleep(0.3)
    st, _, b = rest("DELETE", "/conversations/%s/members/bob" % G, "carol")
    is_((st, b["error"]["code"]), (403, "forbidden"), "another member cannot remove bob")
    st, _, b = rest("DELETE", "/conversations/%s/members/zed" % G, "alice")
    is_((st, b["error"]["code"]), (404, "not_found"), "removing a non-member: 404")
    st, _, b = rest("DELETE", "/conversations/%s/members/bob" % G, "alice")
    is_((st, "bob" in b["conversation"]["members"]), (200, False), "the creator removes bob: 200")
    last_before = db_seqs()[-1]
    bobs = [bob, bob2, bob_sse]
    ok(await until(lambda: all(len([e for e in kinds(c.messages, "member.removed")
                                    if e["members"] == ["bob"]]) == 1 for c in bobs), 5),
       "member.removed reaches bob's WebSockets on both workers and his SSE stream")
    st, _, pb = await held.result(10)
    ok(st == 200 and kinds(pb["events"], "member.removed"), "and his held poll")
    after = await send(a, 4, "after-bob")
    ok(await until(lambda: all(seqs(c.messages)[-4:] == after for c in carol), 5), "carol gets them")
    await asyncio.sleep(0.5)
    ok(all(not [s for s in seqs(c.messages) if s > last_before] for c in bobs),
       "bob's connections get nothing sent after his removal")
    r = await bob.request("send", conversation_id=G, client_msg_id="bob-late", body="x")
    is_(r["error"]["code"], "forbidden", "bob cannot send any more")
    st, _, _ = rest("GET", "/conversations/%s/messages" % G, "bob")
    is_(st, 403, "nor read its history")
    st, _, _ = rest("GET", "/conversations/%s" % G, "bob")
    is_(st, 403, "nor see the conversation")

    async def resumed(kind, cur, want_last):
        """bob's events of G resumed from cur by kind, until his member.removed."""
        if kind == "ws":
            c = await ws_connect_on("bob", P[1], cursor=cur)
            await until(lambda: removed(c.messages, "bob"), 10)
            await asyncio.sleep(0.3)
            got = c.messages
            await c.close()
        elif kind == "sse":
            c = await sse_connect("bob", cursor=cur)
            await c.wait(lambda x: removed(x.messages, "bob"), 10)
            await asyncio.sleep(0.3)
            got = c.messages
            await c.close()
        else:
            got, n = [], 0
            while n < 50 and not (removed(got, "bob") and got and not b["events"]):
                st, _, b = await poll("bob", cursor=cur, timeout_ms=300)
                got += b["events"]
                cur = b["cursor"]
                n += 1
        return got

    for kind in ("ws", "sse", "poll"):
        got = await resumed(kind, before, last_before)
        ok(removed(got, "bob") and seqs(got) == s1,
           "%s resume from before the removal (the ring): up to member.removed, nothing after (%s)"
           % (kind, seqs(got)[-3:]))
    # past the ring: 700 more events, so that the resume reads the store
    more = await send(a, 700, "flood")
    for kind in ("ws", "sse", "poll"):
        got = await resumed(kind, before, last_before)
        ok(removed(got, "bob") and seqs(got) == s1,
           "%s resume from before the removal (the store): up to member.removed, nothing after (%s)"
           % (kind, seqs(got)[-3:]))
    note("part 3 done at %.1f s" % (time.monotonic() - T0))

    # ---- 4
    gap = db_seqs(last_before)
    st, _, b = rest("POST", "/conversations/%s/members" % G, "alice", json={"members": ["bob"]})
    is_(st, 200, "bob is added again")
    back = await send(a, 3, "bob-back")
    ok(await until(lambda: seqs(bob.messages)[-3:] == back, 5), "and gets messages live again")
    for kind in ("ws", "sse"):
        if kind == "ws":
            c = await ws_connect_on("bob", P[0], cursor=before)
            await until(lambda: seqs(c.messages)[-1:] == back[-1:], 15)
        else:
            c = await sse_connect("bob", cursor=before)
            await c.wait(lambda x: seqs(x.messages)[-1:] == back[-1:], 15)
        s = seqs(c.messages)
        ok(not set(s) & set(gap) and s[-3:] == back and removed(c.messages, "bob")
           and kinds(c.messages, "member.added"),
           "%s resume across both spans: the removal, the re-adding, never the %d messages between"
           % (kind, len(gap)))
        await c.close()
    note("part 4 done at %.1f s" % (time.monotonic() - T0))

    # ---- 5
    st, _, b = rest("DELETE", "/conversations/%s/members/carol" % G, "carol")
    is_((st, "carol" in b["conversation"]["members"]), (200, False), "carol leaves by herself")
    ok(await until(lambda: kinds(carol[0].messages, "member.removed"), 5), "and gets her member.removed")
    # ---- 6: removed and added again, resumed from the ring
    H = rest("POST", "/conversations", "alice", json={"kind": "group", "members": ["bob"], "title": "h"})[2]["conversation"]["id"]
    await asyncio.sleep(0.3)
    c0 = await ws_connect_on("bob", P[1])
    r = await a.request("send", conversation_id=H, client_msg_id="h-1", body="h1")
    await until(lambda: seqs(c0.messages, H) == [1], 5)
    cur0 = [m for m in c0.messages if m.get("cursor")][-1]["cursor"]
    await c0.close()
    rest("DELETE", "/conversations/%s/members/bob" % H, "alice")
    for i in range(2):
        await a.request("send", conversation_id=H, client_msg_id="h-gap-%d" % i, body="gap")
    rest("POST", "/conversations/%s/members" % H, "alice", json={"members": ["bob"]})
    for i in range(2):
        await a.request("send", conversation_id=H, client_msg_id="h-back-%d" % i, body="back")
    for kind in ("ws", "sse"):
        if kind == "ws":
            c = await ws_connect_on("bob", P[0], cursor=cur0)
            await until(lambda: seqs(c.messages, H)[-1:] == [5], 10)
        else:
            c = await sse_connect("bob", cursor=cur0)
            await c.wait(lambda x: seqs(x.messages, H)[-1:] == [5], 10)
        is_((seqs(c.messages, H), len(kinds(c.messages, "member.removed", H)),
             len(kinds(c.messages, "member.added", H))), ([4, 5], 1, 1),
            "%s resume from the ring across a removal and a re-adding: the removal, the adding, "
            "the 2 after, never the 2 between" % kind)
        await c.close()

    for c in carol + [bob, bob2, a]:
        await c.close()
    await carol_sse.close()
    await bob_sse.close()

asyncio.run(main())
done()
