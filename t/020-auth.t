#!/usr/bin/python3
# Authentication (PROTOCOL.md section 1): JWT verification with the
# algorithm pinned by configuration (HS256, RS256, ES256; alg none and HS/RS
# confusion refused), the three ways to present a token (hello, Authorization
# header on the upgrade, single-use ticket), expiry and nbf, in-band refresh,
# close 4001 at expiry, the Origin allow-list, REST 401s and the service role.
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()

# HS256 (harness secret), Origin allow-list, default ticket ttl and leeway
ng = Nginx(pg, workers=2, http="chat_allow_origin http://good.example;")

# HS256, no leeway, 1 s tickets
ng0 = Nginx(pg, workers=2, http="chat_jwt_leeway 0s;\nchat_ticket_ttl 1s;")

rs_priv, rs_pub = rsa_keypair()
rs_pub_file = write_file("rs256.pub", rs_pub)
ng_rs = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg RS256;\nchat_jwt_key %s;'
              % (pg.conninfo, rs_pub_file))

ec_priv, ec_pub = ec_keypair()
ec_pub_file = write_file("es256.pub", ec_pub)
ng_es = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg ES256;\nchat_jwt_key %s;'
              % (pg.conninfo, ec_pub_file))

# HS256 secret files: exact bytes, one trailing newline dropped
sec = b"0123456789abcdef0123456789abcdef-file-secret"
ng_nl = Nginx(pg, workers=2, jwt_key=write_file("secret-nl", sec + b"\n"))
ng_nl2 = Nginx(pg, workers=2, jwt_key=write_file("secret-nl2", sec + b"\n\n"))

# RS256 with an X.509 certificate instead of a bare public key
from cryptography import x509  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from cryptography.hazmat.primitives import hashes as _hashes, serialization as _ser  # noqa: E402
import datetime  # noqa: E402
_cert_key = _ser.load_pem_private_key(rs_priv, None)
_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat-test")])
_now = datetime.datetime.utcnow()
_cert = (x509.CertificateBuilder().subject_name(_name).issuer_name(_name)
         .public_key(_cert_key.public_key()).serial_number(1)
         .not_valid_before(_now - datetime.timedelta(days=1))
         .not_valid_after(_now + datetime.timedelta(days=1))
         .sign(_cert_key, _hashes.SHA256()))
cert_file = write_file("rs256.crt", _cert.public_bytes(_ser.Encoding.PEM))
ng_cert = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg RS256;\nchat_jwt_key %s;'
                % (pg.conninfo, cert_file))

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


# ------------------------------------------------------------ helpers ----

def err_code(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def me(nginx, tok):
    st, hd, body = api("GET", "/chat/api/me", token=tok, nginx=nginx)
    return st, body


def hello_result(nginx, tok, **kw):
    """hello over a fresh WebSocket; returns (reply, close code or None)."""
    async def go():
        c = await ws_connect(nginx, token=tok, **kw)
        r = c.hello
        code = None
        if r is None or not r.get("ok"):
            res = await c.wait_closed(5)
            code = res[0] if res else "not closed"
        await c.close()
        return r, code
    return run(go())


def upgrade_status(nginx, tok=None, ticket=None, headers=None):
    """Raw upgrade with Authorization: Bearer (or ?ticket=); returns the
    RawWS (status, body available)."""
    h = {"Sec-WebSocket-Protocol": "chat.v1"}
    h.update(headers or {})
    ws = RawWS(nginx, headers=h, token=tok, ticket=ticket, timeout=5)
    return ws


def reject_case(nginx, tok, want_code, name):
    """The same bad token on every path: hello (error reply + close 1008),
    Authorization on the upgrade (401 JSON) and REST (401 JSON)."""
    r, code = hello_result(nginx, tok)
    ok(r is not None and r.get("ok") is False, "%s: hello -> error reply" % name)
    is_(err_code(r), want_code, "%s: hello error code %s" % (name, want_code))
    is_(code, 1008, "%s: hello -> close 1008" % name)
    ws = upgrade_status(nginx, tok)
    is_(ws.status, 401, "%s: Authorization on the upgrade -> 401" % name)
    is_(err_code(ws_body_json(ws)), want_code, "%s: upgrade 401 body code %s" % (name, want_code))
    ws.close()
    st, body = me(nginx, tok)
    is_(st, 401, "%s: REST -> 401" % name)
    is_(err_code(body), want_code, "%s: REST 401 body code %s" % (name, want_code))


def accept_case(nginx, tok, sub, name, role="user"):
    r, code = hello_result(nginx, tok)
    ok(r is not None and r.get("ok") is True, "%s: hello accepted (%r)" % (name, r))
    if r and r.get("ok"):
        is_(r["result"]["user"]["id"], sub, "%s: hello user id" % name)
        is_(r["result"]["user"].get("role"), role, "%s: hello role" % name)
    st, body = me(nginx, tok)
    is_(st, 200, "%s: REST /me 200" % name)
    ok(isinstance(body, dict) and body.get("user", {}).get("id") == sub,
       "%s: REST /me user id %s (%r)" % (name, sub, body))


# ------------------------------------------------------- good HS256 ----

async def good_hello():
    c = await ws_connect(ng, token=token("alice", name="Alice A."))
    r = c.hello
    ok(r is not None and r.get("type") == "reply" and r.get("ok") is True, "HS256 via hello accepted")
    res = (r or {}).get("result", {})
    is_(res.get("user"), {"id": "alice", "name": "Alice A.", "role": "user"}, "hello result user")
    ok(isinstance(res.get("session_id"), str) and res["session_id"], "hello result session_id string")
    ok(isinstance(res.get("cursor"), str) and res["cursor"], "hello result cursor string")
    ok(isinstance(res.get("heartbeat_ms"), int), "hello result heartbeat_ms number")
    r2 = await c.request("hello", token=token("alice", name="Alice A."))
    ok(r2 is not None and r2.get("ok") is True
       and r2["result"].get("session_id") == res.get("session_id"),
       "a second hello for the same user is answered on the same session (%r)" % (r2,))
    r3 = await c.request("hello", token=token("mallory"))
    is_(err_code(r3), "forbidden", "a later hello with another user's token -> forbidden")
    res3 = await c.wait_closed(5)
    is_(res3 and res3[0], 1008, "... and close 1008")
    await c.close()

run(good_hello())


async def bearer_upgrade():
    c = await ws_connect(ng, token=token("bob", name="Bob"), bearer=True)
    r = await c.request("hello")
    ok(r is not None and r.get("ok") is True, "Authorization: Bearer on the upgrade, hello without token accepted (%r)" % (r,))
    is_(((r or {}).get("result") or {}).get("user"), {"id": "bob", "name": "Bob", "role": "user"},
        "... as the token's user")
    await c.close()

    # no hello at all: the upgrade's credentials suffice (PROTOCOL 4)
    c = await ws_connect(ng, token=token("bob", name="Bob"), bearer=True)
    w = await c.wait_event(lambda m: m.get("type") == "welcome", timeout=5)
    ok(w is not None and w.get("user", {}).get("id") == "bob",
       "Bearer upgrade without hello -> welcome for bob (%r)" % (w,))
    r = await c.request("send", conversation_id="999999999", client_msg_id="b1", body="x")
    ok(r is not None and r.get("ok") is False and err_code(r) != "unauthorized",
       "Bearer upgrade without hello: send is processed, not refused as unauthorized (%r)" % (r,))
    is_(err_code(r), "not_found", "... send to an unknown conversation -> not_found")
    await c.close()

    # a hello token for another user than the upgrade's: forbidden, 1008
    c = await ws_connect(ng, token=token("bob"), bearer=True)
    r = await c.request("hello", token=token("mallory"))
    is_(err_code(r), "forbidden", "upgrade as bob, hello with mallory's token -> forbidden")
    res = await c.wait_closed(5)
    is_(res and res[0], 1008, "... and close 1008")
    await c.close()

run(bearer_upgrade())

ws = upgrade_status(ng, headers={"Authorization": "Basic YWxpY2U6eA=="})
is_(ws.status, 401, "Authorization: Basic on the upgrade -> 401")
ws.close()

# -------------------------------------------------------- bad tokens ----

reject_case(ng, token("carol", exp_in=-60), "token_expired", "expired 60 s ago (leeway 10 s)")

accept_case(ng, token("carol", exp_in=-3), "carol", "expired 3 s ago, within leeway 10 s")

reject_case(ng, token("carol", nbf=int(time.time()) + 120), "unauthorized", "nbf 120 s in the future")

reject_case(ng, token("carol", key=b"another-secret-another-secret-0123456789"),
            "unauthorized", "signed with another secret")

good = token("carol")
h, p, s = good.split(".")
tampered = h + "." + b64u(json.dumps(jwt_claims("admin"))) + "." + s
reject_case(ng, tampered, "unauthorized", "payload swapped, signature kept")

reject_case(ng, raw_jwt({"alg": "none", "typ": "JWT"}, jwt_claims("carol")),
            "unauthorized", "alg none, empty signature")
reject_case(ng, raw_jwt({"alg": "none", "typ": "JWT"}, jwt_claims("carol"), sig=b"x" * 32),
            "unauthorized", "alg none with a signature")
reject_case(ng, raw_jwt({"alg": "HS512", "typ": "JWT"}, jwt_claims("carol"), secret=hs_secret()),
            "unauthorized", "alg HS512 (not configured)")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"}, {"sub": "carol", "iat": int(time.time())},
                        secret=hs_secret()),
            "unauthorized", "no exp claim")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"}, jwt_claims("carol", role="admin"),
                        secret=hs_secret()),
            "unauthorized", "unknown role")
reject_case(ng, "not.a.jwt", "unauthorized", "garbage token")
now = int(time.time())
accept_case(ng, token("carol", nbf=now + 3), "carol", "nbf 3 s in the future, within leeway 10 s")
reject_case(ng, token("carol", iat=now + 120), "unauthorized", "iat 120 s in the future")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"}, {"sub": "carol", "exp": str(now + 3600)},
                        secret=hs_secret()),
            "unauthorized", "exp as a string")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"}, {"sub": 42, "exp": now + 3600},
                        secret=hs_secret()),
            "unauthorized", "sub as a number")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"},
                        '{"sub":"carol","exp":%d,"sub":"admin"}' % (now + 3600), secret=hs_secret()),
            "unauthorized", "duplicate sub claim")
reject_case(ng, raw_jwt({"alg": "HS256", "typ": "JWT"}, {"exp": now + 3600}, secret=hs_secret()),
            "unauthorized", "no sub claim")

# ---------------------------------------------------------- RS256 ----

accept_case(ng_rs, token("rsuser", key=rs_priv, alg="RS256"), "rsuser", "RS256 good token")
# HS/RS confusion: HS256 with the public key PEM as the HMAC secret
reject_case(ng_rs, raw_jwt({"alg": "HS256", "typ": "JWT"}, jwt_claims("rsuser"), secret=rs_pub),
            "unauthorized", "RS256 server, HS256 signed with the public key PEM")
reject_case(ng_rs, raw_jwt({"alg": "RS256", "typ": "JWT"}, jwt_claims("rsuser"), secret=rs_pub),
            "unauthorized", "RS256 server, alg RS256 but HMAC(public PEM) signature")
reject_case(ng_rs, raw_jwt({"alg": "HS256", "typ": "JWT"}, jwt_claims("rsuser"), secret=rs_pub.rstrip(b"\n")),
            "unauthorized", "RS256 server, HS256 with the PEM minus newline")
reject_case(ng_rs, token("rsuser"), "unauthorized", "RS256 server, HS256 token (harness secret)")
other_priv, _ = rsa_keypair()
reject_case(ng_rs, token("rsuser", key=other_priv, alg="RS256"), "unauthorized",
            "RS256 signed by another key")
reject_case(ng_rs, raw_jwt({"alg": "none"}, jwt_claims("rsuser")), "unauthorized", "RS256 server, alg none")

accept_case(ng_cert, token("certuser", key=rs_priv, alg="RS256"), "certuser",
            "RS256 key given as an X.509 certificate, good token")
reject_case(ng_cert, raw_jwt({"alg": "HS256", "typ": "JWT"}, jwt_claims("certuser"),
                             secret=_cert.public_bytes(_ser.Encoding.PEM)),
            "unauthorized", "certificate server, HS256 signed with the certificate PEM")

# ---------------------------------------------------- secret files ----

st, body = me(ng_nl, token("nl", key=sec))
is_(st, 200, "secret file \"S\\n\": token signed with S accepted")
st, body = me(ng_nl, token("nl", key=sec + b"\n"))
is_(st, 401, "secret file \"S\\n\": token signed with S\\n refused")
st, body = me(ng_nl2, token("nl", key=sec + b"\n"))
is_(st, 200, "secret file \"S\\n\\n\": only one newline dropped, S\\n accepted")
st, body = me(ng_nl2, token("nl", key=sec))
is_(st, 401, "secret file \"S\\n\\n\": token signed with S refused")

# ---------------------------------------------------------- ES256 ----

accept_case(ng_es, token("esuser", key=ec_priv, alg="ES256"), "esuser", "ES256 good token")
reject_case(ng_es, raw_jwt({"alg": "HS256", "typ": "JWT"}, jwt_claims("esuser"), secret=ec_pub),
            "unauthorized", "ES256 server, HS256 signed with the public key PEM")
reject_case(ng_es, token("esuser", key=rs_priv, alg="RS256"), "unauthorized", "ES256 server, RS256 token")
other_ec, _ = ec_keypair()
reject_case(ng_es, token("esuser", key=other_ec, alg="ES256"), "unauthorized", "ES256 signed by another key")
# a DER-encoded ECDSA signature is not the JWS form (raw r||s)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec as _ec  # noqa: E402
_k = serialization.load_pem_private_key(ec_priv, None)
_si = b64u(json.dumps({"alg": "ES256", "typ": "JWT"})) + "." + b64u(json.dumps(jwt_claims("esuser")))
_der = _k.sign(_si.encode(), _ec.ECDSA(hashes.SHA256()))
reject_case(ng_es, _si + "." + b64u(_der), "unauthorized", "ES256 with a DER signature")

# ---------------------------------------------------------- tickets ----

st, hd, body = api("POST", "/chat/api/tickets", token=token("dave", name="Dave"), nginx=ng)
ok(st in (200, 201), "POST /chat/api/tickets with Bearer -> 2xx (%s)" % st)
like(hd.get("content-type"), r"^application/json", "ticket answer is JSON")
ok(isinstance(body, dict) and isinstance(body.get("ticket"), str) and len(body["ticket"]) >= 16,
   "answer has a ticket string (%r)" % (body,))
is_(body.get("expires_in") if isinstance(body, dict) else None, 30, "expires_in 30 (chat_ticket_ttl default)")
tk = body.get("ticket") if isinstance(body, dict) else None

st, hd, body = api("POST", "/chat/api/tickets", nginx=ng)
is_(st, 401, "POST /chat/api/tickets without a token -> 401")

ws = upgrade_status(ng, ticket=tk)
is_(ws.status, 101, "ticket on /chat/ws?ticket= -> 101")
if ws.status == 101:
    r = ws.request("hello")
    ok(r is not None and r.get("ok") is True, "hello without token after the ticket upgrade accepted")
    is_(((r or {}).get("result") or {}).get("user"), {"id": "dave", "name": "Dave", "role": "user"},
        "... as the ticket's user")
ws.close()

ws = upgrade_status(ng, ticket=tk)
is_(ws.status, 401, "the same ticket a second time -> 401")
is_(err_code(ws_body_json(ws)), "unauthorized", "... JSON error unauthorized")
ws.close()

st, hd, body = api("POST", "/chat/api/tickets", token=token("svc", role="service"), nginx=ng)
ws = upgrade_status(ng, ticket=body.get("ticket") if isinstance(body, dict) else None)
r = ws.request("hello") if ws.status == 101 else None
is_(((r or {}).get("result") or {}).get("user", {}).get("role"), "service",
    "ticket of a service token: the session has role service")
ws.close()

ws = upgrade_status(ng, ticket="A" * 43)
is_(ws.status, 401, "an unknown ticket -> 401")
ws.close()

# the ticket is redeemed by whichever worker gets the upgrade: try many
tks = []
for i in range(6):
    st, hd, body = api("POST", "/chat/api/tickets", token=token("dave"), nginx=ng)
    tks.append(body.get("ticket") if isinstance(body, dict) else None)
sts = []
for t in tks:
    ws = upgrade_status(ng, ticket=t)
    sts.append(ws.status)
    ws.close()
is_(sts, [101] * 6, "six tickets, each used once (any worker) -> 101")
sts = []
for t in tks:
    ws = upgrade_status(ng, ticket=t)
    sts.append(ws.status)
    ws.close()
is_(sts, [401] * 6, "... and each refused the second time")

# a ticket whose token runs out (beyond leeway) before it is redeemed
st, hd, body = api("POST", "/chat/api/tickets", token=token("erin", exp_in=-9), nginx=ng)
tk_lapsed = body.get("ticket") if isinstance(body, dict) else None
ok(st in (200, 201) and tk_lapsed, "ticket for a token 9 s past exp (leeway 10 s) issued")

st, hd, body = api("POST", "/chat/api/tickets", token=token("erin"), nginx=ng0)
is_(body.get("expires_in") if isinstance(body, dict) else None, 1, "chat_ticket_ttl 1s -> expires_in 1")
tk_exp = body.get("ticket") if isinstance(body, dict) else None
time.sleep(2.2)
ws = upgrade_status(ng0, ticket=tk_exp)
is_(ws.status, 401, "ticket used after its ttl (1 s, waited 2 s) -> 401")
ws.close()

ws = upgrade_status(ng, ticket=tk_lapsed)
is_(ws.status, 401, "ticket redeemed after its token expired (beyond leeway) -> 401")
is_(err_code(ws_body_json(ws)), "token_expired", "... code token_expired (%r)" % (ws_body_json(ws),))
ws.close()

# ---------------------------------------------------------- refresh ----

async def refresh_and_expiry():
    t_start = time.monotonic()
    # expires in 3 s, never refreshed -> 4001
    lapsing = await ws_connect(ng0, token=token("frank", exp_in=3))
    ok(lapsing.hello and lapsing.hello.get("ok"), "session with a 3 s token opened")
    # expires in 3 s, refreshed after 1 s
    refreshed = await ws_connect(ng0, token=token("frank", exp_in=3))
    ok(refreshed.hello and refreshed.hello.get("ok"), "second session with a 3 s token opened")
    # a token accepted thanks to the leeway (ng: 10 s): the leeway is clock
    # skew allowed for exp, so the session lasts until exp + leeway, it is
    # not closed the moment after its hello was accepted
    skewed = await ws_connect(ng, token=token("hank", exp_in=-7))
    ok(skewed.hello and skewed.hello.get("ok"), "token 7 s past exp accepted (leeway 10 s)")
    # the same two cases for sessions authenticated on the upgrade (no hello)
    b_lapsing = await ws_connect(ng0, token=token("gina", exp_in=3), bearer=True)
    b_refreshed = await ws_connect(ng0, token=token("gina", exp_in=3), bearer=True)
    await asyncio.sleep(1)
    r = await b_refreshed.request("auth", token=token("gina", exp_in=3600))
    ok(r is not None and r.get("ok") is True, "Bearer session without hello: auth refresh accepted (%r)" % (r,))
    pong = None
    try:
        await skewed.send({"type": "ping", "id": 70})
        pong = await skewed.wait_event(lambda m: m.get("type") == "pong", timeout=2)
    except Exception as e:  # closed already
        note("ping on the skewed session: %r" % (e,))
    ok(pong == {"type": "pong", "id": 70} and not skewed.closed,
       "... its session is still open 1 s later, before exp + leeway (closed: %r %r)"
       % (skewed.close_code, skewed.close_reason))
    new_tok = token("frank", exp_in=3600)
    r = await refreshed.request("auth", token=new_tok)
    ok(r is not None and r.get("ok") is True, "auth with a new token for the same sub accepted (%r)" % (r,))
    r = await refreshed.request("auth", token=token("grace", exp_in=3600))
    is_(err_code(r), "forbidden", "auth with a token for another sub -> forbidden")
    r = await refreshed.request("auth", token=token("frank", exp_in=-60))
    is_(err_code(r), "token_expired", "auth with an expired token -> token_expired")
    r = await refreshed.request("auth", token=token("frank", key=b"y" * 40))
    is_(err_code(r), "unauthorized", "auth with a badly signed token -> unauthorized")

    res = await lapsing.wait_closed(8)
    el = time.monotonic() - t_start
    is_(res and res[0], 4001, "session whose token expires is closed with 4001")
    ok(el >= 2.0, "... not before the token's exp (%.1fs)" % el)

    # the refreshed one outlives the first token's exp
    while time.monotonic() - t_start < 4.5:
        await asyncio.sleep(0.2)
    await refreshed.send({"type": "ping", "id": 77})
    pong = await refreshed.wait_event(lambda m: m.get("type") == "pong", timeout=5)
    is_(pong, {"type": "pong", "id": 77}, "refreshed session still open after the first token's exp")
    ok(not refreshed.closed, "refreshed session not closed")
    res = await skewed.wait_closed(5)
    is_(res and res[0], 4001, "... and closed with 4001 once exp + leeway has passed")
    res = await b_lapsing.wait_closed(3)
    is_(res and res[0], 4001, "Bearer session without hello whose token expires -> 4001")
    await b_refreshed.send({"type": "ping", "id": 78})
    pong = await b_refreshed.wait_event(lambda m: m.get("type") == "pong", timeout=5)
    is_(pong, {"type": "pong", "id": 78}, "refreshed Bearer session still open after the first exp")
    for c in (refreshed, lapsing, b_lapsing, b_refreshed, skewed):
        await c.close()

run(refresh_and_expiry())


# ----------------------------------------------------------- origin ----

for origin, want in (("http://good.example", 101), ("HTTP://GOOD.EXAMPLE", 101),
                     ("http://bad.example", 403), ("http://good.example.evil", 403),
                     ("http://good.example:8080", 403), ("null", 403), (None, 101)):
    hdrs = {"Sec-WebSocket-Protocol": "chat.v1"}
    if origin is not None:
        hdrs["Origin"] = origin
    ws = RawWS(ng, headers=hdrs, timeout=5)
    is_(ws.status, want, "Origin %s -> %d" % (origin, want))
    if want == 403:
        is_(err_code(ws_body_json(ws)), "forbidden", "Origin %s: JSON error forbidden" % origin)
    ws.close()

# origin is checked on the ticket path as well
st, hd, body = api("POST", "/chat/api/tickets", token=token("dave"), nginx=ng)
ws = RawWS(ng, headers={"Sec-WebSocket-Protocol": "chat.v1", "Origin": "http://bad.example"},
        ticket=body.get("ticket"), timeout=5)
is_(ws.status, 403, "ticket upgrade from a bad Origin -> 403")
ws.close()

# ------------------------------------------------------------- REST ----

st, hd, body = api("GET", "/chat/api/me", nginx=ng)
is_(st, 401, "REST without a token -> 401")
like(hd.get("content-type"), r"^application/json", "... JSON")
is_(err_code(body), "unauthorized", "... error code unauthorized")

st, hd, body = api("GET", "/chat/api/conversations", nginx=ng)
is_(st, 401, "GET /chat/api/conversations without a token -> 401")

st, hd, body = api("GET", "/chat/api/me", headers={"Authorization": "bearer " + token("ivy")}, nginx=ng)
is_(st, 200, "REST with the scheme spelled \"bearer\" (case-insensitive) -> 200")

st, hd, body = api("GET", "/chat/api/me?token=" + token("ivy"), nginx=ng)
is_(st, 401, "a token in the URL (?token=) is not a way to authenticate REST")

st, hd, body = api("GET", "/chat/api/me", headers={"Authorization": "Bearer "}, nginx=ng)
is_(st, 401, "REST with an empty Bearer -> 401")

st, hd, body = api("GET", "/chat/api/me", token=token("henry", name="Henry"), nginx=ng)
is_(st, 200, "REST /me with a user token -> 200")
is_(body.get("user") if isinstance(body, dict) else body, {"id": "henry", "name": "Henry", "role": "user"},
    "/me: user role \"user\"")

st, hd, body = api("GET", "/chat/api/me", token=token("platform", role="service"), nginx=ng)
is_(st, 200, "REST /me with a service token -> 200")
is_((body.get("user") or {}).get("role") if isinstance(body, dict) else body, "service",
    "/me: role \"service\"")

r, code = hello_result(ng, token("platform", role="service"))
is_(((r or {}).get("result") or {}).get("user", {}).get("role"), "service", "hello: role \"service\"")

done()
