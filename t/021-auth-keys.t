#!/usr/bin/python3
# Authentication, issue 7: the optional iss / aud checks (chat_jwt_issuer,
# chat_jwt_audience; RFC 7519 4.1.1, 4.1.3) on every way a token comes in
# (hello, Authorization on the upgrade, REST), several keys selected by kid
# (chat_jwt_key file kid=name; HS256 and RS256), the one-key form unchanged,
# configuration errors, and a ticket flood: one user's tickets cost only that
# user's own, and a table full of other users' live tickets answers 429.
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()

ISS = "https://platform.example"
AUD = "chat"

# iss and aud both required
ng_ia = Nginx(pg, workers=2, http='chat_jwt_issuer "%s";\nchat_jwt_audience %s;' % (ISS, AUD))

# only the issuer
ng_iss = Nginx(pg, workers=2, http='chat_jwt_issuer "%s";' % ISS)

# the one-argument form of chat_jwt_key, neither check (behaviour as before)
ng = Nginx(pg, workers=2)

# HS256, two keys, each with a kid
sec_a = b"A" * 8 + b"0123456789abcdef0123456789abcdef"
sec_b = b"B" * 8 + b"0123456789abcdef0123456789abcdef"
sec_c = b"C" * 8 + b"0123456789abcdef0123456789abcdef"
file_a = write_file("secret-a", sec_a)
file_b = write_file("secret-b", sec_b)
file_c = write_file("secret-c", sec_c + b"\n")
ng_kid = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg HS256;\n'
               'chat_jwt_key %s kid=a;\nchat_jwt_key %s kid=b;' % (pg.conninfo, file_a, file_b))

# HS256, one key without a kid (the old key) and one with (the new one)
ng_mix = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg HS256;\n'
               'chat_jwt_key %s;\nchat_jwt_key %s kid=b;' % (pg.conninfo, file_c, file_b))

# RS256, two public keys with kids
rs1_priv, rs1_pub = rsa_keypair()
rs2_priv, rs2_pub = rsa_keypair()
ng_rs = Nginx(pg, workers=2, chat_http='chat_db "%s";\nchat_jwt_alg RS256;\n'
              'chat_jwt_key %s kid=r1;\nchat_jwt_key %s kid=r2;'
              % (pg.conninfo, write_file("rs1.pub", rs1_pub), write_file("rs2.pub", rs2_pub)))

# a small zone: the fewest live tickets allowed (1024); long tickets, so
# that none runs out while the table is being filled
TTL = 120
ng_fl = Nginx(pg, workers=2, http="chat_shm_size 2m;\nchat_bus_slots 1024;\n"
              "chat_ticket_ttl %ds;" % TTL)

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


# ------------------------------------------------------------ helpers ----

def err(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code"), body["error"].get("message")
    return None, None


def me(nginx, tok):
    st, hd, body = api("GET", "/chat/api/me", token=tok, nginx=nginx)
    return st, body


def hello_result(nginx, tok):
    """hello over a fresh WebSocket; returns (reply, close code or None)."""
    async def go():
        c = await ws_connect(nginx, token=tok)
        r = c.hello
        code = None
        if r is None or not r.get("ok"):
            res = await c.wait_closed(5)
            code = res[0] if res else "not closed"
        await c.close()
        return r, code
    return run(go())


def upgrade(nginx, tok=None, ticket=None):
    return RawWS(nginx, headers={"Sec-WebSocket-Protocol": "chat.v1"}, token=tok,
              ticket=ticket, timeout=5)


def reject_case(nginx, tok, name, want_msg=None):
    """Refused alike on hello (error reply + close 1008), on the upgrade's
    Authorization (401) and on REST (401), as "unauthorized"."""
    r, code = hello_result(nginx, tok)
    ok(r is not None and r.get("ok") is False, "%s: hello -> error reply" % name)
    c, m = err(r)
    is_(c, "unauthorized", "%s: hello error unauthorized" % name)
    if want_msg:
        is_(m, want_msg, "%s: hello message \"%s\"" % (name, want_msg))
    is_(code, 1008, "%s: hello -> close 1008" % name)
    ws = upgrade(nginx, tok)
    is_(ws.status, 401, "%s: Authorization on the upgrade -> 401" % name)
    is_(err(ws_body_json(ws))[0], "unauthorized", "%s: upgrade 401 unauthorized" % name)
    ws.close()
    st, body = me(nginx, tok)
    is_(st, 401, "%s: REST -> 401" % name)
    c, m = err(body)
    is_(c, "unauthorized", "%s: REST error unauthorized" % name)
    if want_msg:
        is_(m, want_msg, "%s: REST message \"%s\"" % (name, want_msg))


def accept_case(nginx, tok, sub, name):
    r, code = hello_result(nginx, tok)
    ok(r is not None and r.get("ok") is True, "%s: hello accepted (%r)" % (name, r))
    is_(((r or {}).get("result") or {}).get("user", {}).get("id"), sub, "%s: hello user id" % name)
    ws = upgrade(nginx, tok)
    is_(ws.status, 101, "%s: Authorization on the upgrade -> 101" % name)
    ws.close()
    st, body = me(nginx, tok)
    is_(st, 200, "%s: REST /me 200" % name)
    is_((body.get("user") or {}).get("id") if isinstance(body, dict) else body, sub,
        "%s: REST /me user id" % name)


# ------------------------------------------------------- iss and aud ----

accept_case(ng_ia, token("ia1", iss=ISS, aud=AUD), "ia1", "iss and aud (string) match")
accept_case(ng_ia, token("ia2", iss=ISS, aud=["other", AUD]), "ia2", "aud an array containing it")
accept_case(ng_ia, token("ia3", iss=ISS, aud=[AUD]), "ia3", "aud an array of one")

reject_case(ng_ia, token("ia", aud=AUD), "no iss", "missing or bad iss")
reject_case(ng_ia, token("ia", iss="https://evil.example", aud=AUD), "another iss",
            "issuer not accepted")
reject_case(ng_ia, token("ia", iss=ISS.upper(), aud=AUD), "iss differing in case only")
reject_case(ng_ia, token("ia", iss=ISS + "/", aud=AUD), "iss with a trailing slash")
reject_case(ng_ia, token("ia", iss=["https://platform.example"], aud=AUD), "iss as an array")
reject_case(ng_ia, token("ia", iss=ISS), "no aud", "missing or bad aud")
reject_case(ng_ia, token("ia", iss=ISS, aud="other"), "another aud", "audience not accepted")
reject_case(ng_ia, token("ia", iss=ISS, aud=["other", "chat2"]), "aud array without it",
            "audience not accepted")
reject_case(ng_ia, token("ia", iss=ISS, aud=[]), "aud an empty array")
reject_case(ng_ia, token("ia", iss=ISS, aud=[AUD, 5]), "aud array with a number in it",
            "missing or bad aud")
reject_case(ng_ia, token("ia", iss=ISS, aud=7), "aud a number", "missing or bad aud")
reject_case(ng_ia, token("ia", iss=ISS, aud="CHAT"), "aud differing in case only")

# the checks come before the others: a foreign token that has also expired
# is refused as foreign, not as "token_expired" (a refresh would not help)
st, body = me(ng_ia, token("ia", exp_in=-3600, iss="https://evil.example", aud=AUD))
is_((st, err(body)[0]), (401, "unauthorized"), "expired token of another issuer -> unauthorized")
st, body = me(ng_ia, token("ia", exp_in=-3600, iss=ISS, aud=AUD))
is_((st, err(body)[0]), (401, "token_expired"), "expired token of the issuer -> token_expired")

# no ticket for a foreign token
st, hd, body = api("POST", "/chat/api/tickets", token=token("ia", iss=ISS, aud="other"), nginx=ng_ia)
is_(st, 401, "POST /tickets with a token for another audience -> 401")
st, hd, body = api("POST", "/chat/api/tickets", token=token("ia4", iss=ISS, aud=AUD), nginx=ng_ia)
ws = upgrade(ng_ia, ticket=body.get("ticket") if isinstance(body, dict) else None)
is_(ws.status, 101, "ticket of a good token -> 101")
ws.close()


async def refresh_aud():
    c = await ws_connect(ng_ia, token=token("ia5", iss=ISS, aud=AUD))
    ok(c.hello and c.hello.get("ok"), "session with iss and aud opened")
    r = await c.request("auth", token=token("ia5", iss=ISS, aud="other"))
    is_(err(r)[0], "unauthorized", "in-band auth refresh with another audience -> unauthorized")
    r = await c.request("auth", token=token("ia5", iss=ISS, aud=[AUD]))
    ok(r is not None and r.get("ok") is True, "in-band auth refresh with a good token accepted (%r)" % (r,))
    await c.close()

run(refresh_aud())

# only an issuer configured: aud is not looked at
accept_case(ng_iss, token("is1", iss=ISS), "is1", "issuer only: no aud")
accept_case(ng_iss, token("is2", iss=ISS, aud="anything"), "is2", "issuer only: any aud")
reject_case(ng_iss, token("is3", aud=AUD), "issuer only: no iss", "missing or bad iss")

# neither configured: iss and aud are ignored, as before
accept_case(ng, token("un1", iss="https://evil.example", aud=7), "un1", "no checks configured: any iss, aud")

# ----------------------------------------------------------- kid: HS256 ----

accept_case(ng_kid, token("ka", key=sec_a, headers={"kid": "a"}), "ka", "kid a, signed with key a")
accept_case(ng_kid, token("kb", key=sec_b, headers={"kid": "b"}), "kb", "kid b, signed with key b")
reject_case(ng_kid, token("kx", key=sec_a, headers={"kid": "b"}), "kid b, signed with key a",
            "bad signature")
reject_case(ng_kid, token("kx", key=sec_b, headers={"kid": "a"}), "kid a, signed with key b",
            "bad signature")
reject_case(ng_kid, token("kx", key=sec_a, headers={"kid": "c"}), "unknown kid", "unknown key id")
reject_case(ng_kid, token("kx", key=sec_a, headers={"kid": "A"}), "kid differing in case only",
            "unknown key id")
reject_case(ng_kid, token("kx", key=sec_a, headers={"kid": ""}), "empty kid", "unknown key id")
reject_case(ng_kid, token("kx", key=sec_a), "no kid, every key has one", "key id required")
reject_case(ng_kid, raw_jwt({"alg": "HS256", "typ": "JWT", "kid": 1}, jwt_claims("kx"), sec_a),
            "kid a number", "bad key id")
# the algorithm is still the configured one, whatever the kid
reject_case(ng_kid, raw_jwt({"alg": "HS512", "kid": "a"}, jwt_claims("kx"), sec_a),
            "kid a, alg HS512", "algorithm not allowed")

# one key without a kid (old) and one with (new): rotation in progress
accept_case(ng_mix, token("m1", key=sec_c), "m1", "no kid -> the key without a kid (file with newline)")
accept_case(ng_mix, token("m2", key=sec_b, headers={"kid": "b"}), "m2", "kid b -> key b")
reject_case(ng_mix, token("mx", key=sec_b), "no kid, signed with key b (it has a kid)",
            "bad signature")
reject_case(ng_mix, token("mx", key=sec_c, headers={"kid": "b"}), "kid b, signed with the kid-less key",
            "bad signature")
reject_case(ng_mix, token("mx", key=sec_c, headers={"kid": "old"}), "kid not configured",
            "unknown key id")

# the one-argument form: a kid in the token is not looked at (as before)
accept_case(ng, token("k1", headers={"kid": "whatever"}), "k1", "one key, no kid configured: token kid ignored")

# ----------------------------------------------------------- kid: RS256 ----

accept_case(ng_rs, token("r1", key=rs1_priv, alg="RS256", headers={"kid": "r1"}), "r1", "RS256 kid r1")
accept_case(ng_rs, token("r2", key=rs2_priv, alg="RS256", headers={"kid": "r2"}), "r2", "RS256 kid r2")
reject_case(ng_rs, token("rx", key=rs2_priv, alg="RS256", headers={"kid": "r1"}),
            "RS256 kid r1 signed with key r2", "bad signature")
reject_case(ng_rs, token("rx", key=rs1_priv, alg="RS256", headers={"kid": "r3"}),
            "RS256 unknown kid", "unknown key id")
reject_case(ng_rs, token("rx", key=rs1_priv, alg="RS256"), "RS256 no kid", "key id required")
# HS/RS confusion with a kid: HS256 with a public key PEM as the secret
reject_case(ng_rs, raw_jwt({"alg": "HS256", "kid": "r1"}, jwt_claims("rx"), rs1_pub),
            "RS256 server, HS256 with the PEM of kid r1", "algorithm not allowed")

# -------------------------------------------------- configuration errors ----

# nginx -t never frees its cycle: under ASan that is no finding (the harness
# sets the same for the servers it starts)
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")


def conf_fails(name, chat_http=None, http="", want=None):
    n = Nginx(pg, workers=1, chat_http=chat_http, http=http, start=False)
    good, out = n.test_conf()
    ok(not good, "config refused: %s" % name)
    if want:
        like(out, want, "... %s" % want)


def keys(*lines):
    return 'chat_db "%s";\nchat_jwt_alg HS256;\n%s' % (pg.conninfo, "\n".join(lines))


conf_fails("two keys with the same kid",
           keys("chat_jwt_key %s kid=a;" % file_a, "chat_jwt_key %s kid=a;" % file_b),
           want=r"duplicate chat_jwt_key kid \"a\"")
conf_fails("a parameter other than kid=", keys("chat_jwt_key %s id=a;" % file_a),
           want=r"invalid parameter \"id=a\"")
conf_fails("an empty kid=", keys("chat_jwt_key %s kid=;" % file_a))
conf_fails("one of two key files missing",
           keys("chat_jwt_key %s kid=a;" % file_a, "chat_jwt_key %s/nope kid=b;" % os.path.dirname(file_a)),
           want=r"chat_jwt_key: open\(\) .*nope.* failed")
conf_fails("a short secret among two keys",
           keys("chat_jwt_key %s kid=a;" % file_a, "chat_jwt_key %s kid=s;" % write_file("short", b"x" * 20)),
           want=r"must be at least 32 bytes")
conf_fails("an empty chat_jwt_issuer", http='chat_jwt_issuer "";', want=r"chat_jwt_issuer must not be empty")
conf_fails("an empty chat_jwt_audience", http='chat_jwt_audience "";')
conf_fails("chat_jwt_issuer twice", http="chat_jwt_issuer a;\nchat_jwt_issuer b;", want=r"is duplicate")
n = Nginx(pg, workers=1, chat_http=keys("chat_jwt_key %s;" % file_a, "chat_jwt_key %s;" % file_c),
          start=False)
good, out = n.test_conf()
ok(good, "two keys without a kid are accepted (%s)" % out.strip()[-200:])

# ------------------------------------------------------------ tickets ----

def ticket(sub):
    st, hd, body = api("POST", "/chat/api/tickets", token=token(sub), nginx=ng_fl)
    return st, hd, body


def redeems(tk):
    ws = upgrade(ng_fl, ticket=tk)
    st = ws.status
    ws.close()
    return st


st, hd, body = ticket("victim")
victim_tk = body.get("ticket") if isinstance(body, dict) else None
ok(st == 200 and victim_tk, "victim's ticket issued")
st, hd, body = ticket("victim")
victim_tk2 = body.get("ticket") if isinstance(body, dict) else None

# one user asks for more tickets than the whole table holds (1024): each
# is issued, and the flood costs only the flooder's own oldest ones
FLOOD = 1100
flood = []
sts = []
for i in range(FLOOD):
    st, hd, body = ticket("flooder")
    sts.append(st)
    flood.append(body.get("ticket") if isinstance(body, dict) else None)
is_(sorted(set(sts)), [200], "a flood of %d tickets by one user: each answered 200" % FLOOD)
is_(redeems(victim_tk), 101, "the victim's earlier ticket still works after the flood")
is_(redeems(flood[-1]), 101, "the flooder's newest ticket works")
is_(redeems(flood[0]), 401, "the flooder's first ticket was evicted (its own)")
is_(redeems(flood[FLOOD // 2]), 401, "... and one from the middle of the flood")
valid = [i for i in range(FLOOD - 40, FLOOD - 1) if redeems(flood[i]) == 101]
is_(valid, list(range(FLOOD - 16, FLOOD - 1)),
    "of the flooder's last 40 tickets, exactly the newest 16 were live (the per-user cap)")

# fill the table with other users' live tickets, 16 each (the per-user cap)
issued, refused, user_tks = 0, None, {}
for u in range(100):
    for i in range(16):
        st, hd, body = ticket("filler%d" % u)
        if st == 200:
            issued += 1
            user_tks.setdefault(u, []).append(body["ticket"])
        else:
            refused = (st, hd, body, u)
            break
    if refused:
        break
ok(refused is not None, "the table fills up (%d tickets issued, then %r)"
   % (issued, refused and refused[0]))
ok(issued >= 1000, "... after at least 1000 live tickets (%d)" % issued)
if refused:
    st, hd, body, u = refused
    is_(st, 429, "a full table of others' live tickets: 429")
    c, m = err(body)
    is_(c, "rate_limited", "... error code rate_limited")
    ra = body.get("error", {}).get("retry_after_ms") if isinstance(body, dict) else None
    ok(isinstance(ra, int) and 0 < ra <= (TTL + 1) * 1000,
       "... retry_after_ms until the oldest runs out (%r, ttl %d s)" % (ra, TTL))
    ok(hd.get("retry-after", "").isdigit(), "... and a Retry-After header (%r)" % hd.get("retry-after"))
else:
    for i in range(4):
        ok(0, "no 429 to look at")

st, hd, body = ticket("newcomer")
is_(st, 429, "still full: a new user's ticket -> 429")
is_(redeems(victim_tk2), 101, "the victim's other earlier ticket survived the full table")
st, hd, body = ticket("filler0")
is_(st, 200, "a user at its cap still gets a ticket when the table is full (its own oldest goes)")
is_(redeems(user_tks[0][0]), 401, "... filler0's oldest ticket is the one that went")
is_(redeems(user_tks[0][1]), 101, "... its next one is still live")
is_(redeems(user_tks[1][0]), 101, "another filler's oldest ticket is untouched")
# redeeming freed two slots
st, hd, body = ticket("newcomer")
is_(st, 200, "once tickets are redeemed there is room again: 200")
ok(isinstance(body, dict) and redeems(body.get("ticket")) == 101, "... and that ticket works")

done()
