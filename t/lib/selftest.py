#!/usr/bin/python3
# Self-test of the harness (t/lib/chattest.py, scripts/migrate.sh) that needs
# no chat module: PostgreSQL start/stop/restart/kill, migrations, plain nginx
# start/reload/worker kill/stop and log checks, the WebSocket helpers against
# a small websockets server. Run: make test-harness (or directly).
import asyncio
import json
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chattest import *  # noqa: E402,F403
import chattest  # noqa: E402

# ---- PostgreSQL + migrate.sh with throwaway migrations ----
mig = os.path.join(tmpdir(), "migrations")
os.mkdir(mig)
write_file("migrations/001_init.sql", """
CREATE TABLE chat_schema_version (version int PRIMARY KEY,
                                  applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO chat_schema_version(version) VALUES (1);
""")
write_file("migrations/002_more.sql", """
INSERT INTO t VALUES (1, 'a|b'), (2, NULL), (3, E'multi\\nline');
INSERT INTO chat_schema_version(version) VALUES (2);
""")

pg = PgCluster(migrations_dir=mig)
is_(pg.psql("SELECT version FROM chat_schema_version ORDER BY 1"), [["1"], ["2"]],
    "migrations 1 and 2 applied")
is_(pg.psql("SELECT id, v FROM t ORDER BY id"), [["1", "a|b"], ["2", ""], ["3", "multi\nline"]],
    "psql() rows: separators, NULL, newline")
is_(pg.psql("SELECT 1; SELECT 2, 3;"), [["1"], ["2", "3"]], "psql() several statements")
is_(pg.query("SELECT v FROM t WHERE id = %s", 1), [("a|b",)], "query() with params")

out = pg.migrate(mig)
like(out, r"schema version 2 \(0 applied\)", "re-running migrate applies nothing")

write_file("migrations/10_bad.sql", """
INSERT INTO t VALUES (10, 'x');
SELECT no_such_function();
INSERT INTO chat_schema_version(version) VALUES (10);
""")
try:
    pg.migrate(mig)
    ok(False, "a failing migration fails migrate.sh")
except RuntimeError as e:
    ok("no_such_function" in str(e), "a failing migration fails migrate.sh")
is_(pg.psql("SELECT count(*) FROM t WHERE id = 10"), [["0"]], "... and is rolled back")
os.unlink(os.path.join(mig, "10_bad.sql"))

write_file("migrations/003_forgot.sql", "INSERT INTO t VALUES (4, 'y');\n")
try:
    pg.migrate(mig)
    ok(False, "a migration that does not record its version is reported")
except RuntimeError as e:
    ok("did not record version 3" in str(e), "a migration that does not record its version is reported")
os.unlink(os.path.join(mig, "003_forgot.sql"))
pg.psql("DELETE FROM t WHERE id = 4")

write_file("migrations/003_ok.sql", "INSERT INTO chat_schema_version(version) VALUES (3);\n")
like(pg.migrate(mig), r"applying 003_ok.sql.*\n.*schema version 3 \(1 applied\)", "numeric order, only new files")

c = pg.conn()
with c.cursor() as cur:
    cur.execute("SELECT 41 + 1")
    is_(cur.fetchone()[0], 42, "psycopg2 conn()")
c.close()

pg.restart(mode="fast")
is_(pg.psql("SELECT count(*) FROM t"), [["3"]], "restart fast keeps data")
pg.restart(mode="immediate")
is_(pg.psql("SELECT count(*) FROM t"), [["3"]], "restart immediate (crash recovery) keeps data")
old = pg.postmaster_pid()
pg.kill()
ok(pg.postmaster_pid() is None and not chattest._alive(old), "kill() SIGKILLs the postmaster")
rc, _ = pg.psql("SELECT 1", check=False)
ok(rc != 0, "psql fails while the cluster is down")
pg.start()
is_(pg.psql("SELECT count(*) FROM t"), [["3"]], "start after kill")
like(pg.conninfo, r"^host=/tmp/chattest-\S+/sock port=\d+ dbname=chat user=postgres$", "conninfo")

# a second cluster with the repo's own migrations, if any
pg2 = PgCluster()
ok(pg2.port != pg.port, "second cluster on another port")
is_(pg2.psql("SELECT current_database()"), [["chat"]], "database chat")

# ---- plain nginx (no module) ----
ng = Nginx(workers=2, module=False, location="""
default_type application/json;
return 404 '{"error":{"code":"not_found","message":"no such endpoint"}}';
""")
is_(len(ng.worker_pids()), 2, "2 workers")
st, h, body = api("GET", "/chat/nonexistent")
is_(st, 404, "404")
like(h.get("content-type"), r"^application/json", "content type")
is_(body, {"error": {"code": "not_found", "message": "no such endpoint"}}, "parsed JSON body")
raw = http_raw(b"GET /chat/x HTTP/1.0\r\n\r\n")
like(raw, r"^b'HTTP/1\.1 404", "http_raw")

ws = RawWS(ng, path="/chat/ws")
is_(ws.status, 404, "RawWS handshake sees the 404")
ok(b"not_found" in ws.body, "RawWS keeps the error body")
ws.close()

old_workers = ng.worker_pids()
ng.reload(workers=3)
new_workers = ng.worker_pids()
ok(len(new_workers) == 3 and not set(old_workers) & set(new_workers), "reload: new generation of 3 workers")

victim = new_workers[0]
after = ng.kill_worker(victim)
ok(victim not in after and len(after) == 3, "kill_worker: master respawned the worker")
ok(ng.wait_log(r"worker process %d exited on signal 9" % victim, timeout=5), "master logged the kill")
is_(ng.check_log(), [], "the kill's [alert] is allowed automatically")

try:
    ng.reload(http="this_is_not_a_directive;")
    ok(False, "bad reload raises")
except NginxError:
    ok(True, "bad reload raises")
ng.allow.append(r"unknown directive \"this_is_not_a_directive\"")
ng.write_conf(http="")

good, out = Nginx(module=False, http="nonsense_directive on;", start=False).try_start()
ok(not good and "nonsense_directive" in out, "try_start reports a config error")
chattest._nginxes.pop()  # that one never ran

with open(os.path.join(ng.dir, "error.log"), "a") as f:
    f.write("2025/01/01 00:00:00 [alert] 1#1: simulated\n==1==ERROR: AddressSanitizer: heap-use-after-free\n")
is_(len(ng.check_log()), 2, "check_log finds [alert] and sanitizer lines")
is_(ng.check_log(allow=[r"simulated", r"AddressSanitizer"]), [], "check_log allow=")
ng.allow += [r"simulated", r"AddressSanitizer"]

status = ng.stop()
is_(status, 0, "nginx quit cleanly")
ng.start()
ok(ng.master_pid and len(ng.worker_pids()) == 3, "restart after stop")

# ---- JWT helpers ----
import jwt  # noqa: E402
t = token("alice", name="Alice")
claims = jwt.decode(t, hs_secret(), algorithms=["HS256"])
ok(claims["sub"] == "alice" and claims["name"] == "Alice" and claims["exp"] > claims["iat"], "token() HS256")
is_(open(chattest.hs_secret_file(), "rb").read(), hs_secret(), "secret file = secret, no newline")
priv, pub = rsa_keypair()
ok(jwt.decode(token("bob", alg="RS256", key=priv), pub, algorithms=["RS256"])["sub"] == "bob", "RS256 pair")
priv, pub = ec_keypair()
ok(jwt.decode(token("carol", alg="ES256", key=priv), pub, algorithms=["ES256"])["sub"] == "carol", "ES256 pair")
ok("exp" not in jwt.decode(token("d", exp_in=None), hs_secret(), algorithms=["HS256"]), "exp_in=None")


# ---- WebSocket helpers against a tiny fake chat server ----
class Fake:
    port = free_port()


async def fake_server(ws, path=None):
    async for raw in ws:
        if isinstance(raw, bytes):
            await ws.send(raw)
            continue
        m = json.loads(raw)
        if m["type"] == "hello":
            await ws.send(json.dumps({"type": "event", "cursor": "c1", "event": {
                "kind": "message.new", "conversation_id": "1", "seq": 1, "message": {"body": "hi"}}}))
            await ws.send(json.dumps({"type": "reply", "id": m["id"], "ok": True, "result": {
                "user": {"id": "alice"}, "session_id": "s", "cursor": "c0", "heartbeat_ms": 30000}}))
        elif m["type"] == "bye":
            await ws.close(4001, "token_expired")
        else:
            await ws.send(json.dumps({"type": "reply", "id": m["id"], "ok": False,
                                      "error": {"code": "bad_request", "message": "?"}}))


async def ws_tests():
    import websockets
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    server = await websockets.serve(fake_server, "127.0.0.1", Fake.port, subprotocols=["chat.v1"])
    try:
        c = await ws_connect(Fake, token="tok")
        ok(c.hello and c.hello["ok"] and c.hello["result"]["user"]["id"] == "alice", "ws_connect + hello")
        is_(c.ws.subprotocol, "chat.v1", "subprotocol chat.v1")
        ev = await c.wait_event("message.new", timeout=2)
        is_(ev and ev["event"]["seq"], 1, "event received during hello is kept")
        is_(len(c.events("message.new")), 1, "events(kind)")
        r = await c.request("send", conversation_id="1", body="x")
        ok(r and r["ok"] is False and r["error"]["code"] == "bad_request", "request() returns error replies")
        none = await c.wait_event(lambda m: False, timeout=0.3)
        is_(none, None, "wait_event timeout returns None")
        await c.send({"type": "bye", "id": 99})
        is_(await c.wait_closed(3), (4001, "token_expired"), "close code and reason")
        await c.close()

        def raw_part():
            w = RawWS(Fake)
            is_(w.status, 101, "RawWS handshake 101")
            ok(w.accept_ok, "Sec-WebSocket-Accept checked")
            is_(w.headers.get("sec-websocket-protocol"), "chat.v1", "RawWS subprotocol")
            w.send_frame(0x1, b'{"type":"hel', fin=False)
            w.send_frame(0x0, b'lo","id":7,"token":"t"}', fin=True)
            got = []
            while len(got) < 2:
                got.append(w.recv_json())
            is_([g["type"] for g in got], ["event", "reply"], "fragmented text message, recv_json")
            w.send_frame(0x2, b"\x00\x01binary")
            f = w.recv_frame()
            ok(f.opcode == 2 and f.payload == b"\x00\x01binary" and not f.masked, "binary frame echo, recv_frame")
            w.send_close(1000, "bye")
            cf, _ = w.read_until_close()
            ok(cf is not None and cf.close_code == 1000, "close handshake")
            w.close()
            w = RawWS(Fake)
            w.send_frame(0x1, b"{}", mask=False)  # servers must fail unmasked frames
            cf, _ = w.read_until_close()
            ok(cf is not None and cf.close_code == 1002, "unmasked frame -> 1002 from a strict server")
            w.close()
        await asyncio.get_running_loop().run_in_executor(None, raw_part)
    finally:
        server.close()
        await server.wait_closed()

asyncio.run(ws_tests())

ok(chattest.KEEP or os.path.isdir(tmpdir()), "temp dir exists until done()")
done()
