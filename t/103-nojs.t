#!/usr/bin/python3
# Chat without JavaScript (/chat/html/), two workers:
#  1. Over HTTP: no session sends to the sign-in; a bad ticket or token is
#     refused; a good one sets an HttpOnly, Secure, SameSite=Lax cookie
#     signed by the module (a changed one is refused); the pages send a CSP
#     without script; a body with markup is escaped; the list has unread
#     counts; history pages by link; reading the newest page marks it
#     read; a form post without the CSRF token, with another's, or from
#     another Origin is refused; the same form twice stores once (POST/
#     redirect/GET); a service token cannot sign in; an archived
#     conversation has no form.
#  2. In Chromium with JavaScript disabled: sign in with a ticket, read,
#     post a message, post a file (its image loads through the cookie),
#     submit one form twice (stored once), a form on another site posting
#     to the chat is refused, sign out.
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pg = PgCluster()
G = db_create_conv("ann", ["ann", "bea"], "Gig <b>42</b>")
A = db_create_conv("ann", ["ann", "bea"], "Old gig")
FILES = os.path.join(tmpdir(), "files")
os.mkdir(FILES)
shutil.chown(FILES, "nobody")
port = free_port()
BASE = "http://localhost:%d" % port
SVC = token("platform", role="service")
ng = Nginx(pg, workers=2, port=port, http="chat_attachments %s; chat_attachment_max_size 64k;" % FILES,
           server="""
    location /chat-files/ { internal; alias %s/; }
    location /evil/ {
        default_type text/html;
        return 200 '<!doctype html><form method="post" action="%s/chat/html/c/%s/send"><input type="hidden" name="csrf" value="CSRF"><input type="hidden" name="client_msg_id" value="evil-1"><input type="hidden" name="body" value="sent from another site"><button>win a prize</button></form>';
    }
""" % (FILES, BASE, G))


def page(path, cookie=None, method="GET", form=None, headers=None):
    h = {"Host": "localhost:%d" % port}
    if cookie:
        h["Cookie"] = cookie
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
        h["Content-Type"] = "application/x-www-form-urlencoded"
    h.update(headers or {})
    st, hd, b = api(method, "/chat/html" + path, body=body, headers=h)
    return st, hd, b.decode() if isinstance(b, bytes) else b


def csrf_of(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def cmid_of(html):
    return re.search(r'name="client_msg_id" value="(html-[^"]+)"', html).group(1)


def bodies():
    return [r[0] for r in pg.query("SELECT body FROM chat_messages WHERE conversation_id = %s ORDER BY seq", G)]


# ---- 1
for i in range(35):
    pg.query("SELECT 1")
st, h, _ = api("POST", "/chat/api/conversations/%s/messages" % G, token=token("bea"),
               json={"client_msg_id": "b-0", "body": "<script>alert('x')</script> & <i>hi</i>"})
for i in range(1, 34):
    api("POST", "/chat/api/conversations/%s/messages" % G, token=token("bea"),
        json={"client_msg_id": "b-%d" % i, "body": "message %d" % i})

st, h, _ = page("/")
is_((st, h.get("location")), (303, BASE + "/chat/html/login"), "no session: to the sign-in")
st, h, _ = page("")
is_((st, h.get("location")), (303, BASE + "/chat/html/"), "html without its slash: to html/")
st, h, html = page("/login")
ok(st == 200 and 'name="token"' in html, "the sign-in page has a token form")
st, h, _ = api("POST", "/chat/api/tickets", token=token("ann"))
t1 = _["ticket"]
st, h, html = page("/login?ticket=" + urllib.parse.quote(t1))
ok(st == 200 and 'name="ticket"' in html and "set-cookie" not in h,
   "a sign-in link shows a button, signs nobody in (the ticket is not spent)")
st, h, _ = page("/login", method="POST", form={"ticket": t1})
is_((st, h.get("location")), (303, BASE + "/chat/html/"), "posting the ticket signs in")
is_(page("/login", method="POST", form={"ticket": t1})[0], 401, "the ticket again: 401 (single use)")
is_(page("/login", method="POST", form={"ticket": "nope"})[0], 401, "a bad ticket: 401")
is_(page("/login", method="POST", form={"token": "nope"})[0], 401, "a bad token: 401")
is_(page("/login", method="POST", form={"token": SVC})[0], 403, "a service token cannot sign in")
st, h, _ = page("/login", method="POST", form={"token": token("ann", name="Ann")},
                headers={"Origin": "http://evil.example"})
is_(st, 403, "a sign-in posted from another site: 403")
st, h, _ = page("/login", method="POST", form={"token": token("ann", name="Ann")})
is_((st, h.get("location")), (303, BASE + "/chat/html/"), "a token: to the list")
sc = h.get("set-cookie", "")
like(sc, r"^chat_session=[^;]+; Path=/chat/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax$",
     "the cookie: HttpOnly, Secure, SameSite=Lax, an hour")
C = sc.split(";")[0]
bad = C[:-3] + ("AAA" if not C.endswith("AAA") else "BBB")
is_(page("/", bad)[0], 303, "a changed cookie is refused")
st, h, html = page("/", C)
is_(st, 200, "the list")
like(h.get("content-security-policy", ""), r"default-src 'none'", "a CSP that allows no script")
ok("script-src" not in h.get("content-security-policy", "") and h.get("x-content-type-options") == "nosniff",
   "no script source, nosniff")
like(html, r"Gig &lt;b&gt;42&lt;/b&gt;</a> <span class=\"unread\">34 unread</span>",
     "the title escaped, the unread count")
like(html, r'http-equiv="refresh"', "the list refreshes itself")
ok("<script" not in html, "no script element")

st, h, html = page("/c/%s" % G, C)
is_(st, 200, "the conversation")
ok("message 33" in html and "message 3<" not in html, "the newest page")
m = re.search(r'href="\?before=(\d+)"', html)
ok(m, "a link to older messages")
st, h, older = page("/c/%s?before=%s" % (G, m.group(1)), C)
ok(st == 200 and "message 33" not in older, "the older page")
like(older, r"&lt;script&gt;alert\(&#39;x&#39;\)&lt;/script&gt; &amp; &lt;i&gt;hi&lt;/i&gt;",
     "it has the first message, its markup escaped as text")
ok("<script" not in older and "<i>" not in older, "no markup of a body reaches the page")
ok(wait_for(lambda: pg.query("SELECT read_seq FROM chat_members WHERE conversation_id = %s AND user_id = 'ann'",
                             G)[0][0] == 34, timeout=10), "the newest page marked the conversation read")
st, h, html2 = page("/", C)
ok("unread" not in html2.split("Gig")[1].split("</li>")[0], "the list shows it read")

csrf, cmid = csrf_of(html), cmid_of(html)
n0 = len(bodies())
st, h, _ = page("/c/%s/send" % G, C, "POST", {"client_msg_id": cmid, "body": "no token"})
is_(st, 403, "a form without the CSRF token: 403")
st, h, _ = page("/c/%s/send" % G, C, "POST", {"csrf": "A" * 22, "client_msg_id": cmid, "body": "bad token"})
is_(st, 403, "a wrong CSRF token: 403")
st, h, _ = page("/c/%s/send" % G, C, "POST", {"csrf": csrf, "client_msg_id": cmid, "body": "x"},
                headers={"Origin": "http://evil.example"})
is_(st, 403, "another Origin: 403")
st, h, _ = page("/c/%s/send" % G, None, "POST", {"csrf": csrf, "client_msg_id": cmid, "body": "x"})
is_(st, 403, "no session: 403")
is_(len(bodies()), n0, "none of them stored anything")
form = {"csrf": csrf, "client_msg_id": cmid, "body": "once <b>only</b>"}
st, h, _ = page("/c/%s/send" % G, C, "POST", form, headers={"Origin": BASE})
is_((st, h.get("location")), (303, BASE + "/chat/html/c/%s" % G), "a form post: 303 back to the page")
st, h, _ = page("/c/%s/send" % G, C, "POST", form)
is_(st, 303, "the same form again: 303")
is_(bodies().count("once <b>only</b>"), 1, "stored once")
st, _, b = api("POST", "/chat/html/c/%s/send" % G, body="csrf=%s&client_msg_id=html-x&body=%%FF%%FE" % csrf,
               headers={"Cookie": C, "Content-Type": "application/x-www-form-urlencoded"})
is_(st, 400, "a body that is not UTF-8: 400")
st, h, html = page("/c/999999", C)
is_(st, 404, "another conversation: 404")
D = db_create_conv("bea", ["bea", "cal"], "not hers")
is_(page("/c/%s" % D, C)[0], 404, "a conversation she is not in: 404")
bnd = "xYz"
big = (("--%s\r\nContent-Disposition: form-data; name=\"client_msg_id\"\r\n\r\nfile-big\r\n--%s\r\n"
        "Content-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n\r\n" % (bnd, bnd)).encode()
       + b"x" * (200 * 1024) + ("\r\n--%s--\r\n" % bnd).encode())
st, h, b = api("POST", "/chat/html/c/%s/attach?csrf=%s" % (G, csrf), body=big,
               headers={"Cookie": C, "Content-Type": "multipart/form-data; boundary=" + bnd})
ok(st == 413 and "text/html" in h.get("content-type", "") and b"too large" in b,
   "a file too large from a page: 413 as a page, not JSON (%d %s)" % (st, h.get("content-type")))
st, h, b = api("POST", "/chat/html/c/%s/attach?csrf=%s" % (G, "B" * 22), body=big[:100],
               headers={"Cookie": C, "Content-Type": "multipart/form-data; boundary=" + bnd})
is_(st, 403, "a file form with a wrong CSRF token: 403 before the body is read")
api("PATCH", "/chat/api/conversations/%s" % A, token=SVC, json={"archived": True})
st, h, html = page("/c/%s" % A, C)
ok(st == 200 and "archived" in html and 'class="send"' not in html, "an archived conversation has no form")

# ---- 2
if not os.path.exists("/usr/bin/chromium") or not os.path.isdir(
        os.path.join(REPO, "client", "node_modules", "playwright-core")):
    bail_out("Chromium or playwright-core is missing: run scripts/install-deps.sh")

PNG = os.path.join(tmpdir(), "pic.png")
with open(PNG, "wb") as f:
    # a 1x1 PNG
    f.write(bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                          "0000000d49444154789c6360f8ff3f0005fe02fea7d6a4800000000049454e44ae426082"))
st, _, b = api("POST", "/chat/api/tickets", token=token("bea", name="Bea"))
ticket = b["ticket"]
# the evil page carries the real CSRF token of bea's session: SameSite and the Origin check still stop it
out = subprocess.run(["node", os.path.join(REPO, "t", "lib", "nojs_browser.js"), BASE, ticket, G, PNG,
                      "http://127.0.0.1:%d/evil/" % port],
                     capture_output=True, text=True, timeout=180)
res = {}
try:
    res = json.loads(out.stdout.strip().splitlines()[-1])
except (ValueError, IndexError):
    diag("driver output:", out.stdout, out.stderr)
note("Chromium: %s" % json.dumps(res)[:1500])
ok(not res.get("error"), "the browser run went through (%s)" % res.get("error"))
is_((res.get("list_status"), res.get("list_url")), (200, BASE + "/chat/html/"), "signed in with a ticket: the list")
is_(res.get("cookie"), {"httpOnly": True, "secure": True, "sameSite": "Lax"}, "the browser keeps the cookie so")
ok("Gig <b>42</b>" in (res.get("list_text") or ""), "the list shows the title as text")
is_(res.get("conv_url"), BASE + "/chat/html/c/%s" % G, "the conversation opens")
is_(res.get("scripts"), 0, "no script element on the page")
is_(res.get("refresh"), 1, "the page refreshes itself")
ok("once <b>only</b>" in (res.get("bodies") or []), "markup in a body is shown as text")
is_(res.get("after_send_url"), BASE + "/chat/html/c/%s" % G, "after a post: back on the page (POST/redirect/GET)")
ok("typed <b>without</b> JavaScript" in (res.get("after_send") or []), "the message is on the page")
is_(bodies().count("typed <b>without</b> JavaScript"), 1, "and stored once")
is_(res.get("images"), 1, "the file is on the page as an image")
ok(200 in (res.get("file_statuses") or []), "and loads through the session cookie (%s)" % res.get("file_statuses"))
is_(pg.query("SELECT count(*) FROM chat_messages WHERE conversation_id = %s AND body = 'a picture' "
             "AND attachments <> '[]'", G)[0][0], 1, "the file's message is stored with it")
is_(res.get("twice"), 1, "one form submitted twice: one message")
is_(bodies().count("submitted twice"), 1, "... stored once")
is_(res.get("evil_status"), 403, "a form on another site posting to the chat: 403")
is_(bodies().count("sent from another site"), 0, "nothing stored")
is_(res.get("after_logout_url"), BASE + "/chat/html/login", "signed out: the sign-in page")
is_(res.get("cookie_after"), 0, "the cookie is gone")

ng.stop()
pg.stop()
done()
