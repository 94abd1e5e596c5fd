#!/usr/bin/python3
# The demo web app (client/demo/: index.html, app.js on client/chat.js) in
# real Chromium (Debian's, driven by playwright-core: t/lib/demo_browser.js)
# through nginx + the module + PostgreSQL, with the demo's token server
# (client/demo/app.py) seeding the gig conversations:
#
#  1. app.py seeds the gigs over the service API, idempotently (a second
#     server process seeds the same conversations again: same ids, nothing
#     new); system messages are format "system".
#  2. alice and bob (two browser contexts) open their gig: typing shows in
#     bob's page and clears when alice sends; the message reaches bob's page
#     (the time is reported, not judged); alice's tick reaches "read".  With
#     bob on the list the next message is delivered but not read (badge,
#     title, notification); opening it reads it.
#  3. Markup in a body and in a file name shows as text (window.__xss stays
#     unset), the markdown subset renders, an image previews from an object
#     URL, a file downloads (as application/octet-stream); react (a chip
#     pressed from the keyboard keeps the focus through the row's redraw),
#     edit, delete, report, block: a send to a blocker fails, Discard drops
#     it, Retry sends it once unblocked.
#  4. Everything is stored once, in order (chat_messages), and every page,
#     also after bob's reload, shows each message once, in seq order.
#  5. A group shows who read ("Seen by Dave") and who types, on a phone.
#  6. nginx stopped: the connection banner; a message written meanwhile is
#     sent once when it is back (its attachment shows while it waits).
#  7. A 10,000-message conversation (sent through the REST API) opens with
#     far fewer rows in the DOM than messages; scrolling up loads older
#     pages and keeps the rows few.
#  8. Gig details (title, budget) show only for conversations the platform
#     made: a user's made-up context does not; /token refuses "platform".
#  9. User ids that are markup (the names the page shows are made from user
#     ids): the server refuses ids with a space or a quote, so the ids are
#     <img/src/onerror=...> and <svg/onload=...>; a group of alice and
#     those two (no title: its title is their names) shows them as text in
#     alice's list, header, message senders, typing line and "Seen by"; the
#     first one signed in to the demo (a token whose name claim is markup
#     too) shows its name as text; window.__xss stays unset everywhere.
#
# Screenshots of the key states (desktop 1280x800, phone 390x844) go to
# $CHAT_SCREENSHOTS if set, else to the test's temp dir (kept with KEEP=1);
# their paths are printed.
import base64
import http.client
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403
from demotest import app_get, app_up, start_app  # noqa: E402

if not os.path.exists("/usr/bin/chromium") or not os.path.isdir(
        os.path.join(REPO, "client", "node_modules", "playwright-core")):
    bail_out("Chromium or playwright-core is missing: run scripts/install-deps.sh")
if not os.path.exists(os.path.join(REPO, "client", "chat.js")):
    bail_out("client/chat.js is missing")

T0 = time.monotonic()
pg = PgCluster()
FILES = os.path.join(tmpdir(), "files")
os.mkdir(FILES)
shutil.chown(FILES, "nobody")
SHOTS = os.environ.get("CHAT_SCREENSHOTS") or os.path.join(tmpdir(), "screenshots")
os.makedirs(SHOTS, exist_ok=True)
SVC = token("platform", role="service")
STAMP = str(int(time.time()))

demo_port = free_port()
ng_port = free_port()


def png(w, h):
    """A small gradient PNG (stdlib only): the image attachment."""
    raw = b"".join(b"\x00" + b"".join(bytes((x * 255 // w, y * 255 // h, 170)) for x in range(w))
                   for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


app = start_app(demo_port, ng_port)
try:
    wait_for(lambda: app_up(demo_port), 10, what="demo token server")
    # seeding before the chat is up: refused, and the server stays up
    st, body = app_get(demo_port, "/seed")
    is_(st, 503, "seeding while the chat is down: 503, the token server carries on")
    st, body = app_get(demo_port, "/token?user=alice")
    ok(st == 200 and body.get("token"), "... and still hands out tokens")
    # the platform's own subject (the page trusts gig details it made) and
    # names that only look like a user are never handed out
    for bad in ("platform", "alice%0A", "Alice"):
        is_(app_get(demo_port, "/token?user=" + bad)[0], 400, "GET /token?user=%s: 400" % bad)

    ng = Nginx(pg, workers=2, port=ng_port,
               http="chat_attachments %s; chat_attachment_max_size 1m;" % FILES,
               server="""
        types { text/html html; text/css css; text/javascript js; }
        charset utf-8;
        charset_types text/css text/javascript;
        location /chat-files/ { internal; alias %(files)s/; }
        location /demo/ { alias %(repo)s/client/demo/; index index.html; }
        location = /client/chat.js { alias %(repo)s/client/chat.js; }
        location = /client/chat-sw.js { alias %(repo)s/client/chat-sw.js; }
        location = /demo/token { proxy_pass http://127.0.0.1:%(dp)d/token; }
        location = /demo/seed { proxy_pass http://127.0.0.1:%(dp)d/seed; }
    """ % {"files": FILES, "repo": REPO, "dp": demo_port})

    # ---- 1. seeding
    # (a /seed right after the start can fail -- seen once, with a full
    # suite running alongside: app.py answered 503 and a conversation id
    # had been used up, so the chat itself had refused a write; the
    # seeding is idempotent: asked again, and the first failure reported)
    tries = []

    def seed():
        tries.append(app_get(demo_port, "/seed"))
        return tries[-1][0] == 200

    wait_for(seed, 15, interval=0.5)
    st, body = tries[-1]
    if len(tries) > 1:
        diag("/seed answered %s %s first; asked %d times" % (tries[0][0], tries[0][1], len(tries)))
    is_(st, 200, "the demo server seeds the gigs once the chat is up")
    convs = body.get("seeded") or {}
    is_(sorted(convs), ["gig-101", "gig-102", "gig-103"], "... three gig conversations")
    app2_port = free_port()
    app2 = start_app(app2_port, ng_port)
    try:
        wait_for(lambda: app_up(app2_port), 10, what="second demo server")
        n_before = pg.query("SELECT count(*) FROM chat_messages")[0][0]
        st, body2 = app_get(app2_port, "/seed")
        is_((st, body2.get("seeded")), (200, convs),
            "a second server process seeds again: the same conversations")
        is_(pg.query("SELECT count(*) FROM chat_messages")[0][0], n_before, "... and no new messages")
        is_(pg.query("SELECT count(*) FROM chat_conversations")[0][0], 3, "... nor conversations")
    finally:
        app2.terminate()
        app2.wait(10)
    rows = pg.query("SELECT id::text, kind, title, context->>'gig_id', context->>'status', "
                    "(context->>'budget')::int, array(SELECT user_id FROM chat_members m "
                    "WHERE m.conversation_id = c.id ORDER BY 1) FROM chat_conversations c ORDER BY id")
    is_([(r[1], r[2], r[3], r[6]) for r in rows],
        [("direct", "Logo for a bakery", "gig-101", ["alice", "bob"]),
         ("direct", "Product photos for a shop", "gig-102", ["carol", "dave"]),
         ("group", "React dashboard build", "gig-103", ["carol", "dave", "erin"])],
        "the gigs: kind, title, context.gig_id, members")
    sysrows = pg.query("SELECT conversation_id::text, seq, sender, body FROM chat_messages "
                       "WHERE format = 'system' ORDER BY conversation_id, seq")
    is_([(r[0], r[1], r[2]) for r in sysrows],
        [(convs["gig-101"], 1, "platform"), (convs["gig-102"], 1, "platform"),
         (convs["gig-103"], 1, "platform")],
        "each gig starts with a system message from the platform")

    # ---- the 10,000-message conversation, through the REST API
    st, _, body = api("POST", "/chat/api/conversations", token=SVC,
                      json={"kind": "direct", "members": ["alice", "erin"], "title": "Bookkeeping retainer",
                            "context": {"gig_id": "gig-900", "title": "Bookkeeping retainer",
                                        "budget": 1200, "currency": "USD", "status": "in_progress",
                                        "client": "alice"}})
    BIG = body["conversation"]["id"]

    # ---- user ids that are markup.  A user id is printable ASCII without
    # space, '"', "'" or '\' (ngx_chat_valid_user_id, the JWT check): the
    # classic <img src=x onerror=...> is refused, these are not
    EVIL = ["<img/src/onerror=window.__xss=1>", "<svg/onload=window.__xss=2>"]
    EVIL_NAME = '<img src=x onerror="window.__xss=3"><b>Mallory</b>'
    spaced = "<img src=x onerror=window.__xss=1>"
    st, _, body = api("POST", "/chat/api/conversations", token=SVC,
                      json={"kind": "group", "members": ["alice", spaced]})
    is_(st, 400, "a member id with a space is refused: 400")
    st, _, body = api("GET", "/chat/api/me", token=token(spaced))
    is_(st, 401, "... and so is a token whose sub has one: 401")
    st, _, body = api("POST", "/chat/api/conversations", token=SVC,
                      json={"kind": "group", "members": ["alice"] + EVIL})
    is_(st, 201, "the platform makes a group of alice and two user ids that are markup")
    EG = (body.get("conversation") or {}).get("id") if isinstance(body, dict) else None
    is_(sorted((body.get("conversation") or {}).get("members") or []) if isinstance(body, dict) else None,
        sorted(["alice"] + EVIL), "... its members are the ids as given")
    evil_tok = [token(u, name=EVIL_NAME) for u in EVIL]
    st, _, body = api("GET", "/chat/api/me", token=evil_tok[0])
    is_(st, 200, "a token for the first one (with a name claim that is markup) is accepted")
    EVIL_FIRST = "Hello from a markup id %s" % STAMP
    st, _, body = api("POST", "/chat/api/conversations/%s/messages" % EG, token=evil_tok[0],
                      json={"client_msg_id": "evil1-" + STAMP, "body": EVIL_FIRST})
    is_(st, 201, "... and it writes to the group")
    toks = {u: token(u, name=u.capitalize()) for u in ("alice", "erin")}
    local = threading.local()

    def post(i):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = http.client.HTTPConnection("127.0.0.1", ng.port, timeout=30)
        u = ("erin", "alice")[i % 2]
        data = json.dumps({"client_msg_id": "bulk-%d" % i,
                           "body": "Ledger line %d: invoice %d reconciled" % (i, 1000 + i)}).encode()
        c.request("POST", "/chat/api/conversations/%s/messages" % BIG, body=data,
                  headers={"Authorization": "Bearer " + toks[u], "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status

    t = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        statuses = list(ex.map(post, range(10000)))
    diag("10,000 messages posted over REST in %.1f s" % (time.monotonic() - t))
    is_(statuses.count(201), 10000, "10,000 messages sent through the REST API")
    is_(pg.query("SELECT count(*), max(seq) FROM chat_messages WHERE conversation_id = %s", int(BIG))[0],
        (10000, 10000), "... stored, seq 1..10000")

    # ---- the browser
    cfg = {"base": "http://127.0.0.1:%d" % ng.port, "convs": convs, "big": BIG, "shots": SHOTS,
           "png": base64.b64encode(png(160, 100)).decode(), "stamp": STAMP,
           "evil": {"conv": EG, "ids": EVIL, "tokens": evil_tok, "first": EVIL_FIRST}}
    cfg_path = write_file("demo_browser.json", json.dumps(cfg))
    drv = subprocess.Popen(["node", os.path.join(REPO, "t", "lib", "demo_browser.js"), cfg_path],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=open(os.path.join(tmpdir(), "driver.log"), "w"), text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in drv.stdout] + [lines.put(None)],
                     daemon=True).start()
    res = {}
    deadline = time.monotonic() + 240
    stopped_for = None
    while True:
        try:
            line = lines.get(timeout=max(1, deadline - time.monotonic()))
        except queue.Empty:
            diag("the browser driver ran out of time")
            drv.kill()
            break
        if line is None:
            break
        line = line.strip()
        if line == "@@stop":
            t = time.monotonic()
            ng.stop()
            stopped_for = t
            drv.stdin.write("ok\n")
            drv.stdin.flush()
        elif line == "@@start":
            diag("nginx was down for %.1f s" % (time.monotonic() - stopped_for))
            ng.start()
            drv.stdin.write("ok\n")
            drv.stdin.flush()
        elif line.startswith("{"):
            try:
                res = json.loads(line)
            except ValueError:
                diag("driver output: " + line[:2000])
    drv.wait(30)
    if not res:
        diag("driver log:", open(os.path.join(tmpdir(), "driver.log")).read()[-4000:])

    ok(res.get("ok"), "the browser driver ran every step" + ("" if res.get("ok") else ": %s" % res.get("error")))
    for s in res.get("steps", []):
        ok(s["ok"], "browser: %s (%d ms)%s" % (s["name"], s["ms"], "" if s["ok"] else ": " + s.get("error", "")))
    is_(res.get("errors"), [], "no script errors in any page")
    for f in res.get("shots", []):
        diag("screenshot: %s" % f)

    M = res.get("bodies") or {}
    tm = res.get("timing") or {}
    diag("alice -> bob: %s ms from Enter to bob's page; typing cleared %s ms after; "
         "10k conversation opened in %s ms; 4 older pages in %s ms"
         % (tm.get("deliverMs"), tm.get("typingClearMs"), tm.get("openBigMs"), tm.get("fourOlderPagesMs")))

    # sign-in
    signin = res.get("signin") or []
    is_(len(signin), 5, "the sign-in screen lists five demo people")
    ok(any("Alice" in s and "Client" in s for s in signin)
       and any("Bob" in s and "Freelancer" in s for s in signin), "... with their name and role")

    # 2. live
    is_(res.get("openIds"), [convs["gig-101"]] * 2, "?gig=gig-101 opens the gig's conversation in both pages")
    like(res.get("transport"), r"^WebSocket", "the transport indicator says WebSocket")
    is_(res.get("swScope"), "/client/", "the outbox service worker (client/chat-sw.js) is registered")
    like(res.get("systemRow"), r"Contract started: Logo for a bakery", "the system message is shown")
    like(res.get("typingShown"), r"^Alice is typing", "bob's page shows alice typing")
    ok(tm.get("deliverMs") is not None, "alice's message reached bob's page (in %s ms)" % tm.get("deliverMs"))
    ticks = res.get("ticksM1") or []
    order = ["sending", "sent", "delivered", "read"]
    ok(ticks and ticks[-1] == "read" and all(order.index(a) < order.index(b) for a, b in zip(ticks, ticks[1:])),
       "alice's tick only moves forward and ends at read: %s" % ticks)
    is_(res.get("onceM1"), [1, 1], "the message shows once in each page")
    is_(res.get("m2WhileAway"), "delivered", "with bob on the list, alice's next message is delivered, not read")
    is_(res.get("bobTitle"), "(1) Chat", "bob's title counts the unread message")
    notes = res.get("bobNotes") or []
    ok(any(M.get("m2", "?") in (n.get("body") or "") for n in notes),
       "bob gets a notification for it (conversation not in view)")
    like(res.get("bobPreview"), r"Did you get the brief", "bob's list shows it as the last message")
    is_(res.get("presenceDot"), "online", "... and alice's presence dot as online")
    t2 = res.get("ticksM2") or []
    ok(t2[-2:] == ["delivered", "read"], "its tick goes delivered, then read when bob opens it: %s" % t2)
    is_(res.get("bobTitleAfter"), "Chat", "... and bob's title has no unread count")

    # 3. safety and message operations
    xss = res.get("xss") or {}
    for who in ("alice", "bob"):
        x = xss.get(who) or {}
        is_(x.get("flag"), "undefined", "%s's page: no markup ran (window.__xss unset)" % who)
        is_(x.get("body"), M.get("xss"), "%s's page: the markup in the body shows as text" % who)
        is_(x.get("fileName"), '<img src=x onerror="window.__xss=1">.txt',
            "%s's page: the markup in the file name shows as text" % who)
        is_((x.get("strayImg"), x.get("scripts")), (0, 0), "%s's page: no <img src=x> or <script> made" % who)
        is_((x.get("imgSrc"), x.get("imgSize")), ("blob:", [160, 100]),
            "%s's page: the image previews from an object URL" % who)
    is_(res.get("finalXss"), ["undefined"] * 4, "no page ran the markup by the end")
    # (Chromium replaces <, > and " in a download's name)
    like(res.get("download"), r"^.img src=x onerror=.window\.__xss=1..\.txt$",
         "the file downloads under its name")
    is_(res.get("downloadType"), "application/octet-stream",
        "... from an application/octet-stream object URL (never rendered in the page's origin)")
    md = res.get("md") or {}
    is_((md.get("strong"), md.get("em"), md.get("code")), ("bold", "italic", "code"),
        "markdown: **bold**, _italic_, `code`")
    is_(md.get("links"), [["https://example.com/a_b", "noopener noreferrer nofollow", "https://example.com/a_b"]],
        "only the https link is a link (rel noopener); the javascript: one is text")
    like(md.get("text"), r"\[bad\]\(javascript:alert\(1\)\)", "... shown as typed")
    like(res.get("reactionChip"), r"1$", "a reaction from alice's menu shows in bob's page")
    is_(res.get("chipFocus"), [True, True],
        "a reaction chip pressed with Enter (twice): the row is redrawn, the focus stays on its chip")
    is_(res.get("edited"), [M.get("m1edit"), True], "an edit shows in bob's page, marked edited")
    is_(res.get("deleted"), "This message was deleted", "a delete shows as a tombstone")
    is_(res.get("menuKeys"), [True, True, True, True],
        "the message menu opens with Enter (focus inside); Escape, and Tab, close it (focus back on ⋯)")
    like(res.get("replyContext"), r"^Replying to Bob: Got it", "the composer says what it replies to")
    like(res.get("replyQuote"), r"Bob: Got it, thanks!", "bob's page shows the reply with the quoted message")
    like(res.get("failedNote"), r"(?s)Not sent.*Retry.*Discard", "a send to a blocker fails with Retry and Discard")
    ok(res.get("m4Gone"), "Discard removes it")

    # the store
    G1 = int(convs["gig-101"])
    msgs = pg.query("SELECT seq, sender, body, deleted, format, client_msg_id, edited_at IS NOT NULL "
                    "FROM chat_messages WHERE conversation_id = %s ORDER BY seq", G1)
    is_([r[0] for r in msgs], list(range(1, len(msgs) + 1)), "gig-101: seqs 1..n, no gap")
    is_(len({(r[1], r[5]) for r in msgs}), len(msgs), "... no client_msg_id stored twice")
    live = [(r[1], r[2]) for r in msgs if r[0] > 4 and not r[3]]
    want = [("alice", M.get("m1edit")), ("bob", M.get("m3")), ("alice", M.get("xss")),
            ("alice", M.get("files")), ("alice", M.get("md")), ("alice", M.get("reply")),
            ("alice", M.get("m5")),
            ("alice", M.get("off"))]
    is_(live, want, "the messages are stored once each, in the order sent (m2 deleted)")
    ok(all(M.get("m4", "?") != r[2] for r in msgs), "the discarded message was never stored")
    is_(pg.query("SELECT r.sender, r.body FROM chat_messages m JOIN chat_messages r ON r.id = m.reply_to "
                 "WHERE m.conversation_id = %s AND m.body = %s", G1, M.get("reply", "?")),
        [("bob", M.get("m3"))], "the reply is stored with reply_to the message it quotes")
    ok(any(r[3] and r[2] == "" for r in msgs if r[0] > 4), "the deleted one is a tombstone in the store")
    is_(pg.query("SELECT count(*) FROM chat_message_edits e JOIN chat_messages m ON m.id = e.message_id "
                 "WHERE m.conversation_id = %s", G1)[0][0], 1, "one edit recorded")
    is_(pg.query("SELECT r.user_id, r.emoji FROM chat_reactions r JOIN chat_messages m ON m.id = r.message_id "
                 "WHERE m.conversation_id = %s", G1), [("alice", "👍")], "the reaction is stored")
    is_(pg.query("SELECT reporter, sender, reason, note FROM chat_reports"),
        [("bob", "alice", "spam", "asks to pay outside the platform %s" % STAMP)], "bob's report is stored")
    is_(pg.query("SELECT count(*) FROM chat_blocks")[0][0], 0, "bob unblocked alice again")
    is_(pg.query("SELECT name, mime, conversation_id FROM chat_attachments ORDER BY name"),
        [('<img src=x onerror="window.__xss=1">.txt', "text/plain", G1), ("offline-plan.txt", "text/plain", G1),
         ("sketch.png", "image/png", G1)],
        "the three uploads are bound to the conversation")

    # 4. every page shows each message once, in order: after bob's reload
    # (everything but the last message, written later) and at the end
    n = len(msgs)
    for when, snap, upto in (("after bob's reload", res.get("afterReload") or {}, n - 1),
                             ("at the end", res.get("final") or {}, n)):
        for who in ("bob", "alice"):
            v = snap.get(who) or {}
            is_(v.get("seqs"), list(range(1, upto + 1)),
                "%s, %s's list holds seq 1..%d once each, in order" % (when, who, upto))
            keys = [r["key"] for r in v.get("rows") or []]
            ok(keys and len(keys) == len(set(keys)), "%s, %s's page: no row twice in the DOM" % (when, who))
            dom = [int(r["seq"]) for r in v.get("rows") or [] if r["seq"]]
            ok(dom == sorted(dom) and len(dom) == len(set(dom)),
               "%s, %s's page: rows in seq order" % (when, who))

    # 5. group and phone
    # carol: gig-102 the platform's notice and dave's message; gig-103 erin's
    # (her own message moved her read position past the notice)
    is_(dict(map(tuple, res.get("carolBadges") or [])),
        {"Product photos for a shop": "2", "React dashboard build": "1"},
        "carol's list shows the unread counts as badges")
    is_(res.get("carolTitle"), "(3) Chat", "carol's title: (3) Chat")
    is_(res.get("carolPhoneView"), ["conv", "none", "conv-title"],
        "on a phone the conversation replaces the list; the focus moves from the hidden list to its title")
    ok(any("Dave" in x for x in res.get("readBy") or []), "the group shows who read: %s" % res.get("readBy"))

    # 6. the banner and the outbox
    b = res.get("banner") or [None, ""]
    ok(b[0] in ("retrying", "offline") and "retrying" in b[1].lower(),
       "with nginx stopped the banner says so: %r" % (b,))
    is_(res.get("pendingFile"), ["offline-plan.txt", "5 B", "sending"],
        "while it waits, its attachment shows with its name and size")
    is_(res.get("offOnce"), [1, 1], "the message written meanwhile shows once in each page")

    # 7. the windowed list
    big = res.get("big") or {}
    f = big.get("first") or {}
    ok(f.get("rows") and f["rows"] < 200, "10,000 messages: %s rows in the DOM when opened" % f.get("rows"))
    is_((f.get("lastSeq"), f.get("atBottom")), (10000, True), "... opened at the newest, at the bottom")
    a_ = big.get("after") or {}
    ok(a_.get("held", 0) >= f.get("held", 0) + 4 * 50, "scrolling up loaded older pages: %s -> %s messages held"
       % (f.get("held"), a_.get("held")))
    ok(a_.get("rows") and a_["rows"] < 200, "... still %s rows in the DOM" % a_.get("rows"))
    ok(a_.get("contiguous") and a_.get("max") == 10000, "... a run without holes, %s..%s"
       % (a_.get("min"), a_.get("max")))
    ok(a_.get("domSeqs") and max(a_["domSeqs"]) < 10000 - 50,
       "... the rows in the DOM are older ones (loading kept the view up there): %s..%s"
       % (min(a_.get("domSeqs") or [0]), max(a_.get("domSeqs") or [0])))
    is_(big.get("latePost"), 201, "erin posts while alice is scrolled up")
    p = big.get("pill") or {}
    like(p.get("text"), r"^1 new message", "alice's page shows a new-messages pill")
    ok(p.get("scrollKept") and p.get("atBottom") is False, "... without moving the view (and the conversation stays unread)")
    is_(big.get("pillAfter"), {"hidden": True, "atBottom": True},
        "the pill scrolls to the bottom and goes away; the message is read (badge cleared)")
    w = big.get("afterWheel") or {}
    ok(w.get("rows") and w["rows"] < 200 and w.get("atBottom") is False,
       "a wheel scroll up leaves the bottom with %s rows" % w.get("rows"))

    # gig details only from the platform
    fg = res.get("fakeGig") or {}
    is_(fg.get("createdBy"), "alice", "alice made a group with a gig context of her own")
    ok(fg.get("list") and "off-platform" not in fg["list"] and "$1" not in fg["list"],
       "bob's list shows neither its title nor its budget: %r" % fg.get("list"))
    is_((fg.get("title"), fg.get("bar")), ("Alice", ""),
        "... its header is the members' names, with no gig bar")
    is_(fg.get("forGig"), None, "... and ?gig= does not find it")

    # 9. user ids that are markup
    ev = res.get("evil") or {}
    E1, E2 = EVIL
    is_(ev.get("list"), {"title": "%s, %s" % (E1, E2), "preview": "%s: %s" % (E1, EVIL_FIRST), "avatar": "<"},
        "alice's list: the group's title is the two ids, the preview names the sender, as text")
    like((ev.get("header") or {}).get("title"), "^" + re.escape("%s, %s" % (E1, E2)) + "$",
         "the header's title: the two ids as text")
    like((ev.get("header") or {}).get("sub"), "^" + re.escape("%s, %s, You · " % (E1, E2)),
         "the header's member line: the two ids as text")
    for k, sender, text in (("first", E1, "written before, over REST"), ("second", E2, "written live, over REST"),
                            ("third", E1, "written from the demo page")):
        is_(ev.get(k), {"sender": sender, "cls": "row theirs", "shown": sender,
                        "more": "Actions for the message from " + sender},
            "a message %s shows its sender's id as text: %s" % (text, sender))
    is_(ev.get("post2"), 201, "the second id's message was sent")
    is_(ev.get("typing"), "%s is typing…" % E1, "alice's typing line shows the id as text")
    is_(ev.get("typingList"), "%s is typing…" % E1, "... and so does her list")
    is_(ev.get("readBy"), ["Seen by " + E1], "\"Seen by\" shows the id as text")
    is_((ev.get("listAfter") or {}).get("preview"), "You: " + (M.get("evilAlice") or "?"),
        "alice's list shows her answer as the last message")
    own = ev.get("own") or {}
    is_((own.get("user"), own.get("openId")), (E1, EG),
        "the first id signs in to the demo with its own token and ?conv= opens the group")
    is_(own.get("me"), ["<", EVIL_NAME, "Guest"],
        "its page shows the name claim (markup) as text, its initial as the avatar")
    is_(ev.get("ownHeader"), {"title": "%s, Alice" % E2, "sub": "You, %s, Alice · 1 online" % E2},
        "its header: the other id as text")
    is_((ev.get("ownFirst") or {}).get("cls"), "row mine", "its own earlier message shows as its own")
    is_((ev.get("ownAlice") or {}).get("shown"), "Alice", "alice's answer reaches it")
    for who in ("alice", "evil"):
        is_((ev.get("pages") or {}).get(who), {"flag": "undefined", "onAttrs": 0, "imgs": 0, "svgs": 0},
            "%s's page: no markup ran or was parsed (no on* attribute, no <img>, no other <svg>)" % who)
    is_(res.get("evilXss"), "undefined", "the markup user's page did not run it by the end either")
    ems = pg.query("SELECT sender, body FROM chat_messages WHERE conversation_id = %s ORDER BY seq", int(EG or 0))
    is_(ems, [(E1, EVIL_FIRST), (E2, M.get("evil2")), (E1, M.get("evil3")), ("alice", M.get("evilAlice"))],
        "the group's messages are stored once each, in order, with the ids as senders")
    ok(wait_for(lambda: pg.query("SELECT read_seq FROM chat_members WHERE conversation_id = %s AND user_id = %s",
                                 int(EG or 0), E1)[0][0] >= 4, 10),
       "the store has the first id's read position at alice's answer")
finally:
    app.terminate()
    app.wait(10)

diag("the test took %.0f s" % (time.monotonic() - T0))
done()
