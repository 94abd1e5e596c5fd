"""The browser tests of client/chat.js (t/111 Chromium, t/112 Firefox).

A static nginx serves the test page (t/lib/www/client.html), client/chat.js
and the demo token server; the chat nginx (2 workers) is another origin, so
everything the page does is cross-origin, as when the platform embeds the
client.  t/lib/client_browser.js drives the browser and asks this side to
stop/start the chat server, count its connections and refuse WebSocket
upgrades or SSE (as a proxy would).  The assertions are here.
"""
import json
import os
import subprocess
import time

from chattest import (PgCluster, Nginx, bail_out, diag, done, free_port, hs_secret,
                      hs_secret_file, is_, ok, wait_for)
from demotest import app_up

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK_MAPS = """
map $http_upgrade $t_refuse_ws {{ "" 0; default {ws}; }}
map $uri $t_refuse_sse {{ default 0; /chat/events {sse}; }}
"""
REFUSE = """
if ($t_refuse_ws) { return 403; }
if ($t_refuse_sse) { return 403; }
"""


def established(port):
    """Established TCP connections whose local port is `port` (the server
    side of every client connection to it)."""
    n = 0
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


def run(browser):
    if browser == "chromium":
        exe, mod = "/usr/bin/chromium", "playwright-core"
    else:
        exe, mod = "/usr/bin/firefox-esr", "puppeteer-core"
    if not os.path.exists(exe) or not os.path.isdir(
            os.path.join(REPO, "client", "node_modules", mod)):
        bail_out("%s or %s is missing: run scripts/install-deps.sh" % (exe, mod))

    pg = PgCluster()
    demo_port = free_port()
    app = subprocess.Popen(["/usr/bin/python3", os.path.join(REPO, "client", "demo", "app.py"),
                            "--port", str(demo_port), "--secret", hs_secret_file(),
                            "--no-seed"],   # tokens only: these tests make their own conversations
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: app_up(demo_port), 10, what="demo token server")
        web_port = free_port()
        web_origin = "http://127.0.0.1:%d" % web_port
        # keepalive_timeout 0: REST requests do not hold connections, so the
        # established connections are the long-lived ones (WebSocket, SSE,
        # held polls)
        chat = Nginx(pg, workers=2,
                     http="chat_jwt_leeway 0;\nchat_cors_origins %s;\n" % web_origin
                          + BLOCK_MAPS.format(ws=0, sse=0),
                     server="keepalive_timeout 0;", location=REFUSE)
        Nginx(None, workers=1, module=False, port=web_port, server="""
            types { text/html html; text/javascript js; }
            location = /favicon.ico { return 204; }
            location /client/ { alias %s/client/; }
            location /t/ { alias %s/t/lib/www/; }
            location = /demo/token { proxy_pass http://127.0.0.1:%d/token; }
        """ % (REPO, REPO, demo_port))
        chat_url = "http://127.0.0.1:%d/chat" % chat.port

        t0 = time.time()
        p = subprocess.Popen(["node", os.path.join(REPO, "t", "lib", "client_browser.js"),
                              browser, web_origin + "/t/client.html", chat_url],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1,
                             env=dict(os.environ, CHAT_TEST_SECRET=hs_secret().decode()))
        res = None
        asked = []
        for line in p.stdout:
            try:
                m = json.loads(line)
            except ValueError:
                diag("driver:", line.rstrip())
                continue
            if "result" in m:
                res = m["result"]
                break
            cmd = m.get("ask")
            asked.append(cmd)
            ans = {}
            if cmd == "connections":
                want = m.get("want")
                try:
                    wait_for(lambda: established(chat.port) == want, 8)
                except Exception:
                    pass
                # settled: the same count a little later
                time.sleep(0.5)
                ans["n"] = established(chat.port)
            elif cmd == "stop":
                chat.stop()
            elif cmd == "start":
                chat.start()
            elif cmd == "bodies":
                def stored():
                    rows = pg.query("SELECT body FROM chat_messages WHERE "
                                    "conversation_id::text = %s ORDER BY seq", m["cid"])
                    return [r[0] for r in rows] if len(rows) >= m["want"] else None
                try:
                    wait_for(stored, 15)
                except Exception:
                    pass
                time.sleep(0.5)
                ans["bodies"] = [r[0] for r in pg.query(
                    "SELECT body FROM chat_messages WHERE conversation_id::text = %s "
                    "ORDER BY seq", m["cid"])]
            elif cmd == "block":
                chat.reload(http="chat_jwt_leeway 0;\nchat_cors_origins %s;\n" % web_origin
                            + BLOCK_MAPS.format(ws=1 if m.get("ws") else 0,
                                                sse=1 if m.get("sse") else 0))
            p.stdin.write(json.dumps(ans) + "\n")
            p.stdin.flush()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        diag("%s driver ran %.1f s" % (browser, time.time() - t0))
        if res is None:
            res = {"error": "no result; stderr: " + p.stderr.read()[-3000:]}
        check(browser, res, pg, chat)
    finally:
        app.terminate()
        app.wait(5)
    done()


def once_in_order(counts, bodies, want, name):
    dup = [k for k, v in (counts or {}).items() if v != 1]
    is_(dup, [], "%s: every message.new event came once" % name)
    got = [b for b in (bodies or []) if b in want]
    is_(got, want, "%s: the messages are there once each, in order" % name)


def check(browser, res, pg, chat):
    B = browser
    ok("error" not in res, "%s: the driver ran every step%s" % (
        B, "" if "error" not in res else ": " + res["error"][:2000]))
    # (the outage and the refused transports make the browser log errors)
    for line in (res.get("log") or [])[:8]:
        diag(line)
    steps = res.get("steps") or {}

    s = steps.get("chat") or {}
    ok(s.get("typingSeen"), "%s: bob sees alice typing" % B)
    diag("%s: alice -> bob message shown after %s ms" % (B, s.get("latencyMs")))
    ok(isinstance(s.get("latencyMs"), int), "%s: alice's message appears in bob's page" % B)
    ok(s.get("typingCleared"), "%s: the typing indicator clears when alice sends" % B)
    ok(s.get("stateAfterSend") in ("sent", "delivered", "read"),
       "%s: send() resolves with the stored message (%s)" % (B, s.get("stateAfterSend")))
    ok(s.get("delivered"), "%s: alice's tick moves to delivered" % B)
    ok(s.get("read"), "%s: and to read once bob's page marks it read" % B)
    is_(s.get("bobUnread"), 0, "%s: bob's unread count is 0 after reading" % B)
    ok(s.get("online"), "%s: alice's presence_sub shows bob online" % B)
    ok(s.get("away"), "%s: bob's page hidden: alice sees him away" % B)
    ok(s.get("back"), "%s: shown again: online" % B)

    s = steps.get("tabs") or {}
    is_(sorted(s.get("leaders") or []), [False, False, True],
        "%s: of bob's three tabs exactly one leads" % B)
    is_(s.get("connections"), 2,
        "%s: the server holds two connections: alice's and one for bob's three tabs" % B)
    is_(sorted(s.get("afterLeaders") or []), [False, True],
        "%s: when the leader tab is %s another takes over" % (B, s.get("leaderGone")))
    want = ["tabs 1", "tabs 2", "tabs 3"] + ["switch %d" % i for i in range(1, 9)]
    for i, t in enumerate(s.get("tabs") or [{}, {}]):
        once_in_order(t.get("counts"), t.get("bodies"), want,
                      "%s: bob's tab %d across the leader change" % (B, i + 1))
    ok(all((u or 0) > 0 for u in s.get("unreadBefore") or [0]),
       "%s: both tabs count alice's messages unread (%s)" % (B, s.get("unreadBefore")))
    is_(s.get("unreadAfter"), [0, 0], "%s: a read in the follower tab clears both tabs' badges" % B)
    ok(s.get("aliceRead"), "%s: and alice's ticks move to read" % B)
    is_(s.get("connectionsAfter"), 2,
        "%s: still one connection for bob's two tabs after the change" % B)

    s = steps.get("offline") or {}
    ok("retrying" in (s.get("banner") or "") or "Offline" in (s.get("banner") or ""),
       "%s: the state says it retries: %r" % (B, s.get("banner")))
    off = [["offline %d" % i, "sending"] for i in (1, 2, 3)]
    is_(s.get("pendingBeforeReload"), off, "%s: three messages wait in the outbox" % B)
    is_(s.get("pendingAfterReload"), off, "%s: a reload shows them again, in order" % B)
    alice = s.get("alice") or []
    offl = [m for m in alice if m[0].startswith("offline")]
    is_([m[0] for m in offl], ["offline 1", "offline 2", "offline 3"],
        "%s: once the server is back all three are stored once, in order" % B)
    ok(all(m[1] is not None and m[2] in ("sent", "delivered", "read") for m in offl),
       "%s: and they show as sent" % B)
    for i, t in enumerate(s.get("bobTabs") or [{}, {}]):
        once_in_order(t.get("counts"), t.get("bodies"),
                      want + ["offline 1", "offline 2", "offline 3"],
                      "%s: bob's tab %d after the outage" % (B, i + 1))

    s = steps.get("fallback") or {}
    phases = s.get("phases") or []
    is_([p.get("tag") for p in phases], ["sse", "poll", "websocket"],
        "%s: WebSocket refused -> SSE, SSE refused -> long-poll, allowed again -> WebSocket" % B)
    for p in phases:
        is_(sorted(set(p.get("transports") or [])), [p.get("tag")],
            "%s: every client is on %s" % (B, p.get("tag")))
        ok(p.get("typing"), "%s: typing works over %s" % (B, p.get("tag")))
        diag("%s: message over %s shown after %s ms" % (B, p.get("tag"), p.get("latencyMs")))
    fb = []
    for t in ("sse", "poll", "websocket"):
        fb += ["%s from alice" % t, "%s from bob" % t]
    want_all = want + ["offline 1", "offline 2", "offline 3"] + fb
    a = s.get("alice") or {}
    once_in_order(a.get("counts"), a.get("bodies"), fb, "%s: alice through the fallbacks" % B)
    for i, t in enumerate(s.get("bobTabs") or [{}, {}]):
        once_in_order(t.get("counts"), t.get("bodies"), want_all,
                      "%s: bob's tab %d through the fallbacks" % (B, i + 1))
    diag("%s: alice's states: %s" % (B, " ".join(s.get("aliceStates") or [])[:1500]))

    s = steps.get("close") or {}
    diag("%s: before close(): %s" % (B, s.get("before")))
    is_([s.get("timeouts"), s.get("intervals")], [0, 0],
        "%s: after close() no timer of the client is left" % B)
    is_(s.get("listeners"), 0, "%s: no window/document listener is left" % B)
    is_(s.get("emitter"), 0, "%s: no listener on the client is left" % B)
    ok(s.get("sockets") is not None and all(x >= 2 for x in s.get("sockets")),
       "%s: every WebSocket is closed (%s)" % (B, s.get("sockets")))
    ok(all(x == 2 for x in s.get("streams") or []), "%s: every EventSource is closed" % B)
    is_(s.get("channels"), 0, "%s: the BroadcastChannel is closed" % B)
    is_(s.get("fetchesAfterClose"), 0, "%s: nothing is fetched after close()" % B)
    is_(s.get("locksHeld"), 0, "%s: the leader lock is released" % B)
    is_(s.get("state"), "closed", "%s: the client says closed" % B)

    s = steps.get("auth") or {}
    r = s.get("refresh") or {}
    is_(r.get("sockets"), 1, "%s: tokens of 6 s are refreshed on one open WebSocket for 15 s" % B)
    ok((r.get("tokenCalls") or 0) >= 3, "%s: the token provider was asked again before each "
       "expiry (%s calls)" % (B, r.get("tokenCalls")))
    is_([x for x in r.get("states") or [] if x != "connected" and x != "connecting"], [],
        "%s: and the connection never dropped" % B)
    e = s.get("expired") or {}
    a = s.get("after") or {}
    ok(4001 in (a.get("closes") or []), "%s: a token left to expire is closed 4001 (%s)" % (
        B, a.get("closes")))
    ok("retrying" in ((e.get("info") or {}).get("text") or ""),
       "%s: the client says it retries: %r" % (B, (e.get("info") or {}).get("text")))
    ok(["while expired", "sent"] in (a.get("bodies") or []) or
       ["while expired", "delivered"] in (a.get("bodies") or []),
       "%s: once a token comes again it reconnects and sends what waited" % B)

    if B == "chromium":
        s = steps.get("bgsync") or {}
        ok(s.get("active"), "%s: the service worker is active and has Background Sync" % B)
        is_(s.get("stored"), ["bg 1", "bg 2"], "%s: with every tab closed, the sync stored the "
            "two messages typed offline, once each, in order" % B)
        is_(s.get("outboxLeft"), 0, "%s: and emptied the outbox" % B)

    # the store: every message once, in the order each sender typed it
    cid = res.get("cid")
    rows = pg.query("SELECT sender, body FROM chat_messages WHERE conversation_id::text = %s "
                    "ORDER BY seq", cid) if cid else []
    bodies = [r[1] for r in rows]
    is_(len(bodies), len(set(bodies)), "%s: the store holds each message once" % B)
    is_([b for b in bodies if b in want_all], want_all,
        "%s: the store holds them in the order they were typed" % B)
    chat.check_log()
