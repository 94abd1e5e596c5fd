#!/usr/bin/python3
# Devices and the per-user connection cap across workers (PROTOCOL 4:
# hello.device_id, ?device_id= on the upgrade), two workers,
# chat_presence_grace 1s, chat_max_connections_per_user 3:
#  1. a connection whose (user, device_id) equals a live connection's
#     replaces it, on the other worker and on the same one: the old one is
#     closed with 4009 "replaced", the new one sends and receives, and the
#     user's contact sees no presence change (no offline, no second online)
#     even after the grace.
#  2. different device ids of one user coexist (with a connection without
#     one), the same device id of another user replaces nothing, and the
#     replaced connections no longer count: the user holds 3 live ones.
#  3. ?device_id= on the upgrade (Authorization: Bearer or ?ticket=) is the
#     same device as hello's: each new tab1 connection replaces the previous
#     one, whichever way it came and on whichever worker; at least one
#     replacement crosses workers each way.
#  4. chat_max_connections_per_user 3 counts connections on both workers:
#     a 4th hello, on either worker, is answered `rate_limited` and closed
#     with 4008; another user is not affected; once one closes a new one
#     (on the other worker) is accepted, and the cap holds again after it.
#  5. a bad device_id (65 chars, characters outside [A-Za-z0-9._-], empty,
#     not a string) in hello is `bad_request`; 64 chars and every allowed
#     character are accepted.
#
# Conversations are created with chat_create_conversation() before nginx
# starts (fixtures).  Connections are placed on a worker before their hello
# (ws_join_on), so no hello ever happens on the wrong worker.
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

GRACE = 1.0          # chat_presence_grace
CAP = 3              # chat_max_connections_per_user

pg = PgCluster()

D_UZ = db_create_conv("uma", ["uma", "zoe"], "uma-zoe")
D_TZ = db_create_conv("tess", ["tess", "zoe"], "tess-zoe")
D_VZ = db_create_conv("vic", ["vic", "zoe"], "vic-zoe")

ng = Nginx(pg, workers=2, http="chat_presence_grace 1s;\nchat_max_connections_per_user 3;")


# ------------------------------------------------------------ helpers ----

def pres(c, user, since=0):
    return [m["event"].get("status") for m in c.messages[since:]
            if m.get("type") == "event" and isinstance(m.get("event"), dict)
            and m["event"].get("kind") == "presence" and m["event"].get("user") == user]


def code(r):
    return ((r or {}).get("error") or {}).get("code")


def other(pid, pids):
    return [p for p in pids if p != pid][0]


async def aapi(*a, **kw):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: api(*a, **kw))


_n = {"cmid": 0}


async def delivered(sender, receivers, conv):
    """sender sends into conv; True when the reply is ok and every receiver
    got the message.new within 5 s."""
    _n["cmid"] += 1
    cmid = "dev-%d" % _n["cmid"]
    r = await sender.request("send", conversation_id=conv, client_msg_id=cmid, body=cmid)
    if not (r and r.get("ok")):
        return False
    return await until(lambda: all(conv_events(c, conv, cmid=cmid) for c in receivers), 5)


async def closed_with(c, timeout=5):
    res = await c.wait_closed(timeout)
    return tuple(res) if res else None


async def url_device(user, device, via):
    """A connection authenticated on the upgrade (via "bearer" or "ticket")
    with ?device_id=device; returns (client, worker pid from its welcome)."""
    path = "/chat/ws?device_id=" + device
    if via == "bearer":
        c = await ws_connect(token=token(user), bearer=True, path=path)
    else:
        st, _, b = await aapi("POST", "/chat/api/tickets", token=token(user))
        if st not in (200, 201):
            raise RuntimeError("ticket: %s %r" % (st, b))
        c = await ws_connect(ticket=b["ticket"], path=path)
    w = await c.wait_event(lambda m: m.get("type") == "welcome", 5)
    try:
        pid = int(w["session_id"].split("-")[0])
    except (TypeError, KeyError, ValueError):
        pid = None
    return c, pid


async def main():
    pids = ng.worker_pids()
    is_(len(pids), 2, "nginx runs 2 workers")
    w1, w2 = pids

    # ---- 1. replacement across workers and on one worker
    zoe = await ws_join_on("zoe", w2)
    old = await ws_join_on("uma", w1, device_id="phone")
    ok(await until(lambda: "online" in pres(zoe, "uma"), 3), "zoe sees uma (device phone, worker 1) online")
    mz = len(zoe.messages)
    t_rep = time.monotonic()
    new = await ws_join_on("uma", w2, check=False, device_id="phone")
    ok(new.hello and new.hello.get("ok"), "uma's phone again, on worker 2: hello ok")
    is_(await closed_with(old), (4009, "replaced"),
        "the old phone connection (worker 1) is closed with 4009 \"replaced\"")
    ok(await delivered(new, [zoe], D_UZ), "the new one sends (zoe receives)")
    ok(await delivered(zoe, [new], D_UZ), "... and receives")
    new2 = await ws_join_on("uma", w2, check=False, device_id="phone")
    ok(new2.hello and new2.hello.get("ok"), "uma's phone a third time, on the same worker 2: hello ok")
    is_(await closed_with(new), (4009, "replaced"), "the previous one (same worker) is closed with 4009 \"replaced\"")
    ok(await delivered(zoe, [new2], D_UZ), "the newest one receives")
    await asyncio.sleep(max(0.0, t_rep + GRACE + 1.5 - time.monotonic()))
    is_(pres(zoe, "uma", mz), [], "zoe saw no presence change of uma through both replacements "
        "(waited past the grace)")

    # ---- 2. several devices
    lap = await ws_join_on("uma", w1, check=False, device_id="laptop")
    ok(lap.hello and lap.hello.get("ok"), "uma's laptop (worker 1) joins")
    vic = await ws_join_on("vic", w1, check=False, device_id="phone")
    ok(vic.hello and vic.hello.get("ok"), "vic with device id phone joins")
    plain = await ws_join_on("uma", w2, check=False)
    ok(plain.hello and plain.hello.get("ok"),
       "uma's third live connection (no device id) is accepted: replaced ones are not counted")
    await asyncio.sleep(0.7)
    is_([c.closed for c in (new2, lap, plain, vic)], [False] * 4,
        "uma's phone, laptop and device-less connection and vic's phone all stay open")
    ok(await delivered(zoe, [new2, lap, plain], D_UZ), "all three of uma's connections receive")
    ok(await delivered(zoe, [vic], D_VZ), "vic's phone receives")
    extra = await ws_join_on("uma", w1, check=False, device_id="tablet")
    is_(code(extra.hello), "rate_limited", "uma's 4th live connection (new device) -> rate_limited")
    is_((await closed_with(extra) or (None,))[0], 4008, "... closed with 4008")
    is_([c.closed for c in (new2, lap, plain)], [False] * 3, "... uma's other three untouched")
    for c in (lap, plain, vic):
        await c.close()

    # ---- 3. ?device_id= on the upgrade
    prev = await ws_join_on("tess", w1, device_id="tab1")
    prev_pid = w1
    ok(await until(lambda: "online" in pres(zoe, "tess"), 3), "zoe sees tess online")
    mz = len(zoe.messages)
    t_rep = time.monotonic()
    bad, url_kinds, cross_kinds, url_same, hello_cross = [], set(), set(), 0, 0
    for i in range(16):
        via = ("bearer", "ticket")[i % 2]
        if i % 4 < 2:
            # nginx tends to hand a new connection to the worker that took
            # the last one: steer the upgrade towards the other worker
            # (a connection closed before any hello has no effect)
            steer = await ws_open_on(other(prev_pid, pids))
            await steer.close()
        c, pid = await url_device("tess", "tab1", via)
        res = await closed_with(prev)
        if pid is None or res != (4009, "replaced"):
            bad.append("round %d: %s upgrade on %s: previous (worker %s) got %r" % (i, via, pid, prev_pid, res))
        url_kinds.add(via)
        if pid == prev_pid:
            url_same += 1
        else:
            cross_kinds.add(via)
        # a hello with the same device on the worker the upgrade did not land on
        h = await ws_join_on("tess", other(pid, pids), check=False, device_id="tab1")
        res = await closed_with(c)
        if not (h.hello and h.hello.get("ok")) or res != (4009, "replaced"):
            bad.append("round %d: hello on the other worker: %r; the %s connection got %r"
                       % (i, h.hello, via, res))
        else:
            hello_cross += 1
        prev, prev_pid = h, other(pid, pids)
        if i >= 3 and len(cross_kinds) == 2 and url_same:
            break
    n_up = i + 1
    is_(bad, [], "?device_id= (Bearer and ticket) and hello device_id name the same device: each new "
        "connection replaced the previous one with 4009 (%d upgrades, %d of them on the worker of "
        "the one replaced; %d hellos across workers)" % (n_up, url_same, hello_cross))
    is_(sorted(url_kinds), ["bearer", "ticket"], "... both upgrade kinds were used")
    is_(sorted(cross_kinds), ["bearer", "ticket"],
        "... both replaced a connection on the other worker")
    ok(hello_cross >= 1, "... and a hello replaced an upgrade's connection on the other worker")
    c, pid = await url_device("tess", "tab1", "bearer")
    is_(await closed_with(prev), (4009, "replaced"), "a last upgrade replaces the last hello connection")
    ok(await delivered(zoe, [c], D_TZ) and await delivered(c, [zoe], D_TZ),
       "the last tab1 connection (welcome on worker %s) sends and receives" % pid)
    await asyncio.sleep(max(0.0, t_rep + GRACE + 1.5 - time.monotonic()))
    is_(pres(zoe, "tess", mz), [], "zoe saw no presence change of tess through all of it")
    await c.close()

    # ---- 4. the per-user cap across workers
    caps = [await ws_join_on("capu", p) for p in (w1, w1, w2)]
    ok(all(c.hello.get("ok") for c in caps), "capu: 3 connections (2 on worker 1, 1 on worker 2)")
    for p in (w1, w2):
        c = await ws_join_on("capu", p, check=False)
        is_(code(c.hello), "rate_limited", "a 4th on worker %d: hello -> rate_limited" % p)
        is_((await closed_with(c) or (None,))[0], 4008, "... and close 4008")
    other_user = await ws_join_on("capv", w1, check=False)
    ok(other_user.hello and other_user.hello.get("ok"), "another user connects meanwhile")
    await other_user.close()
    is_([c.closed for c in caps], [False] * 3, "the three first ones stay open")
    await caps[0].close()           # one on worker 1
    got, tries = None, 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        tries += 1
        c = await ws_join_on("capu", w2, check=False)
        if c.hello and c.hello.get("ok"):
            got = c
            break
        await c.close()
        await asyncio.sleep(0.1)
    ok(got is not None, "after one closes on worker 1, a new one on worker 2 is accepted (try %d)" % tries)
    c = await ws_join_on("capu", w1, check=False)
    is_(code(c.hello), "rate_limited", "... and the cap holds again: one more -> rate_limited")
    is_((await closed_with(c) or (None,))[0], 4008, "... close 4008")
    for c in caps[1:] + [got]:
        if c:
            await c.close()

    # ---- 5. device_id syntax
    bad_ids = [("x" * 65, "65 characters"), ("has space", "a space"), ("a/b", "a slash"),
               ("", "empty"), ("t\u00e4b", "a non-ASCII letter"), ("semi;colon", "a semicolon"),
               (12345, "a number")]
    for dev, label in bad_ids:
        c = await ws_connect(hello=False)
        r = await c.request("hello", token=token("dora"), device_id=dev)
        is_(code(r), "bad_request", "hello with a device_id of %s -> bad_request" % label)
        await c.close()
    for dev, label in (("x" * 64, "64 characters"), ("Az09._-", "every allowed kind of character")):
        c = await ws_connect(hello=False)
        r = await c.request("hello", token=token("dora"), device_id=dev)
        ok(r and r.get("ok"), "hello with a device_id of %s -> ok" % label)
        await c.close()

    for c in (zoe, new2):
        await c.close()


asyncio.run(main())
done()
