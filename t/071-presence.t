#!/usr/bin/python3
# Presence (PROTOCOL 4: ephemeral `presence` events, GET /presence), two
# workers, chat_presence_grace 1s, chat_ping_interval 1s,
# chat_idle_timeout 3s, chat_presence_max_members 3:
#  1. a user's first connection going live gives her contacts (users sharing
#     a small conversation) one `online` event on every connection, on
#     either worker; a non-contact gets none; her second connection gives
#     none; she never gets events about herself.
#  2. `presence away` on every device -> one `away`; one device visible
#     again -> `online`; a request without id works and gets no reply; a
#     bad status is `bad_request`.
#  3. her last connection closing -> `offline` about the grace later, with
#     last_seen (RFC 3339, ms, UTC), and the row in chat_presence.
#  4. a reconnect (on the other worker) within the grace gives no event.
#  5. presence_sub: a user sharing no conversation gets events of the users
#     listed, the reply tells their current status (offline/null for the
#     unknown), replacing the list by [] stops them (per connection: a
#     second connection still subscribed gets them), over 256 users is
#     bad_request.
#  6. chat_presence_max_members: nothing fans out through a group of 4 with
#     the limit at 3; a group of exactly 3 does.
#  7. two users sharing three conversations: one event per connection.
#  8. a client that vanishes without FIN (a TCP proxy that stops forwarding
#     both ways) goes offline after chat_idle_timeout + the grace; while it
#     answered pings it stayed online past the idle timeout.
#  9. GET /chat/api/presence?users= : status of each in the order asked,
#     offline users' last_seen from chat_presence (null if never seen),
#     401 without a token, 400 over 100 users.
# 10. SIGKILL of the worker holding a user's only connection: her contact
#     on the other worker sees her offline within the grace + 3 s; a user
#     who also has a connection on the surviving worker does not go offline.
# 11. nginx restarted on the same database: GET /presence still gives the
#     offline users' last_seen.
#
# Conversations are created with chat_create_conversation() before nginx
# starts (fixtures); every scenario has its own users.
import asyncio
import datetime
import os
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

GRACE = 1.0          # chat_presence_grace
IDLE = 3.0           # chat_idle_timeout
TS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"

pg = PgCluster()


def conv(*members):
    return db_create_conv(members[0], list(members), "-".join(members))


conv("ann", "ben")                   # 1, 2
conv("nia", "nob")                   # nia: live, but no contact of ann's
conv("ola", "oscar")                 # 3
conv("rea", "rex")                   # 4
conv("hank", "hal")                  # 5: hank and ivy share nothing
conv("ivy", "ivo")
G4 = conv("jack", "kate", "liam", "mona")     # 6: 4 > chat_presence_max_members
G3 = conv("nick", "kate", "olga")             # 3 <= the limit
conv("pat", "quin")                           # 7: three shared conversations
conv("pat", "quin", "rosa")
conv("quin", "pat")
conv("sid", "sam")                   # 8
conv("kim", "kit")                   # 10
conv("kai", "kit")

ng = Nginx(pg, workers=2, http="chat_presence_grace 1s;\nchat_ping_interval 1s;\n"
                               "chat_idle_timeout 3s;\nchat_presence_max_members 3;")

ALL = []             # every client made, for the checks of the whole file


# ------------------------------------------------------------ helpers ----

async def join(user, pid=None, **fields):
    c = await ws_join_on(user, pid, **fields)
    ALL.append(c)
    return c


def pres(c, user=None, status=None, since=0, whole=False):
    """The presence events c received from message index `since` on (of
    `user`, with `status`, when given)."""
    out = []
    for m in c.messages[since:]:
        e = m.get("event") if m.get("type") == "event" else None
        if not isinstance(e, dict) or e.get("kind") != "presence":
            continue
        if (user is None or e.get("user") == user) and (status is None or e.get("status") == status):
            out.append(m if whole else e)
    return out


def mark(c):
    return len(c.messages)


def statuses(c, user, since=0):
    return [e.get("status") for e in pres(c, user, since=since)]


async def first_time(pred, timeout):
    """time.monotonic() when pred() first held (polled every 20 ms), or
    None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.02)


def code(r):
    return ((r or {}).get("error") or {}).get("code")


def empty_ok(r):
    return bool(r) and r.get("ok") is True and r.get("result") == {}


def parse_ts(s):
    try:
        return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return None


def db_last_seen(user):
    rows = pg.query("SELECT last_seen FROM chat_presence WHERE user_id = %s", user)
    return rows[0][0] if rows else None


def near(a, b, tol):
    return a is not None and b is not None and abs((a - b).total_seconds()) <= tol


async def aapi(*a, **kw):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: api(*a, **kw))


def other(pid, pids):
    return [p for p in pids if p != pid][0]


class FreezableProxy:
    """A TCP proxy 127.0.0.1:<port> -> nginx; freeze() stops forwarding in
    both directions and leaves every socket open (a client gone without
    FIN: a cut cable, a sleeping laptop)."""

    def __init__(self, target_port):
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.frozen = threading.Event()
        self.stopped = threading.Event()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            r, _, _ = select.select([self.lsock], [], [], 0.1)
            if not r:
                continue
            try:
                a, _ = self.lsock.accept()
                b = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                continue
            self.socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        peer = {a: b, b: a}
        while not self.stopped.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)
                continue
            try:
                r, _, _ = select.select([a, b], [], [], 0.05)
                for s in r:
                    if self.frozen.is_set():
                        break
                    data = s.recv(65536)
                    if not data:
                        a.close()
                        b.close()
                        return
                    peer[s].sendall(data)
            except OSError:
                return

    def freeze(self):
        self.frozen.set()

    def close(self):
        self.stopped.set()
        for s in self.socks + [self.lsock]:
            try:
                s.close()
            except OSError:
                pass


class _Port:
    """What ws_connect() needs of an Nginx: its port (here the proxy's)."""

    def __init__(self, port):
        self.port = port


# ----------------------------------------------------------- scenarios ----

async def silent_client(pids):
    """8. runs while the other scenarios do (it mostly waits)."""
    proxy = FreezableProxy(ng.port)
    try:
        sams = [await join("sam", p) for p in pids]
        sid = await ws_connect(nginx=_Port(proxy.port), token=token("sid"))
        ok(sid.hello and sid.hello.get("ok"), "silent: sid joins through the TCP proxy")
        ALL.append(sid)
        sam = sams[pids.index(other(session_pid(sid), pids))]
        ok(await until(lambda: "online" in statuses(sam, "sid"), 3),
           "silent: sam (on the other worker) sees sid online")
        m = mark(sam)
        await asyncio.sleep(IDLE + 1.0)
        ok(not sid.closed and statuses(sam, "sid", m) == [],
           "silent: a client answering the server's pings stays connected and online past "
           "chat_idle_timeout")
        proxy.freeze()
        t0 = time.monotonic()
        t = await first_time(lambda: "offline" in statuses(sam, "sid", m), IDLE + GRACE + 7)
        ok(t is not None, "silent: once the proxy stops forwarding, sam sees sid offline")
        if t is not None:
            el = t - t0
            ok(1.5 <= el <= IDLE + GRACE + 4, "silent: ... %.1f s after the freeze (idle %.0f s + "
               "grace %.0f s; not at once)" % (el, IDLE, GRACE))
        is_(statuses(sam, "sid", m), ["offline"], "silent: ... and nothing else about sid")
        ok(await until(lambda: db_last_seen("sid") is not None, 3), "silent: sid's last_seen is stored")
        sid.ws.transport.abort()
    finally:
        proxy.close()


async def main():
    pids = ng.worker_pids()
    is_(len(pids), 2, "nginx runs 2 workers")
    w1, w2 = pids
    silent = asyncio.ensure_future(silent_client(pids))

    # ---- 1. online
    ben = await join("ben", w2)
    nia1 = await join("nia", w1)
    nia2 = await join("nia", w2)
    await asyncio.sleep(0.3)
    mb, mn1, mn2 = mark(ben), mark(nia1), mark(nia2)
    t0 = time.monotonic()
    ann1 = await join("ann", w1)
    t = await first_time(lambda: pres(ben, "ann", "online", mb), 5)
    ok(t is not None, "ann joins on worker 1: ben (worker 2) gets ann online (%.2f s)"
       % ((t or t0) - t0))
    await asyncio.sleep(0.7)
    is_(statuses(ben, "ann", mb), ["online"], "... exactly one event")
    e = (pres(ben, "ann", since=mb, whole=True) or [{}])[0]
    ok("cursor" not in e and e.get("type") == "event", "the presence event has no cursor")
    ev = e.get("event") or {}
    ok(ev.get("kind") == "presence" and ev.get("user") == "ann" and ev.get("status") == "online",
       "event is {kind: presence, user: ann, status: online, ...} (%r)" % (ev,))
    like(ev.get("last_seen"), TS, "... with last_seen in RFC 3339 with milliseconds, UTC")
    is_(pres(nia1, "ann") + pres(nia2, "ann"), [], "nia (shares no conversation) gets nothing about ann")
    ann2 = await join("ann", w2)
    await asyncio.sleep(0.7)
    is_(statuses(ben, "ann", mb), ["online"], "ann's second connection changes nothing for ben")

    # ---- 2. away
    mb = mark(ben)
    r = await ann1.request("presence", status="away")
    ok(empty_ok(r), "presence away -> ok {} (%r)" % (r,))
    await asyncio.sleep(0.7)
    is_(statuses(ben, "ann", mb), [], "one device away, the other visible: still online, no event")
    r = await ann2.request("presence", status="away")
    ok(empty_ok(r), "the other device away too -> ok {}")
    ok(await until(lambda: pres(ben, "ann", since=mb), 3), "ben gets an event")
    await asyncio.sleep(0.5)
    is_(statuses(ben, "ann", mb), ["away"], "... exactly one: away")
    mb = mark(ben)
    r = await ann1.request("presence", status="online")
    ok(empty_ok(r), "one device visible again -> ok {}")
    ok(await until(lambda: pres(ben, "ann", since=mb), 3), "ben gets an event")
    await asyncio.sleep(0.5)
    is_(statuses(ben, "ann", mb), ["online"], "... exactly one: online")
    mb = mark(ben)
    rm = len(ann1.received)
    await ann1.send({"type": "presence", "status": "away"})
    ok(await until(lambda: pres(ben, "ann", since=mb), 3),
       "presence away without an id works (both devices away)")
    await asyncio.sleep(0.3)
    is_(statuses(ben, "ann", mb), ["away"], "... ben gets away")
    is_([m for m in ann1.received[rm:] if m.get("type") == "reply"], [], "... and no reply is sent")
    r = await ann1.request("presence", status="busy")
    is_(code(r), "bad_request", "presence status \"busy\" -> bad_request")
    mb = mark(ben)
    ann3 = await join("ann", w1)
    ok(await until(lambda: pres(ben, "ann", since=mb), 3), "a new (visible) connection of ann ...")
    await asyncio.sleep(0.3)
    is_(statuses(ben, "ann", mb), ["online"], "... makes her online again")
    is_(pres(ann1) + pres(ann2) + pres(ann3), [], "ann's connections got no presence event of hers")

    # ---- 3. offline after the grace
    oscar = await join("oscar", w2)
    ola = await join("ola", w1)
    ok(await until(lambda: "online" in statuses(oscar, "ola"), 3), "oscar sees ola online")
    mo = mark(oscar)
    wall0 = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    await ola.close()
    t = await first_time(lambda: pres(oscar, "ola", since=mo), GRACE + 4)
    wall1 = datetime.datetime.now(datetime.timezone.utc)
    is_(statuses(oscar, "ola", mo), ["offline"], "ola's last connection closes: oscar gets offline")
    if t is not None:
        ok(0.7 * GRACE <= t - t0 <= GRACE + 2.5,
           "... %.2f s later (grace %.0f s)" % (t - t0, GRACE))
    else:
        ok(False, "... in time")
    e = (pres(oscar, "ola", "offline", mo) or [{}])[0]
    ls = parse_ts(e.get("last_seen"))
    like(e.get("last_seen"), TS, "... with last_seen in RFC 3339 with milliseconds, UTC")
    ok(ls is not None and wall0 - datetime.timedelta(seconds=1) <= ls <= wall1 + datetime.timedelta(seconds=1),
       "... around the time she left (%s)" % (e.get("last_seen"),))
    ok(await until(lambda: db_last_seen("ola") is not None, 3), "chat_presence has a row for ola")
    ola_seen = db_last_seen("ola")
    ok(near(ola_seen, ls, 1.0), "... its last_seen is the event's (%s, %s)" % (ola_seen, e.get("last_seen")))

    # ---- 4. reconnect within the grace
    rex = await join("rex", w1)
    rea = await join("rea", w1)
    ok(await until(lambda: "online" in statuses(rex, "rea"), 3), "rex sees rea online")
    mr = mark(rex)
    await rea.close()
    await asyncio.sleep(0.3)
    rea2 = await join("rea", w2)
    await asyncio.sleep(GRACE + 1.5)
    is_(statuses(rex, "rea", mr), [], "rea reconnects (on the other worker) within the grace: "
        "rex got no offline and no online")
    mr = mark(rex)
    await rea2.close()
    ok(await until(lambda: "offline" in statuses(rex, "rea", mr), GRACE + 3),
       "... and once she stays away, offline")

    # ---- 5. presence_sub
    hank = await join("hank", w1)
    hank2 = await join("hank", w2)
    r = await hank.request("presence_sub", users=["ivy", "nobody-xyz"])
    res = (r or {}).get("result") or {}
    got = {p.get("user"): (p.get("status"), p.get("last_seen")) for p in res.get("presence") or []}
    is_(got, {"ivy": ("offline", None), "nobody-xyz": ("offline", None)},
        "presence_sub [ivy, nobody-xyz] -> both offline, last_seen null")
    r = await hank2.request("presence_sub", users=["ivy"])
    ok(r and r.get("ok"), "hank's second connection subscribes to ivy too")
    mh, mh2 = mark(hank), mark(hank2)
    ivy = await join("ivy", w2)
    ok(await until(lambda: "online" in statuses(hank, "ivy", mh) and "online" in statuses(hank2, "ivy", mh2), 3),
       "ivy (no shared conversation) joins: both subscribed connections get online")
    r = await hank.request("presence_sub", users=["ivy"])
    res = (r or {}).get("result") or {}
    st = [(p.get("user"), p.get("status")) for p in res.get("presence") or []]
    is_(st, [("ivy", "online")], "presence_sub [ivy] now tells online")
    r = await hank.request("presence_sub", users=[])
    is_((r or {}).get("result"), {"presence": []}, "presence_sub [] -> {presence: []}")
    mh, mh2 = mark(hank), mark(hank2)
    await ivy.close()
    ok(await until(lambda: "offline" in statuses(hank2, "ivy", mh2), GRACE + 3),
       "ivy leaves: the connection still subscribed gets offline")
    await asyncio.sleep(0.7)
    is_(statuses(hank, "ivy", mh), [], "the connection that replaced its list with [] gets nothing")
    is_(statuses(hank2, "ivy", mh2), ["offline"], "... the other exactly one event")
    r = await hank.request("presence_sub", users=["u%d" % i for i in range(256)])
    ok(r and r.get("ok") and len(r["result"].get("presence") or []) == 256,
       "presence_sub with 256 users -> ok, 256 entries")
    r = await hank.request("presence_sub", users=["u%d" % i for i in range(257)])
    is_(code(r), "bad_request", "presence_sub with 257 users -> bad_request")

    # ---- 6. chat_presence_max_members
    kate = await join("kate", w2)
    mk_ = mark(kate)
    jack = await join("jack", w1)
    nick = await join("nick", w1)
    ok(await until(lambda: "online" in statuses(kate, "nick", mk_), 3),
       "kate gets nick online through their group of 3 (the limit)")
    await asyncio.sleep(0.7)
    is_(statuses(kate, "jack", mk_), [], "kate gets nothing of jack: their only shared group has 4 members")

    # ---- 7. several shared conversations
    quin1 = await join("quin", w1)
    quin2 = await join("quin", w2)
    m1, m2 = mark(quin1), mark(quin2)
    pat = await join("pat", w1)
    ok(await until(lambda: pres(quin1, "pat", since=m1) and pres(quin2, "pat", since=m2), 3),
       "quin's connections on both workers get pat online")
    await asyncio.sleep(0.7)
    is_([statuses(quin1, "pat", m1), statuses(quin2, "pat", m2)], [["online"], ["online"]],
        "... once each although they share three conversations")
    m1, m2 = mark(quin1), mark(quin2)
    await pat.close()
    ok(await until(lambda: pres(quin1, "pat", since=m1) and pres(quin2, "pat", since=m2), GRACE + 3),
       "pat leaves: both get an event")
    await asyncio.sleep(0.7)
    is_([statuses(quin1, "pat", m1), statuses(quin2, "pat", m2)], [["offline"], ["offline"]],
        "... offline, once each")

    # ---- 9. GET /chat/api/presence
    awa = await join("awa", w2)
    r = await awa.request("presence", status="away")
    await asyncio.sleep(0.3)
    st, _, b = await aapi("GET", "/chat/api/presence?users=ann,awa,ola,ghost", token=token("zed"))
    is_(st, 200, "GET /presence by any user -> 200")
    lst = (b or {}).get("presence") if isinstance(b, dict) else None
    is_([(p.get("user"), p.get("status")) for p in lst or []],
        [("ann", "online"), ("awa", "away"), ("ola", "offline"), ("ghost", "offline")],
        "... online, away, offline, offline in the order asked")
    byu = {p.get("user"): p for p in lst or []}
    ok(near(parse_ts((byu.get("ola") or {}).get("last_seen")), ola_seen, 0.002),
       "... ola's last_seen is chat_presence's (%r, %s)" % ((byu.get("ola") or {}).get("last_seen"), ola_seen))
    ok("ghost" in byu and byu["ghost"].get("last_seen") is None, "... a never seen user has last_seen null")
    st, _, b = await aapi("GET", "/chat/api/presence?users=ann")
    is_(st, 401, "GET /presence without a token -> 401")
    st, _, b = await aapi("GET", "/chat/api/presence?users=" + ",".join("u%d" % i for i in range(100)),
                          token=token("zed"))
    ok(st == 200 and len((b or {}).get("presence") or []) == 100, "100 users -> 200 with 100 entries")
    st, _, b = await aapi("GET", "/chat/api/presence?users=" + ",".join("u%d" % i for i in range(101)),
                          token=token("zed"))
    is_(st, 400, "101 users -> 400")

    await silent     # 8. ends before the kill

    # ---- 10. SIGKILL of a worker
    pids = ng.worker_pids()
    victim, survivor = pids[0], pids[1]
    kit = await join("kit", survivor)
    kim = await join("kim", victim)
    kai1 = await join("kai", victim)
    kai2 = await join("kai", survivor)
    ok(await until(lambda: "online" in statuses(kit, "kim") and "online" in statuses(kit, "kai"), 3),
       "kit (on the surviving worker) sees kim and kai online")
    m = mark(kit)
    ng.allow.append(r'shared memory zone "[^"]*" was locked by %d\b' % victim)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    note("SIGKILL worker %d" % victim)
    kill = loop.run_in_executor(None, lambda: ng.kill_worker(victim))
    t = await first_time(lambda: "offline" in statuses(kit, "kim", m), GRACE + 8)
    new = await kill
    ok(new and victim not in new, "the master respawned the killed worker")
    ok(t is not None and t - t0 <= GRACE + 3,
       "kim's only connection was on the killed worker: kit sees her offline (%s s after the kill)"
       % ("%.1f" % (t - t0) if t else "never"))
    await asyncio.sleep(max(0.0, t0 + GRACE + 3 - time.monotonic()))
    is_(statuses(kit, "kai", m), [], "kai also has a connection on the surviving worker: no event about him")
    ok(not kit.closed and not kai2.closed, "the surviving worker's connections stay open")
    ok(await until(lambda: db_last_seen("kim") is not None, 3), "kim's last_seen is stored")
    kim_seen = db_last_seen("kim")

    # ---- whole file
    bad = []
    for c in ALL:
        me = (c.hello or {}).get("result", {}).get("user", {}).get("id")
        for mm in pres(c, whole=True):
            ev = mm.get("event") or {}
            if "cursor" in mm or ev.get("status") not in ("online", "away", "offline") \
                    or not isinstance(ev.get("user"), str) or parse_ts(ev.get("last_seen")) is None:
                bad.append(mm)
            if ev.get("user") == me:
                bad.append(("about itself", me, mm))
    is_(bad[:3], [], "every presence event: no cursor, user, status, last_seen RFC 3339; none about "
        "the connection's own user")

    # ---- 11. restart nginx, same database
    for c in ALL:
        if not c.closed:
            await c.close()
    await loop.run_in_executor(None, ng.stop)
    await loop.run_in_executor(None, ng.start)
    st, _, b = await aapi("GET", "/chat/api/presence?users=ola,kim,ghost", token=token("zed"))
    lst = (b or {}).get("presence") if isinstance(b, dict) else None
    is_([(p.get("user"), p.get("status")) for p in lst or []],
        [("ola", "offline"), ("kim", "offline"), ("ghost", "offline")],
        "after an nginx restart: ola, kim, ghost offline")
    byu = {p.get("user"): p for p in lst or []}
    ok(near(parse_ts((byu.get("ola") or {}).get("last_seen")), ola_seen, 0.002)
       and near(parse_ts((byu.get("kim") or {}).get("last_seen")), kim_seen, 0.002),
       "... with the last_seen stored before the restart (%r)" % (lst,))
    ok("ghost" in byu and byu["ghost"].get("last_seen") is None, "... ghost still null")


asyncio.run(main())
done()
