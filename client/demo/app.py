#!/usr/bin/python3
"""Demo token server for ngx_chat_module.

Plays the part of the platform back end in the demo: it hands out HS256
JWTs for demo users, signed with the same secret file the chat module
verifies with (the file's exact bytes, one trailing newline stripped).
Standard library only.

    GET /token?user=alice  ->  {"token": "...", "user": "alice", "expires_in": 3600}

nginx proxies /demo/token here, so any path ending in /token is accepted.
Demo users are any name matching ^[a-z][a-z0-9_]{0,31}$; the display name is
the capitalized user name. There is no password: this is a demo.
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
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

USER_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


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


def make_token(secret, user, ttl):
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "sub": user,
        "name": user.capitalize(),
        "role": "user",
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

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path.rstrip("/").endswith("/health"):
            return self._send(200, {"ok": True})
        if not url.path.endswith("/token"):
            return self._error(404, "not_found", "only /token is served here")
        users = parse_qs(url.query).get("user", [])
        user = users[0] if len(users) == 1 else ""
        if not USER_RE.match(user):
            return self._error(
                400, "bad_request",
                "user must match ^[a-z][a-z0-9_]{0,31}$")
        try:
            secret = read_secret(self.server.secret_path)
        except (OSError, ValueError) as e:
            self.log_message("cannot read secret: %s", e)
            return self._error(500, "internal", "token secret unavailable")
        token = make_token(secret, user, self.server.ttl)
        self._send(200, {"token": token, "user": user,
                         "expires_in": self.server.ttl})

    do_HEAD = do_GET

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
    args = ap.parse_args()

    read_secret(args.secret)  # fail early on a missing or empty secret
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.secret_path = args.secret
    httpd.ttl = args.ttl

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
