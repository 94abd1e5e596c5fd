#!/usr/bin/env bash
# bench/soak.sh — long-running soak of ngx_chat_module: constant churn of
# connections and messages while a sampler records, every few seconds, each
# nginx worker's memory and open files, the shared zone and PostgreSQL's
# connections; then a verdict (memory slope over the second half, integrity
# counters of every chatbench run, [alert]/[crit]/sanitizer lines).
#
#   bench/soak.sh [--duration S] [--nginx BIN] [--module SO] [--workers N]
#                 [--rate R] [--conns N] [--scenarios mixed,dm] [--size B]
#                 [--run-seconds S] [--storm-every S] [--storm-conns N]
#                 [--storm-rate R] [--sample-every S] [--cooldown S]
#                 [--threshold KIB_PER_MIN] [--noise-floor KIB] [--log-level LVL]
#                 [--shm-size SIZE] [--bus-slots N] [--out DIR]
#                 [--port P] [--pgport P] [--keep-data] [--external]
#
# By default it starts its own stack, apart from `make run` (var/) and from
# run.sh: a throwaway PostgreSQL cluster (unix socket only) and nginx with
# conf.example adapted (ports --port / --pgport, default 8094 / 5441), out of
# bench/results/raw/soak-<stamp>/. --nginx /usr/sbin/nginx (default) loads
# --module (build/dyn/ngx_chat_module.so, copied first); any other binary is
# taken as a static build (make static [ASAN=1]) and gets no load_module.
# --external soaks a server that is already running: CHAT_PORT,
# CHAT_SECRET_FILE, CHAT_PID_FILE (nginx master pid) as for run.sh, and
# optionally CHAT_ERROR_LOG (to count alerts) and CHAT_PSQL (psql arguments,
# e.g. "-h /sock -p 5433 -U postgres -d chat").
#
# Results: bench/results/soak-<stamp>/ (samples.csv, global.csv, runs.csv,
# soak.png, summary.txt, summary.json, params.txt, soak.log). Exit status 0
# when memory is FLAT and every check passed, 3 when a check failed, 1 when
# the soak could not run. Every loop is bounded in time; it stops by itself.

set -u
set -o pipefail

BENCH="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH/.." && pwd)"
BIN="$BENCH/build/chatbench"
. "$BENCH/lib.sh"

DURATION=3600
NGINX_BIN=/usr/sbin/nginx
MODULE="$REPO/build/dyn/ngx_chat_module.so"
WORKERS=2
RATE=100                 # msg/s of each message run
CONNS=200                # users of each message run
SCENARIOS="mixed,dm"
SIZE=200
RUN_SECONDS=20           # short back-to-back runs: connections churn
STORM_EVERY=60           # a connect-storm every STORM_EVERY s
STORM_CONNS=300
STORM_RATE=300
SAMPLE_EVERY=5
COOLDOWN=20              # idle sampling after the load, before the end
THRESHOLD=64             # KiB/min of worker RssAnon over the second half
NOISE_FLOOR=1024         # KiB: a trend smaller than this over the half is noise
SHM_SIZE=""              # chat_shm_size (conf.example: 64m)
BUS_SLOTS=""             # chat_bus_slots (conf.example: 65536)
LOG_LEVEL=notice         # notice: worker exits and their codes are logged
OUT=""
PORT="${CHAT_PORT:-8094}"
PGPORT=5441
KEEP_DATA=0
EXTERNAL="${CHAT_EXTERNAL:-0}"
SRC="${SRC:-127.0.0.2-9}"

usage() { sed -n '2,30p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
    --duration) DURATION="$2"; shift ;;
    --nginx) NGINX_BIN="$2"; shift ;;
    --module) MODULE="$2"; shift ;;
    --workers) WORKERS="$2"; shift ;;
    --rate) RATE="$2"; shift ;;
    --conns) CONNS="$2"; shift ;;
    --scenarios) SCENARIOS="$2"; shift ;;
    --size) SIZE="$2"; shift ;;
    --run-seconds) RUN_SECONDS="$2"; shift ;;
    --storm-every) STORM_EVERY="$2"; shift ;;
    --storm-conns) STORM_CONNS="$2"; shift ;;
    --storm-rate) STORM_RATE="$2"; shift ;;
    --sample-every) SAMPLE_EVERY="$2"; shift ;;
    --cooldown) COOLDOWN="$2"; shift ;;
    --threshold) THRESHOLD="$2"; shift ;;
    --noise-floor) NOISE_FLOOR="$2"; shift ;;
    --shm-size) SHM_SIZE="$2"; shift ;;
    --bus-slots) BUS_SLOTS="$2"; shift ;;
    --log-level) LOG_LEVEL="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --pgport) PGPORT="$2"; shift ;;
    --keep-data) KEEP_DATA=1 ;;
    --external) EXTERNAL=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "soak: unknown option $1" >&2; usage >&2; exit 1 ;;
    esac
    shift
done

isnum() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in DURATION WORKERS RATE CONNS SIZE RUN_SECONDS STORM_EVERY STORM_CONNS \
         STORM_RATE SAMPLE_EVERY COOLDOWN PORT PGPORT NOISE_FLOOR; do
    isnum "${!v}" || { echo "soak: --${v,,} must be a whole number" >&2; exit 1; }
done
[ "$DURATION" -ge 30 ] || { echo "soak: --duration must be >= 30" >&2; exit 1; }
[ "$STORM_RATE" -ge 1 ] && [ "$CONNS" -ge 2 ] && [ "$STORM_CONNS" -ge 1 ] \
    || { echo "soak: --storm-rate, --storm-conns >= 1, --conns >= 2" >&2; exit 1; }
[ "$SAMPLE_EVERY" -ge 1 ] || SAMPLE_EVERY=1

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-$BENCH/results/soak-$STAMP}"
case "$OUT" in
"$BENCH"/results/*) RAW="$BENCH/results/raw/$(basename "$OUT")" ;;
*) RAW="$OUT/raw" ;;
esac
mkdir -p "$OUT" "$RAW/logs" "$RAW/bench" || exit 1
chmod 0755 "$RAW" 2> /dev/null
SRV="$RAW/server"          # nginx prefix: conf, logs, pid, temp
PGDATA="$RAW/pg"
PGSOCK="$RAW/pgsock"

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/soak.log"; }
now() { date +%s; }

# ---- dependencies --------------------------------------------------------
ensure_deps() {
    if [ ! -x "$BIN" ]; then
        log "building chatbench"
        make -C "$BENCH" -s all > "$RAW/logs/build.log" 2>&1 \
            || { log "chatbench build failed: $RAW/logs/build.log"; exit 1; }
    fi
    ensure_gnuplot "$RAW/logs/apt.log" || log "gnuplot not available: no plot"
    command -v python3 > /dev/null || { log "python3 missing"; exit 1; }
}

# port_busy, wait_port, wait_gone, ensure_gnuplot: lib.sh

# ---- our own stack: PostgreSQL + nginx -----------------------------------
PG_BIN=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -r -V); do
    [ -x "$d/pg_ctl" ] && { PG_BIN=$d; break; }
done
as_pg() { (cd / && runuser -u postgres -- "$@"); }
PSQL_ARGS=()

start_pg() {
    [ -n "$PG_BIN" ] || { log "PostgreSQL binaries not found (scripts/install-deps.sh)"; return 1; }
    port_busy "$PGPORT" && { log "port $PGPORT is in use (--pgport)"; return 1; }
    [ -e "$PGSOCK/.s.PGSQL.$PGPORT" ] && { log "$PGSOCK/.s.PGSQL.$PGPORT exists"; return 1; }
    install -d -o postgres -g postgres -m 0700 "$PGDATA" || return 1
    install -d -o postgres -g postgres -m 0755 "$PGSOCK" || return 1
    runuser -u postgres -- test -x "$RAW" \
        || { log "user postgres cannot reach $RAW (chmod o+x its parents)"; return 1; }
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 \
        --locale=C.UTF-8 > "$RAW/logs/initdb.log" 2>&1 \
        || { log "initdb failed: $RAW/logs/initdb.log"; return 1; }
    touch "$RAW/logs/postgresql.log"; chown postgres "$RAW/logs/postgresql.log"
    # unix socket only (listen_addresses empty): nothing leaves the host
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$RAW/logs/postgresql.log" -w -t 60 \
        -o "-c port=$PGPORT -c listen_addresses= -c unix_socket_directories=$PGSOCK -c unix_socket_permissions=0777 -c max_connections=100" \
        start > /dev/null \
        || { log "PostgreSQL did not start: $RAW/logs/postgresql.log"; return 1; }
    PG_STARTED=1
    PSQL_ARGS=(-h "$PGSOCK" -p "$PGPORT" -U postgres)
    "$PG_BIN/psql" -X -q "${PSQL_ARGS[@]}" -d postgres -c "CREATE DATABASE chat" \
        > "$RAW/logs/createdb.log" 2>&1 || { log "CREATE DATABASE failed"; return 1; }
    bash "$REPO/scripts/migrate.sh" "${PSQL_ARGS[@]}" -d chat \
        > "$RAW/logs/migrate.log" 2>&1 || { log "migrations failed: $RAW/logs/migrate.log"; return 1; }
    PSQL_ARGS+=(-d chat)
}

stop_pg() {
    [ "${PG_STARTED:-0}" = 1 ] || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop > /dev/null 2>&1 \
        || as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 30 stop > /dev/null 2>&1
    PG_STARTED=0
}

render_conf() {     # conf.example -> $SRV/nginx.conf
    local load="load_module $SRV/ngx_chat_module.so;"
    [ "$STATIC" = 1 ] && load="# static build: no load_module"
    sed -E \
        -e "s|^load_module[[:space:]]+@MODULE@;|$load|" \
        -e "s|@PREFIX@/var/logs|$SRV/logs|g" -e "s|@PREFIX@/var/run|$SRV/run|g" \
        -e "s|@PREFIX@/var/tmp|$SRV/tmp|g" \
        -e "s|@PREFIX@/var/jwt_secret|$SRV/jwt_secret|g" \
        -e "s|@PREFIX@|$REPO|g" -e "s|@PGSOCK@|$PGSOCK|g" -e "s|@PGPORT@|$PGPORT|g" \
        -e "s|@HTTP_LISTEN@|127.0.0.1:$PORT|g" -e "s|@HTTP_PORT@|$PORT|g" \
        -e "s|@DEMO_PORT@|$((PORT + 1))|g" \
        -e "s/^([[:space:]]*worker_processes)[[:space:]]+[^;]+;/\1 $WORKERS;/" \
        -e "s/^([[:space:]]*access_log)[[:space:]]+[^;]+;/\1 off;/" \
        -e "s/^([[:space:]]*error_log[[:space:]]+[^;[:space:]]+)[[:space:]]+[a-z]+;/\1 $LOG_LEVEL;/" \
        -e "/^[[:space:]]*chat_rate_limit[[:space:]]/d" \
        "$REPO/conf.example" > "$SRV/nginx.conf"
    # a small zone or ring reaches its steady state (eviction) sooner
    [ -n "$SHM_SIZE" ] && sed -i -E "s/^([[:space:]]*chat_shm_size)[[:space:]]+[^;]+;/\1 $SHM_SIZE;/" "$SRV/nginx.conf"
    [ -n "$BUS_SLOTS" ] && sed -i -E "s/^([[:space:]]*chat_bus_slots)[[:space:]]+[^;]+;/\1 $BUS_SLOTS;/" "$SRV/nginx.conf"
    local left
    left=$(sed 's/#.*//' "$SRV/nginx.conf" | grep -o '@[A-Z_]*@' | sort -u | tr '\n' ' ')
    [ -z "$left" ] || { log "placeholders left in nginx.conf: $left"; return 1; }
    grep -q "^pid $SRV/run/nginx.pid;" "$SRV/nginx.conf" \
        || { log "conf.example changed: no pid line to rewrite"; return 1; }
}

start_nginx() {
    mkdir -p "$SRV/logs" "$SRV/run" "$SRV/tmp"
    chmod 0755 "$SRV" "$SRV/logs" "$SRV/tmp"
    port_busy "$PORT" && { log "port $PORT is in use (--port)"; return 1; }
    (umask 022; openssl rand -hex 32 | tr -d '\n' > "$SRV/jwt_secret") || return 1
    SECRET_FILE="$SRV/jwt_secret"
    if [ "$STATIC" != 1 ]; then
        [ -f "$MODULE" ] || { log "$MODULE not built (make build)"; return 1; }
        # a private copy: a rebuild during the soak does not touch it
        cp "$MODULE" "$SRV/ngx_chat_module.so" || return 1
    fi
    render_conf || return 1
    # nginx -t exits without freeing its cycle: under ASan, LeakSanitizer
    # would report that pool (indirect leaks only) and fail the test
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
    "$NGINX_BIN" -p "$SRV/" -e "$SRV/logs/stderr.log" -c "$SRV/nginx.conf" -t -q \
        > "$RAW/logs/nginx-t.log" 2>&1 || { log "nginx -t failed: $RAW/logs/nginx-t.log"; return 1; }
    "$NGINX_BIN" -p "$SRV/" -e "$SRV/logs/stderr.log" -c "$SRV/nginx.conf" \
        > "$RAW/logs/nginx-start.log" 2>&1 || { log "nginx did not start: $RAW/logs/nginx-start.log"; return 1; }
    NGINX_STARTED=1
    PID_FILE="$SRV/run/nginx.pid"
    wait_port "$PORT" 30 || { log "nginx not listening on $PORT"; return 1; }
    ERROR_LOGS=("$SRV/logs/error.log" "$SRV/logs/stderr.log")
}

stop_nginx() {
    [ "${NGINX_STARTED:-0}" = 1 ] || return 0
    local pid
    pid=$(cat "$PID_FILE" 2> /dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then
        local ws
        ws=$(pgrep -P "$pid" | tr '\n' ' ')
        kill -QUIT "$pid"
        # ASan workers run LeakSanitizer as they exit: give them time
        wait_gone "$pid" 60 || { log "nginx did not quit in 60 s: SIGKILL"; kill -KILL "$pid" $ws 2> /dev/null; }
        for w in $ws; do wait_gone "$w" 10 || kill -KILL "$w" 2> /dev/null; done
    fi
    NGINX_STARTED=0
}

# ---- sampling ------------------------------------------------------------
MASTER=""
ZONE_KB=0

workers_of() {      # master -> pids of active workers
    local p c
    for p in $(pgrep -P "$1" 2> /dev/null); do
        c=$(tr '\0' ' ' < "/proc/$p/cmdline" 2> /dev/null)
        case "$c" in *"worker process"*"shutting down"*) ;; *"worker process"*) echo "$p" ;; esac
    done
}

status_kb() {       # pid -> "VmRSS RssAnon RssFile RssShmem"
    awk '/^VmRSS:/ {a=$2} /^RssAnon:/ {b=$2} /^RssFile:/ {c=$2} /^RssShmem:/ {d=$2}
         END {printf "%s %s %s %s", a+0, b+0, c+0, d+0}' "/proc/$1/status" 2> /dev/null
}

private_kb() {
    awk '/^Private_(Clean|Dirty):/ {s+=$2} END {print s+0}' "/proc/$1/smaps_rollup" 2> /dev/null
}

# the shared zone "ngx_chat_module": a shared anonymous mapping
# ("/dev/zero (deleted)") of chat_shm_size; prints "start_hex size_kb rss_kb"
zone_map() {
    awk -v want="$ZONE_KB" '
        /^[0-9a-f]+-[0-9a-f]+ / {
            inmap = ($NF == "(deleted)" && $(NF-1) == "/dev/zero"); split($1, r, "-"); cur = r[1]; next }
        inmap && /^Size:/ { size[cur] = $2 }
        inmap && /^Rss:/  { rss[cur] = $2 }
        END {
            best = ""; bs = -1
            for (k in size) {
                if (want > 0 && size[k] == want) { best = k; break }
                if (size[k] > bs) { bs = size[k]; best = k }
            }
            if (best != "") printf "%s %s %s", best, size[best], rss[best]
        }' "/proc/$1/smaps" 2> /dev/null
}

# nginx's slab pool header at the start of the zone (ngx_slab_pool_t,
# 64-bit): pfree at +80, start at +88, end at +96. Prints "used total"
# pages, or nothing when the header does not look right.
zone_pages() {      # pid start_hex size_kb
    local base=$((16#$2)) vals pfree start end
    vals=$(dd if="/proc/$1/mem" bs=8 skip=$(( (base + 80) / 8 )) count=3 2> /dev/null | od -An -v -t u8 | tr -s ' \n' '  ')
    read -r pfree start end <<< "$vals"
    [ -n "${end:-}" ] || return 0
    if [ "$start" -gt "$base" ] && [ "$end" -le $((base + $3 * 1024)) ] && [ "$end" -gt "$start" ]; then
        local total=$(( (end - start) / 4096 ))
        [ "$pfree" -le "$total" ] && echo "$(( total - pfree )) $total"
    fi
}

pg_counts() {       # "all nginx" client backends
    [ ${#PSQL_ARGS[@]} -gt 0 ] || { echo ","; return; }
    timeout 5 psql -X -A -t -F ' ' "${PSQL_ARGS[@]}" -c \
        "SELECT count(*), count(*) FILTER (WHERE application_name = 'nginx chat')
           FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" \
        2> /dev/null | awk 'NF == 2 {printf "%s,%s", $1, $2; ok = 1} END {if (!ok) printf ","}'
}

T0=0
PHASE=baseline
sample_once() {     # writes one row per process and one global row
    local t p st pr fds z zp="" nw=0 tcp pg role cb
    t=$(( $(date +%s%N) / 1000000 - T0 ))
    t=$(awk -v t="$t" 'BEGIN {printf "%.1f", t / 1000}')
    MASTER=$(cat "$PID_FILE" 2> /dev/null)
    for p in $MASTER $(workers_of "$MASTER"); do
        st=$(status_kb "$p"); [ -n "$st" ] || continue
        pr=$(private_kb "$p")
        fds=$(ls "/proc/$p/fd" 2> /dev/null | wc -l)
        z=$(zone_map "$p")
        role=worker; [ "$p" = "$MASTER" ] && role=master
        # $1..$4 VmRSS RssAnon RssFile RssShmem, $5 zone start, $6 size, $7 rss
        set -- $st $z
        echo "$t,$PHASE,$p,$role,$1,$2,$3,$4,$pr,$fds,${7:-}" >> "$OUT/samples.csv"
        if [ "$role" = worker ]; then
            nw=$((nw + 1))
            [ -z "$zp" ] && [ -n "${5:-}" ] && zp=$(zone_pages "$p" "$5" "$6")
        fi
    done
    tcp=$(ss -Htn state established "( sport = :$PORT )" 2> /dev/null | wc -l)
    pg=$(pg_counts)
    cb=$(pgrep -c -f "^$BIN " 2> /dev/null); cb=${cb:-0}
    set -- $zp
    echo "$t,$PHASE,$nw,${1:-},${2:-},$pg,$tcp,$cb" >> "$OUT/global.csv"
}

sampler_loop() {    # until-epoch
    local next
    while [ "$(now)" -lt "$1" ]; do
        next=$(( $(now) + SAMPLE_EVERY ))
        PHASE=$(cat "$RAW/phase" 2> /dev/null || echo load)
        sample_once
        while [ "$(now)" -lt "$next" ] && [ "$(now)" -lt "$1" ]; do sleep 0.5; done
    done
}

# ---- load ----------------------------------------------------------------
run_bench() {       # tag limit-seconds args...
    local tag="$1" limit="$2" rc
    shift 2
    timeout -k 5 "$limit" "$BIN" --mode chat --host 127.0.0.1 --port "$PORT" \
        --secret-file "$SECRET_FILE" --src "$SRC" --out "$RAW/bench" --tag "$tag" \
        --server-ppid "$MASTER" --check "$@" > "$RAW/logs/$tag.txt" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) $tag rc=$rc" >> "$RAW/runs-rc.log"
    return 0
}

message_loop() {    # deadline
    local i=0 sc scs left d
    IFS=, read -r -a scs <<< "$SCENARIOS"
    while :; do
        left=$(( $1 - $(now) ))
        # setup (REST) + connect + warm-up 1 s + drain <= 5 s
        d=$(( left - 12 - CONNS / 100 ))
        [ "$d" -gt "$RUN_SECONDS" ] && d=$RUN_SECONDS
        [ "$d" -ge 3 ] || break
        sc=${scs[$(( i % ${#scs[@]} ))]}
        i=$((i + 1))
        run_bench "msg-$(printf %04d $i)-$sc" $(( d + 60 + CONNS / 20 )) \
            --scenario "$sc" --conns "$CONNS" --rate "$RATE" --size "$SIZE" \
            --duration "$d" --warmup 1 --drain 5 --group-size 10
    done
}

storm_loop() {      # deadline
    local i=0 next
    sleep 5
    while :; do
        next=$(( $(now) + STORM_EVERY ))
        [ $(( $1 - $(now) )) -gt $(( 15 + STORM_CONNS / STORM_RATE )) ] || break
        i=$((i + 1))
        run_bench "storm-$(printf %04d $i)" $(( 60 + STORM_CONNS / 20 )) \
            --scenario connect-storm --conns "$STORM_CONNS" \
            --connect-rate "$STORM_RATE" --hold 1
        while [ "$(now)" -lt "$next" ] && [ "$(now)" -lt "$1" ]; do sleep 1; done
    done
}

# ---- cleanup -------------------------------------------------------------
BG_PIDS=()
cleanup() {
    local p
    # our loops, then their timeout(1) children (which pass the signal on
    # to chatbench)
    for p in "${BG_PIDS[@]}"; do
        # still our child (a finished loop's pid may have been reused)
        [ "$(ps -o ppid= -p "$p" 2> /dev/null | tr -d ' ')" = "$$" ] || continue
        pkill -P "$p" 2> /dev/null
        kill -- "$p" 2> /dev/null
    done
    if [ "$EXTERNAL" != 1 ]; then
        stop_nginx
        stop_pg
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---- main ----------------------------------------------------------------
ensure_deps

STATIC=0
case "$NGINX_BIN" in /usr/sbin/nginx) ;; *) STATIC=1 ;; esac
[ -x "$NGINX_BIN" ] || { log "$NGINX_BIN is not executable"; exit 1; }
NGINX_BIN="$(readlink -f "$NGINX_BIN")"
IS_ASAN=0
if nm -C "$NGINX_BIN" 2> /dev/null | grep -q '__asan_init' \
   || "$NGINX_BIN" -V 2>&1 | grep -q 'fsanitize=[a-z,]*address'; then
    IS_ASAN=1
    # leaks are reported when processes exit normally (the graceful stop at
    # the end); a small quarantine so RSS reaches its plateau quickly
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:quarantine_size_mb=16:malloc_context_size=30}"
fi
if "$NGINX_BIN" -V 2>&1 | grep -q 'fsanitize=[a-z,]*undefined'; then
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
fi

if [ "$EXTERNAL" = 1 ]; then
    PORT="${CHAT_PORT:-$PORT}"
    SECRET_FILE="${CHAT_SECRET_FILE:?--external needs CHAT_SECRET_FILE}"
    PID_FILE="${CHAT_PID_FILE:?--external needs CHAT_PID_FILE}"
    ERROR_LOGS=()
    [ -n "${CHAT_ERROR_LOG:-}" ] && ERROR_LOGS=("$CHAT_ERROR_LOG")
    [ -n "${CHAT_PSQL:-}" ] && read -r -a PSQL_ARGS <<< "$CHAT_PSQL"
    port_busy "$PORT" || { log "nothing listens on 127.0.0.1:$PORT"; exit 1; }
else
    log "starting PostgreSQL (unix socket $PGSOCK, port $PGPORT)"
    start_pg || exit 1
    log "starting nginx $NGINX_BIN on 127.0.0.1:$PORT ($WORKERS workers, asan=$IS_ASAN)"
    start_nginx || exit 1
    ZONE_KB=$(awk '/^[[:space:]]*chat_shm_size/ {v=$2; sub(/;/, "", v);
                 if (v ~ /[mM]$/) print v * 1024; else if (v ~ /[kK]$/) print v + 0; else print int(v / 1024)}' \
              "$SRV/nginx.conf")
    ZONE_KB=${ZONE_KB:-0}
fi
MASTER=$(cat "$PID_FILE" 2> /dev/null)
kill -0 "$MASTER" 2> /dev/null || { log "no nginx master (pid file $PID_FILE)"; exit 1; }
[ -n "$(workers_of "$MASTER")" ] || sleep 1

# the build under test against the module's sources: a build older than the
# newest source file does not test the tree as it is
BUILT="$NGINX_BIN"
[ "$STATIC" = 0 ] && [ "$EXTERNAL" != 1 ] && BUILT="$MODULE"
SRC_NEWEST=$(stat -c %Y "$REPO"/ngx_chat_module/*.[ch] 2> /dev/null | sort -n | tail -1)
STALE=""
if [ "$EXTERNAL" != 1 ] && [ -n "$SRC_NEWEST" ] && [ "$(stat -c %Y "$BUILT")" -lt "$SRC_NEWEST" ]; then
    STALE=1
    log "warning: $BUILT is older than ngx_chat_module/ sources (rebuild?)"
fi

LOG_START=()
for f in "${ERROR_LOGS[@]}"; do LOG_START+=("$(stat -c %s "$f" 2> /dev/null || echo 0)"); done

{
    echo "stamp=$STAMP duration=$DURATION external=$EXTERNAL"
    echo "nginx=$NGINX_BIN static=$STATIC asan=$IS_ASAN workers=$WORKERS port=$PORT"
    [ "$STATIC" = 0 ] && [ "$EXTERNAL" != 1 ] && echo "module=$MODULE sha1=$(sha1sum < "$MODULE" | cut -c1-40)"
    echo "nginx_sha1=$(sha1sum < "$NGINX_BIN" | cut -c1-40)"
    echo "build_time=$(date -u -r "$BUILT" +%FT%TZ) sources_newest=$(date -u -d "@$SRC_NEWEST" +%FT%TZ)${STALE:+ STALE}"
    echo "asan_options=${ASAN_OPTIONS:-}"
    echo "scenarios=$SCENARIOS conns=$CONNS rate=$RATE size=$SIZE run_seconds=$RUN_SECONDS"
    echo "storm: every ${STORM_EVERY}s conns=$STORM_CONNS rate=$STORM_RATE"
    echo "sample_every=$SAMPLE_EVERY cooldown=$COOLDOWN threshold=${THRESHOLD}KiB/min noise_floor=${NOISE_FLOOR}KiB log_level=$LOG_LEVEL"
    echo "zone_kb=$ZONE_KB bus_slots=$(awk '/^[[:space:]]*chat_bus_slots/ {sub(/;/, "", $2); print $2}' "$SRV/nginx.conf" 2> /dev/null) src=$SRC"
    echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2> /dev/null)$(git -C "$REPO" diff --quiet HEAD -- ngx_chat_module 2> /dev/null || echo '+dirty')"
    echo "kernel=$(uname -r) nproc=$(nproc) loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/params.txt"

: > "$RAW/runs-rc.log"
echo "t_s,phase,pid,role,vmrss_kb,rssanon_kb,rssfile_kb,rssshmem_kb,private_kb,fds,zone_rss_kb" > "$OUT/samples.csv"
echo "t_s,phase,workers,zone_used_pages,zone_total_pages,pg_conns,pg_nginx_conns,tcp_estab,chatbench_procs" > "$OUT/global.csv"

log "results in $OUT (raw: $RAW)"
T0=$(( $(date +%s%N) / 1000000 + 10000 ))   # t = 0: the load starts
# baseline: 10 s idle
echo baseline > "$RAW/phase"
sampler_loop $(( $(now) + 10 )) &
BG_PIDS+=($!)
wait "${BG_PIDS[-1]}"

START=$(now)
DEADLINE=$(( START + DURATION ))
echo load > "$RAW/phase"
log "load for ${DURATION}s: $SCENARIOS runs of ${RUN_SECONDS}s ($CONNS users, $RATE msg/s), connect-storm of $STORM_CONNS every ${STORM_EVERY}s"
sampler_loop $(( DEADLINE + COOLDOWN + 60 )) &
SAMPLER=$!
BG_PIDS+=("$SAMPLER")
message_loop "$DEADLINE" &
L1=$!
BG_PIDS+=("$L1")
storm_loop "$DEADLINE" &
L2=$!
BG_PIDS+=("$L2")

# progress, bounded: the loops plan their runs to end by the deadline; their
# chatbench runs are wrapped in timeout(1); past deadline + 120 s they are killed
last=0
while kill -0 "$L1" 2> /dev/null || kill -0 "$L2" 2> /dev/null; do
    if [ "$(now)" -gt $(( DEADLINE + 120 )) ]; then
        log "load loops still running 120 s after the deadline: stopping them"
        pkill -P "$L1" 2> /dev/null; pkill -P "$L2" 2> /dev/null
        kill -- "$L1" "$L2" 2> /dev/null
        break
    fi
    if [ $(( $(now) - last )) -ge 60 ]; then
        last=$(now)
        w=$(workers_of "$MASTER" | tr '\n' ' ')
        r=$(for p in $w; do awk '/^RssAnon:/ {printf "%d ", $2}' "/proc/$p/status" 2> /dev/null; done)
        log "t=$(( last - START ))s runs=$(wc -l < "$RAW/runs-rc.log" 2> /dev/null || echo 0) workers=[${w% }] RssAnon KiB=[${r% }]"
    fi
    sleep 2
done
wait "$L1" "$L2" 2> /dev/null

echo cooldown > "$RAW/phase"
# idle sampling until the deadline (the last run may end before it), then
# --cooldown seconds more: the verdict's window always ends at the deadline
end_cool=$(( $(now) > DEADLINE ? $(now) + COOLDOWN : DEADLINE + COOLDOWN ))
log "load done; idle sampling until $(date -u -d "@$end_cool" +%H:%M:%S)"
while [ "$(now)" -lt "$end_cool" ]; do sleep 1; done
kill "$SAMPLER" 2> /dev/null
wait "$SAMPLER" 2> /dev/null
PHASE=end
sample_once

cp "$RAW/bench/runs.csv" "$OUT/runs.csv" 2> /dev/null
cp "$RAW/runs-rc.log" "$OUT/runs-rc.log" 2> /dev/null

# stop our nginx before reading its logs: LeakSanitizer reports on exit
if [ "$EXTERNAL" != 1 ]; then
    log "stopping nginx (graceful) and PostgreSQL"
    stop_nginx
    stop_pg
fi

# the part of each error log written during the soak; its warn-or-worse
# and sanitizer lines are kept with the results
: > "$RAW/logs/error-during-soak.log"
for i in "${!ERROR_LOGS[@]}"; do
    f=${ERROR_LOGS[$i]}
    [ -f "$f" ] || continue
    tail -c +$(( ${LOG_START[$i]} + 1 )) "$f" >> "$RAW/logs/error-during-soak.log"
done
grep -E '\[(emerg|alert|crit|error|warn)\]|Sanitizer|runtime error:' "$RAW/logs/error-during-soak.log" \
    | head -n 2000 > "$OUT/error-log-warn.txt"

python3 "$BENCH/soak_report.py" --out "$OUT" --raw "$RAW" \
    --error-log "$RAW/logs/error-during-soak.log" --threshold "$THRESHOLD" \
    --noise-floor "$NOISE_FLOOR" \
    --duration "$DURATION" --asan "$IS_ASAN"
rc=$?

if [ "$EXTERNAL" != 1 ] && [ "$KEEP_DATA" != 1 ]; then
    rm -rf "$PGDATA" "$SRV/tmp"
fi
log "done: $OUT/summary.txt"
exit $rc
