#!/usr/bin/python3
# Search (GET /chat/api/search, PROTOCOL 10; schema 7):
#  1. finds messages of the caller's conversations by their words, all of
#     them required, the last one as a prefix; newest first with a keyset
#     cursor (pages walk every hit once); ranked mode; highlighted
#     snippets; a conversation filter.
#  2. never shows what the caller may not read: another conversation's
#     messages, a conversation it was removed from (after the removal:
#     nothing of it), before it joined a since_join conversation, deleted
#     messages; an edited message is found by its new text only.
#  3. errors: no q, too long, not UTF-8, a bad limit / mode / cursor, a
#     conversation filter of a non-member (403) or an unknown one (404);
#     a service token searches a conversation it is not in.
#  4. the plan uses the index (EXPLAIN of the statement with the module's
#     arguments).
#  5. snippets are escaped text with only <mark> as markup (a body with
#     HTML cannot inject it); the query splits into words like the index
#     (an address is one word); one letter is not a prefix; q that is not
#     UTF-8, or over 256 bytes, is 400, odd punctuation is not an error; a
#     service token that is also a member sees each hit once.
#  6. newest first looks at each conversation's newest messages first; when
#     the page is not in that window the index answers: the same hits,
#     paging one by one works either way.
import asyncio
import os
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob"], "search group")
O = db_create_conv("carol", ["carol", "dave"], "not bob's")
ng = Nginx(pg, workers=2)
SVC = token("platform", role="service")


def search(user=None, tok=None, **args):
    st, _, b = api("GET", "/chat/api/search?" + urllib.parse.urlencode(args), token=tok or token(user))
    return st, b


def bodies(b):
    return [r["message"]["body"] for r in b["results"]]


async def main():
    a = await ws_connect_on("alice")
    c = await ws_connect_on("carol")
    texts = ["the invoice for the logo design", "logo sketches attached",
             "deadline moved to friday", "final logo files", "thanks for the invoice"]
    ids = []
    for i, t in enumerate(texts):
        r = await a.request("send", conversation_id=G, client_msg_id="s%d" % i, body=t)
        ids.append(r["result"]["message"]["id"])
    await c.request("send", conversation_id=O, client_msg_id="o1", body="a secret logo for dave")

    # 1
    st, b = search("bob", q="logo")
    is_((st, bodies(b)), (200, ["final logo files", "logo sketches attached", "the invoice for the logo design"]),
        "a word: bob's hits, newest first, not carol's conversation")
    st, b = search("bob", q="logo fin")
    is_(bodies(b), ["final logo files"], "every word required, the last one a prefix")
    st, b = search("bob", q="inv")
    is_(bodies(b), ["thanks for the invoice", "the invoice for the logo design"], "a prefix alone")
    ok(all("<mark>" in r["snippet"] for r in b["results"]), "snippets highlight the hits (%s)" % b["results"][0]["snippet"])
    st, b1 = search("bob", q="logo", limit=2)
    st, b2 = search("bob", q="logo", limit=2, cursor=b1["next"])
    is_((len(b1["results"]), bodies(b1) + bodies(b2), b2["next"]),
        (2, ["final logo files", "logo sketches attached", "the invoice for the logo design"], None),
        "limit=2 and the cursor walk every hit once")
    st, b = search("bob", q="logo invoice", mode="rank")
    ok(st == 200 and bodies(b) == ["the invoice for the logo design"] and "rank" in b["results"][0],
       "mode=rank: ranked hits with their rank")
    st, b = search("bob", q="logo", conversation_id=G)
    is_(len(b["results"]), 3, "a conversation filter")

    # 2
    await a.request("edit", message_id=ids[3], body="final artwork files")
    st, b = search("bob", q="logo")
    ok("final logo files" not in str(b) and len(b["results"]) == 2, "an edited message: not by its old text")
    st, b = search("bob", q="artwork")
    is_(bodies(b), ["final artwork files"], "by its new text")
    await a.request("delete", message_id=ids[1])
    st, b = search("bob", q="sketches")
    is_(b["results"], [], "a deleted message: never")
    rest = api("POST", "/chat/api/conversations/%s/members" % G, token=token("alice"), json={"members": ["erin"]})
    api("PATCH", "/chat/api/conversations/%s" % G, token=token("alice"), json={"history": "since_join"})
    await a.request("send", conversation_id=G, client_msg_id="s-late", body="logo round two")
    st, b = search("erin", q="logo")
    is_(bodies(b), ["logo round two"], "since_join: a member added later finds only what came after")
    api("PATCH", "/chat/api/conversations/%s" % G, token=token("alice"), json={"history": "all"})
    st, b = search("erin", q="logo")
    is_(bodies(b), ["logo round two", "the invoice for the logo design"], "history all: everything")
    api("DELETE", "/chat/api/conversations/%s/members/bob" % G, token=token("alice"))
    st, b = search("bob", q="logo")
    is_(b["results"], [], "removed: nothing of the conversation")

    # 3
    for args, want in [({}, 400), ({"q": ""}, 400), ({"q": "x" * 600}, 400), ({"q": "logo", "limit": 0}, 400),
                       ({"q": "logo", "limit": 51}, 400), ({"q": "logo", "mode": "best"}, 400),
                       ({"q": "logo", "cursor": "x"}, 400), ({"q": "logo", "conversation_id": O}, 403),
                       ({"q": "logo", "conversation_id": 99999}, 404)]:
        st, b = search("erin", **args)
        is_(st, want, "%r: %d" % (args, want))
    st, _, b = api("GET", "/chat/api/search?q=%FF%FE", token=token("erin"))
    is_(st, 400, "q not UTF-8: 400")
    st, b = search("erin", q="!!! ???")
    is_((st, b["results"]), (200, []), "no words: no results")
    st, b = search(tok=SVC, q="secret", conversation_id=O)
    is_(bodies(b), ["a secret logo for dave"], "a service token searches a conversation it is not in")

    # 5: snippets are HTML-escaped text; the query splits like the index
    await a.request("send", conversation_id=G, client_msg_id="x-1",
                    body='<img src=x onerror=alert(1) alt=hello> "quoted" & more hello')
    st, b = search("alice", q="hello")
    snip = b["results"][0]["snippet"]
    bare = snip.replace("<mark>", "").replace("</mark>", "")
    ok("<" not in bare and ">" not in bare and "<mark>hello</mark>" in snip and "&amp;" in snip,
       "a snippet escapes the body, only the highlight is markup: %s" % snip)
    await a.request("send", conversation_id=G, client_msg_id="x-2", body="write to bob@example.com today")
    st, b = search("alice", q="bob@example.com")
    is_(bodies(b), ["write to bob@example.com today"], "an address is one word, as in the index")
    st, b = search("alice", q="o")
    ok(st == 200 and not any("logo" in x for x in bodies(b)), "one letter is a word, not a prefix")
    for q in ("%ED%A0%80", "%C3%C3", "%F8%90%80%80", "%00"):
        st, _, b = api("GET", "/chat/api/search?q=" + q, token=token("alice"))
        is_(st, 400, "q=%s (not UTF-8 text): 400" % q)
    st, _, b = api("GET", "/chat/api/search?q=" + "%D0%B6" * 129, token=token("alice"))
    is_(st, 400, "258 bytes of UTF-8: 400")
    st, _, b = api("GET", "/chat/api/search?q=" + "%D0%B6" * 128, token=token("alice"))
    is_(st, 200, "256 bytes of UTF-8 (128 letters, 768 encoded): 200")
    for q in ("'", "\\", "a:b", "'x':*", "!()&|"):
        st, b = search("alice", q=q)
        is_(st, 200, "q=%r: 200" % q)
    api("POST", "/chat/api/conversations/%s/members" % G, token=SVC, json={"members": ["platform"]})
    st, b = search(tok=SVC, q="hello", conversation_id=G)
    ids_ = [r["message"]["id"] for r in b["results"]]
    is_(len(ids_), len(set(ids_)), "a service token that is also a member: each hit once")

    # 6: a window too small for the page: the index answers, and the
    # same hits come back
    big = rest_conv = api("POST", "/chat/api/conversations", token=token("gina"),
                          json={"kind": "group", "members": ["hal"], "title": "long"})[2]["conversation"]["id"]
    g = await ws_connect_on("gina")
    for i in range(60):
        await g.request("send", conversation_id=big, client_msg_id="w%d" % i,
                        body=("needle %d" % i) if i in (3, 7, 50) else ("hay %d" % i))
    st, b_all = search("hal", q="needle")
    is_([x["message"]["body"] for x in b_all["results"]], ["needle 50", "needle 7", "needle 3"],
        "the window: every hit, newest first")
    pg.query("ALTER FUNCTION chat_search(text, boolean, regconfig, text, bigint, bigint, int, boolean) "
             "SET chat.search_window = '20'")
    st, b_small = search("hal", q="needle")
    is_(bodies(b_small), bodies(b_all), "a window of 20 rows (the page not found in it): the index, the same hits")
    st, b1 = search("hal", q="needle", limit=1)
    st, b2 = search("hal", q="needle", limit=1, cursor=b1["next"])
    st, b3 = search("hal", q="needle", limit=1, cursor=b2["next"])
    is_(bodies(b1) + bodies(b2) + bodies(b3), ["needle 50", "needle 7", "needle 3"],
        "paging one by one through both ways")
    st, bh = search("hal", q="hay", limit=5)
    is_(bodies(bh), ["hay 59", "hay 58", "hay 57", "hay 56", "hay 55"], "a frequent word: from the window")
    pg.query("ALTER FUNCTION chat_search(text, boolean, regconfig, text, bigint, bigint, int, boolean) "
             "RESET chat.search_window")
    await g.close()

    # 4
    cur = pg.conn().cursor()
    cur.execute("SET enable_seqscan = off")    # a few rows: the index must be usable
    cur.execute("EXPLAIN SELECT m.id FROM chat_messages m WHERE m.search "
                "@@ chat_search_query('simple', 'logo') AND NOT m.deleted")
    plan = "\n".join(r[0] for r in cur.fetchall())
    ok("chat_messages_search" in plan, "the plan uses the index:\n" + plan)
    await a.close()
    await c.close()

asyncio.run(main())
done()
