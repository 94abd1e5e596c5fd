#!/usr/bin/env bash
# bench/run.sh — build chatbench, start each server, run the same scenarios
# at the same rates and sizes against each, repeat, aggregate, plot.
#
#   bench/run.sh [--quick] [--reps N] [--modes chat,nchan,socketio]
#                [--scenarios idle,connect-storm,dm,group,mixed]
#                [--out DIR] [--with-mock]
#
# Only loopback addresses are used. Every wait below is bounded; every
# chatbench run stops by itself and is also wrapped in timeout(1).
#
# Our module (mode "chat") is started through a hook: see start_chat().

set -u
set -o pipefail

BENCH="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH/.." && pwd)"
BIN="$BENCH/build/chatbench"

QUICK=0
REPS=""
MODES="chat,nchan,socketio"
SCENARIOS="idle,connect-storm,dm,group,mixed"
OUT=""
WITH_MOCK=0

while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --reps) REPS="$2"; shift ;;
    --modes) MODES="$2"; shift ;;
    --scenarios) SCENARIOS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --with-mock) WITH_MOCK=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
    esac
    shift
done

if [ "$WITH_MOCK" = 1 ]; then
    MODES="$MODES,mock"
fi

# ---- parameters: identical for every server ----
# CPU 0: the server under test (and PostgreSQL for ours); CPU 1: generator.
SERVER_CPUS="${SERVER_CPUS:-0}"
GEN_CPUS="${GEN_CPUS:-1}"
SERVER_WORKERS="${SERVER_WORKERS:-1}"      # nginx workers (ours and Nchan)
SRC="${SRC:-127.0.0.2-9}"                  # client source addresses
SIZES="64 1024"

if [ "$QUICK" = 1 ]; then
    REPS="${REPS:-1}"
    IDLE_CONNS=1000;  STORM_CONNS=1000; STORM_RATE=1000
    DM_CONNS=200;     DM_RATE=500
    GROUP_CONNS=200;  GROUP_K=10;       GROUP_RATE=200
    MIXED_CONNS=200;  MIXED_RATE=300
    DURATION=3; WARMUP=1; DRAIN=2; HOLD=2
else
    # every value can be overridden from the environment; the defaults fit
    # one server process (Socket.IO is one Node process: < 20,000 files;
    # conf.example has worker_connections 16384)
    REPS="${REPS:-3}"
    IDLE_CONNS="${IDLE_CONNS:-15000}"
    STORM_CONNS="${STORM_CONNS:-10000}"; STORM_RATE="${STORM_RATE:-2000}"
    DM_CONNS="${DM_CONNS:-10000}";       DM_RATE="${DM_RATE:-5000}"
    GROUP_CONNS="${GROUP_CONNS:-10000}"; GROUP_K="${GROUP_K:-50}"
    GROUP_RATE="${GROUP_RATE:-500}"
    MIXED_CONNS="${MIXED_CONNS:-10000}"; MIXED_RATE="${MIXED_RATE:-3000}"
    DURATION="${DURATION:-20}"; WARMUP="${WARMUP:-3}"; DRAIN="${DRAIN:-5}"
    HOLD="${HOLD:-10}"
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
# OUT: the summary (summary.md/csv/json, plots, runs.csv, params) to keep;
# RAW: per-run JSON/hgrm, logs and server state (git-ignored)
OUT="${OUT:-$BENCH/results/$STAMP}"
if [ -z "${RAW:-}" ]; then
    case "$OUT" in
    "$BENCH"/results/*) RAW="$BENCH/results/raw/$(basename "$OUT")" ;;
    *) RAW="$OUT/raw" ;;
    esac
fi
mkdir -p "$OUT" "$RAW/logs"
RUN_DIR="$RAW/servers"
mkdir -p "$RUN_DIR"

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/run.log"; }

# ---- dependencies ----
ensure_deps() {
    log "building chatbench"
    make -C "$BENCH" -s all || { log "build failed"; exit 1; }
    make -C "$BENCH" -s test > "$RAW/logs/unit_test.log" 2>&1 \
        || { log "unit tests failed: $RAW/logs/unit_test.log"; exit 1; }

    if ! command -v gnuplot > /dev/null 2>&1; then
        log "installing gnuplot-nox (Debian)"
        (apt-get install -y -q gnuplot-nox > "$RAW/logs/apt.log" 2>&1 \
         || { apt-get update -q >> "$RAW/logs/apt.log" 2>&1 \
              && apt-get install -y -q gnuplot-nox >> "$RAW/logs/apt.log" 2>&1; }) \
         || log "gnuplot not available: no plots"
    fi

    if [ ! -d "$BENCH/peers/socketio/node_modules/socket.io" ]; then
        log "npm ci in peers/socketio"
        (cd "$BENCH/peers/socketio" && npm ci --no-audit --no-fund) \
            > "$RAW/logs/npm-socketio.log" 2>&1 || log "npm ci failed"
    fi

    if [ "$WITH_MOCK" = 1 ] && [ ! -d "$BENCH/peers/mockchat/node_modules/ws" ]; then
        (cd "$BENCH/peers/mockchat" && npm ci --no-audit --no-fund) \
            > "$RAW/logs/npm-mockchat.log" 2>&1 || log "npm ci failed"
    fi
}

# ---- kernel knobs for many loopback connections (root; best effort) ----
tune_kernel() {
    local f
    {
        for f in net.ipv4.ip_local_port_range net.core.somaxconn \
                 net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_tw_reuse; do
            echo "$f = $(sysctl -n $f 2>/dev/null)"
        done
    } > "$RAW/sysctl-before.txt"
    sysctl -q -w net.ipv4.ip_local_port_range="1024 65000" 2>/dev/null
    sysctl -q -w net.core.somaxconn=8192 2>/dev/null
    sysctl -q -w net.ipv4.tcp_max_syn_backlog=8192 2>/dev/null
    sysctl -q -w net.ipv4.tcp_tw_reuse=1 2>/dev/null
    true
}

# ---- process helpers (bounded) ----
wait_port() {       # port, seconds
    local i
    for i in $(seq 1 $(( $2 * 10 ))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

stop_pid() {        # pid: TERM, wait up to 5 s, then KILL
    local pid="$1" i
    [ -n "$pid" ] || return 0
    kill "$pid" 2> /dev/null || return 0
    for i in $(seq 1 50); do
        kill -0 "$pid" 2> /dev/null || return 0
        [ "$(ps -o stat= -p "$pid" 2> /dev/null | cut -c1)" = Z ] && return 0
        sleep 0.1
    done
    kill -9 "$pid" 2> /dev/null
    return 0
}

SERVER_PID=""
SERVER_PORT=""
GEN_EXTRA=()

# ---- servers ----

# ==== HOOK: ngx_chat_module ============================================
# Default: the repository's own stack (scripts/run.sh, what `make run` uses:
# PostgreSQL + Debian nginx with build/dyn/ngx_chat_module.so, out of var/),
# with conf.example adapted for the benchmark: $SERVER_WORKERS workers
# pinned to $SERVER_CPUS (as Nchan), access_log off, error_log warn,
# reuseport; PostgreSQL pinned to $SERVER_CPUS too. The generator signs
# with var/jwt_secret. Ports: CHAT_PORT (8090), CHAT_PGPORT (5440).
# The module must be built first (make build); run.sh does not build it.
# Overrides:
#   CHAT_START_CMD / CHAT_STOP_CMD: start/stop it your way; the command
#     gets CHAT_PORT, SECRET_FILE, SERVER_WORKERS, SERVER_CPUS and must
#     write the nginx master pid to $CHAT_PID_FILE.
#   CHAT_EXTERNAL=1 with CHAT_PORT, CHAT_SECRET_FILE, CHAT_PID_FILE: a
#     server that is already running.
CHAT_PORT="${CHAT_PORT:-8090}"
CHAT_PGPORT="${CHAT_PGPORT:-5440}"

chat_template() {   # conf.example -> benchmark template (same directives)
    local aff="$1"
    sed -E -e "s/^([[:space:]]*worker_processes)[[:space:]]+[^;]+;/\1 $SERVER_WORKERS; worker_cpu_affinity $aff;/" \
        -e "s/^([[:space:]]*access_log)[[:space:]]+[^;]+;/\1 off;/" \
        -e "s/^([[:space:]]*error_log[[:space:]]+[^;[:space:]]+)[[:space:]]+[a-z]+;/\1 warn;/" \
        -e "s/^([[:space:]]*listen[[:space:]]+(@HTTP_LISTEN@|127\.0\.0\.1:@HTTP_PORT@))([[:space:]]+reuseport)?[[:space:]]*;/\1 backlog=4096 reuseport;/" \
        "$REPO/conf.example"
}

start_chat() {
    CHAT_PID_FILE="${CHAT_PID_FILE:-$RUN_DIR/chat/nginx.pid}"
    export CHAT_PORT CHAT_PID_FILE SECRET_FILE SERVER_WORKERS SERVER_CPUS
    mkdir -p "$RUN_DIR/chat"
    CHAT_SECRET="$SECRET_FILE"

    if [ "${CHAT_EXTERNAL:-0}" = 1 ]; then
        CHAT_SECRET="${CHAT_SECRET_FILE:-$SECRET_FILE}"

    elif [ -n "${CHAT_START_CMD:-}" ]; then
        bash -c "$CHAT_START_CMD" > "$RAW/logs/chat-server.log" 2>&1 || {
            log "chat server failed to start: $RAW/logs/chat-server.log"
            return 1
        }

    else
        if [ ! -f "$REPO/build/dyn/ngx_chat_module.so" ] \
           || [ ! -f "$REPO/scripts/run.sh" ]; then
            log "SKIP chat: build/dyn/ngx_chat_module.so not built (make build)"
            return 1
        fi
        if [ -f "$REPO/var/run/nginx.pid" ] \
           && kill -0 "$(cat "$REPO/var/run/nginx.pid")" 2> /dev/null \
           && [ "${CHAT_TAKEOVER:-0}" != 1 ]; then
            log "SKIP chat: a \`make run\` stack is up in var/ (stop it, or" \
                "CHAT_TAKEOVER=1 to let run.sh reconfigure and stop it)"
            return 1
        fi
        chat_template "$(affinity_masks)" > "$RUN_DIR/chat/conf.template"
        HTTP_PORT="$CHAT_PORT" PGPORT="$CHAT_PGPORT" \
        DEMO_PORT="$(( CHAT_PORT + 9 ))" \
        CONF_TEMPLATE="$RUN_DIR/chat/conf.template" \
            bash "$REPO/scripts/run.sh" start \
            >> "$RAW/logs/chat-server.log" 2>&1 || {
            log "chat stack failed to start: $RAW/logs/chat-server.log"
            return 1
        }
        cp "$REPO/var/run/nginx.pid" "$CHAT_PID_FILE" 2> /dev/null
        CHAT_SECRET="$REPO/var/jwt_secret"
        # PostgreSQL works for the server under test: same CPUs
        local pm
        pm="$(head -1 "$REPO/var/pg/postmaster.pid" 2> /dev/null)"
        if [ -n "$pm" ]; then
            for p in $pm $(pgrep -P "$pm"); do
                taskset -a -p -c "$SERVER_CPUS" "$p" > /dev/null 2>&1
            done
        fi
    fi

    wait_port "$CHAT_PORT" 20 || { log "chat server not listening"; return 1; }
    SERVER_PID="$(cat "$CHAT_PID_FILE" 2> /dev/null)"
    SERVER_PORT="$CHAT_PORT"
    GEN_EXTRA=(--secret-file "$CHAT_SECRET")
    return 0
}

stop_chat() {
    if [ "${CHAT_EXTERNAL:-0}" = 1 ]; then
        return 0
    fi
    if [ -n "${CHAT_START_CMD:-}" ]; then
        if [ -n "${CHAT_STOP_CMD:-}" ]; then
            bash -c "$CHAT_STOP_CMD" >> "$RAW/logs/chat-server.log" 2>&1
        fi
        stop_pid "$SERVER_PID"
        return 0
    fi
    HTTP_PORT="$CHAT_PORT" PGPORT="$CHAT_PGPORT" \
        bash "$REPO/scripts/run.sh" stop >> "$RAW/logs/chat-server.log" 2>&1
}
# ==== end of the ngx_chat_module hook ==================================

# worker_cpu_affinity masks: every worker on the first CPU of SERVER_CPUS
# when SERVER_WORKERS > number of listed CPUs, else one CPU each
affinity_masks() {
    local cpus=() c m out="" i
    IFS=, read -r -a cpus <<< "$SERVER_CPUS"
    for i in $(seq 0 $(( SERVER_WORKERS - 1 ))); do
        c="${cpus[$(( i % ${#cpus[@]} ))]}"
        m=1
        [ "$c" -gt 0 ] && m="1$(printf '%0*d' "$c" 0)"
        out="$out $m"
    done
    echo "${out# }"
}

start_nchan() {
    local p="$RUN_DIR/nchan"
    mkdir -p "$p/tmp"
    sed -e "s#@PREFIX@#$p#g" -e "s#@PORT@#8091#g" \
        -e "s#@WORKERS@#$SERVER_WORKERS#g" \
        -e "s#@AFFINITY@#$(affinity_masks)#g" \
        "$BENCH/peers/nchan/nginx.conf.in" > "$p/nginx.conf"
    /usr/sbin/nginx -p "$p" -c "$p/nginx.conf" -e "$p/error.log" \
        > "$RAW/logs/nchan-server.log" 2>&1 || {
        log "nchan failed to start: $RAW/logs/nchan-server.log"; return 1; }
    wait_port 8091 10 || { log "nchan not listening"; return 1; }
    SERVER_PID="$(cat "$p/nginx.pid")"
    SERVER_PORT=8091
    GEN_EXTRA=()
}

stop_nchan() {
    stop_pid "$SERVER_PID"
}

start_socketio() {
    (cd "$BENCH/peers/socketio" \
     && exec env PORT=8092 HOST=127.0.0.1 SECRET_FILE="$SECRET_FILE" \
        taskset -c "$SERVER_CPUS" node server.js) \
        > "$RAW/logs/socketio-server.log" 2>&1 &
    SERVER_PID=$!
    wait_port 8092 15 || { log "socketio not listening"; return 1; }
    SERVER_PORT=8092
    GEN_EXTRA=(--secret-file "$SECRET_FILE")
}

stop_socketio() {
    stop_pid "$SERVER_PID"
}

# mock: chat.v1 against the in-memory Node stand-in (tests this script and
# the chat mode only; NOT a result about ngx_chat_module)
start_mock() {
    (cd "$BENCH/peers/mockchat" \
     && exec env PORT=8093 SECRET_FILE="$SECRET_FILE" \
        taskset -c "$SERVER_CPUS" node server.js) \
        > "$RAW/logs/mock-server.log" 2>&1 &
    SERVER_PID=$!
    wait_port 8093 15 || { log "mockchat not listening"; return 1; }
    SERVER_PORT=8093
    GEN_EXTRA=(--secret-file "$SECRET_FILE")
}

stop_mock() {
    stop_pid "$SERVER_PID"
}

cleanup() {
    if [ -n "${CURRENT_MODE:-}" ]; then
        "stop_${CURRENT_MODE}" 2> /dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- one measurement ----
run_one() {         # mode scenario size rep
    local mode="$1" sc="$2" size="$3" rep="$4" genmode conns rate extra=()
    local tag="$mode.$sc.$size.r$rep" limit rc

    genmode="$mode"
    [ "$mode" = mock ] && genmode=chat

    case "$sc" in
    idle) conns=$IDLE_CONNS; rate=0; extra=(--hold "$HOLD") ;;
    connect-storm) conns=$STORM_CONNS; rate=0
        extra=(--connect-rate "$STORM_RATE" --hold 1) ;;
    dm) conns=$DM_CONNS; rate=$DM_RATE ;;
    group) conns=$GROUP_CONNS; rate=$GROUP_RATE
        extra=(--group-size "$GROUP_K") ;;
    mixed) conns=$MIXED_CONNS; rate=$MIXED_RATE
        extra=(--group-size "$GROUP_K") ;;
    esac

    # <= 19000 connections per generator process
    local workers=$(( (conns + 17999) / 18000 ))

    limit=$(( DURATION + WARMUP + DRAIN + HOLD + conns / 500 + 120 ))

    log "run $tag: conns=$conns rate=$rate"
    timeout "$limit" "$BIN" --mode "$genmode" --scenario "$sc" \
        --port "$SERVER_PORT" --conns "$conns" --workers "$workers" \
        --src "$SRC" --pin "$GEN_CPUS" --rate "$rate" --size "$size" \
        --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" \
        --server-ppid "$SERVER_PID" --out "$RAW" --tag "$tag" \
        "${GEN_EXTRA[@]}" "${extra[@]}" \
        > "$RAW/logs/$tag.txt" 2>&1
    rc=$?
    grep -E 'result|latency e2e|integrity|connect |server rss' \
        "$RAW/logs/$tag.txt" | sed 's/^/    /' | tee -a "$OUT/run.log"
    [ $rc = 0 ] || log "run $tag exited $rc (see $RAW/logs/$tag.txt)"
    sleep 1
}

# ---- main ----
ensure_deps
tune_kernel

SECRET_FILE="$RAW/secret"
if [ ! -f "$SECRET_FILE" ]; then
    head -c 32 /dev/urandom | base64 | tr -d '\n=' > "$SECRET_FILE"
    echo >> "$SECRET_FILE"
fi
export SECRET_FILE

{
    echo "stamp=$STAMP quick=$QUICK reps=$REPS"
    echo "modes=$MODES scenarios=$SCENARIOS sizes=$SIZES"
    echo "server_cpus=$SERVER_CPUS gen_cpus=$GEN_CPUS server_workers=$SERVER_WORKERS"
    echo "idle=$IDLE_CONNS storm=$STORM_CONNS@$STORM_RATE/s"
    echo "dm=$DM_CONNS@$DM_RATE/s group=$GROUP_CONNS(k=$GROUP_K)@$GROUP_RATE/s"
    echo "mixed=$MIXED_CONNS@$MIXED_RATE/s duration=$DURATION warmup=$WARMUP"
    echo "kernel=$(uname -r) nginx=$(/usr/sbin/nginx -v 2>&1 | cut -d/ -f2)"
    echo "node=$(node --version 2>/dev/null) nproc=$(nproc)"
    echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
} > "$OUT/params.txt"

log "results in $OUT"

for mode in ${MODES//,/ }; do
    CURRENT_MODE=""
    case "$mode" in
    chat|nchan|socketio|mock) ;;
    *) log "unknown mode $mode"; continue ;;
    esac

    for sc in ${SCENARIOS//,/ }; do
        if [ "$sc" = mixed ] && [ "$mode" = nchan ]; then
            log "skip nchan.mixed: one channel per WebSocket"
            continue
        fi

        case "$sc" in
        idle|connect-storm) sizes=64 ;;
        *) sizes="$SIZES" ;;
        esac

        for size in $sizes; do
            for rep in $(seq 1 "$REPS"); do
                # a fresh server for every run: RSS and state start equal
                if ! "start_$mode"; then
                    "stop_$mode" 2> /dev/null
                    continue 4
                fi
                CURRENT_MODE="$mode"
                run_one "$mode" "$sc" "$size" "$rep"
                "stop_$mode"
                CURRENT_MODE=""
            done
        done
    done
done

log "aggregating"
cp "$RAW/runs.csv" "$OUT/runs.csv" 2> /dev/null
python3 "$BENCH/report.py" "$RAW" "$OUT" | tee -a "$OUT/run.log"
log "done: $OUT/summary.md"
