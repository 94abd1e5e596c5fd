#!/usr/bin/env bash
# Runs the local stack out of var/: PostgreSQL (var/pg), nginx with the chat
# module (var/nginx.conf) and the demo token server (client/demo/app.py).
#
#   scripts/run.sh start     # safe to repeat; keeps data
#   scripts/run.sh stop
#   scripts/run.sh status
#
# Environment: HTTP_PORT (8080), DEMO_PORT (8081), PGPORT (5433),
# HTTP_LISTEN (127.0.0.1:$HTTP_PORT), CONF_TEMPLATE (conf.example),
# NGINX (/usr/sbin/nginx), MODULE (build/dyn/ngx_chat_module.so).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VAR=$REPO/var
PGDATA=$VAR/pg
SOCK=$VAR/run
LOGS=$VAR/logs
HTTP_PORT=${HTTP_PORT:-8080}
DEMO_PORT=${DEMO_PORT:-8081}
PGPORT=${PGPORT:-5433}
HTTP_LISTEN=${HTTP_LISTEN:-127.0.0.1:$HTTP_PORT}
NGINX=${NGINX:-/usr/sbin/nginx}
MODULE=${MODULE:-$REPO/build/dyn/ngx_chat_module.so}
TEMPLATE=${CONF_TEMPLATE:-$REPO/conf.example}
CONF=$VAR/nginx.conf
PY=/usr/bin/python3

PG_BIN=
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -r -V); do
    [ -x "$d/pg_ctl" ] && { PG_BIN=$d; break; }
done

say() { echo "run: $*"; }
die() { echo "run: $*" >&2; exit 1; }

as_pg() { (cd / && runuser -u postgres -- "$@"); }
psql_() { "$PG_BIN/psql" -X -q -h "$SOCK" -p "$PGPORT" -U postgres "$@"; }

pg_running() { [ -f "$PGDATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

alive() {   # pid cmdline-substring
    [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] &&
        tr '\0' ' ' < "/proc/$1/cmdline" | grep -q -- "$2"
}

nginx_pidfile() {
    local p
    p=$(awk '$1 == "pid" { sub(/;.*/, "", $2); print $2; exit }' "$CONF" 2>/dev/null || true)
    [ -n "$p" ] || p=run/nginx.pid
    case $p in /*) echo "$p" ;; *) echo "$VAR/$p" ;; esac
}

nginx_pid() {
    local f pid
    f=$(nginx_pidfile)
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    alive "$pid" "nginx: master" && echo "$pid"
}

wait_gone() {   # pid seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -d "/proc/$1" ] || return 0
        grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

start_pg() {
    [ -n "$PG_BIN" ] || die "PostgreSQL server binaries not found (scripts/install-deps.sh)"
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        say "initdb $PGDATA"
        rm -rf "$PGDATA"
        install -d -o postgres -g postgres -m 0700 "$PGDATA"
        as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 \
            --locale=C.UTF-8 >"$LOGS/initdb.log" 2>&1 ||
            { cat "$LOGS/initdb.log" >&2; die "initdb failed"; }
    fi
    if pg_running; then
        say "PostgreSQL already running"
    else
        say "starting PostgreSQL on 127.0.0.1:$PGPORT and $SOCK"
        touch "$LOGS/postgresql.log"
        chown postgres "$LOGS/postgresql.log"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$LOGS/postgresql.log" -w -t 60 \
            -o "-c port=$PGPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$SOCK -c unix_socket_permissions=0777 -c max_connections=200 ${PG_OPTS:-}" \
            start >/dev/null || { tail -n 20 "$LOGS/postgresql.log" >&2; die "PostgreSQL did not start"; }
    fi
    if [ "$(psql_ -d postgres -A -t -c "SELECT 1 FROM pg_database WHERE datname = 'chat'")" != 1 ]; then
        say "creating database chat"
        psql_ -d postgres -c "CREATE DATABASE chat"
    fi
    bash "$REPO/scripts/migrate.sh" -h "$SOCK" -p "$PGPORT" -U postgres -d chat
}

make_secret() {
    if [ ! -s "$VAR/jwt_secret" ]; then
        say "generating var/jwt_secret"
        (umask 027; openssl rand -hex 32 | tr -d '\n' > "$VAR/jwt_secret")
    fi
    chmod 0640 "$VAR/jwt_secret"
}

render_conf() {
    [ -f "$TEMPLATE" ] || die "$TEMPLATE not found"
    [ -f "$MODULE" ] || die "$MODULE not built (make build)"
    sed -e "s|@PREFIX@|$REPO|g" -e "s|@MODULE@|$MODULE|g" \
        -e "s|@PGSOCK@|$SOCK|g" -e "s|@PGPORT@|$PGPORT|g" \
        -e "s|@HTTP_LISTEN@|$HTTP_LISTEN|g" \
        -e "s|@HTTP_PORT@|$HTTP_PORT|g" -e "s|@DEMO_PORT@|$DEMO_PORT|g" \
        "$TEMPLATE" > "$CONF.new"
    # HTTP_LISTEN (e.g. 0.0.0.0:8080 in a container) for a template that
    # listens on 127.0.0.1:@HTTP_PORT@ rather than @HTTP_LISTEN@
    if [ "$HTTP_LISTEN" != "127.0.0.1:$HTTP_PORT" ] && ! grep -q '@HTTP_LISTEN@' "$TEMPLATE"; then
        sed -i -E "s|^([[:space:]]*listen[[:space:]]+)127\.0\.0\.1:$HTTP_PORT([ ;])|\1$HTTP_LISTEN\2|" "$CONF.new"
    fi
    # Debian's nginx defaults to /run/nginx.pid, the system nginx's file.
    if ! grep -Eq '^[[:space:]]*pid[[:space:]]' "$CONF.new"; then
        sed -i '1i pid run/nginx.pid;' "$CONF.new"
    fi
    local left
    left=$(sed 's/#.*//' "$CONF.new" | grep -o '@[A-Z_]*@' | sort -u | tr '\n' ' ' || true)
    [ -z "$left" ] || die "unknown placeholder(s) left in $CONF.new: $left"
    mv "$CONF.new" "$CONF"
}

start_nginx() {
    render_conf
    "$NGINX" -p "$VAR/" -c "$CONF" -t -q || die "nginx -t failed for $CONF"
    local pid
    if pid=$(nginx_pid); then
        say "reloading nginx (master $pid)"
        kill -HUP "$pid"
    else
        say "starting nginx on $HTTP_LISTEN"
        "$NGINX" -p "$VAR/" -c "$CONF" || die "nginx did not start (see $LOGS)"
    fi
}

stop_demo() {
    local pid
    pid=$(cat "$SOCK/demo.pid" 2>/dev/null || true)
    if alive "$pid" "client/demo/app.py"; then
        kill "$pid"
        wait_gone "$pid" 5 || kill -9 "$pid"
    fi
    rm -f "$SOCK/demo.pid"
}

start_demo() {
    stop_demo
    say "starting the demo token server on 127.0.0.1:$DEMO_PORT"
    nohup "$PY" "$REPO/client/demo/app.py" --host 127.0.0.1 --port "$DEMO_PORT" \
        --secret "$VAR/jwt_secret" --pidfile "$SOCK/demo.pid" \
        --chat-url "http://127.0.0.1:$HTTP_PORT/chat" \
        >>"$LOGS/demo.log" 2>&1 < /dev/null &
    local i
    for ((i = 0; i < 50; i++)); do
        [ -s "$SOCK/demo.pid" ] && return 0
        kill -0 $! 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOGS/demo.log" >&2
    die "the demo token server did not start"
}

start() {
    mkdir -p "$VAR" "$LOGS" "$VAR/tmp" "$VAR/tmp/body" "$VAR/files"
    # uploads: written by the workers (nobody) into tmp/body, then renamed
    # into files/ (one file system)
    chown nobody "$VAR/tmp/body" "$VAR/files"
    chmod 0755 "$VAR" "$LOGS"
    # PostgreSQL creates its socket here; nginx workers (nobody) connect to it
    install -d -o postgres -g postgres -m 0755 "$SOCK"
    runuser -u postgres -- test -x "$VAR" ||
        die "user postgres cannot reach $VAR: make the directories above it world-searchable (chmod o+x)"
    start_pg
    make_secret
    start_nginx
    start_demo
    cat <<MSG

  The chat demo is up:
    open http://127.0.0.1:$HTTP_PORT/demo/ and sign in as a client (alice, carol)
    or a freelancer (bob, dave, erin); e.g. ?user=alice in one window
    and ?user=bob in another.
  Logs: var/logs/   Stop: make stop

MSG
}

stop() {
    local pid
    if pid=$(nginx_pid); then
        say "stopping nginx (master $pid)"
        kill -QUIT "$pid"
        wait_gone "$pid" 15 || { say "nginx did not quit in 15s, terminating"; kill -TERM "$pid"; wait_gone "$pid" 5 || true; }
    fi
    stop_demo
    if pg_running; then
        say "stopping PostgreSQL"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
}

status() {
    local pid
    if pid=$(nginx_pid); then echo "nginx: running (master $pid)"; else echo "nginx: stopped"; fi
    pid=$(cat "$SOCK/demo.pid" 2>/dev/null || true)
    if alive "$pid" "client/demo/app.py"; then echo "demo: running ($pid)"; else echo "demo: stopped"; fi
    if pg_running; then echo "postgresql: running"; else echo "postgresql: stopped"; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
