#!/usr/bin/python3
# /chat/health and /chat/ready, for load balancers and orchestrators:
# health answers 200 while the worker runs, whatever the store does; ready
# answers 200 with every check ok, and 503 (JSON naming the check) when
# PostgreSQL is down or the schema is behind, then 200 again by itself once
# it is back.  Each look sends several requests (whichever workers answer).
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

N = 8   # requests per look: the two workers both answer


def look(ng, path, method="GET"):
    out = []
    for _ in range(N):
        st, hdrs, body = api(method, path, nginx=ng)
        out.append((st, hdrs, body))
    return out


def ready_state(ng):
    res = look(ng, "/chat/ready")
    return sorted({r[0] for r in res}), res


def wait_ready(ng, status, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        sts, res = ready_state(ng)
        if sts == [status]:
            return time.monotonic() - t0, res
        time.sleep(0.2)
    return None, ready_state(ng)[1]


pg = PgCluster()
ng = Nginx(pg, workers=2)
workers = set(ng.worker_pids())

# ---------------------------------------------------------------- health
res = look(ng, "/chat/health")
is_(sorted({r[0] for r in res}), [200], "health: 200 (x%d)" % N)
ok(all(isinstance(r[2], dict) and r[2].get("status") == "ok" for r in res),
   'health: {"status":"ok"}')
ok({r[2].get("pid") for r in res} <= workers and len({r[2].get("pid") for r in res}) >= 1,
   "health: the pid is the answering worker's (%s)" % sorted({r[2].get("pid") for r in res}))
ok(all(r[1].get("cache-control") == "no-store" for r in res), "health: Cache-Control: no-store")
ok(all(r[1].get("content-type", "").startswith("application/json") for r in res),
   "health: JSON")
st, hdrs, body = api("HEAD", "/chat/health", nginx=ng)
is_((st, body or None), (200, None), "health: HEAD 200 without a body")
st, hdrs, body = api("POST", "/chat/health", nginx=ng, json={})
is_(st, 405, "health: POST is 405")

# ---------------------------------------------------------------- ready
t, res = wait_ready(ng, 200, 10)
ok(t is not None, "ready: 200 once the workers have the store")
b = res[0][2] if res and isinstance(res[0][2], dict) else {}
is_(b.get("ready"), True, "ready: true")
c = b.get("checks") or {}
is_([c.get(k, {}).get("ok") for k in ("store", "schema", "bus", "zone")], [True] * 4,
    "ready: store, schema, bus and zone ok")
ok((c.get("store") or {}).get("connections", 0) >= 1, "ready: the pool has live connections")
is_((c.get("schema") or {}).get("version"),
    max(int(f.split("_")[0]) for f in os.listdir(os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "..", "sql")) if f[0].isdigit() and f.endswith(".sql")),
    "ready: the schema version the module needs is the newest migration")
z = c.get("zone") or {}
ok(0 < z.get("free", 0) <= z.get("size", 0), "ready: zone free %s of %s bytes" % (
    z.get("free"), z.get("size")))
ok(isinstance((c.get("bus") or {}).get("lag"), int), "ready: the bus reports its lag")
diag("ready: %s" % json.dumps(b))

# --------------------------------------------------- PostgreSQL stopped
pg.stop()
t, res = wait_ready(ng, 503, 15)
ok(t is not None, "PostgreSQL stopped: ready 503 on both workers (after %s s)" % (
    None if t is None else round(t, 1)))
b = res[0][2] if res and isinstance(res[0][2], dict) else {}
is_([b.get("ready"), (b.get("checks") or {}).get("store", {}).get("ok")], [False, False],
    "ready: false, store not ok")
ok(isinstance((b.get("checks") or {}).get("store", {}).get("retry_after_ms"), int),
   "ready: the store says when it retries")
res = look(ng, "/chat/health")
is_(sorted({r[0] for r in res}), [200], "health stays 200 while the store is down")

pg.start()
t, res = wait_ready(ng, 200, 30)
ok(t is not None, "PostgreSQL back: ready 200 again by itself (after %s s)" % (
    None if t is None else round(t, 1)))

# ------------------------------------------------------ schema behind
latest = (c.get("schema") or {}).get("version")
pg.psql("DELETE FROM chat_schema_version")
pg.restart()          # every connection reconnects and checks the schema again


def schema_behind_everywhere():
    res = look(ng, "/chat/ready")
    if all(r[0] == 503 and isinstance(r[2], dict)
           and (r[2].get("checks") or {}).get("schema", {}).get("ok") is False for r in res):
        return res
    return None


try:
    res = wait_for(schema_behind_everywhere, 20)
except Exception:
    res = None
ok(res, "schema behind: ready 503 with the schema check not ok, on both workers")
pg.psql("INSERT INTO chat_schema_version (version) VALUES (%d)" % latest)
t, res = wait_ready(ng, 200, 30)
ok(t is not None, "schema migrated: ready 200 again (after %s s)" % (
    None if t is None else round(t, 1)))

ng.check_log(allow=(r"schema version 0 is behind", r"database schema"))
ng.stop()

# ----------------------- their own locations, with their own access rules
ng2 = Nginx(pg, workers=1, server="""
    merge_slashes off;
    location = /chat/health { chat; allow 127.0.0.1; deny all; }
    location = /chat/ready { chat; deny all; }
    location ~ ^/probe/(health|api)$ { chat; }
""")
st, _, body = api("GET", "/chat/health", nginx=ng2)
is_((st, (body or {}).get("status")), (200, "ok"),
    "location = /chat/health { chat; allow 127.0.0.1; ... }: 200")
st, _, body = api("GET", "/chat/ready", nginx=ng2)
is_(st, 403, "location = /chat/ready { chat; deny all; }: 403 by nginx's access rules")
st, _, body = api("GET", "/probe/health", nginx=ng2)
is_((st, (body or {}).get("status")), (200, "ok"), "a regex location: its last segment")
st, _, body = api("GET", "/chat/api/me", nginx=ng2, token=token("alice"))
is_(st, 200, "the rest of /chat/ is unchanged")
st, _, body = api("GET", "/probe/api", nginx=ng2)
is_(st, 404, "a location of its own serves only an endpoint of one segment (not the API)")
st, _, body = api("GET", "/chat//ready", nginx=ng2)
is_(st, 404, "/chat//ready (merge_slashes off) does not reach what location = /chat/ready "
    "guards")
ng2.check_log()
done()
