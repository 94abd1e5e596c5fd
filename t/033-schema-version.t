#!/usr/bin/python3
# A database whose schema is behind the module (version row gone, or the
# version table itself missing): REST answers 503 "unavailable" with
# retry_after_ms, WebSocket hello answers "unavailable", error.log names the
# schema and the migrations; once the database is migrated the module
# recovers by itself (it keeps reconnecting) within a few seconds.
import asyncio
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403


def code(b):
    return b.get("error", {}).get("code") if isinstance(b, dict) else None


def check_unavailable(ng, label):
    tok = token("alice")
    for method, path, body in (("GET", "/chat/api/conversations", None),
                               ("POST", "/chat/api/conversations",
                                {"kind": "direct", "members": ["bob"]}),
                               ("GET", "/chat/api/conversations/1/messages", None)):
        # several requests: both workers answer the same
        res = [api(method, path, token=tok, json=body, nginx=ng) for _ in range(6)]
        is_(sorted({r[0] for r in res}), [503], "%s: %s %s -> 503 (x6)" % (label, method, path))
        is_(sorted({code(r[2]) for r in res}, key=str), ["unavailable"],
            "%s: %s %s -> code unavailable" % (label, method, path))
        ok(all(isinstance(r[2], dict)
               and isinstance(r[2].get("error", {}).get("retry_after_ms"), int)
               and r[2]["error"]["retry_after_ms"] > 0 for r in res),
           "%s: %s %s -> retry_after_ms > 0" % (label, method, path))
        ok(all(re.match(r"^\d+$", r[1].get("retry-after", "")) for r in res),
           "%s: %s %s -> Retry-After header" % (label, method, path))

    async def ws():
        out = []
        for _ in range(4):
            c = await ws_connect(ng, token=tok)
            out.append(c.hello)
            await c.close()
        return out
    hellos = asyncio.run(ws())
    ok(all(h and h.get("ok") is False and h.get("error", {}).get("code") == "unavailable"
           and isinstance(h["error"].get("retry_after_ms"), int) for h in hellos),
       "%s: WebSocket hello -> error unavailable with retry_after_ms" % label)
    if not all(h and h.get("ok") is False for h in hellos):
        diag("hellos: %r" % (hellos,))


def recovered(ng, timeout):
    """Seconds until every one of 10 consecutive requests succeeds."""
    tok = token("alice")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        res = [api("GET", "/chat/api/conversations", token=tok, nginx=ng)[0] for _ in range(10)]
        if res == [200] * 10:
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


def works(ng, label):
    ta, tb = token("alice"), token("bob")
    st, _, b = api("POST", "/chat/api/conversations", token=ta, nginx=ng,
                   json={"kind": "direct", "members": ["bob"]})
    ok(st in (200, 201), "%s: create a conversation works (%s)" % (label, st))
    conv = b["conversation"]["id"] if isinstance(b, dict) and "conversation" in b else "0"

    async def run():
        cs = [await ws_connect(ng, token=tb) for _ in range(4)]
        r = await cs[0].request("send", conversation_id=conv, client_msg_id=label,
                                body="back")
        evs = [await c.wait_event("message.new", 10) for c in cs]
        for c in cs:
            await c.close()
        return cs, r, evs
    cs, r, evs = asyncio.run(run())
    ok(all(c.hello and c.hello.get("ok") for c in cs), "%s: WebSocket hello works" % label)
    ok(r and r.get("ok"), "%s: send works" % label)
    ok(all(e is not None for e in evs), "%s: the event reaches every connection" % label)


# ------------------------------------------- 1. version row gone ----

pg = PgCluster()
# the newest migration's number: what the module requires
latest = max(int(f.split("_")[0]) for f in os.listdir(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sql"))
    if f[0].isdigit() and f.endswith(".sql"))
pg.psql("DELETE FROM chat_schema_version")
is_(pg.psql("SELECT coalesce(max(version), 0) FROM chat_schema_version"), [["0"]],
    "schema version is 0 before nginx starts")
t_started = time.monotonic()
ng = Nginx(pg, workers=2)
m = ng.wait_log(r"\[(error|emerg|crit|alert)\].*schema.*", timeout=10)
ok(m, "error.log has an error about the schema")
like(m.group(0) if m else None, r"version 0 .*behind.*%d.*migrations" % latest,
     "... naming the version, the module's version and the migrations")
check_unavailable(ng, "version 0")
time.sleep(1.5)   # let the module retry a few times
n = len(re.findall(r"schema version 0 is behind", ng.error_log()))
ok(1 <= n <= 2, "the error is logged once per worker, not on every retry (%d)" % n)
check_unavailable(ng, "version 0, still")
# long enough for the reconnect backoff to reach its ceiling (5 s by default)
time.sleep(max(0, 8 - (time.monotonic() - t_started)))

pg.psql("INSERT INTO chat_schema_version (version) VALUES (%d)" % latest)
t = recovered(ng, 20)
ok(t is not None and t < 12, "after restoring the version row the module recovers "
   "by itself (%s s)" % (None if t is None else round(t, 1)))
ok(ng.wait_log(r"schema is at version %d now" % latest, timeout=5),
   "error.log notes the schema is current now")
works(ng, "after restore")
is_(ng.stop(), 0, "nginx quits cleanly")

# ------------------------------------------- 2. no schema at all ----

pg2 = PgCluster(migrate=False)
ng2 = Nginx(pg2, workers=2)
m = ng2.wait_log(r"\[(error|emerg|crit|alert)\].*chat_schema_version.*", timeout=10)
ok(m, "empty database: error.log has an error about chat_schema_version")
like(m.group(0) if m else None, r"missing.*migrations",
     "... saying it is missing and naming the migrations")
check_unavailable(ng2, "empty database")
pg2.migrate()
t = recovered(ng2, 20)
ok(t is not None and t < 12, "after running the migrations the module recovers "
   "by itself (%s s)" % (None if t is None else round(t, 1)))
works(ng2, "after migrate")

done()
