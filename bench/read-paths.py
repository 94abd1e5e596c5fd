#!/usr/bin/python3
"""bench/read-paths.py -- the read paths at scale: a history page, the
conversation list, search (a common word, a rare word, a prefix) and a
thread's replies, through nginx + the module, on a throwaway PostgreSQL
cluster seeded with MESSAGES messages over CONVERSATIONS conversations and
USERS users.

    /usr/bin/python3 bench/read-paths.py [--messages N] [--conversations N]
        [--users N] [--requests N] [--clients N] [--out DIR]

Defaults: 10,000,000 messages, 100,000 conversations, 20,000 users, 300
requests per point, 50 concurrent clients.  The skew: 10 huge groups of
2,000 members hold 30% of the messages, 4,990 groups of 3-12 members 30%,
95,000 direct conversations 40%; bodies are 6-20 words from a vocabulary
with a Zipf-like skew plus one rare token.  Each point is measured with one
client (sequential) and with CLIENTS clients at once; p50 / p99 in ms.
It also writes EXPLAIN (ANALYZE, BUFFERS) of every statement these
endpoints run (auto_explain, nested statements) to DIR/explain.txt, and
fails if any of them reads chat_messages, chat_members or
chat_conversations by a sequential scan.
"""
import argparse
import asyncio
import os
import random
import re
import sys
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "t", "lib"))
import chattest  # noqa: E402
from chattest import PgCluster, Nginx, token  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--messages", type=int, default=10_000_000)
ap.add_argument("--conversations", type=int, default=100_000)
ap.add_argument("--users", type=int, default=20_000)
ap.add_argument("--requests", type=int, default=300)
ap.add_argument("--clients", type=int, default=50)
ap.add_argument("--out", default=os.path.join(REPO, "bench", "results",
                                              "read-paths-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())))
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)

M, C, U = args.messages, args.conversations, args.users
HUGE = 10
GROUPS = C // 20 - HUGE
DIRECT = C - HUGE - GROUPS
WORDS = ["the", "logo", "invoice", "design", "deadline", "files", "final", "draft", "client",
         "review", "payment", "milestone", "update", "thanks", "please", "meeting", "budget",
         "revision", "approved", "feedback", "contract", "schedule", "sketch", "color", "font"]


def log(*a):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), " ".join(map(str, a))), flush=True)


pg = PgCluster(settings={"shared_buffers": "2GB", "maintenance_work_mem": "1GB",
                         "max_wal_size": "8GB", "checkpoint_timeout": "30min",
                         "synchronous_commit": "off", "work_mem": "64MB",
                         "shared_preload_libraries": "auto_explain",
                         "max_connections": "200"})
t0 = time.monotonic()
log("seeding %d messages, %d conversations, %d users" % (M, C, U))

q = pg.query
# the read paths' indexes are built after the load
q("DROP INDEX chat_messages_search")
q("DROP INDEX chat_messages_replies")
q("DROP INDEX chat_messages_deleted")
q("""INSERT INTO chat_conversations (kind, title, direct_key, created_by, last_activity, created_at)
     SELECT CASE WHEN i <= %s THEN 'group' ELSE 'direct' END,
            CASE WHEN i <= %s THEN 'group ' || i END,
            CASE WHEN i > %s THEN 'd' || i END,
            'u' || (1 + (i::bigint * 7919) %% %s),
            now() - interval '30 days', now() - interval '30 days'
     FROM generate_series(1, %s) i""", HUGE + GROUPS, HUGE + GROUPS, HUGE + GROUPS, U, C)
# huge groups: 2,000 members each; groups: 3-12; directs: 2
q("""INSERT INTO chat_members (conversation_id, user_id)
     SELECT DISTINCT c, 'u' || (1 + ((c::bigint * 104729 + k * 7919) %% %s))
     FROM generate_series(1, %s) c,
          LATERAL generate_series(0, CASE WHEN c <= %s THEN 1999
                                          WHEN c <= %s THEN 2 + c %% 10 ELSE 1 END) k
     ON CONFLICT DO NOTHING""", U, C, HUGE, HUGE + GROUPS)
q("""UPDATE chat_conversations c SET member_count = x.n
     FROM (SELECT conversation_id, count(*) n FROM chat_members GROUP BY 1) x
     WHERE x.conversation_id = c.id""")
log("conversations and members in %.0f s" % (time.monotonic() - t0))

per_huge = int(M * 0.3) // HUGE
per_group = int(M * 0.3) // GROUPS
per_direct = (M - per_huge * HUGE - per_group * GROUPS) // DIRECT
vocab = list(WORDS)
for lo in range(1, C + 1, max(1, C // 20)):
    hi = min(C, lo + max(1, C // 20) - 1)
    q("""INSERT INTO chat_messages (conversation_id, seq, sender, client_msg_id, body, created_at)
         SELECT c, s,
                'u' || (1 + ((c::bigint * 104729 + (s %% 3) * 7919) %% %s)),
                'b' || c || '-' || s,
                (SELECT string_agg((%s::text[])[1 + floor(power(random(), 2.5) * %s)::int], ' ')
                 FROM generate_series(1, 6 + (c + s) %% 15) w WHERE s > 0)
                || ' zq' || ((c * 31 + s) %% 1000003),
                now() - interval '30 days' + (c %% 1000 + s) * interval '1 s'
         FROM generate_series(%s, %s) c,
              LATERAL generate_series(1, CASE WHEN c <= %s THEN %s WHEN c <= %s THEN %s ELSE %s END) s""",
      U, vocab, len(WORDS), lo, hi, HUGE, per_huge, HUGE + GROUPS, per_group, per_direct)
    log("  conversations %d-%d loaded (%.0f s)" % (lo, hi, time.monotonic() - t0))
q("""UPDATE chat_conversations c SET last_seq = x.s, last_activity = x.t
     FROM (SELECT conversation_id, max(seq) s, max(created_at) t FROM chat_messages GROUP BY 1) x
     WHERE x.conversation_id = c.id""")
# threads: every 50th message of the huge groups replies to the one 10 before
q("""UPDATE chat_messages m SET reply_to = p.id
     FROM chat_messages p
     WHERE m.conversation_id <= %s AND m.seq %% 50 = 0 AND m.seq > 10
       AND p.conversation_id = m.conversation_id AND p.seq = m.seq - 10""", HUGE)
q("UPDATE chat_members mb SET read_seq = c.last_seq - 5, delivered_seq = c.last_seq "
  "FROM chat_conversations c WHERE c.id = mb.conversation_id")
log("messages in %.0f s; building indexes" % (time.monotonic() - t0))
q("CREATE INDEX chat_messages_search ON chat_messages USING gin (search) WHERE NOT deleted")
q("CREATE INDEX chat_messages_replies ON chat_messages (reply_to, seq) WHERE reply_to IS NOT NULL")
q("CREATE INDEX chat_messages_deleted ON chat_messages (conversation_id, seq) WHERE deleted")
q("VACUUM ANALYZE")
n = q("SELECT count(*) FROM chat_messages")[0][0]
size = q("SELECT pg_size_pretty(pg_database_size(current_database()))")[0][0]
log("seeded %d messages (%s) in %.0f s" % (n, size, time.monotonic() - t0))

ng = Nginx(pg, workers=2, http="chat_db_pool_size 8;")

# who reads what: members of huge groups, of small groups, of directs
pairs = q("""(SELECT user_id, conversation_id FROM chat_members WHERE conversation_id <= %s
              ORDER BY random() LIMIT 400)
             UNION ALL (SELECT user_id, conversation_id FROM chat_members
                        WHERE conversation_id > %s AND conversation_id <= %s
                        ORDER BY random() LIMIT 400)
             UNION ALL (SELECT user_id, conversation_id FROM chat_members
                        WHERE conversation_id > %s ORDER BY random() LIMIT 400)""",
          HUGE, HUGE, HUGE + GROUPS, HUGE + GROUPS)
parents = q("SELECT m.reply_to, mb.user_id FROM chat_messages m JOIN chat_members mb "
            "ON mb.conversation_id = m.conversation_id WHERE m.reply_to IS NOT NULL "
            "ORDER BY random() LIMIT 300")
users = sorted({p[0] for p in pairs})
tokens = {u: token(u) for u in users + [p[1] for p in parents]}
rare = [r[0] for r in q("SELECT 'zq' || ((conversation_id * 31 + seq) % 1000003) "
                        "FROM chat_messages TABLESAMPLE SYSTEM (0.1) LIMIT 300")]

POINTS = [
    ("history page (50)", lambda r: ("/chat/api/conversations/%s/messages?limit=50" % r.choice(pairs)[1],
                                     None)),
    ("conversation list (50)", lambda r: ("/chat/api/conversations?limit=50", r.choice(users))),
    ("search, common word", lambda r: ("/chat/api/search?q=logo&limit=20", r.choice(users))),
    ("search, rare word", lambda r: ("/chat/api/search?" + urllib.parse.urlencode(
        {"q": r.choice(rare), "limit": 20}), r.choice(users))),
    ("search, prefix", lambda r: ("/chat/api/search?q=revi&limit=20", r.choice(users))),
    ("replies of a message", lambda r: ("/chat/api/messages/%s/replies?limit=50" % r.choice(parents)[0],
                                        None)),
]


def pick(name, gen, r):
    path, user = gen(r)
    if user is None:
        if "replies" in name:
            p = r.choice(parents)
            path, user = "/chat/api/messages/%s/replies?limit=50" % p[0], p[1]
        else:
            p = r.choice(pairs)
            path, user = "/chat/api/conversations/%s/messages?limit=50" % p[1], p[0]
    return path, user


async def client(name, gen, n, seed, lat, errors):
    r = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", ng.port)
    try:
        for _ in range(n):
            path, user = pick(name, gen, r)
            req = ("GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
                   % (path, tokens.get(user) or token(user))).encode()
            t = time.monotonic()
            writer.write(req)
            status, hdrs = await chattest._http_head(reader)
            body = await reader.readexactly(int(hdrs.get("content-length", 0)))
            lat.append((time.monotonic() - t) * 1000)
            if status != 200:
                errors.append((status, path, body[:200]))
    finally:
        writer.close()


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]


async def measure():
    rows = []
    for name, gen in POINTS:
        res = {}
        for mode, k in (("1 client", 1), ("%d clients" % args.clients, args.clients)):
            lat, errors = [], []
            # a warm-up pass, then the measured one
            await client(name, gen, 20, 1, [], [])
            t = time.monotonic()
            await asyncio.gather(*[client(name, gen, max(1, args.requests // k) if k > 1 else args.requests,
                                          100 + i, lat, errors) for i in range(k)])
            el = time.monotonic() - t
            res[mode] = (pct(lat, 0.5), pct(lat, 0.99), len(lat) / el, len(errors))
            if errors:
                log("%s, %s: %d errors, e.g. %r" % (name, mode, len(errors), errors[0]))
        rows.append((name, res))
        log("%-24s %s" % (name, "  ".join("%s p50 %.2f p99 %.2f ms (%.0f/s)" % (m, v[0], v[1], v[2])
                                             for m, v in res.items())))
    return rows


rows = asyncio.run(measure())

# the plans: every statement the endpoints ran, nested ones included
logf = pg.log
mark = os.path.getsize(logf)
u, cv = pairs[0]
pu, pp = parents[0][1], parents[0][0]
plan_sql = [
    ("history", "SELECT chat_history(%s, false, %s, NULL, NULL, 50)", (u, cv)),
    ("history, after_seq", "SELECT chat_history(%s, false, %s, NULL, 100, 50)", (u, cv)),
    ("conversation list", "SELECT chat_list_conversations(%s, NULL, NULL, 50)", (u,)),
    ("search, common word", "SELECT chat_search(%s, false, 'simple', 'logo', NULL, NULL, 20, false)", (u,)),
    ("search, rare word", "SELECT chat_search(%s, false, 'simple', %s, NULL, NULL, 20, false)", (u, rare[0])),
    ("search, prefix, ranked", "SELECT chat_search(%s, false, 'simple', 'revi', NULL, NULL, 20, true)", (u,)),
    ("replies", "SELECT chat_replies(%s, false, %s, NULL, NULL, 50)", (pu, pp)),
]
conn = pg.conn()
cur = conn.cursor()
cur.execute("SET auto_explain.log_min_duration = 0")
cur.execute("SET auto_explain.log_nested_statements = on")
cur.execute("SET auto_explain.log_analyze = on")
cur.execute("SET auto_explain.log_buffers = on")
cur.execute("SET client_min_messages = warning")
for name, sql, params in plan_sql:
    cur.execute("SELECT 'PLAN MARK " + name + "'")
    cur.execute(sql, params)
time.sleep(1)
with open(logf, errors="replace") as f:
    f.seek(mark)
    text = f.read()
with open(os.path.join(args.out, "explain.txt"), "w") as f:
    f.write(text)
seq = [l for l in text.splitlines() if re.search(r"Seq Scan on (chat_messages|chat_members|chat_conversations)\b", l)]

with open(os.path.join(args.out, "README.md"), "w") as f:
    f.write("# Read paths at %d messages\n\n" % n)
    f.write("`/usr/bin/python3 bench/read-paths.py --messages %d --conversations %d --users %d "
            "--requests %d --clients %d`\n\n" % (M, C, U, args.requests, args.clients))
    f.write("Seeded in %.0f s (%s). nginx 2 workers, chat_db_pool_size 8; PostgreSQL 15, "
            "shared_buffers 2GB. Plans: explain.txt.\n\n" % (time.monotonic() - t0, size))
    f.write("| point | 1 client p50 / p99 ms | %d clients p50 / p99 ms | %d clients req/s |\n"
            "|---|---|---|---|\n" % (args.clients, args.clients))
    for name, res in rows:
        a, b = res["1 client"], res["%d clients" % args.clients]
        f.write("| %s | %.2f / %.2f | %.2f / %.2f | %.0f |\n" % (name, a[0], a[1], b[0], b[1], b[2]))
    f.write("\nSequential scans of the big tables in the plans: %d\n" % len(seq))
log("results in %s; sequential scans of big tables: %d" % (args.out, len(seq)))
for l in seq[:10]:
    log("  " + l.strip())
ng.stop()
pg.stop()
sys.exit(1 if seq else 0)
