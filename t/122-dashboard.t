#!/usr/bin/python3
# The health dashboard (dashboard/: index.html, dashboard.js, dashboard.css,
# static files nginx serves at /chat/dashboard/) in real Chromium (Debian's,
# driven by playwright-core: t/lib/dashboard_browser.js), polling the
# module's /chat/metrics and /chat/ready every 2 s:
#
#  1. nginx serves the three files with their types; the page's parser
#     reads the text format's corners (comments, escaped quotes and
#     backslashes in label values, +Inf, -Inf, NaN, timestamps, a trailing
#     comma, CRLF) and skips broken lines, reporting them; its
#     histogram_quantile answers as Prometheus' does on known buckets;
#     rates and quantiles across a counter reset (two known scrapes).
#  2. A page polling a URL that is not the metrics shows the error banner.
#  3. Under load (20 WebSocket connections in 4 group conversations, ~50
#     sends/s) a desktop (1280x800) and a phone (390x844) page each hold
#     >= 5 points: the connections tile and chart count the connections the
#     test opened, messages/s is within a factor of 2 of the load's rate,
#     deliveries/s > 0, send latency p50 and p99 and statement p99 are
#     numbers > 0, the pool has connections, the readiness tile says ready
#     with every check ok; each chart has a heading, a summary and an
#     aria-label with its latest value; the phone shows one column and no
#     horizontal scrolling, the desktop more than one.
#  4. PostgreSQL stopped: both pages turn "not ready" with the store check
#     failed within 10 s; started again: ready again.
#
# Screenshots (desktop and phone under load, with PostgreSQL stopped, the
# banner) go to $CHAT_SCREENSHOTS if set, else to the test's temp dir (kept
# with KEEP=1); their paths are printed.
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

if not os.path.exists("/usr/bin/chromium") or not os.path.isdir(
        os.path.join(REPO, "client", "node_modules", "playwright-core")):
    bail_out("Chromium or playwright-core is missing: run scripts/install-deps.sh")

T0 = time.monotonic()
SHOTS = os.environ.get("CHAT_SCREENSHOTS") or os.path.join(tmpdir(), "screenshots")
os.makedirs(SHOTS, exist_ok=True)

N_CONNS = 20          # one user each
GROUPS = 4            # of 5 members
RATE = 50.0           # sends per second, all connections together
MAX_LOAD_S = 60       # the driver normally stops it after ~15 s

pg = PgCluster()
ng = Nginx(pg, workers=2, server="""
location /chat/dashboard/ {
    alias %s/dashboard/;
    types { text/html html; text/javascript js; text/css css; }
}
""" % REPO)

users = ["dash%02d" % i for i in range(N_CONNS)]
convs = []
for g in range(GROUPS):
    members = users[g::GROUPS]
    convs.append(rest_create_conv(members[0], "group", members[1:], nginx=ng, title="load %d" % g))
conv_of = {u: convs[i % GROUPS] for i, u in enumerate(users)}


class Load:
    """Every connection sends at RATE / N_CONNS per second, the
    connections' phases spread evenly, until stopped; acks are timed."""

    def __init__(self, conns):
        self.conns = conns
        self.stopping = False
        self.acks = []          # monotonic times of ok replies
        self.failed = 0
        self.t0 = None

    async def one(self, i, c, user):
        period = N_CONNS / RATE
        k = 0
        nxt = self.t0 + i * period / N_CONNS
        while not self.stopping and time.monotonic() - self.t0 < MAX_LOAD_S:
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            r = await request_or_none(c, "send", conversation_id=conv_of[user],
                                      client_msg_id="%s-%d" % (user, k), body="load %d" % k)
            if r and r.get("ok"):
                self.acks.append(time.monotonic())
            else:
                self.failed += 1
            k += 1
            nxt += period

    async def run(self):
        self.t0 = time.monotonic()
        await asyncio.gather(*(self.one(i, c, u) for i, (c, u) in enumerate(self.conns)))

    def rate(self, last=10.0):
        """acks per second over the last `last` s (or since the start)."""
        now = time.monotonic()
        span = min(last, now - self.t0)
        return sum(1 for t in self.acks if t >= now - span) / span if span > 0 else 0.0


async def scenario():
    conns = []
    for u in users:
        conns.append((await ws_connect_on(u, nginx=ng), u))
    load = Load(conns)
    task = asyncio.ensure_future(load.run())
    await asyncio.sleep(0.5)

    cfg = {"base": "http://127.0.0.1:%d" % ng.port, "shots": SHOTS}
    cfg_path = write_file("dashboard_browser.json", json.dumps(cfg))
    drv = await asyncio.create_subprocess_exec(
        "node", os.path.join(REPO, "t", "lib", "dashboard_browser.js"), cfg_path,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=open(os.path.join(tmpdir(), "driver.log"), "w"), limit=1 << 24)
    loop = asyncio.get_running_loop()
    info = {"result": None}
    while True:
        line = await drv.stdout.readline()
        if not line:
            break
        line = line.decode().strip()
        if line == "@@pgstop":
            load.stopping = True
            info["load_rate"] = load.rate()
            info["load_s"] = time.monotonic() - load.t0
            await task
            info["acks"] = len(load.acks)
            info["failed"] = load.failed
            info["open"] = sum(1 for c, _ in conns if not c.closed)
            await loop.run_in_executor(None, pg.stop)
            info["pg_stopped_at"] = time.monotonic()
            drv.stdin.write(b"ok\n")
            await drv.stdin.drain()
        elif line == "@@pgstart":
            await loop.run_in_executor(None, pg.start)
            drv.stdin.write(b"ok\n")
            await drv.stdin.drain()
        elif line.startswith("{"):
            try:
                info["result"] = json.loads(line)
            except ValueError as e:
                diag("driver output does not parse: %s" % e)
        else:
            diag("driver: %s" % line)
    await drv.wait()
    load.stopping = True
    await task
    info.setdefault("open", sum(1 for c, _ in conns if not c.closed))
    info.setdefault("load_rate", load.rate())
    for c, _ in conns:
        await c.close()
    return info


info = asyncio.run(scenario())
res = info["result"] or {}
if not res:
    diag("driver log:\n" + open(os.path.join(tmpdir(), "driver.log")).read()[-3000:])
for s in res.get("steps", []):
    ok(s["ok"], "browser step: %s (%d ms)%s" % (s["name"], s["ms"],
                                                ": " + s["error"] if not s["ok"] else ""))
is_(res.get("errors"), [], "no page errors")
diag("timing: %s" % json.dumps(res.get("timing")))

# ----------------------------------------------------------- 1. files --
is_(res.get("page"), {"status": 200, "type": "text/html"}, "index.html served as text/html")
is_((res.get("assets") or {}).get("dashboard.js"), [200, "text/javascript"], "dashboard.js: text/javascript")
is_((res.get("assets") or {}).get("dashboard.css"), [200, "text/css"], "dashboard.css: text/css")

u = res.get("unit") or {}
is_(u.get("families"), [["m_total", "counter", "A help with a \\ backslash\nand a newline"],
                        ["g", "gauge", ""]],
    "parser: HELP (unescaped) and TYPE, a free comment ignored, a TYPE after blanks")
is_(u.get("m"), [[{"path": '/a"b\\c\nd', "code": "200"}, 3, None],
                 [{"code": "500", "path": "x"}, 1500, 1700000000000]],
    "parser: escaped quote, backslash and newline in a label value; blanks around a comma, "
    "a trailing comma, an exponent, a timestamp")
ok(u.get("g") and u.get("g2") and u.get("g3"), "parser: NaN, +Inf (after a tab), -Inf")
is_(u.get("g4"), [[{"a": '{},= " #'}, -0.25]], "parser: braces, comma, equals, hash in a quoted value")
is_(u.get("hle"), ["0.1", "+Inf"], "parser: le labels as written")
is_(u.get("crlf"), [7], "parser: a CRLF line end")
is_(u.get("errors"), [14, 15, 16, 17],
    "parser: an unterminated value, a bad number, a bad label name, a bad escape: reported, skipped")
is_(u.get("names"), ["m_total", "m_total", "g", "g2", "g3", "g4", "h_bucket", "h_bucket", "crlf"],
    "parser: every good line kept around the bad ones")
q = u.get("q") or {}
is_([q.get("p50"), q.get("p75"), q.get("first"), q.get("inf"), q.get("unsorted")],
    [1, 1.5, 0.002, 2, 0.001],
    "histogram_quantile: a bucket's top, interpolated within a bucket, from 0 in the first, "
    "the highest finite bound for +Inf, buckets given out of order")
ok(q.get("none") and q.get("noInf"), "histogram_quantile: NaN without observations or without +Inf")
is_(u.get("reset"), [1, 15, 2, 1, 4, 0.001, 0.00198, 4, 0.00991],
    "two scrapes across a restart: a counter that went down counts its new value (stored 30 "
    "in 2 s: 15/s; 4008 2 -> 1 and 4029 0 -> 1: cut/limited 1/s), a histogram whose count went "
    "down its new buckets (p50 1 ms, p99 1.98 ms of 4 sends), a statement new in the second "
    "counts whole (p99 9.91 ms of 4 statements)")

# ---------------------------------------------------------- 2. banner --
b = res.get("badScrape") or {}
ok(b.get("bannerHidden") is False and "Scrape failed" in (b.get("banner") or "")
   and "404" in (b.get("banner") or ""),
   "a scrape that fails shows the error banner (%r)" % (b.get("banner"),))
is_(b.get("updated"), "never", "... and 'Last update: never'")

# ------------------------------------------------------- 3. under load --
diag("load: %.1f sends/s acked over the last 10 s, %s acked, %s failed, %.1f s; %s connections open"
     % (info.get("load_rate", 0), info.get("acks"), info.get("failed"), info.get("load_s", 0),
        info.get("open")))
ok(info.get("load_rate", 0) > RATE / 2, "the load ran (%.1f sends/s)" % info.get("load_rate", 0))
loaded = res.get("loaded") or {}
for name in ("desktop", "phone"):
    L = loaded.get(name) or {}
    p = L.get("latest") or {}
    recent = [x.get("messagesPerSec") for x in (L.get("recent") or [])]
    ok((L.get("points") or 0) >= 5, "%s: >= 5 points (%s)" % (name, L.get("points")))
    conn = (p.get("connections") or {})
    ok(abs((conn.get("websocket") or 0) - info.get("open", N_CONNS)) <= 2,
       "%s: chat_connections{websocket} %s ~ the %s the test holds open"
       % (name, conn.get("websocket"), info.get("open")))
    is_(L.get("tiles", {}).get("connections"), str(int(conn.get("total") or -1)),
        "%s: the connections tile shows it" % name)
    ch = {c["id"]: c for c in L.get("charts") or []}
    like(ch.get("connections", {}).get("aria") or "", r"^Connections: %d open" % int(conn.get("total") or -1),
         "%s: the connections chart's aria-label says it" % name)
    mps = p.get("messagesPerSec")
    lr = info.get("load_rate", RATE)
    ok(isinstance(mps, (int, float)) and mps > 0 and lr / 2 <= mps <= lr * 2,
       "%s: messages/s %s within a factor of 2 of the load's %.1f (recent: %s)"
       % (name, mps, lr, [round(x, 1) if x is not None else None for x in recent]))
    d = p.get("deliveriesPerSec") or {}
    ok((d.get("durable") or 0) > mps if mps else False,
       "%s: durable deliveries/s %s > messages/s (5 members each)" % (name, d.get("durable")))
    ok(all(isinstance(p.get(k), (int, float)) and p.get(k) > 0 for k in ("sendP50", "sendP99", "dbP99")),
       "%s: send p50 %s s, p99 %s s, statement p99 %s s: numbers > 0"
       % (name, p.get("sendP50"), p.get("sendP99"), p.get("dbP99")))
    ok(p.get("sendP50") <= p.get("sendP99") if p.get("sendP99") else False, "%s: p50 <= p99" % name)
    ok(((p.get("db") or {}).get("connections") or 0) >= 1, "%s: the pool has %s connections"
       % (name, (p.get("db") or {}).get("connections")))
    ok(0 < ((p.get("zone") or {}).get("usedPct") or 0) < 100 and p.get("busLagMax") is not None
       and p.get("reconnects") is not None,
       "%s: zone used %s %%, bus lag max %s, reconnects %s" % (
           name, (p.get("zone") or {}).get("usedPct"), p.get("busLagMax"), p.get("reconnects")))
    rt = (L.get("tiles") or {}).get("ready") or {}
    is_([rt.get("state"), rt.get("value")], ["ready", "\u2713 Ready"], "%s: the readiness tile says ready" % name)
    is_(sorted((c["name"], c["ok"]) for c in rt.get("checks") or []),
        [("bus", "true"), ("schema", "true"), ("store", "true"), ("zone", "true")],
        "%s: every check ok" % name)
    is_([L.get("bannerHidden"), L.get("lastError")], [True, None], "%s: no banner, no error" % name)
    like(L.get("updated") or "", r"^\d\d:\d\d:\d\d$", "%s: a last update time (%s)" % (name, L.get("updated")))
    is_(L.get("h1"), "Chat health", "%s: an h1" % name)
    is_(sorted(ch), sorted(["connections", "messages", "deliveries", "latency", "pool", "dblatency", "errors"]),
        "%s: the seven charts" % name)
    bad = [c["id"] for c in ch.values()
           if not (c.get("heading") and c.get("summary") and c.get("aria")
                   and c["aria"].startswith(c["heading"] + ": ") and c.get("paths", 0) >= 1
                   and c.get("points", 0) >= 5)]
    is_(bad, [], "%s: each chart has a heading, a summary, an aria-label with it, a line of >= 5 points"
        % name)
    like(ch.get("latency", {}).get("summary") or "", r"^p50 [\d.]+ m?s, p99 [\d.]+ m?s over \d+ sends",
         "%s: the latency summary (%s)" % (name, ch.get("latency", {}).get("summary")))
    diag("%s: %s" % (name, " | ".join(c.get("summary") or "" for c in ch.values())))
D, P = loaded.get("desktop") or {}, loaded.get("phone") or {}
ok((D.get("columns") or 0) >= 2, "desktop: the charts in %s columns" % D.get("columns"))
is_(P.get("columns"), 1, "phone: the charts in one column")
ok(P.get("scrollWidth", 9999) <= P.get("clientWidth", 0),
   "phone: no horizontal scrolling (%s <= %s)" % (P.get("scrollWidth"), P.get("clientWidth")))

# ------------------------------------------------ 4. PostgreSQL stopped --
t = (res.get("timing") or {}).get("notReadyMs")
ok(t is not None and t <= 10000, "PostgreSQL stopped: both pages not ready within 10 s (%s ms)" % t)
for name in ("desktop", "phone"):
    S = (res.get("stopped") or {}).get(name) or {}
    rt = (S.get("tiles") or {}).get("ready") or {}
    store = [c for c in rt.get("checks") or [] if c["name"] == "store"]
    is_([rt.get("state"), rt.get("value")], ["not-ready", "\u2717 Not ready"],
        "%s: the readiness tile says not ready" % name)
    ok(store and store[0]["ok"] == "false" and "failed" in store[0]["text"],
       "%s: the store check shows failed (%s)" % (name, store and store[0]["text"]))
    is_(S.get("readiness", {}).get("status"), 503, "%s: /chat/ready answered 503" % name)
    is_(S.get("bannerHidden"), True, "%s: the metrics still scrape (no banner)" % name)
t = (res.get("timing") or {}).get("readyAgainMs")
ok(t is not None, "PostgreSQL back: ready again (%s ms)" % t)

for f in res.get("shots") or []:
    note("screenshot: %s" % f)
is_(ng.check_log(), [], "no alert or crit in error.log")
diag("%.1f s" % (time.monotonic() - T0))
done()
