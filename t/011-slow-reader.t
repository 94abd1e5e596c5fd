#!/usr/bin/python3
# A WebSocket client that stops reading while its conversation is flooded
# stops being sent events once half of chat_max_queue waits for it, and is
# cut (close 4008, or its TCP connection dropped) when it has not drained
# that within chat_send_timeout -- the worker's memory does not grow with
# the flood -- and the conversation's other members keep receiving every
# message.
import asyncio
import http.client
import json
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

MAX_QUEUE = 128 * 1024
BODY = 16 * 1024            # each message.new frame is a bit larger
FLOOD = 1024                # messages: 16 MiB towards the slow reader
WARMUP = 64
MIB = 1024 * 1024

# Under ASan (make test-static ASAN=1) freed memory sits in ASan's
# quarantine (256 MiB by default) and would read as growth; a worker that
# grows because of us still grows without it.
os.environ.setdefault("ASAN_OPTIONS",
                      "detect_leaks=0:abort_on_error=0:quarantine_size_mb=0")

pg = PgCluster()
# (REST bodies of up to chat_max_message_size, 64k, are accepted)
ng = Nginx(pg, workers=2, http="chat_max_queue 128k;\nchat_send_timeout 3s;")

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)


def run(coro):
    return loop.run_until_complete(coro)


def mem(pid):
    """{VmRSS, RssAnon, RssFile, RssShmem} in bytes for a process."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def workers_mem():
    """Per-worker private memory (RssAnon + RssFile = VmRSS minus the shared
    zone pages the worker touched; the zone is a fixed-size cache, not
    per-connection memory) and VmRSS."""
    res = {}
    for pid in ng.worker_pids():
        m = mem(pid)
        res[pid] = (m.get("RssAnon", 0) + m.get("RssFile", 0), m.get("VmRSS", 0))
    return res


class SlowWS(RawWS):
    """RawWS on a socket with a tiny receive buffer (set before connect, so
    the advertised window stays small)."""

    def __init__(self, port, rcvbuf=4096, timeout=10):
        self.port = port
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.status = None
        self.headers = {}
        self.accept_ok = False
        self.response = b""
        self.handshake("/chat/ws", {"Sec-WebSocket-Protocol": "chat.v1"})


# ------------------------------------------------------------ set-up ----

tok = {u: token(u) for u in ("ann", "ben", "cat", "dan")}
st, hd, body = api("POST", "/chat/api/conversations", token=tok["ann"],
                   json={"kind": "group", "title": "flood", "members": ["ben", "cat", "dan"]})
ok(st in (200, 201), "conversation created (%s)" % st)
conv = body["conversation"]["id"]


def post_many(n, prefix, threads=2, body_size=BODY):
    """Posts n messages as ann over REST from `threads` keep-alive
    connections; returns the list of statuses."""
    statuses = []
    lock = threading.Lock()

    def worker(k):
        c = http.client.HTTPConnection("127.0.0.1", ng.port, timeout=30)
        mine = []
        try:
            for i in range(k, n, threads):
                payload = json.dumps({"client_msg_id": "%s-%d" % (prefix, i),
                                      "body": ("%s-%d " % (prefix, i)).ljust(body_size, "x")})
                c.request("POST", "/chat/api/conversations/%s/messages" % conv, body=payload,
                          headers={"Authorization": "Bearer " + tok["ann"],
                                   "Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                mine.append(r.status)
        except Exception as e:  # reported through the statuses
            mine.append("error: %r" % (e,))
        finally:
            c.close()
        with lock:
            statuses.extend(mine)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return statuses


def seqs(client):
    return [m["event"]["seq"] for m in client.events("message.new")
            if m["event"].get("conversation_id") == conv]


async def wait_count(client, n, timeout):
    deadline = time.monotonic() + timeout
    while len(seqs(client)) < n and time.monotonic() < deadline and not client.closed:
        await asyncio.sleep(0.1)
    return len(seqs(client))


async def open_readers():
    cat = await ws_connect(ng, token=tok["cat"], max_size=4 * MIB)
    dan = await ws_connect(ng, token=tok["dan"], max_size=4 * MIB)
    return cat, dan

cat, dan = run(open_readers())
ok(cat.hello and cat.hello.get("ok") and dan.hello and dan.hello.get("ok"), "two normal readers joined")

# warm the workers up (pools, buffers, first allocations) before measuring
sts = post_many(WARMUP, "warm")
is_(sorted(set(sts)), [201], "warm-up: %d messages posted" % WARMUP)
is_(run(wait_count(cat, WARMUP, 30)), WARMUP, "warm-up: first reader got them all")
is_(run(wait_count(dan, WARMUP, 30)), WARMUP, "warm-up: second reader got them all")

# the slow reader: joins, reads its hello reply, then never reads again
ben = SlowWS(ng.port)
is_(ben.status, 101, "slow reader upgraded")
ben.send_json({"type": "hello", "id": 1, "token": tok["ben"]})
hello = None
try:
    while True:
        m = ben.recv_json(timeout=10)
        if m is None or (m.get("type") == "reply" and m.get("id") == 1):
            hello = m
            break
except socket.timeout:
    pass
ok(hello is not None and hello.get("ok") is True, "slow reader's hello accepted")
ben.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

log_mark = len(ng.error_log())
time.sleep(0.5)
before = workers_mem()
note("worker memory before the flood (private, VmRSS): %r" % before)

# ------------------------------------------------------------- flood ----

peak = {pid: v[0] for pid, v in before.items()}
peak_rss = {pid: v[1] for pid, v in before.items()}
sampling = {"on": True}


def sampler():
    while sampling["on"]:
        for pid, (priv, rss) in workers_mem().items():
            if pid in peak:
                peak[pid] = max(peak[pid], priv)
                peak_rss[pid] = max(peak_rss[pid], rss)
        time.sleep(0.02)


# the slow reader resumes reading as soon as the server gives up on it:
# it then sees whole frames and the 4008 close frame (the server waits a
# while for the client to read its close frame)
drained = {"frames": 0, "close": None, "eof": False, "bad": None, "err": None, "t": None}
slow_re = re.compile(r"client websocket too slow: (\d+) bytes queued, closing with 4008")


def drain_when_cut():
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not slow_re.search(ng.error_log(), log_mark):
        time.sleep(0.01)
    drained["t"] = time.monotonic()
    try:
        while True:
            f = ben.recv_frame(timeout=10)
            if f is None:
                drained["eof"] = True
                break
            if f.opcode == 8:
                drained["close"] = f
                break
            if f.opcode == 1:
                try:
                    j = f.json()
                    if j.get("type") != "event" or j["event"].get("kind") != "message.new":
                        drained["bad"] = j
                except ValueError:
                    drained["bad"] = f
                drained["frames"] += 1
    except Exception as e:
        drained["err"] = repr(e)


drainer = threading.Thread(target=drain_when_cut)
drainer.start()

smp = threading.Thread(target=sampler)
smp.start()
t0 = time.monotonic()


async def flood():
    sts = await loop.run_in_executor(None, post_many, FLOOD, "flood")
    n_cat = await wait_count(cat, WARMUP + FLOOD, 60)
    n_dan = await wait_count(dan, WARMUP + FLOOD, 60)
    return sts, n_cat, n_dan

sts, n_cat, n_dan = run(flood())
elapsed = time.monotonic() - t0
sampling["on"] = False
smp.join()
after = workers_mem()
note("flood of %d x %d bytes took %.1fs" % (FLOOD, BODY, elapsed))
note("worker memory after: %r; peak private %r; peak VmRSS %r" % (after, peak, peak_rss))

is_(sorted(set(sts)), [201], "flood: %d messages posted, each 201" % FLOOD)

# the slow reader was cut by the queue limit, not by anything else
m = ng.wait_log(r"client websocket too slow: (\d+) bytes queued, closing with 4008", timeout=10,
                start=log_mark)
ok(m is not None, "error.log: slow reader closed with 4008 (did not drain in chat_send_timeout)")
if m:
    queued = int(m.group(1))
    ok(queued <= MAX_QUEUE, "bytes queued when cut (%d) <= chat_max_queue (%d)" % (queued, MAX_QUEUE))
slow_lines = re.findall(r"client websocket too slow", ng.error_log()[log_mark:])
is_(len(slow_lines), 1, "only the slow reader was cut for slowness")

# memory: growth bounded by the queue cap, not by the 16 MiB flood
grow_peak = sum(peak[p] - before[p][0] for p in before)
grow_after = sum(after.get(p, (0, 0))[0] - before[p][0] for p in before)
grow_rss = sum(peak_rss[p] - before[p][1] for p in before)
ok(grow_peak < 4 * MIB, "peak private memory growth of the workers %.2f MiB < 4 MiB (flood: %d MiB)"
   % (grow_peak / MIB, FLOOD * BODY // MIB))
ok(grow_after < 4 * MIB, "private memory growth after the flood %.2f MiB < 4 MiB" % (grow_after / MIB))
note("VmRSS peak growth (includes shared-zone pages of the event ring): %.2f MiB" % (grow_rss / MIB))

# the others got everything, in order, without gaps
is_(n_cat, WARMUP + FLOOD, "first normal reader received all %d messages" % (WARMUP + FLOOD))
is_(n_dan, WARMUP + FLOOD, "second normal reader received all %d messages" % (WARMUP + FLOOD))
s = seqs(cat)
is_(s, list(range(s[0], s[0] + len(s))) if s else s, "first reader: seq in order, no gaps, no duplicates")
s = seqs(dan)
is_(s, list(range(s[0], s[0] + len(s))) if s else s, "second reader: seq in order, no gaps, no duplicates")
ok(not cat.closed and not dan.closed, "normal readers still connected (%r %r)" % (cat.close_code, dan.close_code))

drainer.join(60)
note("slow reader got %d frames, then %s" % (drained["frames"], "EOF" if drained["eof"] else repr(drained["close"])))
c = drained["close"]
ok(drained["eof"] or (c is not None and c.close_code == 4008),
   "slow reader: close 4008 or connection cut (got %s)" % ("EOF" if drained["eof"] else repr(c)))
is_(c.close_code if c is not None else None, 4008,
    "slow reader that resumes reading at once gets the 4008 close frame")
ok(drained["bad"] is None and drained["err"] is None,
   "slow reader: everything before the close is whole message.new frames (%r %r)"
   % (drained["bad"], drained["err"]))
ok(drained["frames"] < FLOOD // 2, "slow reader got only a part of the flood (%d of %d)"
   % (drained["frames"], FLOOD))
if c is not None:
    ok(ben.eof(timeout=5), "slow reader: TCP closed after the close frame")
ben.close()


# -------------------------------------------------------- afterwards ----

async def after_flood():
    sts = await loop.run_in_executor(None, post_many, 1, "after", 1, 100)
    n = await wait_count(cat, WARMUP + FLOOD + 1, 10)
    n2 = await wait_count(dan, WARMUP + FLOOD + 1, 10)
    await cat.send({"type": "ping", "id": 5})
    pong = await cat.wait_event(lambda m: m.get("type") == "pong", timeout=5)
    # the slow user reconnects and is served normally
    ben2 = await ws_connect(ng, token=tok["ben"])
    r = await ben2.request("send", conversation_id=conv, client_msg_id="ben-back", body="I'm back")
    n3 = await wait_count(cat, WARMUP + FLOOD + 2, 10)
    await ben2.close()
    return sts, n, n2, pong, ben2.hello, r, n3

sts, n, n2, pong, h2, r, n3 = run(after_flood())
is_(sts, [201], "a message after the flood posted")
is_((n, n2), (WARMUP + FLOOD + 1, WARMUP + FLOOD + 1), "both readers receive it promptly")
is_(pong, {"type": "pong", "id": 5}, "first reader answers ping")
ok(h2 and h2.get("ok") and r and r.get("ok"), "the slow user reconnects, and its send is accepted")
is_(n3, WARMUP + FLOOD + 2, "... and the others receive it")

run(cat.close())
run(dan.close())
done()
