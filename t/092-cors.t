#!/usr/bin/python3
# Cross-origin use (CORS), chat_cors_origins http://localhost:<port>:
#  1. a preflight (OPTIONS with Access-Control-Request-Method) from an
#     allowed origin is answered 204 without authentication, with the
#     origin echoed, the methods and headers the API uses, Max-Age and
#     Vary: Origin; from another origin 204 without CORS headers.
#  2. answers (success, errors, SSE, long-poll) to an allowed origin carry
#     Access-Control-Allow-Origin (echoed, never *) and Vary: Origin, no
#     credentials header (chat_cors_credentials off); to another origin no
#     Access-Control-* header.
#  3. in Chromium, a page on http://localhost:<port> uses the API on
#     http://127.0.0.1:<port> -- GET, POST, PATCH, DELETE with a Bearer
#     header, an EventSource with a ticket that sees a message, a
#     long-poll; a page on http://127.0.0.1:<port> calling
#     http://localhost:<port> is refused by the browser.
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pg = PgCluster()
G = db_create_conv("alice", ["alice", "bob"], "cors")
port = free_port()
ALLOWED = "http://localhost:%d" % port
OTHER = "http://127.0.0.1:%d" % port
ng = Nginx(pg, workers=2, port=port, http="chat_cors_origins %s;" % ALLOWED, server="""
    location /page/ {
        default_type text/html;
        return 200 "<!doctype html><title>a page of the platform</title>";
    }
""")


def cors_headers(h):
    return {k: v for k, v in h.items() if k.startswith("access-control-")}


# 1
st, h, _ = api("OPTIONS", "/chat/api/messages/1", headers={
    "Origin": ALLOWED, "Access-Control-Request-Method": "PATCH",
    "Access-Control-Request-Headers": "authorization, content-type"})
is_(st, 204, "preflight from the allowed origin: 204 without a token")
is_(h.get("access-control-allow-origin"), ALLOWED, "the origin is echoed")
ok("PATCH" in h.get("access-control-allow-methods", "") and "DELETE" in h.get("access-control-allow-methods", ""),
   "the methods the API uses")
ok("Authorization" in h.get("access-control-allow-headers", "")
   and "Content-Type" in h.get("access-control-allow-headers", "")
   and "Last-Event-ID" in h.get("access-control-allow-headers", ""), "the headers it reads")
is_(h.get("access-control-max-age"), "600", "cached for 10 minutes")
is_(h.get("vary"), "Origin", "Vary: Origin")
ok("access-control-allow-credentials" not in h, "no credentials mode")
st, h, _ = api("OPTIONS", "/chat/events", headers={
    "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
is_((st, cors_headers(h)), (204, {}), "preflight from another origin: 204, no CORS headers")

# 2
for (method, path, name) in [("GET", "/chat/api/me", "REST success"),
                             ("GET", "/chat/api/conversations/999", "REST error"),
                             ("GET", "/chat/poll?timeout_ms=0", "long-poll")]:
    st, h, _ = api(method, path, token=token("alice"), headers={"Origin": ALLOWED})
    is_((h.get("access-control-allow-origin"), h.get("vary")), (ALLOWED, "Origin"),
        "%s (%d) to the allowed origin: the origin echoed, Vary" % (name, st))
    st, h, _ = api(method, path, token=token("alice"), headers={"Origin": "http://evil.example"})
    is_(cors_headers(h), {}, "%s to another origin: no CORS headers" % name)
st, h, _ = api("GET", "/chat/api/me", headers={"Origin": ALLOWED})
is_((st, h.get("access-control-allow-origin")), (401, ALLOWED), "a 401 carries them too (the page can read it)")
raw = http_raw("GET /chat/events HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\nAuthorization: Bearer %s\r\n\r\n"
               % (ALLOWED, token("alice")), read_until_close=False, timeout=3).decode("latin-1")
ok(("Access-Control-Allow-Origin: %s" % ALLOWED) in raw and "text/event-stream" in raw,
   "an SSE stream to the allowed origin carries them")

# 3
if not os.path.exists("/usr/bin/chromium") or not os.path.isdir(
        os.path.join(REPO, "client", "node_modules", "playwright-core")):
    bail_out("Chromium or playwright-core is missing: run scripts/install-deps.sh")

out = subprocess.run(["node", os.path.join(REPO, "t", "lib", "cors_browser.js"),
                      ALLOWED + "/page/", OTHER + "/page/", OTHER, ALLOWED, token("alice"), G],
                     capture_output=True, text=True, timeout=120)
res = {}
try:
    res = json.loads(out.stdout.strip().splitlines()[-1])
except (ValueError, IndexError):
    diag("driver output:", out.stdout, out.stderr)
a = res.get("allowed") or {}
note("Chromium: %s" % json.dumps(res)[:600])
ok(not a.get("error"), "the allowed page ran through (%s)" % a.get("error"))
is_(a.get("me"), [200, "alice"], "Chromium, another origin: GET with a Bearer header")
is_(a.get("post"), [201, "from another origin"], "POST a message")
is_(a.get("patch"), [200, "edited across origins"], "PATCH it")
is_((a.get("sse") or {}).get("welcome"), True, "an EventSource with a ticket opens")
is_((a.get("sse") or {}).get("message"), "seen by the stream", "and gets the message the page sent")
ok((a.get("sse") or {}).get("lastEventId"), "with its id as lastEventId")
is_(a.get("poll"), [200, True], "a long-poll")
is_(a.get("del"), [200, True], "DELETE the message")
o = res.get("other") or {}
ok(o.get("error") and "me" not in o, "a page on an origin that is not allowed is refused (%s)" % o.get("error"))

done()
