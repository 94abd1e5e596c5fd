#!/usr/bin/env bash
# bench/tests/selftest.sh — checks the load generator end to end in about a
# minute: unit tests; small runs against Nchan, Socket.IO and the mockchat
# stand-in that must read zero loss/dup/reorder; and fault injection
# (mockchat drops, duplicates, delays deliveries) that must be detected.
# Loopback only; every server is stopped at the end.

set -u
BENCH="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$BENCH/build/chatbench"
TMP="$(mktemp -d /tmp/chatbench-selftest.XXXXXX)"
PIDS=()
PASS=0
FAIL=0

cleanup() {
    local p i
    for p in "${PIDS[@]}"; do
        kill "$p" 2> /dev/null
    done
    for p in "${PIDS[@]}"; do
        for i in $(seq 1 30); do
            kill -0 "$p" 2> /dev/null || break
            sleep 0.1
        done
        kill -9 "$p" 2> /dev/null
    done
    if [ -f "$TMP/nchan/nginx.pid" ]; then
        p="$(cat "$TMP/nchan/nginx.pid")"
        kill "$p" 2> /dev/null
        for i in $(seq 1 30); do
            kill -0 "$p" 2> /dev/null || break
            sleep 0.1
        done
    fi
}
trap cleanup EXIT

ok()   { PASS=$((PASS + 1)); echo "ok   $*"; }
nok()  { FAIL=$((FAIL + 1)); echo "FAIL $*"; }

wait_port() {
    local i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0
        sleep 0.1
    done
    return 1
}

jget() {    # file, python expression over d
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"
}

# run NAME EXPECTED_RC ARGS...: chatbench with --check
run() {
    local name="$1" want="$2" rc
    shift 2
    "$BIN" --out "$TMP/res" --tag "$name" --check --duration 2 --warmup 0.5 \
        --drain 2 "$@" > "$TMP/$name.txt" 2>&1
    rc=$?
    if [ "$rc" = "$want" ]; then
        ok "$name (rc $rc)"
    else
        nok "$name: rc $rc, wanted $want"
        sed 's/^/     /' "$TMP/$name.txt"
    fi
}

expect() {  # name, python condition over d, description
    if [ "$(jget "$TMP/res/$1.json" "$2")" = True ]; then
        ok "$1: $3"
    else
        nok "$1: $3 ($2)"
    fi
}

make -C "$BENCH" -s all > /dev/null || { echo "build failed"; exit 1; }
if make -C "$BENCH" -s test > "$TMP/unit.txt" 2>&1; then
    ok "unit tests ($(grep -c passed "$TMP/unit.txt") suites)"
else
    nok "unit tests"; cat "$TMP/unit.txt"
fi

for d in socketio mockchat; do
    if [ ! -d "$BENCH/peers/$d/node_modules" ]; then
        (cd "$BENCH/peers/$d" && npm ci --no-audit --no-fund > /dev/null 2>&1)
    fi
done

SECRET="$TMP/secret"
printf 'selftest-secret-%s\n' "$RANDOM$RANDOM" > "$SECRET"

start_mock() {  # port, env...
    local port="$1"
    shift
    (cd "$BENCH/peers/mockchat" \
     && exec env PORT="$port" SECRET_FILE="$SECRET" "$@" node server.js) \
        > "$TMP/mock-$port.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port" || nok "mockchat on $port did not start"
}

# -- chat mode against the stand-in: clean, with pings and retries --
start_mock 8291 PING_MS=300 FAIL_EVERY=37
C=(--mode chat --port 8291 --secret-file "$SECRET")
run chat-dm 0 "${C[@]}" --scenario dm --conns 200 --rate 400
expect chat-dm "d['errors']['retries'] > 0 and d['requests']['pings'] > 0" \
    "retries after 'unavailable' and pongs to pings"
expect chat-dm "d['latency_e2e_ms']['n'] > 0 and d['latency_e2e_ms']['p50'] > 0" \
    "latency recorded"
run chat-group-hello 0 "${C[@]}" --scenario group --group-size 10 \
    --conns 200 --rate 300 --auth hello --size 1024 --workers 2 \
    --src 127.0.0.2-5
expect chat-group-hello "d['deliveries']['unique'] == d['deliveries']['expected'] > 0" \
    "every fan-out delivery arrived once"
run chat-mixed 0 "${C[@]}" --scenario mixed --group-size 10 --conns 200 \
    --rate 300
expect chat-mixed "d['requests']['typing'] > 0 and d['requests']['read'] > 0" \
    "typing and read requests sent"
run chat-storm 0 "${C[@]}" --scenario connect-storm --conns 500 \
    --connect-rate 1000
expect chat-storm "d['connections']['ok'] == 500 and d['connect']['p99_ms'] > 0" \
    "500 connects measured"

# -- fault injection: the generator must notice --
start_mock 8292 DROP_EVERY=101
run fault-drop 3 --mode chat --port 8292 --secret-file "$SECRET" \
    --scenario group --group-size 5 --conns 100 --rate 500
expect fault-drop "d['integrity']['lost'] > 0 and d['integrity']['seq_gap'] > 0" \
    "dropped deliveries counted as lost"
start_mock 8293 DUP_EVERY=101
run fault-dup 3 --mode chat --port 8293 --secret-file "$SECRET" \
    --scenario group --group-size 5 --conns 100 --rate 500
expect fault-dup "d['integrity']['dup'] > 0 and d['integrity']['lost'] == 0" \
    "duplicated deliveries counted"
start_mock 8294 DELAY_EVERY=101
run fault-delay 3 --mode chat --port 8294 --secret-file "$SECRET" \
    --scenario dm --conns 100 --rate 2000
expect fault-delay "d['integrity']['seq_back'] > 0 and d['latency_e2e_ms']['max'] >= 30" \
    "late deliveries seen as reordered and in the latency tail"

# -- Nchan --
mkdir -p "$TMP/nchan/tmp"
sed -e "s#@PREFIX@#$TMP/nchan#g" -e "s#@PORT@#8295#g" -e "s#@WORKERS@#2#g" \
    -e "s#@AFFINITY@#auto#g" "$BENCH/peers/nchan/nginx.conf.in" \
    > "$TMP/nchan/nginx.conf"
if /usr/sbin/nginx -p "$TMP/nchan" -c "$TMP/nchan/nginx.conf" \
       -e "$TMP/nchan/error.log" && wait_port 8295; then
    N=(--mode nchan --port 8295 --server-ppid "$(cat "$TMP/nchan/nginx.pid")")
    run nchan-dm 0 "${N[@]}" --scenario dm --conns 200 --rate 400
    run nchan-group 0 "${N[@]}" --scenario group --group-size 10 \
        --conns 200 --rate 300 --size 1024
    run nchan-idle 0 "${N[@]}" --scenario idle --conns 1000 --hold 2
    expect nchan-idle "d['server_rss_kb']['per_conn_bytes'] > 0" \
        "server RSS per connection measured"
else
    nok "nchan did not start"
fi

# -- Socket.IO --
(cd "$BENCH/peers/socketio" \
 && exec env PORT=8296 SECRET_FILE="$SECRET" node server.js) \
    > "$TMP/sio.log" 2>&1 &
PIDS+=($!)
if wait_port 8296; then
    S=(--mode socketio --port 8296 --secret-file "$SECRET")
    run sio-dm 0 "${S[@]}" --scenario dm --conns 200 --rate 400
    run sio-group 0 "${S[@]}" --scenario group --group-size 10 --conns 200 \
        --rate 300
    run sio-mixed 0 "${S[@]}" --scenario mixed --group-size 10 --conns 200 \
        --rate 300
    expect sio-group "d['latency_ack_ms']['n'] > 0" "acks measured"
    # a wrong key must be refused by the peer's JWT check
    printf 'wrong\n' > "$TMP/wrong"
    "$BIN" --mode socketio --port 8296 --secret-file "$TMP/wrong" \
        --scenario idle --conns 20 --hold 0.5 --out "$TMP/res" \
        --tag sio-badkey > "$TMP/sio-badkey.txt" 2>&1
    expect sio-badkey "d['connections']['auth_failed'] == 20" \
        "tokens signed with another key are refused"
else
    nok "socketio did not start"
fi

echo "results and logs: $TMP"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
