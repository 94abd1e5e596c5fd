#!/usr/bin/python3
# Smoke: PostgreSQL (migrated) + nginx with the chat module (2 workers)
# start, an unknown /chat/ path answers a JSON 404, nginx stops cleanly.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
is_(pg.psql("SELECT current_database()"), [["chat"]], "PostgreSQL up, database chat")
ok(pg.psql("SELECT to_regclass('chat_schema_version') IS NOT NULL") == [["t"]],
   "migrations applied (chat_schema_version exists)")

ng = Nginx(pg, workers=2)
is_(len(ng.worker_pids()), 2, "nginx started with 2 workers")

status, headers, body = api("GET", "/chat/nonexistent")
is_(status, 404, "GET /chat/nonexistent -> 404")
like(headers.get("content-type"), r"^application/json", "Content-Type application/json")
ok(isinstance(body, dict) and isinstance(body.get("error"), dict)
   and body["error"].get("code") == "not_found", "body is {\"error\":{\"code\":\"not_found\",...}}")

is_(ng.stop(), 0, "nginx quits cleanly")
done()
