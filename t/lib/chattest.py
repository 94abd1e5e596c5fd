"""chattest -- the test harness of ngx_chat_module.

Every t/NNN-name.t is a Python 3 script (#!/usr/bin/python3) that prints TAP:

    import os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
    from chattest import *

    pg = PgCluster()                  # throwaway cluster, database chat, migrated
    ng = Nginx(pg, workers=2)         # nginx + the module, started
    st, hdrs, body = api("GET", "/chat/api/me", token=token("alice"))
    is_(st, 200, "me")
    done()                            # stops everything, checks error logs, prints 1..N

Small helpers the test files share (worker pid of a session, polling, the
events of a conversation, connecting onto a given worker, fixtures) are at
the end of this file.

Standard library plus Debian's python3-websockets (10.4), python3-psycopg2,
python3-jwt, python3-cryptography. Nothing waits forever: every wait has a
timeout and the whole file gets CHATTEST_TIMEOUT seconds (default 600).

Environment:
  KEEP=1              keep the temp dir (logs, confs, cluster) and print where
  CHAT_NGINX=path     nginx binary with the module compiled in (make static):
                      no load_module line
  CHAT_MODULE=path    the .so to load (default build/dyn/ngx_chat_module.so)
  CHAT_LOG_LEVEL=lvl  default error_log level of every Nginx (default info)
  CHATTEST_TIMEOUT=s  overall alarm for the test file (default 600)
"""

import asyncio
import base64
import hashlib
import http.client
import json as _json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

__all__ = [
    "REPO", "ok", "is_", "isnt", "like", "diag", "note", "skip", "skip_all",
    "done", "bail_out", "wait_for", "free_port", "tmpdir", "PgCluster",
    "Nginx", "NginxError", "token", "jwt_encode", "hs_secret", "rsa_keypair",
    "ec_keypair", "write_file", "api", "http_raw", "ws_connect", "ChatClient",
    "RawWS", "Frame", "hs_secret_file", "b64u", "raw_jwt", "jwt_claims", "ws_body_json",
    # shared test helpers (the end of this file)
    "session_pid", "gseq", "until", "conv_events", "stream_ok", "ws_ping",
    "request_or_none", "ws_connect_on", "ws_spread", "rest_create_conv", "db_create_conv",
    "db_messages", "by_sender_cmid", "db_lock", "worker_of", "ws_open_on",
    "ws_join_on", "worker_of_port", "ahttp", "poll", "PollRequest", "SSEClient", "sse_connect", "sse_connect_on",
]

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
KEEP = os.environ.get("KEEP", "") not in ("", "0")
STATIC_NGINX = os.environ.get("CHAT_NGINX") or None
NGINX_BIN = STATIC_NGINX or "/usr/sbin/nginx"
MODULE_SO = os.environ.get("CHAT_MODULE") or os.path.join(REPO, "build", "dyn", "ngx_chat_module.so")
LOG_LEVEL = os.environ.get("CHAT_LOG_LEVEL") or "info"
TIMEOUT = int(os.environ.get("CHATTEST_TIMEOUT") or 600)

# nginx-tests' rule: a run that logged one of these fails
BAD_LOG_RE = re.compile(
    r"\[(alert|emerg|crit)\]|AddressSanitizer|LeakSanitizer|"
    r"ThreadSanitizer|runtime error:|Sanitizer:DEADLYSIGNAL")

# ---------------------------------------------------------------- TAP ----

_state = {"n": 0, "failed": 0, "finished": False, "planned": None}
_nginxes = []
_clusters = []
_tmp = {"dir": None}


def _out(line):
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # reader gone: still clean up
        pass


def diag(*msgs):
    """Diagnostics to stderr (prove shows them even without -v)."""
    try:
        sys.stdout.flush()
        for m in msgs:
            for line in str(m).splitlines() or [""]:
                sys.stderr.write("# " + line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def note(*msgs):
    """Comments to stdout (shown by prove -v)."""
    for m in msgs:
        for line in str(m).splitlines() or [""]:
            _out("# " + line)


def _flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass


def _where():
    for fr in reversed(traceback.extract_stack()[:-1]):
        if os.path.abspath(fr.filename) != os.path.abspath(__file__):
            return "%s line %s" % (os.path.basename(fr.filename), fr.lineno)
    return "the end of the test (harness check)"


def ok(cond, name=""):
    """One test point. Returns bool(cond)."""
    _state["n"] += 1
    name = str(name).replace("\n", " ").replace("#", "\\#")
    if cond:
        _out("ok %d - %s" % (_state["n"], name))
    else:
        _state["failed"] += 1
        _out("not ok %d - %s" % (_state["n"], name))
        diag("  Failed test '%s'" % name, "  at %s" % _where())
    return bool(cond)


def is_(got, expected, name=""):
    r = ok(got == expected, name)
    if not r:
        diag("         got: %r" % (got,), "    expected: %r" % (expected,))
    return r


def isnt(got, unexpected, name=""):
    r = ok(got != unexpected, name)
    if not r:
        diag("         got: %r" % (got,), "    expected anything else")
    return r


def like(got, regex, name=""):
    r = ok(got is not None and re.search(regex, str(got)) is not None, name)
    if not r:
        diag("                  %r" % (got,), "    doesn't match '%s'" % regex)
    return r


def skip(reason, count=1):
    for _ in range(count):
        _state["n"] += 1
        _out("ok %d # skip %s" % (_state["n"], reason))


def skip_all(reason):
    """Skip the whole file (before any test point)."""
    _state["planned"] = 0
    _out("1..0 # SKIP %s" % reason)
    _finish(plan=False)
    _flush()
    os._exit(0)


def bail_out(reason):
    _out("Bail out! %s" % reason)
    _finish(plan=False)
    _flush()
    os._exit(255)


def done():
    """Stops every Nginx (gracefully) and PgCluster, fails if an Nginx logged
    [alert]/[emerg]/[crit] or a sanitizer report (unless allowed), prints
    the plan and exits (non-zero when a test failed)."""
    _finish()
    _flush()
    os._exit(1 if _state["failed"] else 0)


def _finish(plan=True):
    if _state["finished"]:
        return
    _state["finished"] = True
    signal.alarm(60)  # cleanup gets its own limit
    for ng in list(_nginxes):
        try:
            ng.stop()
        except Exception as e:  # still check the log
            diag("stopping nginx: %r" % (e,))
            ng._kill_all()
    for ng in list(_nginxes):
        bad = ng.check_log()
        if plan and not ok(not bad, "no alerts or sanitizer reports in %s" % ng.name):
            for line in bad[:40]:
                diag("  " + line)
    for pg in list(_clusters):
        try:
            pg.stop(mode="immediate")
        except Exception as e:
            diag("stopping postgres: %r" % (e,))
            pg.kill()
    if _state["failed"] and not KEEP:
        for ng in _nginxes:
            diag("---- last lines of %s/error.log ----" % ng.name)
            for line in _tail_interesting(ng.error_log(), 40):
                diag(line)
    if plan:
        _out("1..%d" % _state["n"])
    d = _tmp["dir"]
    if d and os.path.isdir(d):
        if KEEP:
            diag("KEEP=1: logs and data left in %s" % d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    signal.alarm(0)


def _tail_interesting(text, n):
    lines = [l for l in text.splitlines() if "[debug]" not in l]
    return lines[-n:]


def _excepthook(tp, value, tb):
    if tp is KeyboardInterrupt:
        diag("interrupted")
    _state["n"] += 1
    _state["failed"] += 1
    _out("not ok %d - test script died: %s: %s" % (_state["n"], tp.__name__, value))
    diag("".join(traceback.format_exception(tp, value, tb)))
    try:
        _finish()
    finally:
        _flush()
        os._exit(255)


def _atexit():
    if not _state["finished"]:
        _finish()
        _flush()
        if _state["failed"]:
            os._exit(1)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    if _state["finished"]:
        # cleanup itself hangs: kill what we started and leave
        for ng in _nginxes:
            ng._kill_all()
        for pg in _clusters:
            pg.kill()
        _out("Bail out! cleanup timed out")
        os._exit(255)
    raise _Timeout("test file ran longer than %d s (CHATTEST_TIMEOUT)" % TIMEOUT)


sys.excepthook = _excepthook
import atexit  # noqa: E402
atexit.register(_atexit)
signal.signal(signal.SIGALRM, _alarm)


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


signal.signal(signal.SIGTERM, _sigterm)
signal.alarm(TIMEOUT)

# ------------------------------------------------------------ helpers ----


def wait_for(pred, timeout=10.0, interval=0.05, what=None):
    """Polls pred() until it returns something true; returns it, or None on
    timeout (raises TimeoutError instead when `what` names the thing)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            if what:
                raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
            return None
        time.sleep(interval)


def tmpdir():
    """The test file's temp dir under /tmp (0755: postgres and the nginx
    workers, running as other users, can traverse it)."""
    if _tmp["dir"] is None:
        name = os.path.splitext(os.path.basename(sys.argv[0] or "t"))[0]
        d = tempfile.mkdtemp(prefix="chattest-%s-" % re.sub(r"[^\w.-]", "_", name), dir="/tmp")
        os.chmod(d, 0o755)
        _tmp["dir"] = d
    return _tmp["dir"]


def _subdir(prefix):
    base = tmpdir()
    i = 1
    while os.path.exists(os.path.join(base, "%s%d" % (prefix, i))):
        i += 1
    d = os.path.join(base, "%s%d" % (prefix, i))
    os.mkdir(d)
    os.chmod(d, 0o755)
    return d


def write_file(path, data, mode=0o644):
    """Writes str/bytes to path (relative paths go into tmpdir()); returns
    the absolute path."""
    if not os.path.isabs(path):
        path = os.path.join(tmpdir(), path)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


_used_ports = set()


def free_port():
    """A TCP port free on 127.0.0.1 (not handed out twice by this process)."""
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def _port_open(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
        rest = s[s.rindex(")") + 2:].split()
        return rest[0], int(rest[1])  # state, ppid
    except (OSError, ValueError, IndexError):
        return None, None


def _alive(pid):
    st, _ = _proc_state(pid)
    return st is not None and st not in ("Z", "X")


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st, ppid = _proc_state(int(d))
            if ppid == pid and st not in (None, "Z", "X"):
                kids.append(int(d))
    return sorted(kids)


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run(cmd, check=True, timeout=120, **kw):
    """subprocess.run with text output captured and a timeout."""
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (exit %d):\n%s" % (" ".join(map(str, cmd)), r.returncode, r.stdout))
    return r


# ---------------------------------------------------------- PostgreSQL ----

def _pg_bindir():
    cands = []
    for v in os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []:
        if os.path.exists("/usr/lib/postgresql/%s/bin/pg_ctl" % v):
            cands.append(v)
    if not cands:
        raise RuntimeError("PostgreSQL server binaries not found (scripts/install-deps.sh)")
    cands.sort(key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")])
    return "/usr/lib/postgresql/%s/bin" % cands[-1]


class PgCluster:
    """A throwaway PostgreSQL cluster in the test's temp dir, owned by the
    postgres user, listening on 127.0.0.1:<free port> and a unix socket in
    <dir>/sock, trust auth, database `chat` migrated with scripts/migrate.sh.

    Attributes: dir, data, sockdir, port, dbname, user, log (server log path),
    conninfo ("host=<sockdir> port=<port> dbname=chat user=postgres"),
    tcp_conninfo (the same over 127.0.0.1).
    """

    def __init__(self, dbname="chat", migrate=True, settings=None, start=True,
                 migrations_dir=None):
        self.bindir = _pg_bindir()
        self.dir = _subdir("pg")
        self.data = os.path.join(self.dir, "data")
        self.sockdir = os.path.join(self.dir, "sock")
        self.log = os.path.join(self.dir, "postgres.log")
        self.port = free_port()
        self.dbname = dbname
        self.user = "postgres"
        for d in (self.data, self.sockdir):
            os.mkdir(d)
            shutil.chown(d, "postgres", "postgres")
        os.chmod(self.data, 0o700)
        os.chmod(self.sockdir, 0o755)
        open(self.log, "a").close()
        shutil.chown(self.log, "postgres", "postgres")
        self._as_pg([self.bindir + "/initdb", "-D", self.data, "-U", "postgres",
                     "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        conf = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "'%s'" % self.sockdir,
            "unix_socket_permissions": "0777",
            "max_connections": 200,
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] '",
        }
        conf.update(settings or {})
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# chattest\n")
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))
        _clusters.append(self)
        self._running = False
        if start:
            self.start()
            self.psql("CREATE DATABASE %s" % dbname, dbname="postgres")
            if migrate:
                self.migrate(migrations_dir)

    @property
    def conninfo(self):
        return "host=%s port=%d dbname=%s user=%s" % (self.sockdir, self.port, self.dbname, self.user)

    @property
    def tcp_conninfo(self):
        return "hostaddr=127.0.0.1 port=%d dbname=%s user=%s" % (self.port, self.dbname, self.user)

    def _as_pg(self, cmd, check=True, timeout=120):
        return run(["runuser", "-u", "postgres", "--"] + cmd, check=check,
                   timeout=timeout, cwd=self.dir)

    def _conn_args(self, dbname=None):
        return ["-h", self.sockdir, "-p", str(self.port), "-U", self.user,
                "-d", dbname or self.dbname]

    def migrate(self, migrations_dir=None):
        """Runs scripts/migrate.sh (MIGRATIONS_DIR=migrations_dir if given);
        returns its output."""
        env = dict(os.environ)
        if migrations_dir:
            env["MIGRATIONS_DIR"] = migrations_dir
        return run(["bash", os.path.join(REPO, "scripts", "migrate.sh")] + self._conn_args(),
                   env=env).stdout

    def start(self, timeout=60):
        self._as_pg([self.bindir + "/pg_ctl", "-D", self.data, "-l", self.log,
                     "-w", "-t", str(timeout), "start"], timeout=timeout + 10)
        self._running = True

    def stop(self, mode="fast", timeout=60):
        """mode: smart | fast | immediate"""
        if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._running = False
            return
        self._as_pg([self.bindir + "/pg_ctl", "-D", self.data, "-m", mode,
                     "-w", "-t", str(timeout), "stop"], timeout=timeout + 10)
        self._running = False

    def restart(self, mode="fast"):
        """Stops (fast or immediate) and starts again on the same port."""
        self.stop(mode=mode)
        self.start()

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                pid = int(f.readline())
            return pid if _alive(pid) else None
        except (OSError, ValueError):
            return None

    def kill(self):
        """SIGKILLs the postmaster and all its processes (a crash)."""
        pid = self.postmaster_pid()
        if pid:
            kids = _children(pid)
            for p in [pid] + kids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            wait_for(lambda: not any(_alive(p) for p in [pid] + kids), timeout=10)
            # Nobody may reap the dead postmaster (pid 1 here does not): a
            # zombie still answers kill(pid, 0), so PostgreSQL would take the
            # lock files for a live postmaster. They are stale: remove them.
            for f in (os.path.join(self.data, "postmaster.pid"),
                      os.path.join(self.sockdir, ".s.PGSQL.%d.lock" % self.port),
                      os.path.join(self.sockdir, ".s.PGSQL.%d" % self.port)):
                try:
                    os.unlink(f)
                except OSError:
                    pass
        self._running = False

    def psql(self, sql, dbname=None, check=True):
        """Runs SQL (any number of statements) through psql; returns the rows
        of the results as lists of strings (NULL -> ''). Raises on error
        unless check=False (then returns (returncode, output))."""
        r = subprocess.run(
            [self.bindir + "/psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-F", "\x1f", "-0", "-f", "-"] + self._conn_args(dbname),
            input=sql, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            timeout=120)
        if not check:
            return r.returncode, r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError("psql failed: %s\n%s" % (r.stderr.strip(), sql))
        return [rec.split("\x1f") for rec in r.stdout.split("\0")[:-1]]

    def conn(self, autocommit=True, dbname=None):
        """A psycopg2 connection (caller closes it)."""
        import psycopg2
        c = psycopg2.connect(host=self.sockdir, port=self.port, user=self.user,
                             dbname=dbname or self.dbname, connect_timeout=10)
        c.autocommit = autocommit
        return c

    def query(self, sql, *params):
        """Runs one statement with psycopg2; returns fetched rows (typed) or
        the rowcount for statements without a result."""
        c = self.conn()
        try:
            with c.cursor() as cur:
                cur.execute(sql, params or None)
                return cur.fetchall() if cur.description else cur.rowcount
        finally:
            c.close()

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


# -------------------------------------------------------------- nginx ----

class NginxError(Exception):
    pass


_CONF = """\
{load_module}
worker_processes {workers};
error_log {dir}/error.log {log_level};
pid {dir}/nginx.pid;
daemon off;
master_process on;
{main}
events {{
    worker_connections {worker_connections};
{events}
}}

http {{
    client_body_temp_path {dir}/client_body_temp;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    access_log {access_log};
    default_type application/octet-stream;

{chat_http}
{http}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
{server}
        location /chat/ {{
{chat_location}
{location}
        }}
    }}
}}
"""


class Nginx:
    """An nginx with the chat module, in its own dir under the test's temp dir.

    Nginx(pg=None, workers=2, http="", server="", location="", main="",
          events="", module=True, chat_http=None, chat_location="chat;",
          log_level=None, access_log=False, allow=(), port=None,
          worker_connections=4096, jwt_key=None, start=True)

    The config is _CONF above: `http`, `server`, `location` (inside
    `location /chat/`), `main` and `events` are raw text added at those
    levels. chat_http defaults to
        chat_db "<pg.conninfo>"; chat_jwt_alg HS256; chat_jwt_key <secret file>;
    (chat_db omitted without pg). module=False: no load_module, no chat
    directives at all (plain nginx). `allow` lists regexes of log lines the
    test expects ([alert] etc. that should not fail it).
    """

    def __init__(self, pg=None, workers=2, http="", server="", location="", main="",
                 events="", module=True, chat_http=None, chat_location="chat;",
                 log_level=None, access_log=False, allow=(), port=None,
                 worker_connections=4096, jwt_key=None, start=True):
        self.dir = _subdir("nginx")
        self.name = os.path.basename(self.dir)
        self.pg = pg
        self.port = port or free_port()
        self.conf_path = os.path.join(self.dir, "nginx.conf")
        self.proc = None
        self.allow = list(allow)
        self.params = dict(workers=workers, http=http, server=server, location=location,
                           main=main, events=events, module=module, chat_http=chat_http,
                           chat_location=chat_location, log_level=log_level or LOG_LEVEL,
                           access_log=access_log, worker_connections=worker_connections,
                           jwt_key=jwt_key)
        _nginxes.append(self)
        _default["nginx"] = self
        self.write_conf()
        if start:
            self.start()

    # -- configuration --

    def conf_text(self):
        p = self.params
        module = p["module"]
        if module and not STATIC_NGINX:
            load = "load_module %s;" % MODULE_SO
        else:
            load = ""
        if not module:
            chat_http, chat_loc = "", ""
        else:
            chat_loc = p["chat_location"]
            if p["chat_http"] is not None:
                chat_http = p["chat_http"]
            else:
                lines = []
                if self.pg is not None:
                    lines.append('chat_db "%s";' % self.pg.conninfo)
                lines.append("chat_jwt_alg HS256;")
                lines.append("chat_jwt_key %s;" % (p["jwt_key"] or hs_secret_file()))
                chat_http = "\n".join(lines)
        return _CONF.format(
            load_module=load, workers=p["workers"], dir=self.dir,
            log_level=p["log_level"], main=p["main"], events=p["events"],
            worker_connections=p["worker_connections"],
            access_log=("%s/access.log" % self.dir) if p["access_log"] else "off",
            chat_http=_indent(chat_http, 4), http=_indent(p["http"], 4),
            port=self.port, server=_indent(p["server"], 8),
            chat_location=_indent(chat_loc, 12), location=_indent(p["location"], 12))

    def write_conf(self, **changes):
        """Updates parameters (same names as the constructor's) and rewrites
        nginx.conf; use before reload()."""
        for k, v in changes.items():
            if k not in self.params:
                raise TypeError("unknown Nginx parameter %s" % k)
            self.params[k] = v
        with open(self.conf_path, "w") as f:
            f.write(self.conf_text())

    def test_conf(self):
        """nginx -t; returns (ok, output)."""
        r = run([NGINX_BIN, "-p", self.dir + "/", "-c", self.conf_path, "-t"],
                check=False, timeout=60)
        return r.returncode == 0, r.stdout

    # -- processes --

    @property
    def master_pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def try_start(self, timeout=15):
        """Starts nginx; returns (True, "") once the port answers and the
        workers are up, or (False, output) when nginx exits (e.g. a config
        error -- see also test_conf())."""
        if self.master_pid:
            raise NginxError("%s already running" % self.name)
        stderr_path = os.path.join(self.dir, "nginx.stderr")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        with open(stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [NGINX_BIN, "-p", self.dir + "/", "-c", self.conf_path],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, self._startup_output()
            if _port_open(self.port) and len(self.worker_pids()) >= self.params["workers"]:
                return True, ""
            time.sleep(0.05)
        return False, "nginx did not come up in %ds\n%s" % (timeout, self._startup_output())

    def start(self, timeout=15):
        good, out = self.try_start(timeout)
        if not good:
            self._kill_all()
            raise NginxError("nginx failed to start:\n" + out)
        return self

    def _startup_output(self):
        txt = ""
        try:
            with open(os.path.join(self.dir, "nginx.stderr"), errors="replace") as f:
                txt += f.read()
        except OSError:
            pass
        return txt + "\n".join(_tail_interesting(self.error_log(), 20))

    def stop(self, timeout=20):
        """Graceful quit (SIGQUIT); SIGKILL after `timeout` seconds.
        Returns the master's exit status (None if it was not running)."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            workers = self.worker_pids(all=True)
            try:
                os.kill(self.proc.pid, signal.SIGQUIT)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                diag("%s: nginx did not quit in %ds, killing it" % (self.name, timeout))
                self._kill_all()
            wait_for(lambda: not any(_alive(p) for p in workers), timeout=5)
        return self.proc.returncode

    def _kill_all(self):
        if not self.proc:
            return
        pids = self.worker_pids(all=True) if self.proc.poll() is None else []
        for p in [self.proc.pid] + pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def reload(self, timeout=15, **changes):
        """Rewrites the conf (with `changes`, see write_conf) and sends
        SIGHUP; returns once a full new generation of workers is running.
        Raises NginxError if the reload is refused (bad config)."""
        if changes:
            self.write_conf(**changes)
        old = set(self.worker_pids(all=True))
        mark = len(self.error_log())
        os.kill(self.master_pid, signal.SIGHUP)
        want = self.params["workers"]

        def new_generation():
            if re.search(r"\[emerg\]", self.error_log()[mark:]):
                raise NginxError("reload failed:\n" + self.error_log()[mark:][-3000:])
            new = [p for p in self.worker_pids() if p not in old]
            return new if len(new) >= want else None

        wait_for(new_generation, timeout=timeout, what="new nginx workers after reload")
        # old workers retitle themselves "...is shutting down" (or exit)
        # shortly after the new ones start
        wait_for(lambda: not set(self.worker_pids()) & old, timeout=timeout)
        return self

    def worker_pids(self, all=False):
        """Pids of the master's worker processes; all=True includes workers
        that are shutting down (and cache processes)."""
        mp = self.master_pid
        if not mp:
            return []
        pids = []
        for p in _children(mp):
            cmd = _cmdline(p)
            if all or cmd == "nginx: worker process":
                pids.append(p)
        return pids

    def kill_worker(self, pid=None, sig=signal.SIGKILL, wait=True, timeout=10):
        """Signals a worker (default: the first). A worker killed by a signal
        makes the master log "[alert] worker process N exited on signal S";
        that line is allowed automatically. With wait, returns the pids once
        the master has replaced it."""
        pids = self.worker_pids()
        pid = pid or pids[0]
        self.allow.append(r"worker process %d exited on signal %d\b" % (pid, int(sig)))
        os.kill(pid, sig)
        if not wait:
            return None
        wait_for(lambda: not _alive(pid), timeout=timeout, what="worker %d to die" % pid)
        return wait_for(lambda: (lambda w: w if len(w) >= self.params["workers"] and pid not in w else None)(self.worker_pids()),
                        timeout=timeout, what="a replacement worker")

    # -- logs --

    def error_log(self):
        try:
            with open(os.path.join(self.dir, "error.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def check_log(self, allow=()):
        """[alert]/[emerg]/[crit] and sanitizer lines of error.log and the
        master's stderr, minus lines matching self.allow or `allow`."""
        text = self.error_log()
        try:
            with open(os.path.join(self.dir, "nginx.stderr"), errors="replace") as f:
                text += "\n" + f.read()
        except OSError:
            pass
        pats = [re.compile(a) for a in list(self.allow) + list(allow)]
        return [l for l in text.splitlines()
                if BAD_LOG_RE.search(l) and not any(p.search(l) for p in pats)]

    def wait_log(self, regex, timeout=10, start=0):
        """Waits until error.log (from offset `start`) matches regex; returns
        the match or None."""
        r = re.compile(regex)
        return wait_for(lambda: r.search(self.error_log(), start), timeout=timeout)

    # -- clients --

    def url(self, path="/", scheme="http"):
        return "%s://127.0.0.1:%d%s" % (scheme, self.port, path)

    def api(self, method, path, token=None, json=None, headers=None, body=None, timeout=10):
        return api(method, path, token=token, json=json, headers=headers,
                   body=body, timeout=timeout, nginx=self)


def _indent(text, n):
    text = (text or "").strip("\n")
    if not text:
        return ""
    pad = " " * n
    return "\n".join(pad + l if l.strip() else l for l in text.splitlines())


_default = {"nginx": None}


def _nginx(n):
    n = n or _default["nginx"]
    if n is None:
        raise RuntimeError("no Nginx started")
    return n


# ---------------------------------------------------------------- JWT ----

_secret = {"value": None, "file": None}


def hs_secret():
    """The harness's HS256 secret (64 hex chars, as bytes)."""
    if _secret["value"] is None:
        _secret["value"] = secrets.token_hex(32).encode()
    return _secret["value"]


def hs_secret_file():
    """Path of a file with hs_secret() (no trailing newline), 0644."""
    if _secret["file"] is None:
        _secret["file"] = write_file("jwt_secret", hs_secret(), 0o644)
    return _secret["file"]


def jwt_encode(claims, key=None, alg="HS256", headers=None):
    """Raw PyJWT encode; key defaults to hs_secret()."""
    import jwt
    return jwt.encode(claims, hs_secret() if key is None else key, algorithm=alg,
                      headers=headers)


def token(sub, exp_in=3600, key=None, alg="HS256", headers=None, **claims):
    """A signed JWT for user `sub`: exp = now + exp_in (no exp when exp_in is
    None), iat = now, plus any claims (name=, role=, nbf=, ...). HS256 with
    the harness secret by default; pass alg="RS256"/"ES256" and the private
    key PEM from rsa_keypair()/ec_keypair()."""
    now = int(time.time())
    c = {"sub": sub, "iat": now}
    if exp_in is not None:
        c["exp"] = now + int(exp_in)
    c.update(claims)
    return jwt_encode(c, key=key, alg=alg, headers=headers)


def b64u(b):
    """base64url without padding, of bytes or a str."""
    if isinstance(b, str):
        b = b.encode()
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def raw_jwt(header, claims, secret=None, sig=None):
    """A compact JWS built by hand, with exactly the given header and claims
    (a dict, or a str taken as is): HS256 over `secret` (any bytes, PEM
    included -- PyJWT refuses those), or the given signature bytes."""
    import hmac
    signing_input = b64u(_json.dumps(header, separators=(",", ":"))) + "." + \
        b64u(claims if isinstance(claims, str) else _json.dumps(claims, separators=(",", ":")))
    if secret is not None:
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + (b64u(sig) if sig else "")


def jwt_claims(sub, exp_in=3600, **kw):
    """{"sub", "iat", "exp"} for now, plus kw."""
    now = int(time.time())
    c = {"sub": sub, "iat": now, "exp": now + exp_in}
    c.update(kw)
    return c


def ws_body_json(ws):
    """The JSON body of a refused upgrade (RawWS.body), or the raw bytes."""
    raw = getattr(ws, "body", b"")
    try:
        return _json.loads(raw.split(b"\r\n\r\n")[-1] if b"\r\n\r\n" in raw else raw)
    except ValueError:
        return raw


def _pem_pair(priv):
    from cryptography.hazmat.primitives import serialization
    private_pem = priv.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    public_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def rsa_keypair(bits=2048):
    """(private_pem, public_pem) bytes; write_file("rs.pub", public_pem) for
    chat_jwt_key."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    return _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def ec_keypair():
    """(private_pem, public_pem) bytes for ES256 (P-256)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    return _pem_pair(ec.generate_private_key(ec.SECP256R1()))


# --------------------------------------------------------------- HTTP ----

def api(method, path, token=None, json=None, headers=None, body=None, timeout=10, nginx=None):
    """One HTTP/1.1 request to the Nginx (default: the last one created).
    Returns (status, headers {lowercase name: value}, body) where body is the
    parsed JSON when the response says application/json (raw bytes if it
    does not parse), else raw bytes."""
    n = _nginx(nginx)
    h = {"Host": "localhost"}
    if token:
        h["Authorization"] = "Bearer " + token
    if json is not None:
        body = _json.dumps(json).encode()
        h["Content-Type"] = "application/json"
    elif isinstance(body, str):
        body = body.encode()
    h.update(headers or {})
    c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if "json" in hdrs.get("content-type", ""):
            try:
                data = _json.loads(data)
            except ValueError:
                pass
        return r.status, hdrs, data
    finally:
        c.close()


def http_raw(request, nginx=None, port=None, timeout=5, read_until_close=True):
    """Sends raw bytes and returns the raw bytes received until the server
    closes (or `timeout` passes without data)."""
    port = port or _nginx(nginx).port
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(request if isinstance(request, bytes) else request.encode())
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            if not b:
                break
            chunks.append(b)
            if not read_until_close:
                break
        return b"".join(chunks)
    finally:
        s.close()


# ---------------------------------------------------------- WebSocket ----

class ChatClient:
    """A protocol-level client over the `websockets` library (asyncio).

    Attributes: ws (the websockets protocol object), hello (the hello reply
    dict or None), messages (every non-reply JSON message received, in
    order), close_code / close_reason once closed.
    """

    def __init__(self, ws):
        self.ws = ws
        self.hello = None
        self.messages = []
        self.received = []       # every message, replies too, in order
        self._pending = []       # messages not yet taken by wait_event
        self._replies = {}
        self._next_id = 1
        self._changed = asyncio.Event()
        self.close_code = None
        self.close_reason = None
        self.closed = False
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self):
        import websockets
        try:
            async for raw in self.ws:
                try:
                    msg = _json.loads(raw)
                except ValueError:
                    msg = {"type": "_unparsed", "raw": raw}
                self.received.append(msg)
                if isinstance(msg, dict) and msg.get("type") == "reply" and "id" in msg:
                    self._replies[msg["id"]] = msg
                else:
                    self.messages.append(msg)
                    self._pending.append(msg)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason
            self._changed.set()

    async def _wait_change(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), left)
        except asyncio.TimeoutError:
            return False
        return True

    async def send(self, obj):
        """Sends a dict as JSON text (or a str/bytes as is)."""
        await self.ws.send(obj if isinstance(obj, (str, bytes)) else _json.dumps(obj))

    async def request(self, type, timeout=10, **fields):
        """Sends {"type": type, "id": <next id>, **fields}; returns the whole
        reply dict ({"type":"reply","id":..,"ok":..,"result"|"error":..}) or
        None on timeout / connection closed. Events received meanwhile are
        kept for events()/wait_event()."""
        rid = fields.pop("id", None)
        if rid is None:
            rid = self._next_id
            self._next_id += 1
        msg = {"type": type, "id": rid}
        msg.update(fields)
        await self.send(msg)
        deadline = time.monotonic() + timeout
        while rid not in self._replies:
            if self.closed or not await self._wait_change(deadline):
                if rid in self._replies:
                    break
                return None
        return self._replies.pop(rid)

    def events(self, kind=None):
        """All non-reply messages received so far ({"type":"event",...},
        welcome, resync_required, pong...), optionally only events whose
        event.kind == kind."""
        if kind is None:
            return list(self.messages)
        return [m for m in self.messages if _event_kind(m) == kind]

    async def wait_event(self, pred=None, timeout=10):
        """Returns (and takes off the pending list) the first received message
        not taken before that matches pred -- a callable(msg) or an event kind
        string like "message.new"; waits up to `timeout`; None on timeout."""
        if isinstance(pred, str):
            kind = pred
            pred = lambda m: _event_kind(m) == kind  # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._pending):
                if pred is None or pred(m):
                    return self._pending.pop(i)
            if self.closed or not await self._wait_change(deadline):
                for i, m in enumerate(self._pending):
                    if pred is None or pred(m):
                        return self._pending.pop(i)
                return None

    async def wait_closed(self, timeout=10):
        """Waits for the connection to close; returns (code, reason) or None."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            return None
        return self.close_code, self.close_reason

    async def close(self, code=1000, reason=""):
        try:
            await asyncio.wait_for(self.ws.close(code, reason), 10)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self._reader, 5)
        except Exception:
            self._reader.cancel()


def _event_kind(m):
    if isinstance(m, dict) and isinstance(m.get("event"), dict):
        return m["event"].get("kind")
    return None


async def ws_connect(nginx=None, token=None, ticket=None, cursor=None, hello=True,
                     path="/chat/ws", headers=None, subprotocols=("chat.v1",),
                     bearer=False, timeout=10, **kw):
    """Opens a WebSocket to ws://127.0.0.1:<port><path> and returns a
    ChatClient. ticket -> ?ticket=; bearer=True sends the token in an
    Authorization header instead of hello. With hello=True and a token (and
    bearer False), sends hello (with cursor if given) and stores the reply in
    client.hello (check client.hello["ok"]). Extra kw go to
    websockets.connect (e.g. max_size, origin). Raises on a failed
    handshake (websockets.InvalidStatusCode has .status_code)."""
    import websockets
    n = _nginx(nginx)
    url = "ws://127.0.0.1:%d%s" % (n.port, path)
    if ticket:
        url += ("&" if "?" in url else "?") + "ticket=" + ticket
    h = dict(headers or {})
    if bearer and token:
        h["Authorization"] = "Bearer " + token
    kw.setdefault("compression", None)
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", timeout)
    kw.setdefault("close_timeout", 5)
    ws = await websockets.connect(url, subprotocols=list(subprotocols) if subprotocols else None,
                                  extra_headers=h, **kw)
    c = ChatClient(ws)
    if hello and token and not bearer:
        fields = {"token": token}
        if cursor is not None:
            fields["cursor"] = cursor
        c.hello = await c.request("hello", timeout=timeout, **fields)
    return c


class Frame:
    """A WebSocket frame read by RawWS: fin, rsv (3 bits), opcode, masked,
    payload (bytes); .text, .json(), .close_code, .close_reason."""

    def __init__(self, fin, rsv, opcode, masked, payload):
        self.fin, self.rsv, self.opcode, self.masked, self.payload = fin, rsv, opcode, masked, payload

    @property
    def text(self):
        return self.payload.decode("utf-8", errors="replace")

    def json(self):
        return _json.loads(self.payload)

    @property
    def close_code(self):
        return struct.unpack("!H", self.payload[:2])[0] if self.opcode == 8 and len(self.payload) >= 2 else None

    @property
    def close_reason(self):
        return self.payload[2:].decode("utf-8", errors="replace") if self.opcode == 8 else None

    def __repr__(self):
        return "Frame(fin=%d rsv=%d op=%d len=%d %r)" % (
            self.fin, self.rsv, self.opcode, len(self.payload), self.payload[:60])


class RawWS:
    """A WebSocket client over a plain socket, for frame-level tests.

    ws = RawWS(nginx)                     # handshake done; check ws.status
    ws = RawWS(nginx, headers={"Sec-WebSocket-Version": "8"})
    ws = RawWS(nginx, handshake=False); ws.sendall(b"GET ... ")
    ws.send_frame(0x1, b'{"type":"ping","id":1}', fin=True, mask=True, rsv=0)
    f = ws.recv_frame()                   # Frame or None at EOF
    ws.send_json({...}); ws.recv_json()   # text messages, fragments joined

    After the handshake: status (int), headers ({lowercase: value}),
    accept_ok (Sec-WebSocket-Accept matches), response (raw head bytes).
    Headers given as None are left out of the request.
    """

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, nginx=None, path="/chat/ws", headers=None, protocols=("chat.v1",),
                 handshake=True, timeout=5, port=None, token=None, ticket=None):
        self.port = port or _nginx(nginx).port
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        self.buf = b""
        self.status = None
        self.headers = {}
        self.accept_ok = False
        self.response = b""
        if ticket:
            path += ("&" if "?" in path else "?") + "ticket=" + ticket
        if handshake:
            h = {}
            if token:
                h["Authorization"] = "Bearer " + token
            if protocols:
                h["Sec-WebSocket-Protocol"] = ", ".join(protocols)
            h.update(headers or {})
            self.handshake(path, h)

    def handshake(self, path="/chat/ws", headers=None):
        self.key = base64.b64encode(os.urandom(16)).decode()
        h = {"Host": "127.0.0.1:%d" % self.port, "Upgrade": "websocket",
             "Connection": "Upgrade", "Sec-WebSocket-Key": self.key,
             "Sec-WebSocket-Version": "13"}
        h.update(headers or {})
        req = "GET %s HTTP/1.1\r\n" % path
        req += "".join("%s: %s\r\n" % (k, v) for k, v in h.items() if v is not None)
        self.sendall((req + "\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            b = self._recv()
            if not b:
                break
            self.buf += b
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        self.response = head + sep
        self.buf = rest
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.\d (\d{3})", lines[0] if lines else "")
        self.status = int(m.group(1)) if m else None
        for l in lines[1:]:
            k, _, v = l.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        want = base64.b64encode(hashlib.sha1(self.key.encode() + self.GUID).digest()).decode()
        self.accept_ok = self.headers.get("sec-websocket-accept") == want
        if self.status != 101:
            # the error body, if any, for the test to inspect
            self.body = self.buf + self._read_rest()
            self.buf = b""
        return self.status

    def _read_rest(self):
        """The body of a refused upgrade: by its Content-Length when it has
        one (the connection may be kept alive), else until the close."""
        n = int(self.headers.get("content-length", "-1"))
        data = b""
        deadline = time.monotonic() + self.timeout
        try:
            while (n < 0 or len(self.buf) + len(data) < n) and time.monotonic() < deadline:
                b = self.sock.recv(65536)
                if not b:
                    break
                data += b
        except OSError:
            pass
        return data

    def _recv(self, n=65536):
        try:
            return self.sock.recv(n)
        except socket.timeout:
            raise
        except OSError:
            return b""

    def sendall(self, data):
        self.sock.sendall(data)

    @staticmethod
    def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, mask_key=None, length=None):
        """Encodes one frame; `length` overrides the length field (for
        lying-length tests)."""
        if isinstance(payload, str):
            payload = payload.encode()
        b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
        n = len(payload) if length is None else length
        mbit = 0x80 if mask else 0
        if n < 126:
            hdr = struct.pack("!BB", b0, mbit | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", b0, mbit | 126, n)
        else:
            hdr = struct.pack("!BBQ", b0, mbit | 127, n)
        if mask:
            key = mask_key if mask_key is not None else os.urandom(4)
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
            hdr += key
        return hdr + payload

    def send_frame(self, opcode, payload=b"", fin=True, mask=True, rsv=0, mask_key=None, length=None):
        self.sendall(self.frame(opcode, payload, fin, mask, rsv, mask_key, length))

    def send_text(self, text, **kw):
        self.send_frame(0x1, text, **kw)

    def send_json(self, obj, **kw):
        self.send_frame(0x1, _json.dumps(obj), **kw)

    def send_close(self, code=1000, reason=b"", **kw):
        payload = b"" if code is None else struct.pack("!H", code) + (
            reason.encode() if isinstance(reason, str) else reason)
        self.send_frame(0x8, payload, **kw)

    def send_ping(self, payload=b"", **kw):
        self.send_frame(0x9, payload, **kw)

    def _need(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out reading a frame")
            self.sock.settimeout(left)
            b = self._recv()
            if not b:
                return False
            self.buf += b
        return True

    def recv_frame(self, timeout=None):
        """Next frame, or None when the server closed the TCP connection.
        Raises socket.timeout after `timeout` (default: the constructor's)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            if not self._need(2, deadline):
                return None
            b0, b1 = self.buf[0], self.buf[1]
            n = b1 & 0x7F
            off = 2
            if n == 126:
                if not self._need(4, deadline):
                    return None
                n = struct.unpack("!H", self.buf[2:4])[0]
                off = 4
            elif n == 127:
                if not self._need(10, deadline):
                    return None
                n = struct.unpack("!Q", self.buf[2:10])[0]
                off = 10
            masked = bool(b1 & 0x80)
            key = b""
            if masked:
                if not self._need(off + 4, deadline):
                    return None
                key = self.buf[off:off + 4]
                off += 4
            if not self._need(off + n, deadline):
                return None
        finally:
            self.sock.settimeout(self.timeout)
        payload = self.buf[off:off + n]
        self.buf = self.buf[off + n:]
        if masked:
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, masked, payload)

    def recv_message(self, timeout=None, skip_control=True):
        """Next data message as (opcode, payload) with continuation frames
        joined; a close frame returns (8, payload); None at EOF. Pings and
        pongs are skipped (not answered) when skip_control."""
        deadline = time.monotonic() + (timeout or self.timeout)
        op, data = None, b""
        while True:
            f = self.recv_frame(max(0.001, deadline - time.monotonic()))
            if f is None:
                return None
            if f.opcode == 8:
                return 8, f.payload
            if f.opcode in (9, 10):
                if skip_control:
                    continue
                return f.opcode, f.payload
            if op is None:
                op = f.opcode
            data += f.payload
            if f.fin:
                return op, data

    def recv_json(self, timeout=None):
        """Next text message parsed as JSON (None at EOF or on a close)."""
        m = self.recv_message(timeout)
        if m is None or m[0] == 8:
            return None
        return _json.loads(m[1])

    def request(self, type, timeout=None, **fields):
        """Sends a request (id auto) and returns its reply, skipping other
        messages (which are appended to self.skipped)."""
        self._id = getattr(self, "_id", 0) + 1
        rid = fields.pop("id", self._id)
        msg = {"type": type, "id": rid}
        msg.update(fields)
        self.send_json(msg)
        self.skipped = getattr(self, "skipped", [])
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self.recv_json(max(0.001, deadline - time.monotonic()))
            if m is None:
                return None
            if m.get("type") == "reply" and m.get("id") == rid:
                return m
            self.skipped.append(m)

    def read_until_close(self, timeout=None):
        """Reads frames until a close frame or EOF; returns (close Frame or
        None, [frames before it])."""
        deadline = time.monotonic() + (timeout or self.timeout)
        frames = []
        while True:
            f = self.recv_frame(max(0.001, deadline - time.monotonic()))
            if f is None or f.opcode == 8:
                return f, frames
            frames.append(f)

    def eof(self, timeout=None):
        """True when the server closed the TCP connection (after draining)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while True:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                b = self.sock.recv(65536)
                if not b:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(self.timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------ shared test helpers ----
# Small helpers the t/*.t files share.  Those that read the database take
# pg=None: the PgCluster created last (as api() and ws_connect() take the
# Nginx created last).

def _pg(pg):
    pg = pg or (_clusters[-1] if _clusters else None)
    if pg is None:
        raise RuntimeError("no PgCluster created")
    return pg


def session_pid(c):
    """The pid of the nginx worker that holds a ChatClient's session, from
    its hello reply (session_id "<pid>-..."); None without a good hello."""
    try:
        return int(c.hello["result"]["session_id"].split("-")[0])
    except (TypeError, KeyError, ValueError, IndexError, AttributeError):
        return None


def gseq(cursor):
    """The gseq of a cursor (PROTOCOL 8: "<epoch>.<gseq>"), None if it is
    not one."""
    try:
        return int(str(cursor).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return None


async def until(pred, timeout=20.0, interval=0.05):
    """wait_for() for coroutines: polls pred() every `interval` s (the event
    loop runs meanwhile) until it returns something true, for at most
    `timeout` s.  Returns True then, else bool(pred()) asked once more at
    the end (so with a timeout <= 0 it just asks once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


def conv_events(msgs, conv=None, kind="message.new", cmid=None, whole=False):
    """The events of `kind` among msgs -- a ChatClient (its messages) or a
    list of received messages -- in the order received; only those of
    conversation `conv` and of the message with client_msg_id `cmid` when
    given.  The event objects ({"kind", "conversation_id", "seq", "message",
    ...}), or with whole=True the whole messages ({"type": "event",
    "cursor", "event"})."""
    if isinstance(msgs, ChatClient):
        msgs = msgs.messages
    out = []
    for m in msgs:
        e = m.get("event") if m.get("type") == "event" else None
        if not isinstance(e, dict) or e.get("kind") != kind:
            continue
        if conv is not None and e.get("conversation_id") != conv:
            continue
        if cmid is not None and e.get("message", {}).get("client_msg_id") != cmid:
            continue
        out.append(m if whole else e)
    return out


def stream_ok(name, events, want, fmt="%s: all %d messages, each once, in seq order"):
    """ok() that `events` (whole event messages as conv_events(...,
    whole=True) gives them, as received) carry exactly the messages `want`
    -- [(seq, message id, ...), ...] as db_messages() gives them -- each
    once, in seq order.  The test's name is fmt % (name, len(want)); on a
    mismatch diag() tells the duplicated and missing seqs."""
    got = [(e["event"]["seq"], e["event"]["message"]["id"]) for e in events]
    want = [(w[0], w[1]) for w in want]
    if got == want:
        return ok(True, fmt % (name, len(want)))
    seqs = [s for s, _ in got]
    dups = sorted({s for s in seqs if seqs.count(s) > 1})
    missing = sorted(set(s for s, _ in want) - set(seqs))
    ok(False, fmt % (name, len(want)))
    diag("  got %d events (seq %s..%s); duplicated seqs %s; missing seqs %s (%d); out of order: %s"
         % (len(got), seqs[:1], seqs[-1:], dups[:10], missing[:10], len(missing),
            seqs != sorted(seqs)))
    return False


_ping_ids = {"n": 0}


async def ws_ping(c, timeout=5):
    """Sends a ping with a fresh id over a ChatClient; returns the matching
    pong, or None after `timeout` s."""
    _ping_ids["n"] += 1
    rid = "ping-%d" % _ping_ids["n"]
    await c.send({"type": "ping", "id": rid})
    return await c.wait_event(lambda m: m.get("type") == "pong" and m.get("id") == rid, timeout)


async def request_or_none(c, type, timeout=10, **fields):
    """c.request(type, timeout, **fields): the reply, or None on a timeout
    or a close -- also when the connection turns out closed as the request
    goes out (then once the close is complete, waiting up to 5 s for it)."""
    try:
        return await c.request(type, timeout=timeout, **fields)
    except Exception:  # noqa: BLE001 -- closed before the frame went out
        await c.wait_closed(5)
        return None


async def ws_connect_on(user, want_pid=None, cursor=None, nginx=None, tries=100, timeout=15,
                        retry_delay=0.2, **kw):
    """A ChatClient of `user` (hello with token(user), and `cursor` if
    given) whose hello succeeded -- on the worker with pid want_pid if
    given: a session that lands on the other worker is closed and the
    connect repeated, up to `tries` connections.  For `timeout` s a failed
    handshake (a worker that died or is not up), a connection closed before
    the hello reply and a hello answered `unavailable` (the store not ready
    or away) are retried every `retry_delay` s; then, and at once for any
    other failed hello, it raises RuntimeError.  Extra kw go to
    ws_connect() (e.g. max_size)."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        try:
            c = await ws_connect(nginx=nginx, token=token(user), cursor=cursor, **kw)
        except Exception as e:  # noqa: BLE001 -- a worker died under the handshake
            if time.monotonic() > deadline:
                raise RuntimeError("cannot connect: %r" % (e,))
            await asyncio.sleep(retry_delay)
            continue
        h = c.hello or {}
        if h.get("ok"):
            if want_pid is None or session_pid(c) == want_pid:
                return c
            if n >= tries:
                raise RuntimeError("no connection landed on worker %s" % want_pid)
        elif c.closed or (h.get("error") or {}).get("code") == "unavailable":
            if time.monotonic() > deadline:
                raise RuntimeError("hello failed: %r" % (h,))
            await asyncio.sleep(retry_delay)
        else:
            raise RuntimeError("hello failed: %r" % (h,))
        await c.close()


async def ws_spread(user, pids, per_worker=1, extra=0, **claims):
    """Connections of `user` (token(user, **claims)): per_worker sessions on
    each worker in `pids` (by session_pid()) plus `extra` anywhere, from at
    most 400 connects; surplus connections are closed again.  Returns them
    worker by worker in the order of pids, the extra ones last.  Raises
    RuntimeError when a hello fails."""
    keep = {p: [] for p in pids}
    more = []
    tok = token(user, **claims)
    for _ in range(400):
        if all(len(v) >= per_worker for v in keep.values()) and len(more) >= extra:
            break
        c = await ws_connect(token=tok)
        if not (c.hello and c.hello.get("ok")):
            raise RuntimeError("hello failed for %s: %r" % (user, c.hello))
        pid = session_pid(c)
        if pid in keep and len(keep[pid]) < per_worker:
            keep[pid].append(c)
        elif len(more) < extra:
            more.append(c)
        else:
            await c.close()
    return [c for p in pids for c in keep[p]] + more


def rest_create_conv(creator, kind, members, statuses=(200, 201), nginx=None, **fields):
    """Creates a conversation over REST (POST /chat/api/conversations with
    {kind, members, **fields}, e.g. title=) as user `creator`; returns its
    id.  Raises RuntimeError unless the answer's status is in `statuses`
    (201 new; 200 an existing direct conversation)."""
    body = {"kind": kind, "members": members}
    body.update(fields)
    st, _, b = api("POST", "/chat/api/conversations", token=token(creator), json=body,
                   nginx=nginx)
    if st not in statuses:
        raise RuntimeError("create %s by %s: %s %r" % (kind, creator, st, b))
    return b["conversation"]["id"]


def db_create_conv(creator, members, title, kind="group", pg=None):
    """Creates a conversation with the schema's own chat_create_conversation()
    (a fixture: needs no nginx); returns its id as a string."""
    rows = _pg(pg).query("SELECT o_conv FROM chat_create_conversation(%s, %s, %s, %s, NULL)",
                         creator, kind, list(members), title)
    return str(rows[0][0])


def db_messages(conv, columns=("seq", "id", "sender", "client_msg_id"), pg=None):
    """The rows of chat_messages of conversation `conv` in seq order: tuples
    of `columns` (id as text, as the protocol carries it)."""
    cols = ", ".join("id::text" if c == "id" else c for c in columns)
    return _pg(pg).query("SELECT %s FROM chat_messages WHERE conversation_id = %%s ORDER BY seq"
                         % cols, int(conv))


def by_sender_cmid(rows):
    """{(sender, client_msg_id): [message id, ...]} of db_messages() rows
    with the default columns: more than one id under a key is a duplicate."""
    out = {}
    for _, mid, snd, cmid in rows:
        out.setdefault((snd, cmid), []).append(mid)
    return out


def db_lock(sql, *params, pg=None):
    """Runs `sql` (a SELECT ... FOR UPDATE) in a transaction that it leaves
    open, holding its row locks; returns the psycopg2 connection --
    rollback() and close() it to release them."""
    lk = _pg(pg).conn(autocommit=False)
    with lk.cursor() as cur:
        cur.execute(sql, params or None)
        cur.fetchall()
    return lk


def _tcp_inode(local_port, remote_port):
    """The socket inode of the established 127.0.0.1 TCP connection whose
    local port is local_port and remote port remote_port (/proc/net/tcp),
    or None."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        try:
            lp = int(f[1].rsplit(":", 1)[1], 16)
            rp = int(f[2].rsplit(":", 1)[1], 16)
        except (IndexError, ValueError):
            continue
        if lp == local_port and rp == remote_port and f[3] == "01" and f[9] != "0":
            return f[9]
    return None


def worker_of(c, nginx=None):
    """The pid of the nginx worker that accepted a ChatClient's TCP
    connection (read from /proc: the worker holding the server side's
    socket), or None -- known right after the upgrade, before any hello."""
    try:
        cport = c.ws.transport.get_extra_info("sockname")[1]
    except (AttributeError, IndexError, TypeError):
        return None
    return worker_of_port(cport, nginx)


def worker_of_port(cport, nginx=None):
    """The pid of the nginx worker holding the server side of the TCP
    connection whose client side has local port cport, or None."""
    n = _nginx(nginx)
    inode = _tcp_inode(n.port, cport)
    if inode is None:
        return None
    want = "socket:[%s]" % inode
    for pid in n.worker_pids():
        d = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(d)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(d, fd)) == want:
                    return pid
            except OSError:
                pass
    return None


async def ws_open_on(want_pid, nginx=None, tries=200, **kw):
    """A ChatClient connected to the worker with pid want_pid and not
    joined yet (no hello sent; kw go to ws_connect(), e.g. path=, but no
    credentials on the upgrade, which would join it): upgrades another
    worker accepted are closed before any hello and repeated, up to `tries`
    connections; then it raises RuntimeError.  For sessions whose joining
    has side effects (presence, device replacement, per-user caps) that
    ws_connect_on()'s hello on the wrong worker would cause."""
    kw.setdefault("hello", False)
    for _ in range(tries):
        c = await ws_connect(nginx=nginx, **kw)
        if worker_of(c, nginx) == want_pid:
            return c
        await c.close()
    raise RuntimeError("no connection landed on worker %s in %d tries" % (want_pid, tries))


async def ws_join_on(user, want_pid=None, nginx=None, check=True, tries=200, **fields):
    """A ChatClient of `user` on the worker with pid want_pid (any worker
    when None) that sent hello with token(user) and `fields` (cursor=,
    device_id=, ...) only once it is there (ws_open_on()); the reply is in
    client.hello.  With check, a hello that is not ok raises RuntimeError."""
    if want_pid is None:
        c = await ws_connect(nginx=nginx, hello=False)
    else:
        c = await ws_open_on(want_pid, nginx=nginx, tries=tries)
    c.hello = await c.request("hello", token=token(user), **fields)
    if check and not (c.hello and c.hello.get("ok")):
        await c.close()
        raise RuntimeError("hello of %s failed: %r" % (user, c.hello))
    return c


# ------------------------------------------------- SSE and long-poll ----

async def _http_head(reader):
    """Reads a status line and headers: (status, {lowercase name: value})."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before the status line")
    status = int(line.split()[1])
    hdrs = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs


async def _http_body_each(reader, hdrs, fn):
    """Calls fn(bytes) with the body's bytes as they come: chunked, by
    length, or to the close."""
    if "chunked" in hdrs.get("transfer-encoding", ""):
        while True:
            line = await reader.readline()
            if not line:
                return
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            fn(data)
    elif "content-length" in hdrs:
        left = int(hdrs["content-length"])
        while left:
            data = await reader.read(min(left, 65536))
            if not data:
                return
            left -= len(data)
            fn(data)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            fn(data)


def _query(path, **args):
    import urllib.parse
    q = {k: v for k, v in args.items() if v is not None}
    if not q:
        return path
    return path + ("&" if "?" in path else "?") + urllib.parse.urlencode(q)


async def ahttp(method, path, token=None, headers=None, body=None, nginx=None, timeout=30):
    """One HTTP/1.1 request over asyncio (the event loop runs while it is
    held, unlike api()).  Returns (status, headers, body): body parsed as
    JSON when the response says application/json."""
    n = _nginx(nginx)
    reader, writer = await asyncio.open_connection("127.0.0.1", n.port)
    try:
        h = {"Host": "localhost", "Connection": "close"}
        if token:
            h["Authorization"] = "Bearer " + token
        if body is not None and not isinstance(body, (bytes, str)):
            body = _json.dumps(body)
            h["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode()
        if body is not None:
            h["Content-Length"] = str(len(body))
        h.update(headers or {})
        req = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        writer.write(req.encode() + (body or b""))

        async def go():
            status, hdrs = await _http_head(reader)
            parts = []
            await _http_body_each(reader, hdrs, parts.append)
            return status, hdrs, b"".join(parts)
        status, hdrs, data = await asyncio.wait_for(go(), timeout)
        if "json" in hdrs.get("content-type", ""):
            try:
                data = _json.loads(data)
            except ValueError:
                pass
        return status, hdrs, data
    finally:
        writer.close()


async def poll(user=None, cursor=None, timeout_ms=None, token_=None, nginx=None, timeout=60, **args):
    """GET /chat/poll as `user` (Bearer token(user), or token_):
    (status, headers, body)."""
    path = _query("/chat/poll", cursor=cursor, timeout_ms=timeout_ms, **args)
    return await ahttp("GET", path, token=token_ or (token(user) if user else None),
                       nginx=nginx, timeout=timeout)


class SSEClient:
    """An EventSource-like reader of GET /chat/events over asyncio.

    status, headers: the response's.  records: every dispatched SSE event as
    {"id", "event", "data"} (data parsed as JSON when it parses); messages:
    the data objects, as a ChatClient's messages (conv_events() reads
    them); hello: the welcome's data; comments: heartbeat comments seen;
    retry: the last "retry:" value; last_id: as an EventSource keeps it;
    closed once the server ended the stream."""

    def __init__(self):
        self.records, self.messages = [], []
        self.hello = None
        self.comments = 0
        self.retry = None
        self.last_id = None
        self.closed = False
        self.status = None
        self.headers = {}
        self.body = b""
        self._changed = asyncio.Event()
        self._reader = None
        self._writer = None
        self._task = None

    async def open(self, path="/chat/events", token=None, ticket=None, cursor=None,
                   last_event_id=None, headers=None, nginx=None, **args):
        n = _nginx(nginx)
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", n.port)
        h = {"Host": "localhost", "Accept": "text/event-stream"}
        if token:
            h["Authorization"] = "Bearer " + token
        if last_event_id:
            h["Last-Event-ID"] = last_event_id
        h.update(headers or {})
        path = _query(path, ticket=ticket, cursor=cursor, **args)
        req = "GET %s HTTP/1.1\r\n" % path + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        self._writer.write(req.encode())
        self.status, self.headers = await asyncio.wait_for(_http_head(self._reader), 10)
        self._task = asyncio.ensure_future(self._read())
        return self

    def pid(self):
        try:
            return int(self.hello["session_id"].split("-")[0])
        except (TypeError, KeyError, ValueError, IndexError, AttributeError):
            return None

    def _feed(self, chunk):
        self.body += chunk
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.rstrip(b"\r").decode("utf-8")
            if line == "":
                if self._data:
                    self._dispatch(self._fields, "\n".join(self._data))
                self._fields, self._data = {}, []
                continue
            if line.startswith(":"):
                self.comments += 1
                self._changed.set()
                continue
            k, _, v = line.partition(":")
            v = v[1:] if v.startswith(" ") else v
            if k == "data":
                self._data.append(v)
            elif k == "retry":
                self.retry = int(v)
            elif k in ("id", "event"):
                self._fields[k] = v
                if k == "id":
                    self.last_id = v

    async def _read(self):
        self._buf, self._fields, self._data = b"", {}, []
        try:
            await _http_body_each(self._reader, self.headers, self._feed)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            self._changed.set()

    def _dispatch(self, fields, data):
        try:
            obj = _json.loads(data)
        except ValueError:
            obj = data
        rec = {"id": fields.get("id"), "event": fields.get("event", "message"), "data": obj}
        self.records.append(rec)
        if isinstance(obj, dict):
            self.messages.append(obj)
            if obj.get("type") == "welcome":
                self.hello = obj
        self._changed.set()

    async def wait(self, pred, timeout=10):
        """Waits until pred(self) is true; returns it (False on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            if pred(self):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (self.closed and not pred(self)):
                return bool(pred(self))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_closed(self, timeout=10):
        return await self.wait(lambda s: s.closed, timeout)

    def abort(self):
        """Drops the TCP connection (a client that goes away)."""
        if self._writer:
            self._writer.transport.abort()

    async def close(self):
        self.abort()
        if self._task:
            try:
                await asyncio.wait_for(self._task, 5)
            except Exception:
                self._task.cancel()


async def sse_connect(user=None, token_=None, nginx=None, welcome=True, **kw):
    """An SSEClient of `user` (Bearer token(user)); waits for the welcome
    when welcome=True."""
    c = await SSEClient().open(token=token_ or (token(user) if user else None), nginx=nginx, **kw)
    if welcome and c.status == 200:
        await c.wait(lambda s: s.hello is not None or s.closed, 15)
    return c


async def sse_connect_on(user, want_pid, tries=100, **kw):
    """An SSEClient of `user` whose session is on worker want_pid."""
    for _ in range(tries):
        c = await sse_connect(user, **kw)
        if c.pid() == want_pid:
            return c
        await c.close()
    raise RuntimeError("no SSE stream landed on worker %s" % want_pid)


class PollRequest:
    """A GET /chat/poll in flight: start() sends it; pid() is the worker
    holding it; result() waits for (status, headers, body); abort() drops
    the connection (a client that goes away)."""

    async def start(self, user=None, cursor=None, timeout_ms=None, token_=None, nginx=None,
                    headers=None, **args):
        n = _nginx(nginx)
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", n.port)
        self.port = self._writer.get_extra_info("sockname")[1]
        self.nginx = n
        h = {"Host": "localhost"}
        t = token_ or (token(user) if user else None)
        if t:
            h["Authorization"] = "Bearer " + t
        h.update(headers or {})
        path = _query("/chat/poll", cursor=cursor, timeout_ms=timeout_ms, **args)
        req = "GET %s HTTP/1.1\r\n" % path + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        self._writer.write(req.encode())
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        status, hdrs = await _http_head(self._reader)
        parts = []
        await _http_body_each(self._reader, hdrs, parts.append)
        data = b"".join(parts)
        if "json" in hdrs.get("content-type", ""):
            try:
                data = _json.loads(data)
            except ValueError:
                pass
        self._writer.close()
        return status, hdrs, data

    def pid(self):
        return worker_of_port(self.port, self.nginx)

    async def result(self, timeout=60):
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    def abort(self):
        self._writer.transport.abort()
        self.task.cancel()
