#!/usr/bin/python3
# The demo page in real Chromium (Debian's, driven by playwright-core):
# alice and bob chat from two windows through nginx + the module +
# PostgreSQL; a reload brings the history back without duplicates.
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

    ok(res.get("ok"), "both windows came online, exchanged messages, bob reloaded"
       + ("" if res.get("ok") else ": %s" % res.get("error")))

    alice = res.get("alice") or []
    bob = res.get("bob") or []
    ok(any("hello bob" in m for m in bob), "bob's window shows alice's message")
    ok(any("hi alice" in m for m in alice), "alice's window shows bob's reply")
    is_(len(bob), 2, "after the reload bob's window shows each message once")
    is_(len(alice), 2, "alice's window shows each message once (reply and event deduplicated)")

    rows = pg.psql("SELECT sender, body FROM chat_messages ORDER BY seq")
    is_([r[0] for r in rows], ["alice", "bob"], "the store holds both messages, in order")
finally:
    app.terminate()
    app.wait(10)

done()
