#!/usr/bin/python3
# chat_db conninfo at configuration time.  A host name would make libpq
# resolve it (blocking DNS) on every reconnect inside a worker: nginx -t,
# start and reload resolve it once and hand libpq the addresses as
# hostaddr (NOTICE "chat_db host ... resolved to ..."), keeping host.
#  1. host=localhost: nginx -t passes and says what localhost resolved to;
#     the workers connect, REST and WebSocket work; a reload resolves again.
#     The same as a URI, with per-host ports, and with a name beside a
#     socket directory; quoting in the rewritten conninfo survives
#     (an application_name with quotes reaches PostgreSQL as written).
#  2. While PostgreSQL restarts, the workers reconnect without DNS or
#     password-database lookups (strace: no /etc/hosts, resolv.conf,
#     nsswitch.conf or /etc/passwd, no port 53).
#  3. A numeric host, a socket directory, and host with hostaddr are left
#     as they are (no NOTICE) and work.
#  4. Refused by nginx -t with a clear message: a name that does not
#     resolve, more ports than hosts, a conninfo libpq cannot parse.
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import chattest  # noqa: E402
from chattest import *  # noqa: E402,F403

pg = PgCluster()
P = pg.port
RESOLVED_RE = r'chat_db host "localhost" resolved to 127\.0\.0\.1'


def chat_http(conninfo):
    return 'chat_db "%s";\nchat_jwt_alg HS256;\nchat_jwt_key %s;' % (conninfo, hs_secret_file())


def conf(conninfo, **kw):
    return Nginx(pg, workers=2, chat_http=chat_http(conninfo), start=False, **kw)


def works(ng, label):
    """REST on both workers (several requests) and a WebSocket hello."""
    tok = token("alice")
    res = [api("GET", "/chat/api/conversations", token=tok, nginx=ng)[0] for _ in range(8)]
    is_(res, [200] * 8, "%s: REST works (x8)" % label)
    st, _, b = api("POST", "/chat/api/conversations", token=tok, nginx=ng,
                   json={"kind": "direct", "members": ["bob"]})
    ok(st in (200, 201), "%s: a conversation can be created (%s)" % (label, st))

    async def ws():
        c = await ws_connect(ng, token=tok)
        h = c.hello
        await c.close()
        return h
    h = asyncio.run(ws())
    ok(h and h.get("ok"), "%s: WebSocket hello works" % label)


def test_conf(ng):
    """nginx -t, as Nginx.test_conf() does, but without LeakSanitizer: an
    ASan build of nginx -t exits non-zero for the cycle it never frees."""
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    r = subprocess.run([chattest.NGINX_BIN, "-p", ng.dir + "/", "-c", ng.conf_path, "-t"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60, env=env)
    return r.returncode == 0, r.stdout


def test_ok(ng, label, notice):
    good, out = test_conf(ng)
    ok(good, "%s: nginx -t passes" % label)
    if not good:
        diag(out)
    if notice:
        like(out, notice, "%s: nginx -t says what the name resolved to" % label)
    else:
        ok(not re.search(r"resolved to", out), "%s: nothing is resolved" % label)
    return out


def test_refused(conninfo, regex, label):
    ng = conf(conninfo)
    good, out = test_conf(ng)
    ok(not good, "%s: nginx -t fails" % label)
    like(out, r"\[emerg\].*" + regex, "%s: with a clear message" % label)
    return ng


# ---------------------------------------------------------------- 1 --

ci = "host=localhost port=%d dbname=chat user=postgres" % P
ng = conf(ci)
test_ok(ng, "host=localhost", RESOLVED_RE + r".*without DNS")
ng.start()
# at start the configuration is read before error.log is open: stderr
ok(re.search(RESOLVED_RE, open(os.path.join(ng.dir, "nginx.stderr"), errors="replace").read()),
   "host=localhost: nginx says it at start too")
works(ng, "host=localhost")

mark = len(ng.error_log())
ng.reload()
ok(ng.wait_log(RESOLVED_RE, timeout=5, start=mark), "host=localhost: a reload resolves again")
works(ng, "host=localhost, after reload")

# ---------------------------------------------------------------- 2 --

strace = shutil.which("strace")
if not strace:
    skip("strace is not installed", 2)
else:
    trace = os.path.join(ng.dir, "strace.out")
    pids = ng.worker_pids()
    args = [strace, "-f", "-qq", "-o", trace, "-e", "trace=openat,open,stat,newfstatat,connect"]
    for p in pids:
        args += ["-p", str(p)]
    st = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    pg.restart()
    tok = token("alice")
    back = wait_for(lambda: all(api("GET", "/chat/api/conversations", token=tok,
                                    nginx=ng)[0] == 200 for _ in range(8)), timeout=20)
    ok(back, "restart: both workers reconnected")
    st.send_signal(signal.SIGINT)
    try:
        st.wait(10)
    except subprocess.TimeoutExpired:
        st.kill()
        st.wait(5)
    text = open(trace, errors="replace").read() if os.path.exists(trace) else ""
    bad = [l for l in text.splitlines()
           if re.search(r'"/etc/(hosts|resolv\.conf|nsswitch\.conf|passwd|host\.conf)"'
                        r'|htons\(53\)', l)]
    ok(re.search(r"connect\(.*htons\(%d\).*127\.0\.0\.1" % P, text) and not bad,
       "restart: the workers reconnect to 127.0.0.1:%d without DNS or passwd lookups" % P)
    if bad or not text:
        diag("strace lines: %r" % (bad[:10] or text[-2000:],))
is_(ng.stop(), 0, "host=localhost: nginx quits cleanly")

# a URI, per-host ports, a name beside a socket directory, quoting
for label, ci in (
        ("URI", "postgresql://postgres@localhost:%d/chat" % P),
        ("name and socket directory, a port each",
         "host=localhost,%s port=%d,%d dbname=chat user=postgres" % (pg.sockdir, P, P)),
        ("socket directory first, then a name",
         "host=%s,localhost port=%d dbname=chat user=postgres" % (pg.sockdir, P))):
    ng = conf(ci)
    test_ok(ng, label, RESOLVED_RE)
    ng.start()
    works(ng, label)
    is_(ng.stop(), 0, "%s: nginx quits cleanly" % label)

# nginx.conf turns \\ into \, libpq's conninfo \' into '
ci = "host=localhost port=%d dbname=chat user=postgres application_name='chat \\\\'q\\\\' x'" % P
ng = conf(ci)
test_ok(ng, "quoted application_name", RESOLVED_RE)
ng.start()
works(ng, "quoted application_name")
names = [r[0] for r in pg.query("SELECT DISTINCT application_name FROM pg_stat_activity "
                                "WHERE application_name LIKE 'chat%%'")]
is_(names, ["chat 'q' x"], "quoted application_name: PostgreSQL sees it as written")
is_(ng.stop(), 0, "quoted application_name: nginx quits cleanly")

# ---------------------------------------------------------------- 3 --

for label, ci in (("numeric host", "host=127.0.0.1 port=%d dbname=chat user=postgres" % P),
                  ("socket directory", pg.conninfo),
                  ("a name with hostaddr", "host=db.invalid hostaddr=127.0.0.1 port=%d "
                   "dbname=chat user=postgres" % P)):
    ng = conf(ci)
    test_ok(ng, label, None)
    ng.start()
    works(ng, label)
    ok(not re.search(r"resolved to", ng.error_log()), "%s: no NOTICE at start" % label)
    is_(ng.stop(), 0, "%s: nginx quits cleanly" % label)

# ---------------------------------------------------------------- 4 --

test_refused("host=no-such-host.invalid port=%d dbname=chat" % P,
             r'chat_db host "no-such-host\.invalid" could not be resolved.*hostaddr=',
             "a name that does not resolve")
test_refused("host=localhost,127.0.0.1 port=1,2,3 dbname=chat",
             r"chat_db has 3 ports for 2 hosts", "3 ports for 2 hosts")
test_refused("host='localhost dbname=chat", r"invalid chat_db conninfo", "an unterminated quote")
ng = test_refused("dbname=chat nosuchkeyword=1", r"invalid chat_db conninfo.*nosuchkeyword",
                  "an unknown keyword")
ng.allow.append(r"\[emerg\].*invalid chat_db conninfo")
good, _ = ng.try_start()
ok(not good, "an unknown keyword: nginx does not start either")

done()
