#!/usr/bin/python3
"""bench/catchup-sql.py -- the catch-up page query against another version
of it, on a throwaway PostgreSQL cluster (t/lib/chattest.py's PgCluster).

    /usr/bin/python3 bench/catchup-sql.py [REV] [MEMBERSHIPS] [EVENTS]

A user in MEMBERSHIPS (default 2000) conversations with EVENTS (default
100) events each, interleaved by gseq; times 7 executions of one 256-event
page of chat_catchup as this checkout has it and as REV (a git revision,
default fb342b2) had it, and checks both return the same rows.
"""
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "t", "lib"))
from chattest import PgCluster  # noqa: E402

REV = sys.argv[1] if len(sys.argv) > 1 else "fb342b2"
M = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
E = int(sys.argv[3]) if len(sys.argv) > 3 else 100


def stmt(text):
    m = re.search(r'\{ "chat_catchup",\n(.*?), [45] \}', text, re.S)
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))).replace('\\"', '"')


src = os.path.join(REPO, "ngx_chat_module", "ngx_chat_store.c")
queries = [("this checkout", stmt(open(src).read())),
           (REV, stmt(subprocess.check_output(
               ["git", "-C", REPO, "show", REV + ":ngx_chat_module/ngx_chat_store.c"], text=True)))]

pg = PgCluster()
pg.query("SELECT count(*) FROM (SELECT chat_create_conversation('busy', 'group', "
         "ARRAY['busy', 'pal'], 'r' || i, NULL) FROM generate_series(1, %s) i) x", M)
pg.query("""INSERT INTO chat_events (gseq, conversation_id, kind, payload)
            SELECT (SELECT v FROM chat_clock) + row_number() OVER (ORDER BY k, c.id), c.id,
                   'message.new', '{"kind":"message.new","conversation_id":"' || c.id
                   || '","seq":' || k || ',"message":{"body":"' || repeat('x', 50) || '"}}'
            FROM chat_conversations c, generate_series(1, %s) k""", E)
pg.query("UPDATE chat_clock SET v = (SELECT max(gseq) FROM chat_events)")
pg.query("ANALYZE")
start = pg.query("SELECT min(gseq) - 1 FROM chat_events WHERE kind = 'message.new'")[0][0]
top = pg.query("SELECT max(gseq) FROM chat_events")[0][0]

cur = pg.conn().cursor()
results = []
for i, (name, q) in enumerate(queries):
    cur.execute("PREPARE p%d AS %s" % (i, q))
    args = ("busy", 0, 256, 1 << 20) + ((top,) if "$5" in q else ())
    ts = []
    for k in range(7):
        t = time.monotonic()
        a = (args[0], start + k * 5000) + args[2:]
        cur.execute("EXECUTE p%d(%s)" % (i, ", ".join(["%s"] * len(a))), a)
        rows = cur.fetchall()
        ts.append((time.monotonic() - t) * 1000)
        if k == 0:
            results.append(rows)
    ts.sort()
    print("%-14s %d rows, median %.1f ms, min %.1f ms (7 pages; %d memberships x %d events)"
          % (name, len(results[-1]), ts[3], ts[0], M, E))
print("same rows:", results[0] == results[1])
pg.stop()
