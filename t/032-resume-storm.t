#!/usr/bin/python3
# Reconnect storm: 5 users in a group and in 5 direct conversations; sender
# connections store 10,000 messages (and, meanwhile, new groups are created
# over REST and written to over REST) while receiver clients (2 per user,
# sessions on both workers) are cut at random points -- TCP reset, abrupt
# close, clean WebSocket close -- and come back with hello.cursor = the last
# cursor they saw.  Afterwards every receiver holds every message of its
# conversations exactly once, in seq order, without a gap, as stored in the
# DB, and conversation.created of the groups made meanwhile once, before
# their messages.  The bus ring is small (chat_bus_slots 1024) so that long
# absences are caught up from PostgreSQL, short ones from the ring.
# Phase 2: nginx is restarted with the smallest ring (1024 slots), send
# batches of up to 4096 (one batch can overrun the ring, so workers read the
# bus from PostgreSQL) and catch-up pages of 16 events; the receivers resume
# with their cursors, and an unpaced burst of 3,000 more messages (up to
# 2,000 in flight) runs through the same random drops.
# Then: hello without a cursor starts live, a garbage / foreign-epoch /
# future cursor gets resync_required, a cursor from before the storm
# replays everything, and `sync` rewinds a live connection -- also while it
# is still being caught up from the store: on a dedicated nginx (catch-up
# pages of 16, a ring that holds none of the backlog) the next store page is
# held in PostgreSQL while the sync goes out, and after the sync reply the
# stream must be exactly the DB's events after the sync cursor, once each.
import asyncio
import os
import random
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

TOTAL = int(os.environ.get("STORM_MESSAGES") or 10000)
BURST = int(os.environ.get("STORM_BURST") or 3000)
SEED = int(os.environ.get("STORM_SEED") or random.randrange(1 << 30))
RECEIVERS_PER_USER = 2
rnd = random.Random(SEED)


# ------------------------------------------------------------- helpers ----

def cut(c, rst):
    """Drops the TCP connection without a WebSocket close (RST with
    SO_LINGER 0, else a plain close)."""
    tr = c.ws.transport
    try:
        if rst:
            sock = tr.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    tr.abort()


# --------------------------------------------------------------- setup ----

pg = PgCluster()
NG = {"cur": Nginx(pg, workers=2, http="chat_bus_slots 1024;")}
note("seed %d (STORM_SEED=%d to repeat)" % (SEED, SEED))

USERS = ["u1", "u2", "u3", "u4", "u5"]
TOK = {u: token(u) for u in USERS}


# statuses=(201,): every conversation created here is a new one
G = rest_create_conv("u1", "group", USERS[1:], statuses=(201,))
DMS = [rest_create_conv(USERS[i], "direct", [USERS[(i + 1) % 5]], statuses=(201,))
       for i in range(5)]
MEMBERS = {G: set(USERS)}
for i, d in enumerate(DMS):
    MEMBERS[d] = {USERS[i], USERS[(i + 1) % 5]}
CONVS = [G] + DMS
DYN = []                    # groups created during the storm


def user_convs(u):
    return [cv for cv in CONVS + DYN if u in MEMBERS[cv]]


EPOCH = pg.query("SELECT epoch FROM chat_clock")[0][0]


def make_plan(n, prefix):
    """n messages: 40% group, 60% direct; each from a member."""
    plan = {u: [] for u in USERS}
    for i in range(n):
        cv = G if rnd.random() < 0.4 else DMS[rnd.randrange(5)]
        u = rnd.choice(sorted(MEMBERS[cv]))
        plan[u].append((cv, "%s%05d" % (prefix, i), "%s %d from %s" % (prefix, i, u)))
    return plan


class Receiver:
    """One logical client: a user's device that keeps reconnecting."""

    def __init__(self, user, k):
        self.user, self.k = user, k
        self.name = "%s/%d" % (user, k)
        self.cursor = None
        self.events = []          # (gseq, kind, conversation_id, seq, message id)
        self.sessions = 0
        self.pids = set()
        self.drops = {"rst": 0, "abort": 0, "close": 0, "server": 0, "slow": 0}
        self.problems = []
        self.live = None
        self.start_cursor = None

    def absorb(self, c, start):
        """Takes the durable events a finished session received."""
        last = gseq(start)
        for m in c.messages:
            t = m.get("type")
            if t == "event" and "cursor" in m:
                e = m.get("event") or {}
                g = gseq(m["cursor"])
                if g is None or (last is not None and g <= last):
                    self.problems.append("session %d: cursor %s after %s" % (
                        self.sessions, m["cursor"], last))
                last = g if g is not None else last
                msg = e.get("message") or {}
                self.events.append((g, e.get("kind"), e.get("conversation_id"),
                                    e.get("seq"), msg.get("id")))
                self.cursor = m["cursor"]
            elif t == "event":
                pass      # ephemeral
            else:
                self.problems.append("session %d: unexpected %r" % (self.sessions, m))

    def have(self):
        n = {}
        for ev in self.events:
            if ev[1] == "message.new":
                n[ev[2]] = n.get(ev[2], 0) + 1
        if self.live is not None:
            for m in self.live.messages:
                e = m.get("event") or {}
                if m.get("type") == "event" and e.get("kind") == "message.new":
                    n[e.get("conversation_id")] = n.get(e.get("conversation_id"), 0) + 1
        return n

    async def connect(self):
        for attempt in range(100):
            try:
                c = await ws_connect(token=TOK[self.user], cursor=self.cursor, timeout=20)
            except Exception as e:  # noqa: BLE001
                self.problems.append("connect: %r" % (e,))
                await asyncio.sleep(0.2)
                continue
            if c.hello and c.hello.get("ok"):
                self.sessions += 1
                self.pids.add(session_pid(c))
                got = c.hello["result"].get("cursor")
                if self.cursor is not None and got != self.cursor:
                    self.problems.append("hello cursor %s, sent %s" % (got, self.cursor))
                return c, (self.cursor if self.cursor is not None else got)
            err = (c.hello or {}).get("error", {})
            await c.close()
            if err.get("code") in ("unavailable", "rate_limited"):
                # right after an nginx start the store may not be ready yet
                await asyncio.sleep(min(err.get("retry_after_ms", 200), 1000) / 1000.0)
                continue
            self.problems.append("hello failed: %r" % (c.hello,))
            await asyncio.sleep(0.2)
        raise RuntimeError("%s could not connect: %s" % (self.name, self.problems[-3:]))

    async def start(self):
        c, start = await self.connect()
        self.cursor = start           # from "now": before any message
        self.live, self.start_cursor = c, start

    def server_closed(self, c):
        if c.close_code == 4008:
            # "too slow a reader": policy, not a fault; the client resumes
            self.drops["slow"] += 1
        else:
            self.drops["server"] += 1
            self.problems.append("server closed a session: %s %s" % (
                c.close_code, c.close_reason))

    async def storm(self, stop):
        c, start = self.live, self.start_cursor
        if c is None:
            await asyncio.sleep(rnd.uniform(0, 0.5))
            c, start = await self.connect()
        while True:
            self.live = c
            stay = rnd.choice([0.02, 0.1, 0.3, 0.6, 1.0, 1.8])
            stay *= rnd.uniform(0.5, 1.5)
            t_end = time.monotonic() + stay
            while time.monotonic() < t_end and not c.closed and not stop.is_set():
                await asyncio.sleep(0.02)
            if stop.is_set() and not c.closed:
                break
            if c.closed:
                self.server_closed(c)
            else:
                how = rnd.choice(["rst", "abort", "close"])
                self.drops[how] += 1
                if how == "close":
                    await c.close()
                else:
                    cut(c, how == "rst")
                    await c.wait_closed(10)
            self.live = None
            self.absorb(c, start)
            await asyncio.sleep(rnd.choice([0, 0, 0.05, 0.2, 0.5, 1.2]))
            c, start = await self.connect()
        self.live, self.start_cursor = c, start

    async def settle(self, want, timeout):
        deadline = time.monotonic() + timeout
        c, start = self.live, self.start_cursor

        def complete():
            h = self.have()
            return all(h.get(cv, 0) >= want[cv] for cv in user_convs(self.user))
        while True:
            await until(lambda: complete() or c.closed, deadline - time.monotonic())
            if c.closed and not complete() and time.monotonic() < deadline:
                self.server_closed(c)
                self.live = None
                self.absorb(c, start)
                c, start = await self.connect()
                self.live = c
                continue
            break
        r = complete()
        await asyncio.sleep(0.5)
        await c.close()
        self.live, self.start_cursor = None, None
        self.absorb(c, start)
        return r


async def sender(user, items, stats, rate, window):
    """Sends `items` over one connection, `window` at a time, paced to
    `rate` messages/s (None: as fast as it goes); retries (the same
    client_msg_id) after errors or a lost connection."""
    conn = {"c": None}
    lock = asyncio.Lock()
    t0 = time.monotonic()

    async def get_conn():
        async with lock:          # one connection per sender, not one per send
            while conn["c"] is None or conn["c"].closed:
                if conn["c"] is not None:
                    stats["reconnects"] += 1
                try:
                    c = await ws_connect(token=TOK[user], timeout=20)
                except Exception:  # noqa: BLE001
                    await asyncio.sleep(0.2)
                    continue
                if c.hello and c.hello.get("ok"):
                    conn["c"] = c
                    stats["pids"].add(session_pid(c))
                else:
                    await c.close()
                    await asyncio.sleep(0.2)
            return conn["c"]

    async def one(item):
        cv, cmid, body = item
        for attempt in range(100):
            c = await get_conn()
            r = await c.request("send", conversation_id=cv, client_msg_id=cmid, body=body,
                                timeout=30)
            if r and r.get("ok"):
                stats["acks"][(user, cmid)] = (r["result"]["message"]["id"],
                                               r["result"]["message"]["seq"])
                return
            stats["retries"] += 1
            if r is None:
                continue
            err = r.get("error", {})
            if err.get("code") in ("unavailable", "rate_limited"):
                await asyncio.sleep(min(err.get("retry_after_ms", 100), 2000) / 1000.0)
                continue
            stats["errors"].append((user, cmid, err))
            return
        stats["errors"].append((user, cmid, "gave up"))

    for i in range(0, len(items), window):
        await asyncio.gather(*[one(it) for it in items[i:i + window]])
        if rate:
            due = t0 + (i + window) / float(rate)
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
    return conn


async def creator(stats, groups, per_group):
    """Every ~1.5 s a new group of 3 over REST, then messages into it over
    REST (from its members), while the storm goes on."""
    for i in range(groups):
        await asyncio.sleep(1.5)
        members = rnd.sample(USERS, 3)
        try:
            cv = await asyncio.to_thread(rest_create_conv, members[0], "group", members[1:],
                                         statuses=(201,))
        except Exception as e:  # noqa: BLE001
            stats["errors"].append(("create", repr(e)))
            continue
        MEMBERS[cv] = set(members)
        DYN.append(cv)
        stats["created"] += 1
        for j in range(per_group):
            u = rnd.choice(members)
            path = "/chat/api/conversations/%s/messages" % cv
            body = {"client_msg_id": "dyn-%s-%d" % (cv, j), "body": "dyn %s %d" % (cv, j)}
            for attempt in range(20):
                st, _, b = await asyncio.to_thread(api, "POST", path, token=TOK[u], json=body)
                if st in (200, 201):
                    stats["rest"] += 1
                    break
                if st != 503:
                    stats["errors"].append(("rest", st, b))
                    break
                await asyncio.sleep(0.2)


def db_state():
    rows = pg.query("SELECT conversation_id::text, seq, id::text FROM chat_messages "
                    "ORDER BY conversation_id, seq")
    per = {cv: [] for cv in CONVS + DYN}
    for cv, seq, mid in rows:
        per.setdefault(cv, []).append((seq, mid))
    return per


def verdict(receivers, per, label):
    bad = []
    for r in receivers:
        gs = [e[0] for e in r.events]
        if any(b <= a for a, b in zip(gs, gs[1:])):
            dup = len(gs) - len(set(gs))
            bad.append("%s: cursors not strictly increasing (%d duplicates)" % (r.name, dup))
        kinds = {e[1] for e in r.events}
        if kinds - {"message.new", "conversation.created"}:
            bad.append("%s: unexpected kinds %s" % (r.name, kinds))
        for cv in CONVS + DYN:
            cr = [e[0] for e in r.events if e[2] == cv and e[1] == "conversation.created"]
            first = [e[0] for e in r.events if e[2] == cv and e[1] == "message.new"][:1]
            if cv in DYN and r.user in MEMBERS[cv]:
                if len(cr) != 1 or (first and first[0] < cr[0]):
                    bad.append("%s conv %s: %d conversation.created (want 1, before the "
                               "messages)" % (r.name, cv, len(cr)))
            elif cr:
                bad.append("%s conv %s: %d unexpected conversation.created"
                           % (r.name, cv, len(cr)))
            got = [(e[3], e[4]) for e in r.events if e[2] == cv and e[1] == "message.new"]
            exp = per[cv] if r.user in MEMBERS[cv] else []
            if got != [(s, m) for s, m in exp]:
                seqs = [s for s, _ in got]
                missing = sorted(set(range(1, len(exp) + 1)) - set(seqs))
                dups = len(seqs) - len(set(seqs))
                disorder = sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
                bad.append("%s conv %s: got %d want %d; missing %d %s; duplicates %d; "
                           "out of order %d" % (r.name, cv, len(got), len(exp), len(missing),
                                                missing[:8], dups, disorder))
    ok(not bad, "%s: every receiver holds every message of its conversations exactly once, "
       "in seq order, no gap, as in the DB; conversation.created of new groups once" % label)
    for b in bad[:20]:
        diag("  " + b)
    probs = [(r.name, p) for r in receivers for p in r.problems]
    is_(probs[:10], [], "%s: no protocol anomalies (bad hello cursor, resync, unexpected "
        "messages, server-side closes)" % label)
    for r in receivers:
        r.problems = []


async def phase(label, receivers, plan, rate, window, groups, pids):
    """Senders store `plan` while the receivers are cut and resume; then
    everything settles and is checked against the DB."""
    n = sum(len(v) for v in plan.values())
    stop = asyncio.Event()
    stats = {"acks": {}, "retries": 0, "errors": [], "pids": set(), "rest": 0, "created": 0,
             "reconnects": 0}
    before = {r.name: (r.sessions, dict(r.drops), set(r.pids)) for r in receivers}
    for r in receivers:
        r.pids = set()
    t0 = time.monotonic()
    rtasks = [asyncio.ensure_future(r.storm(stop)) for r in receivers]
    ctask = asyncio.ensure_future(creator(stats, groups, 25))
    conns = await asyncio.gather(*[sender(u, plan[u], stats,
                                          rate * len(plan[u]) / float(n) if rate else None,
                                          window) for u in USERS])
    await ctask
    t_send = time.monotonic() - t0
    stop.set()
    await asyncio.gather(*rtasks)
    sessions = sum(r.sessions - before[r.name][0] for r in receivers)
    drops = {k: sum(r.drops[k] - before[r.name][1][k] for r in receivers)
             for k in ("rst", "abort", "close", "server", "slow")}
    note("%s: sent %d in %.1fs (%d retries, %d sender reconnects); receivers: %d sessions; "
         "drops %s" % (label, len(stats["acks"]), t_send, stats["retries"],
                       stats["reconnects"], sessions, drops))

    is_(len(stats["acks"]), n, "%s: all %d sends acknowledged" % (label, n))
    is_(stats["created"], groups, "%s: %d groups created over REST meanwhile" % (label, groups))
    is_(stats["rest"], groups * 25, "%s: %d REST sends into them stored" % (label, groups * 25))
    is_(stats["errors"][:5], [], "%s: no send failed" % label)
    per = db_state()
    mine = {mid for (u, cmid), (mid, s) in stats["acks"].items()}
    ok(all([s for s, _ in per[cv]] == list(range(1, len(per[cv]) + 1)) for cv in per),
       "%s: DB: every conversation's seq is 1..N without gaps" % label)
    dbids = {mid: s for cv in per for s, mid in per[cv]}
    ok(all(dbids.get(mid) == s for (mid, s) in stats["acks"].values()) and len(mine) == n,
       "%s: every ack names a distinct stored message (id, seq)" % label)

    want = {cv: len(per[cv]) for cv in per}
    t1 = time.monotonic()
    settled = await asyncio.gather(*[r.settle(want, 60) for r in receivers])
    note("%s: settled in %.1fs" % (label, time.monotonic() - t1))
    for sc in conns:
        if sc["c"] is not None:
            await sc["c"].close()
    ok(all(settled), "%s: every receiver caught up afterwards" % label)
    if not all(settled):
        for r, s in zip(receivers, settled):
            if not s:
                diag("  %s has %s want %s" % (r.name, r.have(),
                                              {cv: want[cv] for cv in user_convs(r.user)}))
    ok(sessions >= 3 * len(receivers), "%s: receivers reconnected many times (%d sessions)"
       % (label, sessions))
    ok(all(drops[k] > 0 for k in ("rst", "abort", "close")),
       "%s: drops of every kind happened %s" % (label, drops))
    used = set().union(*[r.pids for r in receivers])
    is_(used, set(pids), "%s: receiver sessions ran on both workers" % label)
    verdict(receivers, per, label)
    return per


async def storm():
    receivers = [Receiver(u, k) for u in USERS for k in range(RECEIVERS_PER_USER)]
    for r in receivers:
        await r.start()
    initial_cursor = receivers[0].start_cursor

    # phase 1: 10,000 paced sends (~18 s), ring of 1024 slots
    pids1 = NG["cur"].worker_pids()
    await phase("storm", receivers, make_plan(TOTAL, "m"), 550, 12, 10, pids1)

    # phase 2: restart nginx, big batches, small catch-up pages; resume;
    # unpaced burst
    is_(NG["cur"].stop(), 0, "nginx stops cleanly after the storm")
    NG["cur"] = Nginx(pg, workers=2, http="chat_bus_slots 1024;\n"
                      "chat_db_batch_size 4096;\nchat_catchup_page 16;")
    pids2 = NG["cur"].worker_pids()
    per = await phase("burst after restart", receivers, make_plan(BURST, "b"), None, 400, 3,
                      pids2)
    return initial_cursor, per


async def after(initial_cursor, per):
    clock = pg.query("SELECT coalesce(max(gseq), 0) FROM chat_events")[0][0]

    # ---- a cursor from before the storm: everything is replayed (store) ----
    t0 = time.monotonic()
    c = await ws_connect(token=TOK["u1"], cursor=initial_cursor, timeout=20)
    is_((c.hello or {}).get("result", {}).get("cursor"), initial_cursor,
        "hello with the pre-storm cursor: the stream starts there")
    want = sum(len(per[cv]) for cv in user_convs("u1"))
    await until(lambda: len(c.events("message.new")) >= want, 60)
    await asyncio.sleep(0.3)
    evs = c.events("message.new")
    gs = [gseq(m["cursor"]) for m in evs]
    is_(len(evs), want, "the pre-storm cursor replays all %d messages of u1 (%.1fs)"
        % (want, time.monotonic() - t0))
    ok(all(b > a for a, b in zip(gs, gs[1:])), "... in cursor order, none twice")
    ok(all([e["event"]["seq"] for e in evs if e["event"]["conversation_id"] == cv]
           == list(range(1, len(per[cv]) + 1)) for cv in user_convs("u1")),
       "... every conversation 1..N")
    is_(gs[-1] if gs else None, max(g for g, in pg.query(
        "SELECT gseq FROM chat_events WHERE conversation_id = ANY(%s::bigint[])",
        [int(x) for x in user_convs("u1")])), "... up to u1's last event")
    await c.close()

    # ---- no cursor: starts live ----
    c = await ws_connect(token=TOK["u1"])
    hc = (c.hello or {}).get("result", {}).get("cursor")
    # positions are handed out in chunks: the stream's position is at or
    # past the newest event, and the next event comes after it
    ok(gseq(hc) is not None and gseq(hc) >= clock,
       "hello without a cursor: the stream starts now (cursor %s >= newest event %d)"
       % (gseq(hc), clock))
    ok(str(hc).startswith(EPOCH + "."), "... in this database's epoch")
    await asyncio.sleep(0.5)
    is_(c.events(), [], "... and nothing old is replayed")
    s = await ws_connect(token=TOK["u2"])
    r = await s.request("send", conversation_id=G, client_msg_id="after-1", body="live")
    e = await c.wait_event("message.new", 10)
    ok(e and e["event"]["message"]["client_msg_id"] == "after-1" and gseq(e["cursor"]) ==
       gseq(hc) + 1, "... then live events arrive (gseq cursor+1)")
    await c.close()

    # ---- unknown cursors: resync_required, then live ----
    for label, cur in (("garbage", "garbage"),
                       ("foreign epoch", ("0" * 8 if EPOCH != "0" * 8 else "1" * 8) + ".5"),
                       ("future gseq", "%s.%d" % (EPOCH, clock + 10 ** 12)),
                       ("non-numeric gseq", EPOCH + ".12x"),
                       ("empty gseq", EPOCH + "."),
                       ("long garbage (100 bytes)", "x" * 100)):
        c = await ws_connect(token=TOK["u1"], cursor=cur)
        if not ok(c.hello and c.hello.get("ok"), "%s cursor: hello ok" % label):
            diag("  hello reply: %r" % (c.hello,))
            await c.close()
            continue
        rs = await c.wait_event(lambda m: m.get("type") == "resync_required", 5)
        ok(rs is not None, "%s cursor: resync_required" % label)
        now = pg.query("SELECT coalesce(max(gseq), 0) FROM chat_events")[0][0]
        rsg = gseq((rs or {}).get("cursor"))
        ok(rsg is not None and rsg >= now, "%s cursor: resync_required.cursor is now (%s >= %d)"
           % (label, rsg, now))
        is_((rs or {}).get("cursor"), (c.hello or {}).get("result", {}).get("cursor"),
            "%s cursor: ... the hello's cursor" % label)
        ok(isinstance((rs or {}).get("reason"), str), "%s cursor: with a reason" % label)
        r = await s.request("send", conversation_id=G, client_msg_id="rs-" + label, body="x")
        e = await c.wait_event("message.new", 10)
        ok(e and e["event"]["message"]["client_msg_id"] == "rs-" + label
           and rsg is not None and gseq(e["cursor"]) == rsg + 1,
           "%s cursor: the stream continues live from there" % label)
        is_(len(c.events()), 2, "%s cursor: nothing else was sent (no replay)" % label)
        await c.close()

    # ---- sync on a live connection ----
    c = await ws_connect(token=TOK["u3"])
    for i in range(5):
        r = await s.request("send", conversation_id=G, client_msg_id="sync-%d" % i,
                            body="s%d" % i)
    await until(lambda: len(c.events("message.new")) >= 5, 10)
    evs = c.events("message.new")
    is_([e["event"]["message"]["client_msg_id"] for e in evs],
        ["sync-%d" % i for i in range(5)], "sync: 5 live events")
    back = evs[1]["cursor"]
    r = await c.request("sync", cursor=back)
    ok(r and r.get("ok"), "sync to the 2nd event's cursor: ok")
    is_((r or {}).get("result", {}).get("cursor"), back, "sync reply carries the cursor")
    await until(lambda: len(c.events("message.new")) >= 8, 10)
    r = await s.request("send", conversation_id=G, client_msg_id="sync-5", body="s5")
    await until(lambda: len(c.events("message.new")) >= 9, 10)
    await asyncio.sleep(0.3)
    names = [e["event"]["message"]["client_msg_id"] for e in c.events("message.new")]
    is_(names, ["sync-0", "sync-1", "sync-2", "sync-3", "sync-4", "sync-2", "sync-3",
                "sync-4", "sync-5"],
        "sync replays the events after the cursor once, then the stream goes on live")
    after_sync = [gseq(m["cursor"]) for m in c.events("message.new")][5:]
    ok(all(b > a for a, b in zip(after_sync, after_sync[1:])) and after_sync
       and after_sync[0] == gseq(back) + 1, "... strictly in cursor order from the sync cursor")
    r = await c.request("sync", cursor=c.events("message.new")[-1]["cursor"])
    ok(r and r.get("ok"), "sync to the current cursor: ok")
    await asyncio.sleep(0.3)
    is_(len(c.events("message.new")), 9, "... replays nothing")
    r = await c.request("sync", cursor="nonsense")
    ok(r and r.get("ok") is False, "sync with an unknown cursor: error reply")
    rs = await c.wait_event(lambda m: m.get("type") == "resync_required", 5)
    ok(rs is not None, "... and resync_required")
    r = await c.request("sync")
    is_((r or {}).get("error", {}).get("code"), "bad_request", "sync without a cursor: "
        "bad_request")
    r = await s.request("send", conversation_id=G, client_msg_id="sync-6", body="s6")
    await until(lambda: len(c.events("message.new")) >= 10, 10)
    is_(c.events("message.new")[-1]["event"]["message"]["client_msg_id"]
        if c.events("message.new") else None, "sync-6", "the connection stays live")
    await c.close()
    await s.close()


# ---- sync while the catch-up still reads the store ----------------------
# A dedicated nginx reads catch-up in pages of 16 events, its ring (1024
# slots) starts after the whole backlog (so all of it comes from the
# store), and a session can run at most ~200 KB ahead of what the client
# has read (chat_max_queue 256k: a 128 KB window; a listen socket with
# sndbuf=32k; the client's SO_RCVBUF 32k).  Each trial resumes u1 from the
# pre-storm cursor, reads SYNC_READ events, then holds the store's next page
# in PostgreSQL (LOCK TABLE chat_events, seen waiting in pg_stat_activity):
# the `sync` is sent while that page is in flight, the page comes back after
# the reply and is stale.  Nothing is left to timing.

SYNC_MIN_BACKLOG = 4000     # u1's events after the pre-storm cursor, at least
SYNC_READ = 300


def u1_backlog(after_gseq):
    """[(gseq, conversation_id, kind, message id or None)] of u1's
    conversations after `after_gseq`, in gseq order (what a catch-up from
    there must deliver)."""
    return [tuple(r) for r in pg.query(
        "SELECT e.gseq, e.conversation_id::text, e.kind, "
        "coalesce(e.message_id::text, e.payload::jsonb -> 'message' ->> 'id') FROM chat_events e "
        "WHERE e.conversation_id IN (SELECT conversation_id FROM chat_members "
        "WHERE user_id = 'u1') AND e.gseq > %s ORDER BY e.gseq", after_gseq)]


async def sync_backlog(initial_cursor):
    """Tops u1's backlog after the pre-storm cursor up to SYNC_MIN_BACKLOG
    events (only needed with a small STORM_MESSAGES); sent through the
    storm's nginx, before the dedicated one starts."""
    need = SYNC_MIN_BACKLOG - len(u1_backlog(gseq(initial_cursor)))
    if need <= 0:
        return
    stats = {"acks": {}, "retries": 0, "errors": [], "pids": set(), "reconnects": 0}
    items = [(G, "backlog%05d" % i, "backlog %d" % i) for i in range(need)]
    conn = await sender("u1", items, stats, None, 50)
    if conn["c"] is not None:
        await conn["c"].close()
    is_((len(stats["acks"]), stats["errors"][:3]), (need, []),
        "sync during catch-up: %d more messages stored for u1's backlog" % need)


def catchup_ws(port):
    """A RawWS to `port` whose socket has a 32 KB receive buffer (set before
    connect, so the TCP window stays small)."""
    ws = RawWS(port=port, handshake=False, timeout=10)
    ws.sock.close()
    sk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sk.settimeout(10)
    sk.connect(("127.0.0.1", port))
    ws.sock, ws.buf = sk, b""
    ws.handshake("/chat/ws", {"Sec-WebSocket-Protocol": "chat.v1"})
    return ws


def recv_or_none(ws, timeout):
    """The next JSON message; "timeout" after `timeout` s of silence; None
    at EOF or a close."""
    try:
        return ws.recv_json(timeout=timeout)
    except socket.timeout:
        return "timeout"


def n_durable(msgs):
    return sum(1 for m in msgs if m.get("type") == "event" and "cursor" in m)


def read_until(ws, into, pred, timeout, quiet=None):
    """Appends messages to `into` until pred() holds (then, with `quiet`,
    until `quiet` s pass without one), `timeout` s pass, or the connection
    ends.  pred is a callable, or a number: that many durable events in
    `into`.  Returns "ok", "timeout" or "eof"."""
    if not callable(pred):
        want, seen = pred, [n_durable(into)]

        def count(m):
            seen[0] += m.get("type") == "event" and "cursor" in m
    else:
        want, seen, count = None, None, lambda m: None
    deadline = time.monotonic() + timeout
    while not (pred() if want is None else seen[0] >= want):
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        m = recv_or_none(ws, min(left, 1.0))
        if m is None:
            return "eof"
        if m != "timeout":
            into.append(m)
            count(m)
    while quiet:
        m = recv_or_none(ws, quiet)
        if m == "timeout":
            break
        if m is None:
            return "eof"
        into.append(m)
    return "ok"


def as_rows(msgs):
    """(gseq, conversation_id, kind, message id) of the durable events among
    msgs; anything that is not an event is kept as ("not an event", type)."""
    out = []
    for m in msgs:
        if m.get("type") == "event" and "cursor" in m:
            e = m.get("event") or {}
            out.append((gseq(m["cursor"]), e.get("conversation_id"), e.get("kind"),
                        (e.get("message") or {}).get("id")))
        elif m.get("type") != "event":           # ephemeral events are fine
            out.append(("not an event", m.get("type")))
    return out


def pages_held_waiting():
    """Catch-up page queries (the chat_catchup statement) waiting on a lock."""
    return pg.query("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND wait_event_type = 'Lock' "
                    "AND position('CROSS JOIN LATERAL' in query) > 0")[0][0]


def sync_trial(port, label, initial_cursor, backlog, pick):
    """One trial; `pick(durable events received so far)` names the sync
    cursor.  Every path ends in assertions (failures, not skips)."""
    ws = catchup_ws(port)
    is_(ws.status, 101, "%s: WebSocket to the dedicated nginx" % label)
    ws.send_json({"type": "hello", "id": 1, "token": TOK["u1"], "cursor": initial_cursor})
    got, hello = [], {}
    read_until(ws, got, lambda: any(m.get("type") == "reply" and m.get("id") == 1
                                    for m in got), 10)
    for i, m in enumerate(got):
        if m.get("type") == "reply" and m.get("id") == 1:
            hello = got.pop(i)
            break
    is_((hello.get("ok"), (hello.get("result") or {}).get("cursor")), (True, initial_cursor),
        "%s: hello with the pre-storm cursor" % label)

    # catch-up from the store is under way
    read_until(ws, got, SYNC_READ, 30)
    ok(len(as_rows(got)) >= SYNC_READ, "%s: catch-up runs (%d events read of %d)"
       % (label, len(as_rows(got)), len(backlog)))

    # hold the next store page in PostgreSQL
    lk, locked = pg.conn(autocommit=False), False
    try:
        with lk.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '20s'")
            cur.execute("LOCK TABLE chat_events IN ACCESS EXCLUSIVE MODE")
        locked = True
    except Exception as e:  # noqa: BLE001
        diag("  LOCK TABLE chat_events: %r" % (e,))
    held, deadline = 0, time.monotonic() + 15
    while locked and time.monotonic() < deadline:
        # keep reading (a full window would stop the session short of its
        # next query) until the page query is seen waiting
        read_until(ws, got, lambda: True, 0, quiet=0.05)
        held = pages_held_waiting()
        if held:
            break
    read_until(ws, got, lambda: True, 0, quiet=0.5)   # all it sent before the page
    before = as_rows(got)
    ok(locked and held >= 1, "%s: a store page of the catch-up is in flight (held in "
       "PostgreSQL) when the sync goes out" % label)
    ok(SYNC_READ <= len(before) < len(backlog), "%s: ... %d of %d events delivered by then, "
       "the rest still to come" % (label, len(before), len(backlog)))
    is_(before == backlog[:len(before)], True, "%s: ... those are the backlog's first %d "
        "events, in order, once each" % (label, len(before)))

    back = pick([m for m in got if m.get("type") == "event" and "cursor" in m])
    ws.send_json({"type": "sync", "id": 2, "cursor": back})
    pre, reply = [], {}
    read_until(ws, pre, lambda: any(m.get("type") == "reply" and m.get("id") == 2
                                    for m in pre), 10)
    for i, m in enumerate(pre):
        if m.get("type") == "reply" and m.get("id") == 2:
            reply = pre.pop(i)
            post = pre[i:]                       # after the reply
            pre = pre[:i]
            break
    else:
        post = []
    is_((reply.get("ok"), (reply.get("result") or {}).get("cursor")), (True, back),
        "%s: the sync is answered while the page is held, with its cursor" % label)
    held_after = pages_held_waiting() if locked else 0
    try:
        lk.rollback()
        lk.close()
    except Exception:  # noqa: BLE001
        pass
    ok(held_after >= 1, "%s: ... and the page was still in flight then" % label)

    # after the reply: exactly the backlog after the sync cursor
    want = [r for r in backlog if r[0] > gseq(back)]
    st = read_until(ws, post, len(want), 60, quiet=0.7)
    ws.close()
    rows = as_rows(post)
    if not is_(rows == want, True, "%s: after the sync reply every event after the sync "
               "cursor (gseq %s) arrives exactly once, in order, as in the DB (%d events)"
               % (label, gseq(back), len(want))):
        gs = [r[0] for r in rows]
        diag("  read: %s; got %d (first %s, last %s), want %d (first %s, last %s); "
             "duplicates %d; missing %d; extra %d; out of order %d"
             % (st, len(rows), rows[:1], rows[-1:], len(want), want[:1], want[-1:],
                len(gs) - len(set(gs)), len(set(want) - set(rows)), len(set(rows) - set(want)),
                sum(1 for a, b in zip(gs, gs[1:]) if not (isinstance(a, int) and
                                                          isinstance(b, int) and b > a))))


def sync_during_catchup(initial_cursor):
    """`sync` while the session is still being caught up from the store (a
    page query in flight): after the sync reply the client gets exactly the
    events after the sync cursor, once each, in order -- duplicates of what
    it had are allowed only before the reply."""
    backlog = u1_backlog(gseq(initial_cursor))
    ok(len(backlog) >= SYNC_MIN_BACKLOG, "sync during catch-up: u1 has %d events after the "
       "pre-storm cursor (at least %d)" % (len(backlog), SYNC_MIN_BACKLOG))
    is_(NG["cur"].stop(), 0, "sync during catch-up: the storm's nginx stops cleanly")
    port = free_port()
    NG["cur"] = Nginx(pg, workers=2, http="chat_catchup_page 16;\nchat_bus_slots 1024;\n"
                      "chat_max_queue 256k;",
                      server="listen 127.0.0.1:%d sndbuf=32k;" % port)

    async def ready():
        # both workers joined to the store and their bus started (a slow
        # build, e.g. with ASan, may take a while after the listen)
        for pid in NG["cur"].worker_pids():
            c = await ws_connect_on("u1", pid, nginx=NG["cur"], timeout=30)
            await c.close()

    asyncio.run(ready())
    for label, pick in (
            ("sync to the 10th event", lambda evs: evs[9]["cursor"]),
            ("sync to the middle", lambda evs: evs[len(evs) // 2]["cursor"]),
            ("sync to the hello cursor", lambda evs: initial_cursor),
            ("sync to the last event (no rewind)", lambda evs: evs[-1]["cursor"])):
        sync_trial(port, "sync during catch-up, " + label, initial_cursor, backlog, pick)


async def main():
    initial_cursor, per = await storm()
    await after(initial_cursor, per)
    await sync_backlog(initial_cursor)
    return initial_cursor


t_start = time.monotonic()
initial = asyncio.run(main())
sync_during_catchup(initial)
note("total %.1fs" % (time.monotonic() - t_start))
done()
