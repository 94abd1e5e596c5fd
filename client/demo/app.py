#!/usr/bin/python3
"""Demo token server for ngx_chat_module.

Plays the part of the platform back end in the demo: it hands out HS256
JWTs for demo users, signed with the same secret file the chat module
verifies with (the file's exact bytes, one trailing newline stripped), and
seeds the demo's gig conversations through the chat's service API.
Standard library only.

    GET /token?user=alice  ->  {"token": "...", "user": "alice", "expires_in": 3600,
                                "name": "Alice", "kind": "client"}
    POST /seed (or GET)    ->  {"seeded": {"gig-101": "<conversation id>", ...}}

nginx proxies /demo/token here, so any path ending in /token (and /seed,
/health) is accepted. Demo users are any name matching ^[a-z][a-z0-9_]{0,31}$
(the whole name: no trailing newline) except the reserved ones: "platform"
is the platform's own service subject (the page trusts a conversation's gig
details only when "platform" created it) and is never handed out as a user,
nor are a few other names a person could pass for the platform with. The
display name is the capitalized user name. There is no password: this is a
demo, and the token endpoint must never be exposed in production.

Seeding happens lazily: the first /token call starts one background thread
that creates the demo conversations over the chat's REST API (--chat-url)
with a service token, and retries with backoff while the chat is not up;
/token never waits for it. A /seed call seeds at once and answers with the
result. Nothing runs at import or start. Every step is idempotent: a direct
conversation between two users is unique (the server returns the existing
one), a group is looked up by its context.gig_id among a member's
conversations before it is created, and messages carry fixed client_msg_ids.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

USER_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# The demo's people: the page lists the same ones (client/demo/app.js).
DEMO_USERS = {
    "alice": "client", "carol": "client",
    "bob": "freelancer", "dave": "freelancer", "erin": "freelancer",
}

# The platform's subject for its service token; system messages show it.
SERVICE_SUBJECT = "platform"

# never minted as a user's token: the platform's subject (the page shows a
# conversation's gig details only when it created it) and look-alikes
RESERVED_USERS = frozenset({SERVICE_SUBJECT, "system", "admin", "root",
                            "service", "support", "moderator", "chat"})

# The gigs the demo starts with. `messages` are (sender, body); sender None
# is a system message posted by the service token.
GIGS = [
    {
        "gig_id": "gig-101", "kind": "direct", "members": ["alice", "bob"],
        "title": "Logo for a bakery", "budget": 300, "currency": "USD",
        "status": "in_progress", "client": "alice",
        "messages": [
            (None, "Contract started: Logo for a bakery ($300)"),
            ("bob", "Hi Alice! Thanks for hiring me. Which colours does the bakery use?"),
            ("alice", "Warm brown and cream. I can send a photo of the old sign."),
            ("bob", "Perfect — **first sketches** by Friday."),
        ],
    },
    {
        "gig_id": "gig-102", "kind": "direct", "members": ["carol", "dave"],
        "title": "Product photos for a shop", "budget": 450, "currency": "USD",
        "status": "offer", "client": "carol",
        "messages": [
            (None, "Offer sent: Product photos for a shop ($450)"),
            ("dave", "I can shoot 40 products on a white background next week."),
        ],
    },
    {
        "gig_id": "gig-103", "kind": "group", "members": ["carol", "dave", "erin"],
        "title": "React dashboard build", "budget": 2400, "currency": "USD",
        "status": "in_progress", "client": "carol",
        "messages": [
            (None, "Contract started: React dashboard build ($2,400)"),
            ("carol", "Welcome both! Dave takes the charts, Erin the sign-in pages."),
            ("erin", "Sounds good. Is there a design file I can start from?"),
        ],
    },
]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def read_secret(path):
    with open(path, "rb") as f:
        secret = f.read()
    if secret.endswith(b"\n"):
        secret = secret[:-1]
    if not secret:
        raise ValueError("empty secret in %s" % path)
    return secret


def make_token(secret, user, ttl, role="user"):
    """role "service" makes the platform's own token (PROTOCOL §1, §11)."""
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "sub": user,
        "name": user.capitalize(),
        "role": role,
        "iat": now,
        "exp": now + ttl,
    }
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    sig = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


class ChatAPIError(Exception):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class Seeder:
    """Creates the demo gigs once; safe to call from many threads and again
    after a failure (the chat may start after this server)."""

    RETRY_AFTER = 5.0  # s between attempts while the chat is not reachable

    def __init__(self, chat_url, secret_path, timeout=5.0):
        self.chat_url = chat_url.rstrip("/")
        self.secret_path = secret_path
        self.timeout = timeout
        self.lock = threading.Lock()
        self.result = None        # {gig_id: conversation id} once done
        self.last_try = 0.0
        self.last_error = None
        self.thread = None        # the background seeding, while it runs
        self.thread_lock = threading.Lock()

    def _call(self, method, path, user, body=None, role="user"):
        secret = read_secret(self.secret_path)
        tok = make_token(secret, user, 300, role=role)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.chat_url + "/api" + path, data=data, method=method,
            headers={"Authorization": "Bearer " + tok,
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}")
            except ValueError:
                detail = {}
            raise ChatAPIError("%s %s -> %d %s" % (method, path, e.code, detail),
                               status=e.code)

    def _service(self, method, path, body=None):
        return self._call(method, path, SERVICE_SUBJECT, body, role="service")

    def _find_group(self, member, gig_id):
        before = None
        for _ in range(50):  # pages of 100: plenty for a demo user
            q = "/conversations?limit=100" + ("&before=" + quote(before) if before else "")
            _, body = self._call("GET", q, member)
            for c in body.get("conversations") or []:
                if (c.get("context") or {}).get("gig_id") == gig_id:
                    return c
            before = body.get("next")
            if not before:
                return None
        return None

    def _context(self, gig):
        return {k: gig[k] for k in ("gig_id", "title", "budget", "currency",
                                    "status", "client")}

    def _seed_gig(self, gig):
        ctx = self._context(gig)
        if gig["kind"] == "direct":
            _, body = self._service("POST", "/conversations", {
                "kind": "direct", "members": gig["members"],
                "title": gig["title"], "context": ctx})
            conv = body["conversation"]
        else:
            conv = self._find_group(gig["members"][0], gig["gig_id"])
            if conv is None:
                _, body = self._service("POST", "/conversations", {
                    "kind": "group", "members": gig["members"],
                    "title": gig["title"], "context": ctx})
                conv = body["conversation"]
        cid = conv["id"]
        # a direct conversation the two users opened before the seed (the
        # old demo did) comes back without the gig: give it the gig
        if (conv.get("context") or {}).get("gig_id") != gig["gig_id"]:
            self._service("PATCH", "/conversations/%s" % quote(cid),
                          {"title": gig["title"], "context": ctx})
        for i, (sender, text) in enumerate(gig["messages"]):
            cmid = "seed-%s-%d" % (gig["gig_id"], i)
            path = "/conversations/%s/messages" % quote(cid)
            if sender is None:
                self._service("POST", path, {"client_msg_id": cmid, "body": text})
            else:
                self._call("POST", path, sender, {"client_msg_id": cmid, "body": text,
                                                  "format": "markdown"})
        return cid

    def seed(self, force=False):
        """{gig_id: conversation id}; raises while the chat cannot do it."""
        with self.lock:
            if self.result is not None:
                return self.result
            now = time.monotonic()
            if not force and now - self.last_try < self.RETRY_AFTER and self.last_error:
                raise ChatAPIError("seeding failed %.1f s ago: %s"
                                   % (now - self.last_try, self.last_error))
            self.last_try = now
            out = {}
            try:
                for gig in GIGS:
                    try:
                        out[gig["gig_id"]] = self._seed_gig(gig)
                    except ChatAPIError as e:
                        # a refusal (say, one user blocked the other) will not
                        # change by retrying: leave that gig out and go on
                        if e.status is None or e.status >= 500 or e.status == 429:
                            raise
                        sys.stderr.write("demo: gig %s not seeded: %s\n"
                                         % (gig["gig_id"], e))
            except Exception as e:  # whatever went wrong, a later try may work
                self.last_error = str(e) or e.__class__.__name__
                raise ChatAPIError(self.last_error)
            self.result = out
            self.last_error = None
            return out

    BACKOFF = (1.0, 60.0)  # s: the first wait between background tries, the longest

    def seed_in_background(self):
        """Starts seeding in a thread unless it is done or one runs: the
        caller (a sign-in) never waits for the chat. Retries with backoff
        until the seed succeeds."""
        with self.thread_lock:
            if self.result is not None or (self.thread and self.thread.is_alive()):
                return
            self.thread = threading.Thread(target=self._background, name="demo-seed",
                                           daemon=True)
            self.thread.start()

    def _background(self):
        wait = self.BACKOFF[0]
        while self.result is None:
            try:
                self.seed(force=True)
            except Exception as e:
                sys.stderr.write("%s demo: seeding: %s (again in %.0f s)\n"
                                 % (time.strftime("%Y-%m-%dT%H:%M:%S"), e, wait))
                time.sleep(wait)
                wait = min(wait * 2, self.BACKOFF[1])


class Handler(BaseHTTPRequestHandler):
    server_version = "chat-demo-token/1"

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code, message):
        self._send(status, {"error": {"code": code, "message": message}})

    def _seed(self, force):
        seeder = self.server.seeder
        if seeder is None:
            return None
        try:
            return seeder.seed(force=force)
        except Exception as e:  # never the caller's failure
            self.log_message("seeding: %s", e)
            return None

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        if path.endswith("/health"):
            return self._send(200, {"ok": True})
        if path.endswith("/seed"):
            if self.server.seeder is None:
                return self._error(404, "not_found", "seeding is off (--no-seed)")
            got = self._seed(force=True)
            if got is None:
                return self._error(503, "unavailable", "the chat could not be seeded "
                                   "yet: %s" % self.server.seeder.last_error)
            return self._send(200, {"seeded": got})
        if not url.path.endswith("/token"):
            return self._error(404, "not_found", "only /token and /seed are served here")
        users = parse_qs(url.query).get("user", [])
        user = users[0] if len(users) == 1 else ""
        if not USER_RE.fullmatch(user):
            return self._error(
                400, "bad_request",
                "user must match ^[a-z][a-z0-9_]{0,31}$")
        if user in RESERVED_USERS:
            return self._error(400, "bad_request",
                               "%r is reserved (the platform's own name)" % user)
        try:
            secret = read_secret(self.server.secret_path)
        except (OSError, ValueError) as e:
            self.log_message("cannot read secret: %s", e)
            return self._error(500, "internal", "token secret unavailable")
        # a sign-in is the moment the demo data is needed: seeded in the
        # background (retried while the chat is not up), never waited for
        if self.server.seeder is not None:
            self.server.seeder.seed_in_background()
        token = make_token(secret, user, self.server.ttl)
        self._send(200, {"token": token, "user": user,
                         "expires_in": self.server.ttl,
                         "name": user.capitalize(),
                         "kind": DEMO_USERS.get(user, "guest")})

    do_HEAD = do_GET
    do_POST = do_GET

    def log_message(self, fmt, *args):
        sys.stderr.write("%s demo: %s\n" % (
            time.strftime("%Y-%m-%dT%H:%M:%S"), fmt % args))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.abspath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--secret", default=os.path.join(repo, "var", "jwt_secret"),
                    help="HS256 secret file (default: var/jwt_secret)")
    ap.add_argument("--ttl", type=int, default=3600, help="token lifetime, s")
    ap.add_argument("--pidfile", help="write the pid here once listening")
    ap.add_argument("--chat-url", default="http://127.0.0.1:8080/chat",
                    help="the chat location the demo data is seeded through "
                         "(default: http://127.0.0.1:8080/chat, make run's)")
    ap.add_argument("--no-seed", action="store_true",
                    help="hand out tokens only; create no demo conversations")
    args = ap.parse_args()

    read_secret(args.secret)  # fail early on a missing or empty secret
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.secret_path = args.secret
    httpd.ttl = args.ttl
    httpd.seeder = None if args.no_seed else Seeder(args.chat_url, args.secret)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(args.pidfile + ".tmp", args.pidfile)
    sys.stderr.write("demo token server on http://%s:%d/token?user=NAME\n"
                     % (args.host, args.port))
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass


if __name__ == "__main__":
    main()
