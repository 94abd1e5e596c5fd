#!/usr/bin/env python3
"""Verify an HS256 JWT read from stdin ("JWT <token>" line) against a key
given as a file path: the file's bytes minus one trailing newline."""
import base64, hashlib, hmac, json, sys, time

key = open(sys.argv[1], "rb").read()
if key.endswith(b"\n"):
    key = key[:-1]
tok = None
for line in sys.stdin:
    if line.startswith("JWT "):
        tok = line.split()[1]
if tok is None:
    sys.exit("no JWT line")

def unb64(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

h, p, s = tok.split(".")
mac = hmac.new(key, (h + "." + p).encode(), hashlib.sha256).digest()
ok = hmac.compare_digest(mac, unb64(s))
hdr, claims = json.loads(unb64(h)), json.loads(unb64(p))
ok = ok and hdr == {"alg": "HS256", "typ": "JWT"}
ok = ok and claims["sub"] == "alice" and claims["exp"] > time.time()
print("1 passed, 0 failed" if ok else "0 passed, 1 failed")
sys.exit(0 if ok else 1)
