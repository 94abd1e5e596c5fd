#!/usr/bin/python3
# The demo page in real Chromium (Debian's, driven by playwright-core):
# alice and bob chat from two windows through nginx + the module +
# PostgreSQL; a reload brings the history back without duplicates.
# What the server sent is checked under the page: t/lib/demo_browser.js
# records every WebSocket frame each page load received and sent (an init
# script wraps window.WebSocket), so "each message once" is the server's
# doing, not the page's own de-duplication: each connection gets exactly
# one message.new frame per message, in seq order, and a page that comes
# back (reload; leaving and returning while a message is sent) resumes with
# its cursor -- nothing before it again, nothing after it missing.
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not os.path.exists("/usr/bin/chromium") or not os.path.isdir(
        os.path.join(REPO, "client", "node_modules", "playwright-core")):
    bail_out("Chromium or playwright-core is missing: run scripts/install-deps.sh")

pg = PgCluster()
demo_port = free_port()
app = subprocess.Popen(["/usr/bin/python3", os.path.join(REPO, "client", "demo", "app.py"),
                        "--port", str(demo_port), "--secret", hs_secret_file()],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    def token_server_up():
        try:
            return b" 200 " in http_raw(b"GET /token?user=x HTTP/1.0\r\n\r\n",
                                        port=demo_port)
        except OSError:
            return False

    wait_for(token_server_up, 10, what="demo token server")
    ng = Nginx(pg, workers=2, server="""
        location /demo/ {
            alias %s/client/demo/;
        }
        location = /demo/token {
            proxy_pass http://127.0.0.1:%d/token;
        }
    """ % (REPO, demo_port))

    out = subprocess.run(["node", os.path.join(REPO, "t", "lib", "demo_browser.js"),
                          "http://127.0.0.1:%d" % ng.port],
                         capture_output=True, text=True, timeout=120)
    res = {}
    try:
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        diag("driver output:", out.stdout, out.stderr)

    ok(res.get("ok"), "both windows came online, exchanged messages, bob reloaded, left and "
       "came back" + ("" if res.get("ok") else ": %s" % res.get("error")))

    bodies = res.get("bodies") or []
    alice = res.get("alice") or []
    bob = res.get("bob") or []
    ok(bodies and any(bodies[0] in m for m in bob), "bob's window shows alice's message")
    ok(len(bodies) > 1 and any(bodies[1] in m for m in alice),
       "alice's window shows bob's reply")
    is_(len(bob), 5, "after the reload and the return bob's window shows each message once")
    is_(len(alice), 5, "alice's window shows each message once (reply and event deduplicated)")

    rows = pg.query("SELECT m.id::text, m.seq, m.sender, m.body, e.gseq FROM chat_messages m "
                    "JOIN chat_events e ON e.conversation_id = m.conversation_id "
                    "AND e.kind = 'message.new' "
                    "AND coalesce(e.message_id::text, e.payload::jsonb -> 'message' ->> 'id') = m.id::text "
                    "ORDER BY m.seq")
    is_([(r[2], r[3]) for r in rows],
        list(zip(["alice", "bob", "alice", "alice", "alice"], bodies)) if bodies else [None],
        "the store holds the five messages, in order")
    dbid = {r[3]: r[0] for r in rows}           # body -> message id
    ids = [dbid.get(b) for b in bodies]          # m1..m5
    db_gseq = {r[0]: r[4] for r in rows}

    # --- what the server sent, frame by frame (recorded under the page) ---
    def conns(load):
        """{conn index: {"in": [parsed frames], "out": [parsed frames]}}"""
        out = {}
        for f in load:
            try:
                m = json.loads(f["data"])
            except ValueError:
                m = {"type": "_unparsed", "raw": f["data"]}
            out.setdefault(f["conn"], {"in": [], "out": []})[f["dir"]].append(m)
        return out

    def news(frames):
        """(message id, cursor) of every message.new event frame, as received"""
        return [((m.get("event") or {}).get("message", {}).get("id"), m.get("cursor"))
                for m in frames if m.get("type") == "event"
                and (m.get("event") or {}).get("kind") == "message.new"]

    def durable(frames):
        return [m.get("cursor") for m in frames if m.get("type") == "event" and "cursor" in m]

    def hello_cursor(c):
        for m in c["out"]:
            if m.get("type") == "hello":
                return m.get("cursor")
        return None

    loads = res.get("loads") or {}
    a_loads = [conns(l) for l in loads.get("alice") or []]
    b_loads = [conns(l) for l in loads.get("bob") or []]
    is_([len(l) for l in a_loads], [1], "alice's page: one WebSocket connection")
    is_([len(l) for l in b_loads], [1, 1, 1], "bob's three page loads: one WebSocket "
        "connection each")

    # alice: one connection for the whole run
    ac = a_loads[0][0] if a_loads and 0 in a_loads[0] else {"in": [], "out": []}
    got = news(ac["in"])
    is_([i for i, _ in got], ids, "alice's connection received exactly one message.new "
        "frame per message, m1..m5 in seq order")
    gs = [gseq(c) for c in durable(ac["in"])]
    ok(gs and all(b > a for a, b in zip(gs, gs[1:])),
       "... and no durable event twice (cursors strictly increasing)")
    is_([gseq(c) for _, c in got], [db_gseq.get(i) for i in ids],
        "... each with the cursor of its event in the store")

    # bob: each page load's connection gets exactly what came after its cursor
    bc = [l.get(0, {"in": [], "out": []}) for l in b_loads] + \
        [{"in": [], "out": []}] * (3 - len(b_loads))
    want = [ids[0:2], ids[2:3], ids[3:5]]
    what = ["first load (m1, m2 live)",
            "after the reload (m3 live; m1, m2 not again)",
            "after leaving and coming back (m4 caught up from the cursor, m5 live)"]
    prev_last = None
    for k in range(3):
        got = news(bc[k]["in"])
        if not is_([i for i, _ in got], want[k], "bob's connection, %s: exactly one "
                   "message.new frame per message, in seq order" % what[k]):
            diag("  seqs got: %s" % [{v: s for v, s in zip(ids, range(1, 6))}.get(i)
                                     for i, _ in got])
        gs = [gseq(c) for c in durable(bc[k]["in"])]
        ok(all(b > a for a, b in zip(gs, gs[1:])),
           "... no durable event twice on it (cursors strictly increasing)")
        hc = hello_cursor(bc[k])
        if k == 0:
            is_(hc, None, "bob's first hello carries no cursor (starts live)")
        else:
            ok(hc is not None and hc == prev_last, "bob's hello after the %s resumes with "
               "the last cursor the previous connection received (%s)"
               % (("reload", "return")[k - 1], hc))
            ok(prev_last is not None and all(g > gseq(prev_last) for g in gs),
               "... and nothing at or before that cursor is delivered again")
        dc = durable(bc[k]["in"])
        prev_last = dc[-1] if dc else prev_last
    every = [i for c in bc for i, _ in news(c["in"])]
    is_(every, ids, "across bob's three connections: every message once, m1..m5 in seq order")
finally:
    app.terminate()
    app.wait(10)

done()
