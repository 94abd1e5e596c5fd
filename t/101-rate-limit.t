#!/usr/bin/python3
# chat_rate_limit: token buckets in the shared zone, two workers.
#  1. Sends: one user's WebSocket connections on both workers draw on one
#     bucket (burst + 1 pass at once, not twice that); the refused get
#     rate_limited with retry_after_ms and are not stored; after the wait
#     a send passes again.  A REST send of the same user shares it (429).
#  2. A WebSocket that goes on sending into refusals is closed with 4029;
#     one that stops is not.
#  3. REST calls: 429, Retry-After and retry_after_ms; a service token is
#     not limited.
#  4. Typing starts (stops are never refused).
#  5. Connection attempts per user: WebSocket (hello), SSE (an error event
#     with retry, on a 200 stream) and long-poll (429); per address on the
#     upgrade.
#  6. The log names the limit, the user and the count.
#  7. Bad directives are refused at configuration time.
import asyncio
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("ann", ["ann", "bea", "spam", "calm", "rita", "tim", "connie", "sia", "pol"], "room")
ng = Nginx(pg, workers=2, http="""
    chat_rate_limit send user rate=1r/s burst=4;
    chat_rate_limit typing user rate=1r/s burst=2;
    chat_rate_limit rest user rate=1r/s burst=5;
""")
SVC = token("platform", role="service")


def err(b):
    return b.get("error", {}).get("code") if isinstance(b, dict) else None


async def main():
    P = ng.worker_pids()

    # ---- 1
    w = [await ws_connect_on("ann", p) for p in P]
    t0 = time.monotonic()
    replies = []
    for i in range(12):
        replies.append(await w[i % 2].request("send", conversation_id=G, client_msg_id="s-%d" % i, body="x"))
    elapsed = time.monotonic() - t0
    passed = [r for r in replies if r.get("ok")]
    refused = [r for r in replies if not r.get("ok")]
    ok(5 <= len(passed) <= 5 + int(elapsed) + 1,
       "both workers draw on one bucket: %d of 12 passed in %.2fs (burst 4 + 1)" % (len(passed), elapsed))
    ok(refused and all(err(r) == "rate_limited" and r["error"].get("retry_after_ms", 0) > 0 for r in refused),
       "the refused get rate_limited with retry_after_ms")
    ok(all(r["error"]["retry_after_ms"] <= 1001 for r in refused), "retry_after_ms is at most a period")
    is_(pg.query("SELECT count(*) FROM chat_messages WHERE sender = 'ann'")[0][0], len(passed),
        "only the passed ones are stored")
    st, hd, body = api("POST", "/chat/api/conversations/%s/messages" % G, token=token("ann"),
                       json={"client_msg_id": "rest-1", "body": "x"})
    is_((st, err(body)), (429, "rate_limited"), "a REST send of the same user shares the bucket: 429")
    await asyncio.sleep(max(r["error"]["retry_after_ms"] for r in refused[-1:]) / 1000 + 0.05)
    r = await w[1].request("send", conversation_id=G, client_msg_id="s-late", body="x")
    ok(r.get("ok"), "after retry_after_ms a send passes again")
    ok(not w[0].closed and not w[1].closed, "a few refusals close nothing")

    # ---- 2
    s = await ws_connect_on("spam", P[0])
    for i in range(60):
        await s.send({"type": "send", "id": i + 1, "conversation_id": G, "client_msg_id": "sp-%d" % i,
                      "body": "buy now"})
    got = await s.wait_closed(10)
    is_(got and got[0], 4029, "a WebSocket that goes on sending into refusals is closed with 4029")
    c = await ws_connect_on("calm", P[1])
    for i in range(8):
        await c.request("send", conversation_id=G, client_msg_id="c-%d" % i, body="x")
    await asyncio.sleep(0.3)
    ok(not c.closed, "one that got a few refusals is not closed")

    # ---- 3
    res = [api("GET", "/chat/api/me", token=token("rita")) for _ in range(10)]
    codes = [x[0] for x in res]
    ok(codes[:6] == [200] * 6 and 429 in codes, "REST: burst 5 + 1 pass, then 429 (%s)" % codes)
    st, hd, body = [x for x in res if x[0] == 429][0]
    ok(err(body) == "rate_limited" and body["error"]["retry_after_ms"] > 0 and int(hd.get("retry-after", 0)) >= 1,
       "with rate_limited, retry_after_ms and Retry-After")
    ok(all(api("GET", "/chat/api/reports", token=SVC)[0] == 200 for _ in range(10)),
       "a service token is not limited")

    # ---- 4
    t = await ws_connect_on("tim", P[0])
    rs = [await t.request("typing", conversation_id=G, state="start") for _ in range(6)]
    ok([r.get("ok") for r in rs][:3] == [True] * 3 and any(err(r) == "rate_limited" for r in rs),
       "typing starts: burst 2 + 1, then rate_limited")
    r = await t.request("typing", conversation_id=G, state="stop")
    ok(r.get("ok"), "a typing stop is never refused")

    # ---- 6
    log = ng.error_log()
    ok('rate limit "send" per user exceeded by "ann"' in log, "the log names the limit and the user")
    ok(re.search(r'exceeded by "spam", 1 refused in a row', log), "the first refusal of a run is logged")
    ok("closing a connection of \"spam\" that went on past 32 rate limit refusals" in log,
       "the close of a client that went on is logged")

    await asyncio.gather(*(x.close() for x in w + [c, t]))


asyncio.run(main())
ng.stop()

# ---- 5 (in an nginx of its own: ws_connect_on's tries are attempts too)
ng = Nginx(pg, workers=2, http="""
    chat_rate_limit connect user rate=12r/m burst=3;
    chat_rate_limit connect address rate=1000r/s burst=1000;
""")
# every attempt counts against the limit: connect only once the workers
# have the store (a hello before that is answered "unavailable")
ready_pids = set()
t_ready = time.monotonic()
while time.monotonic() - t_ready < 10 and not set(ng.worker_pids()) <= ready_pids:
    st_, _, b_ = api("GET", "/chat/ready", nginx=ng)
    if st_ == 200:
        ready_pids.add(b_.get("pid"))
    else:
        time.sleep(0.05)


async def connects():
    conns = []
    for i in range(4):
        conns.append(await ws_connect(token=token("connie")))
    ok(all(x.hello and x.hello.get("ok") for x in conns),
       "4 WebSocket connections pass (burst 3 + 1): %s" % [x.hello and (x.hello.get("ok") or x.hello.get("error"))
                                                          for x in conns])
    x = await ws_connect(token=token("connie"))
    is_(err(x.hello), "rate_limited", "the 5th: hello answered rate_limited")
    got = await x.wait_closed(5)
    is_(got and got[0], 4029, "and closed with 4029")
    for y in conns:
        await y.close()
    ss = []
    for i in range(4):
        ss.append(await sse_connect("sia"))
    ok(all(y.status == 200 and y.hello for y in ss), "4 SSE streams pass")
    y = await sse_connect("sia", welcome=False)
    await y.wait(lambda z: z.closed or any(rec["event"] == "error" for rec in z.records), 5)
    rec = [rec for rec in y.records if rec["event"] == "error"]
    ok(y.status == 200 and rec and rec[0]["data"]["error"]["code"] == "rate_limited"
       and y.retry and y.retry > 0, "the 5th SSE: 200, an error event rate_limited and a retry")
    for z in ss + [y]:
        await z.close()
    res = []
    for i in range(5):
        res.append(await poll("pol", timeout_ms=0))
    is_([q[0] for q in res][:4], [200] * 4, "4 polls pass")
    is_((res[4][0], err(res[4][2])), (429, "rate_limited"), "the 5th poll: 429 rate_limited")



asyncio.run(connects())
ng.stop()

# ---- 7
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
for bad, want in (("chat_rate_limit sends user rate=1r/s;", "is not send, typing, connect or rest"),
                  ("chat_rate_limit send everyone rate=1r/s;", "is not user or address"),
                  ("chat_rate_limit send user rate=0r/s;", "invalid parameter"),
                  ("chat_rate_limit send user burst=3 rate=x;", "invalid parameter"),
                  ("chat_rate_limit send user burst=3;", "is required"),
                  ("chat_rate_limit send user rate=1r/s; chat_rate_limit send user rate=2r/s;", "is duplicate")):
    n = Nginx(pg, workers=1, http=bad, start=False)
    good, out = n.test_conf()
    ok(not good and want in out, "refused: %s (%s)" % (bad, want))

pg.stop()
done()
