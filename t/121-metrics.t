#!/usr/bin/python3
# /chat/metrics (Prometheus text format 0.0.4): the exposition parses
# strictly (every sample of a declared family, no series twice, histogram
# buckets cumulative up to +Inf = _count); values move as a scripted
# sequence says -- 3 WebSocket connections, 5 messages and a retry of one,
# an SSE stream, a held long-poll, a bad request; connections on both
# workers are summed; a worker killed with SIGKILL takes its connections
# out of the gauges but not its counts out of the counters.
import asyncio
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"'
                  r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*")*)\})? (-?[0-9]+(\.[0-9]+)?|\+Inf)$')


def scrape(ng):
    st, hdrs, body = api("GET", "/chat/metrics", nginx=ng)
    return st, hdrs, body


def parse(text):
    """{(name, labels-tuple): value}, families {name: type}; raises on
    anything a strict reader refuses."""
    fams, seen, samples = {}, set(), {}
    for ln in text.split("\n"):
        if ln == "":
            continue
        if ln.startswith("# HELP "):
            continue
        if ln.startswith("# TYPE "):
            _, _, name, typ = ln.split(" ", 3)
            if name in fams:
                raise ValueError("TYPE twice: %s" % name)
            if typ not in ("counter", "gauge", "histogram"):
                raise ValueError("bad type: %s" % ln)
            fams[name] = typ
            continue
        m = LINE.match(ln)
        if not m:
            raise ValueError("bad line: %r" % ln)
        name, labels, value = m.group(1), m.group(3) or "", m.group(5)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        fam = name if name in fams else base
        if fam not in fams:
            raise ValueError("sample of an undeclared family: %r" % ln)
        if fams[fam] == "counter" and not name.endswith("_total"):
            raise ValueError("counter without _total: %s" % name)
        key = (name, tuple(sorted(re.findall(r'([a-zA-Z_]+)="([^"]*)"', labels))))
        if key in seen:
            raise ValueError("series twice: %r" % (key,))
        seen.add(key)
        samples[key] = float(value) if value != "+Inf" else float("inf")
    return fams, samples


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def check_histograms(fams, samples, name):
    for fam, typ in fams.items():
        if typ != "histogram":
            continue
        groups = {}
        for (n, lab), v in samples.items():
            if n == fam + "_bucket":
                rest = tuple(x for x in lab if x[0] != "le")
                le = dict(lab)["le"]
                groups.setdefault(rest, []).append((float("inf") if le == "+Inf"
                                                   else float(le), v))
        for rest, bs in groups.items():
            bs.sort()
            vals = [v for _, v in bs]
            if vals != sorted(vals) or bs[-1][0] != float("inf"):
                return "%s%s buckets not cumulative up to +Inf" % (fam, rest)
            if samples.get((fam + "_count", rest)) != vals[-1]:
                return "%s%s _count != +Inf bucket" % (fam, rest)
    return None


def metrics(ng):
    st, hdrs, body = scrape(ng)
    text = body.decode() if isinstance(body, bytes) else str(body)
    return parse(text)


pg = PgCluster()
ng = Nginx(pg, workers=2)

st, hdrs, body = scrape(ng)
is_(st, 200, "GET /chat/metrics: 200")
is_(hdrs.get("content-type"), "text/plain; version=0.0.4", "Content-Type of format 0.0.4")
text = body.decode() if isinstance(body, bytes) else str(body)
try:
    fams, s0 = parse(text)
    ok(True, "the exposition parses strictly (%d families, %d series)" % (len(fams), len(s0)))
except ValueError as e:
    ok(False, "the exposition parses strictly: %s" % e)
    fams, s0 = {}, {}
for fam in ("chat_connections", "chat_sessions_total", "chat_messages_total",
            "chat_deliveries_total", "chat_closes_total", "chat_errors_total",
            "chat_rate_limited_total", "chat_db_connections", "chat_db_busy", "chat_db_queue",
            "chat_db_reconnects_total", "chat_bus_position", "chat_bus_lag", "chat_zone_bytes",
            "chat_send_seconds", "chat_db_query_seconds", "chat_worker_connections"):
    ok(fam in fams, "family %s (%s)" % (fam, fams.get(fam)))
is_(api("POST", "/chat/metrics", nginx=ng, json={})[0], 405, "POST is 405")
ok(not re.search(r"alice|bob|eyJ", text), "no user or token in the exposition")

alice_bob = rest_create_conv("alice", "group", ["bob", "carol"], nginx=ng, title="m")


async def scripted():
    out = {}
    pids = ng.worker_pids()
    # connections on both workers: alice on one, bob and carol on the other
    a = await ws_connect_on("alice", want_pid=pids[0], nginx=ng)
    b = await ws_connect_on("bob", want_pid=pids[1], nginx=ng)
    c = await ws_connect_on("carol", want_pid=pids[1], nginx=ng)
    await asyncio.sleep(0.2)
    out["open"] = metrics(ng)
    for i in range(5):
        r = await a.request("send", conversation_id=alice_bob, client_msg_id="m%d" % i,
                            body="hello %d" % i)
        assert r.get("ok"), r
    r = await a.request("send", conversation_id=alice_bob, client_msg_id="m4", body="hello 4")
    out["retry_ok"] = r.get("ok")
    r = await a.request("send", conversation_id="999999", client_msg_id="x", body="nope")
    out["bad"] = (r.get("error") or {}).get("code")
    await wait_for_async(lambda: len(b.events("message.new")) >= 5
                         and len(c.events("message.new")) >= 5, 10)
    sse = await sse_connect("dave", nginx=ng)
    held = asyncio.ensure_future(poll("erin", timeout_ms=3000, nginx=ng))
    await asyncio.sleep(1.2)      # other workers publish pool and bus once a second
    out["mid"] = metrics(ng)
    await held
    await sse.close()
    for x in (a, b, c):
        await x.close()
    return out


async def wait_for_async(pred, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


out = asyncio.run(scripted())
fo, so = out["open"]
is_(val(so, "chat_connections", transport="websocket"), 3.0,
    "3 WebSocket connections: chat_connections{transport=websocket} 3")
wk = {k[1]: v for k, v in so.items() if k[0] == "chat_worker_connections"}
is_(sorted(wk.values()), [1.0, 2.0], "per worker: 1 and 2 (%s)" % wk)
ok(val(so, "chat_sessions_total", transport="websocket")
   - (val(s0, "chat_sessions_total", transport="websocket") or 0) >= 3,
   "chat_sessions_total{websocket} +3 at least (connections that landed on the other "
   "worker were opened and closed again)")

fm, sm = out["mid"]
is_(val(sm, "chat_messages_total", result="stored"), 5.0, "5 sends: stored +5")
ok(out["retry_ok"], "the retry of m4 is answered ok")
is_(val(sm, "chat_messages_total", result="duplicate"), 1.0, "and counted a duplicate")
is_(out["bad"], "not_found", "a send to no conversation: not_found")
ok((val(sm, "chat_errors_total", code="not_found") or 0) >= 1, "chat_errors_total{not_found}")
ok((val(sm, "chat_deliveries_total", kind="durable") or 0) >= 15,
   "durable deliveries >= 5 messages x 3 members (%s)" % val(sm, "chat_deliveries_total",
                                                             kind="durable"))
is_(val(sm, "chat_connections", transport="sse"), 1.0, "an SSE stream: sse 1")
is_(val(sm, "chat_connections", transport="poll"), 1.0, "a held long-poll: poll 1")
is_(val(sm, "chat_messages_total", result="error"), 1.0, "the refused send: error +1")
is_(val(sm, "chat_send_seconds_count"), 7.0, "chat_send_seconds counts the 7 sends")
q = {dict(k[1]).get("statement") for k in sm if k[0] == "chat_db_query_seconds_count"}
ok(len(q) >= 3, "chat_db_query_seconds by statement (%s)" % sorted(q)[:6])
err = check_histograms(fm, sm, None)
ok(err is None, "histogram buckets cumulative, +Inf = _count" + (": %s" % err if err else ""))
ok((val(sm, "chat_db_connections") or 0) >= 2, "chat_db_connections: both pools live")
ok(val(sm, "chat_zone_bytes", state="free") < val(sm, "chat_zone_bytes", state="size"),
   "zone free < size")
pos = {k[1]: v for k, v in sm.items() if k[0] == "chat_bus_position"}
ok(len(pos) == 2 and all(v > 0 for v in pos.values()), "bus position per worker (%s)" % pos)

time.sleep(0.5)
fe, se = metrics(ng)
is_([val(se, "chat_connections", transport=t) for t in ("websocket", "sse", "poll")],
    [0.0, 0.0, 0.0], "all closed: every connection gauge back to 0")


# a worker killed with SIGKILL while it holds connections
async def killed():
    pids = ng.worker_pids()
    conns = [await ws_connect_on("alice", want_pid=pids[0], nginx=ng) for _ in range(2)]
    await asyncio.sleep(0.2)
    before = metrics(ng)[1]
    ng.kill_worker(pids[0])
    wait_for(lambda: len([p for p in ng.worker_pids() if p not in pids]) == 1, 10)
    await asyncio.sleep(1.5)
    after = metrics(ng)[1]
    for x in conns:
        await x.close()
    return before, after


before, after = asyncio.run(killed())
is_(val(before, "chat_connections", transport="websocket"), 2.0, "2 connections on one worker")
is_(val(after, "chat_connections", transport="websocket"), 0.0,
    "its SIGKILL takes them out of the gauge")
ok(val(after, "chat_sessions_total", transport="websocket")
   >= val(before, "chat_sessions_total", transport="websocket"),
   "and leaves the counters as they were (%s -> %s)" % (
       val(before, "chat_sessions_total", transport="websocket"),
       val(after, "chat_sessions_total", transport="websocket")))
is_(val(after, "chat_messages_total", result="stored"), 5.0, "stored stays 5")

done()
