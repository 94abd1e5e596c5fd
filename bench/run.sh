#!/usr/bin/env bash
# bench/run.sh — build chatbench, start each server, run the same scenarios
# at the same rates and sizes against each, repeat, aggregate, plot.
#
#   bench/run.sh [--quick] [--dry-run] [--reps N]
#                [--modes chat,nchan,socketio]
#                [--scenarios idle,connect-storm,dm,group,mixed]
#                [--out DIR] [--with-mock]
#
# Sweeps: idle over IDLE_CONNS, dm over DM_RATES, group over GROUP_SPECS
# (K:msg/s pairs); see the parameters below and bench/README.md.
# --dry-run prints the runs and an estimate of the wall time, runs nothing.
# Only loopback addresses are used. Every wait below is bounded; every
# chatbench run stops by itself and is also wrapped in timeout(1).
#
# Our module (mode "chat") is started through a hook: see start_chat().

set -u
set -o pipefail

BENCH="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH/.." && pwd)"
BIN="$BENCH/build/chatbench"
. "$BENCH/lib.sh"

QUICK=0
DRY_RUN=0
REPS=""
MODES="chat,nchan,socketio"
SCENARIOS="idle,connect-storm,dm,group,mixed"
OUT=""
WITH_MOCK=0

while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --reps) REPS="$2"; shift ;;
    --modes) MODES="$2"; shift ;;
    --scenarios) SCENARIOS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --with-mock) WITH_MOCK=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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

# Every value can be overridden from the environment, with --quick too.
# Lists are separated by spaces. Sweeps use 64 B bodies; 1 KB bodies are
# run at one point each (DM_RATE_1K, GROUP_SPEC_1K; empty: none).
#   IDLE_CONNS      idle: connection counts (memory vs connections)
#   DM_RATES        dm: msg/s, at DM_CONNS connections
#   GROUP_SPECS     group: K:msg/s pairs (K members per group; a message
#                   fans out to K connections, the sender's own included,
#                   so deliveries/s = msg/s x K) at max(GROUP_CONNS, K)
#                   connections
#   CONNECT_RATE    connects/s of every scenario but connect-storm
# DM_RATE, GROUP_K/GROUP_RATE (the single-point names) still work as the
# list's default. The full defaults are sized so that --modes
# chat,nchan,socketio with 3 repetitions takes about 50 minutes (--dry-run
# prints the estimate) and fit one server process: Socket.IO is one Node
# process (< 20,000 files) and conf.example has worker_connections 16384.
if [ "$QUICK" = 1 ]; then
    REPS="${REPS:-1}"
    IDLE_CONNS="${IDLE_CONNS:-500 1000}"
    STORM_CONNS="${STORM_CONNS:-1000}";  STORM_RATE="${STORM_RATE:-1000}"
    DM_CONNS="${DM_CONNS:-200}";         DM_RATES="${DM_RATES:-200 500}"
    DM_RATE_1K="${DM_RATE_1K-500}"
    GROUP_CONNS="${GROUP_CONNS:-200}"
    GROUP_SPECS="${GROUP_SPECS:-10:100 10:200 100:4}"
    GROUP_SPEC_1K="${GROUP_SPEC_1K-10:200}"
    MIXED_CONNS="${MIXED_CONNS:-200}";   MIXED_RATE="${MIXED_RATE:-300}"
    MIXED_K="${MIXED_K:-10}"
    DURATION="${DURATION:-3}"; WARMUP="${WARMUP:-1}"; DRAIN="${DRAIN:-2}"
    HOLD="${HOLD:-2}"
else
    REPS="${REPS:-3}"
    IDLE_CONNS="${IDLE_CONNS:-1000 5000 15000}"
    STORM_CONNS="${STORM_CONNS:-10000}"; STORM_RATE="${STORM_RATE:-5000}"
    DM_CONNS="${DM_CONNS:-10000}"
    DM_RATES="${DM_RATES:-${DM_RATE:-1000 3000 10000}}"
    DM_RATE_1K="${DM_RATE_1K-${DM_RATE:-3000}}"
    GROUP_CONNS="${GROUP_CONNS:-10000}"
    if [ -z "${GROUP_SPECS:-}" ] && [ -n "${GROUP_K:-}${GROUP_RATE:-}" ]; then
        GROUP_SPECS="${GROUP_K:-50}:${GROUP_RATE:-500}"
    fi
    read -r first _ <<< "${GROUP_SPECS:-10:1000}"   # 1 KB: the first spec
    GROUP_SPEC_1K="${GROUP_SPEC_1K-$first}"
    GROUP_SPECS="${GROUP_SPECS:-10:1000 10:4000 100:100 100:400 1000:20}"
    MIXED_CONNS="${MIXED_CONNS:-10000}"; MIXED_RATE="${MIXED_RATE:-3000}"
    MIXED_K="${MIXED_K:-${GROUP_K:-50}}"
    DURATION="${DURATION:-8}"; WARMUP="${WARMUP:-2}"; DRAIN="${DRAIN:-10}"
    HOLD="${HOLD:-3}"
fi
CONNECT_RATE="${CONNECT_RATE:-2000}"
MIXED_SIZES="64 1024"
# for the --dry-run estimate only: server start + stop per run (s), and
# chat's REST conversation set-up (conversations/s; a guess)
EST_SERVER_S="${EST_SERVER_S:-6}"
EST_REST_RATE="${EST_REST_RATE:-1000}"

# ---- checks of the lists (tags carry integers) ----
isint() { [[ "$1" =~ ^[0-9]+$ ]]; }
bad_param() { echo "run.sh: $*" >&2; exit 1; }
for v in $IDLE_CONNS $DM_RATES $DM_RATE_1K "$DM_CONNS" "$GROUP_CONNS" \
         "$STORM_CONNS" "$STORM_RATE" "$MIXED_CONNS" "$MIXED_RATE" \
         "$MIXED_K" "$CONNECT_RATE" "$REPS"; do
    isint "$v" || bad_param "not a whole number: '$v'"
done
for spec in $GROUP_SPECS $GROUP_SPEC_1K; do
    [[ "$spec" =~ ^[0-9]+:[0-9]+$ ]] && [ "${spec%%:*}" -ge 2 ] \
        || bad_param "GROUP_SPECS: '$spec' is not K:msg/s with K >= 2"
done
[ "$MIXED_K" -ge 2 ] || bad_param "MIXED_K must be >= 2"

# ---- the plan: one line per point, "scenario size conns rate k" ----
# conns are rounded down to whole conversations (what chatbench would do)
# so that the tag names the connections actually used; rate is msg/s
# (connect-storm: connects/s); k is the group size (0: none)
round_down() { echo $(( $1 / $2 * $2 )); }     # n unit

plan_points() {
    local sc c r k spec u s
    for sc in ${SCENARIOS//,/ }; do
        case "$sc" in
        idle)
            for c in $IDLE_CONNS; do echo "idle 64 $c 0 0"; done ;;
        connect-storm)
            echo "connect-storm 64 $STORM_CONNS $STORM_RATE 0" ;;
        dm)
            c="$(round_down "$DM_CONNS" 2)"
            for r in $DM_RATES; do echo "dm 64 $c $r 0"; done
            for r in $DM_RATE_1K; do echo "dm 1024 $c $r 0"; done ;;
        group)
            for spec in $GROUP_SPECS; do
                k="${spec%%:*}"; r="${spec#*:}"
                c=$(( GROUP_CONNS > k ? GROUP_CONNS : k ))
                echo "group 64 $(round_down "$c" "$k") $r $k"
            done
            for spec in $GROUP_SPEC_1K; do
                k="${spec%%:*}"; r="${spec#*:}"
                c=$(( GROUP_CONNS > k ? GROUP_CONNS : k ))
                echo "group 1024 $(round_down "$c" "$k") $r $k"
            done ;;
        mixed)
            u="$MIXED_K"; [ $(( u % 2 )) = 0 ] || u=$(( 2 * u ))
            for s in $MIXED_SIZES; do
                echo "mixed $s $(round_down "$MIXED_CONNS" "$u") $MIXED_RATE $MIXED_K"
            done ;;
        *) echo "run.sh: unknown scenario $sc" >&2 ;;
        esac
    done
}

# MODE.SCENARIO.SIZE.c<conns>[.r<rate>][.k<K>].rep<N>; report.py reads it
run_tag() {         # mode scenario size conns rate k rep
    local t="$1.$2.$3.c$4"
    [ "$5" -gt 0 ] && t="$t.r$5"
    [ "$6" -gt 0 ] && t="$t.k$6"
    echo "$t.rep$7"
}

skip_point() {      # mode scenario: a combination that cannot run
    [ "$2" = mixed ] && [ "$1" = nchan ]
}

# estimated seconds of one run: server start/stop, chat's REST set-up,
# connect at the connect rate, the run itself, the pause after it
est_run() {         # mode scenario conns rate k
    local mode="$1" sc="$2" c="$3" r="$4" k="$5" convs=0
    case "$sc" in
    dm) convs=$(( c / 2 )) ;;
    group) convs=$(( c / k )) ;;
    mixed) convs=$(( c / 2 + c / 5 / k )) ;;
    esac
    case "$mode" in chat|mock) ;; *) convs=0 ;; esac
    awk -v sc="$sc" -v c="$c" -v r="$r" -v cr="$CONNECT_RATE" \
        -v sv="$EST_SERVER_S" -v rest="$EST_REST_RATE" -v cv="$convs" \
        -v w="$WARMUP" -v d="$DURATION" -v dr="$DRAIN" -v h="$HOLD" 'BEGIN {
        t = sv + cv / rest + 1
        if (sc == "idle") t += c / cr + 1 + h
        else if (sc == "connect-storm") t += (r > 0 ? c / r : 0) + 1
        else t += c / cr + w + d + dr
        printf "%.1f\n", t }'
}

dry_run() {
    local mode pt sc size c r k e total=0 mt n=0 runs=0 label
    echo "run.sh --dry-run: modes $MODES, scenarios $SCENARIOS, $REPS repetition(s)"
    echo "per run: ${EST_SERVER_S} s server start/stop + connect (conns/${CONNECT_RATE}/s;"
    echo "  connect-storm: conns/STORM_RATE) + warmup $WARMUP + duration $DURATION"
    echo "  + drain $DRAIN (at most) | idle: 1 + hold $HOLD | storm: hold 1; + 1 s pause;"
    echo "  chat: + conversations / ${EST_REST_RATE}/s over REST (a guess)"
    echo "deliveries/s = msg/s x members (dm: 2, group: K), the sender's own copy included"
    echo
    printf '%-9s %-14s %5s %7s %7s %5s %15s %7s  %s\n' mode scenario size conns \
        rate K deliveries/s "est s" "tags (rep1..$REPS)"
    for mode in ${MODES//,/ }; do
        mt=0
        while read -r sc size c r k; do
            [ -n "$sc" ] || continue
            if skip_point "$mode" "$sc"; then
                printf '%-9s %-14s %5s  skipped (one channel per WebSocket)\n' \
                    "$mode" "$sc" "$size"
                continue
            fi
            e="$(est_run "$mode" "$sc" "$c" "$r" "$k")"
            case "$sc" in
            dm) label=$(( r * 2 )) ;;
            group) label=$(( r * k )) ;;
            *) label="-" ;;
            esac
            printf '%-9s %-14s %5s %7s %7s %5s %15s %7s  %s\n' "$mode" "$sc" \
                "$size" "$c" "$r" "$k" "$label" "$e" \
                "$(run_tag "$mode" "$sc" "$size" "$c" "$r" "$k" N)"
            mt="$(awk -v a="$mt" -v b="$e" -v n="$REPS" 'BEGIN{print a+b*n}')"
            n=$(( n + 1 ))
        done < <(plan_points)
        printf '  %s: %.0f s (%.1f min) for %d repetition(s)\n' "$mode" "$mt" \
            "$(awk -v a="$mt" 'BEGIN{print a/60}')" "$REPS"
        total="$(awk -v a="$total" -v b="$mt" 'BEGIN{print a+b}')"
    done
    runs=$(( n * REPS ))
    echo
    printf 'total: %d points, %d runs, estimated %.0f s = %.1f min (upper bound:\n' \
        "$n" "$runs" "$total" "$(awk -v a="$total" 'BEGIN{print a/60}')"
    echo "  every drain taken in full; plus building, npm ci and the report)"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
}

if [ "$DRY_RUN" = 1 ]; then
    dry_run
    exit 0
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
# OUT: the summary (summary.md/csv/json, plots, runs.csv, params) to keep;
# RAW: per-run JSON/hgrm, logs and server state (git-ignored)
OUT="${OUT:-$BENCH/results/$STAMP}"
# absolute: servers are started with their own prefix and working directory
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${RAW:-}" ]; then
    case "$OUT" in
    "$BENCH"/results/*) RAW="$BENCH/results/raw/$(basename "$OUT")" ;;
    *) RAW="$OUT/raw" ;;
    esac
fi
mkdir -p "$RAW/logs"
RAW="$(cd "$RAW" && pwd)"
RUN_DIR="$RAW/servers"
mkdir -p "$RUN_DIR"

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/run.log"; }

# ---- dependencies ----
ensure_deps() {
    log "building chatbench"
    make -C "$BENCH" -s all || { log "build failed"; exit 1; }
    make -C "$BENCH" -s test > "$RAW/logs/unit_test.log" 2>&1 \
        || { log "unit tests failed: $RAW/logs/unit_test.log"; exit 1; }

    ensure_gnuplot "$RAW/logs/apt.log" || log "gnuplot not available: no plots"

    if [[ ",$MODES," == *,nchan,* ]] \
       && [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
        log "apt-get install libnginx-mod-nchan"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            libnginx-mod-nchan > "$RAW/logs/apt-nchan.log" 2>&1 \
            || log "libnginx-mod-nchan not installed: no nchan runs"
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

# ---- process helpers (bounded; wait_port is in lib.sh) ----
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

chat_template() {   # conf.example -> benchmark template (same directives; no
                    # rate limits: one generator is one address)
    local aff="$1"
    sed -E -e "s/^([[:space:]]*worker_processes)[[:space:]]+[^;]+;/\1 $SERVER_WORKERS; worker_cpu_affinity $aff;/" \
        -e "s/^([[:space:]]*access_log)[[:space:]]+[^;]+;/\1 off;/" \
        -e "s/^([[:space:]]*error_log[[:space:]]+[^;[:space:]]+)[[:space:]]+[a-z]+;/\1 warn;/" \
        -e "s/^([[:space:]]*listen[[:space:]]+(@HTTP_LISTEN@|127\.0\.0\.1:@HTTP_PORT@))([[:space:]]+reuseport)?[[:space:]]*;/\1 backlog=4096 reuseport;/" \
        -e "s/^([[:space:]]*chat_max_connections_per_address)[[:space:]]+[^;]+;/\1 0;/" \
        -e "/^[[:space:]]*chat_rate_limit[[:space:]]/d" \
        "$REPO/conf.example" | chat_set
}

# CHAT_SET="chat_receipt_flush 1s; chat_typing_timeout 5s": directives of
# conf.example given other values for a run
chat_set() {
    local script="" d name value
    IFS=';' read -ra sets <<< "${CHAT_SET:-}"
    for d in "${sets[@]}"; do
        read -r name value <<< "$d"
        [ -n "$name" ] || continue
        script+="s|^([[:space:]]*$name)[[:space:]]+[^;]+;|\\1 $value;|;"
    done
    if [ -n "$script" ]; then sed -E -e "$script"; else cat; fi
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

# PostgreSQL's CPU per stored message in the steady part of a run of ours:
# a sampler reads, every second, the CPU of every process of the cluster
# (utime + stime) and the last message id; seconds in which messages were
# stored count, but the first and last such seconds (set-up, drain) do not.
# "postgres cpu: S s, N messages, U us per message".  psql's own short
# backends are gone before the next sample and are not counted.
pg_ticks() {
    local pm p t=0 f
    pm="$(head -1 "$REPO/var/pg/postmaster.pid" 2> /dev/null)"
    [ -n "$pm" ] || { echo 0; return; }
    for p in $pm $(pgrep -P "$pm"); do
        f=$(cut -d' ' -f14,15 "/proc/$p/stat" 2> /dev/null) || continue
        t=$(( t + ${f% *} + ${f#* } ))
    done
    echo "$t"
}

pg_last_id() {
    /usr/lib/postgresql/*/bin/psql -X -A -t -h "$REPO/var/run" \
        -p "$CHAT_PGPORT" -U postgres -d chat \
        -c "SELECT last_value FROM chat_messages_id_seq" 2> /dev/null || echo 0
}

pg_receipts() {     # receipt events, chat_members row updates, xacts
    /usr/lib/postgresql/*/bin/psql -X -A -t -F ' ' -h "$REPO/var/run" \
        -p "$CHAT_PGPORT" -U postgres -d chat \
        -c "SELECT (SELECT count(*) FROM chat_events WHERE kind = 'receipt'),
                   (SELECT n_tup_upd FROM pg_stat_user_tables
                    WHERE relname = 'chat_members'),
                   extract(epoch FROM clock_timestamp())" \
        2> /dev/null || echo "0 0 0"
}

pg_sample() {       # start | stop
    if [ "$1" = start ]; then
        PG_RECEIPTS="$(pg_receipts)"
        PG_SAMPLES="$RAW/logs/pg-samples.$$"
        : > "$PG_SAMPLES"
        ( while :; do echo "$(pg_ticks) $(pg_last_id)"; sleep 1; done ) \
            >> "$PG_SAMPLES" 2> /dev/null &
        PG_SAMPLER=$!
        return
    fi
    kill "$PG_SAMPLER" 2> /dev/null; wait "$PG_SAMPLER" 2> /dev/null
    awk -v hz="$(getconf CLK_TCK)" '
        NR > 1 && $2 > m { n++; dt[n] = $1 - t; dm[n] = $2 - m }
        { t = $1; m = $2 }
        END { for (i = 2; i < n; i++) { T += dt[i]; M += dm[i] }
              printf "postgres cpu: %.2f s, %d messages, %.0f us per message, %.0f stored/s\n",
                     T / hz, M, M ? T / hz / M * 1e6 : 0,
                     (n > 2 ? M / (n - 2) : 0) }' "$PG_SAMPLES"
    rm -f "$PG_SAMPLES"
    # live state: what receipts cost the store over the whole run (the
    # statistics of row updates lag by up to a second)
    sleep 1
    echo "$PG_RECEIPTS $(pg_receipts)" | awk '
        { dt = $6 - $3; if (dt > 0 && $4 > $1)
              printf "postgres receipts: %d events (%.0f/s), %d member rows updated (%.0f/s) in %.0f s\n",
                     $4 - $1, ($4 - $1) / dt, $5 - $2, ($5 - $2) / dt, dt }'
}

# ---- one measurement ----
run_one() {         # mode scenario size conns rate k rep
    local mode="$1" sc="$2" size="$3" conns="$4" rate="$5" k="$6" rep="$7"
    local genmode extra=() tag limit rc desc
    tag="$(run_tag "$mode" "$sc" "$size" "$conns" "$rate" "$k" "$rep")"

    genmode="$mode"
    [ "$mode" = mock ] && genmode=chat

    desc="conns=$conns rate=$rate"
    case "$sc" in
    idle) extra=(--hold "$HOLD" --connect-rate "$CONNECT_RATE") ;;
    connect-storm)
        desc="conns=$conns connect-rate=$rate"
        extra=(--connect-rate "$rate" --hold 1); rate=0 ;;
    dm) extra=(--connect-rate "$CONNECT_RATE") ;;
    group|mixed)
        desc="$desc k=$k"
        extra=(--group-size "$k" --connect-rate "$CONNECT_RATE") ;;
    esac

    # LIVE=1: chat clients also send typing, reads and acks (dm, group)
    if [ "${LIVE:-0}" = 1 ] && [ "$genmode" = chat ]; then
        extra+=(--live)
    fi

    # <= 19000 connections per generator process
    local workers=$(( (conns + 17999) / 18000 ))

    limit=$(( DURATION + WARMUP + DRAIN + HOLD + conns / 500 + 120 ))

    log "run $tag: $desc"
    [ "$mode" = chat ] && pg_sample start
    timeout "$limit" "$BIN" --mode "$genmode" --scenario "$sc" \
        --port "$SERVER_PORT" --conns "$conns" --workers "$workers" \
        --src "$SRC" --pin "$GEN_CPUS" --rate "$rate" --size "$size" \
        --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" \
        --server-ppid "$SERVER_PID" --out "$RAW" --tag "$tag" \
        "${GEN_EXTRA[@]}" "${extra[@]}" \
        > "$RAW/logs/$tag.txt" 2>&1
    rc=$?
    [ "$mode" = chat ] && pg_sample stop >> "$RAW/logs/$tag.txt"
    grep -E 'result|latency e2e|latency ack|integrity|connect |server rss|postgres cpu|postgres receipts|requests' \
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
    echo "modes=$MODES scenarios=$SCENARIOS"
    echo "sizes=64 (sweeps) 1024 (dm at ${DM_RATE_1K:-none} msg/s, group at ${GROUP_SPEC_1K:-none} K:msg/s; mixed: $MIXED_SIZES)"
    echo "server_cpus=$SERVER_CPUS gen_cpus=$GEN_CPUS server_workers=$SERVER_WORKERS"
    echo "idle_conns=[$IDLE_CONNS] storm=$STORM_CONNS@$STORM_RATE/s connect_rate=$CONNECT_RATE/s"
    echo "dm_conns=$DM_CONNS dm_rates=[$DM_RATES] msg/s dm_rate_1k=$DM_RATE_1K"
    echo "group_conns=$GROUP_CONNS group_specs=[$GROUP_SPECS] (K:msg/s) group_spec_1k=$GROUP_SPEC_1K"
    echo "mixed=$MIXED_CONNS(k=$MIXED_K)@$MIXED_RATE/s"
    echo "duration=$DURATION warmup=$WARMUP drain=$DRAIN hold=$HOLD"
    echo "kernel=$(uname -r) nginx=$(/usr/sbin/nginx -v 2>&1 | cut -d/ -f2)"
    echo "node=$(node --version 2>/dev/null) nproc=$(nproc)"
    echo "mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo 2>/dev/null)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
    echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
} > "$OUT/params.txt"

log "results in $OUT"

mapfile -t POINTS < <(plan_points)

for mode in ${MODES//,/ }; do
    CURRENT_MODE=""
    case "$mode" in
    chat|nchan|socketio|mock) ;;
    *) log "unknown mode $mode"; continue ;;
    esac

    skipped=""
    for pt in "${POINTS[@]}"; do
        read -r sc size conns rate k <<< "$pt"
        if skip_point "$mode" "$sc"; then
            case " $skipped " in
            *" $sc "*) ;;
            *) log "skip $mode.$sc: one channel per WebSocket"
               skipped="$skipped $sc" ;;
            esac
            continue
        fi

        for rep in $(seq 1 "$REPS"); do
            # a fresh server for every run: RSS and state start equal
            if ! "start_$mode"; then
                "stop_$mode" 2> /dev/null
                continue 3
            fi
            CURRENT_MODE="$mode"
            run_one "$mode" "$sc" "$size" "$conns" "$rate" "$k" "$rep"
            "stop_$mode"
            CURRENT_MODE=""
        done
    done
done

log "aggregating"
cp "$RAW/runs.csv" "$OUT/runs.csv" 2> /dev/null
python3 "$BENCH/report.py" "$RAW" "$OUT" | tee -a "$OUT/run.log"
log "done: $OUT/summary.md"
