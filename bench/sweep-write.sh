#!/usr/bin/env bash
# The store's write path (issue 8): nginx workers x message rate x commit
# flush latency, one bench/run.sh run per point, against this checkout's
# build/dyn/ngx_chat_module.so.  Prints one table row per point: latency
# (e2e p50/p99, ack p50/p99), deliveries, integrity counters and
# PostgreSQL's CPU per stored message.
#
#   bench/sweep-write.sh [--scenario group|dm] [--k 10] [--workers "1 2"]
#                        [--rates "1000 4000"] [--flush "0 2000"]
#                        [--reps 1] [--duration 8] [--out DIR]
#
# --flush: PostgreSQL's commit_delay in microseconds (commit_siblings 0),
# the stand-in for a slower disk: this machine has no dm-delay, and a WAL on
# a slow loop device needs a second file system.  Every commit then waits
# that long before its flush (and more commits share a flush), as a cloud
# volume's 0.5-2 ms flush would make it.  0: the disk as it is.
# Environment as for run.sh (SERVER_CPUS, GEN_CPUS, CHAT_PORT, ...);
# SERVER_CPUS="0,1" GEN_CPUS=1 runs unpinned-ish on both cores.
set -euo pipefail

BENCH="$(cd "$(dirname "$0")" && pwd)"
SCENARIO=group
K=10
WORKERS_LIST="1 2"
RATES="1000 4000"
FLUSH="0"
REPS=1
DURATION=8
OUT=""

while [ $# -gt 0 ]; do
    case "$1" in
    --scenario) SCENARIO="$2"; shift ;;
    --k) K="$2"; shift ;;
    --workers) WORKERS_LIST="$2"; shift ;;
    --rates) RATES="$2"; shift ;;
    --flush) FLUSH="$2"; shift ;;
    --reps) REPS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "sweep-write.sh: unknown option $1" >&2; exit 1 ;;
    esac
    shift
done

OUT="${OUT:-$BENCH/results/write-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

row() {     # run.log of one point -> one row per run
    awk -v pt="$1" '
    function pick(line, key,    i, n, f) {
        n = split(line, f, /[ \t]+/)
        for (i = 1; i < n; i++) if (f[i] == key) return f[i + 1]
        return "-"
    }
    /latency e2e/  { e = pick($0, "p50") " / " pick($0, "p99") }
    /latency ack/  { a = pick($0, "p50") " / " pick($0, "p99") }
    /integrity/    { g = $0; sub(/^ *integrity */, "", g) }
    /postgres cpu/ { c = $0; sub(/^ *postgres cpu: */, "", c) }
    /result/       { r = $0; sub(/^ *result */, "", r) }
    /^[0-9:]+ run / && e != "" { printf "| %s | %s | %s | %s | %s | %s |\n", pt, e, a, g, c, r
                                 e = a = g = c = r = "" }
    END { if (e != "") printf "| %s | %s | %s | %s | %s | %s |\n", pt, e, a, g, c, r }' "$2"
}

{
    echo "# write-path sweep: $SCENARIO k=$K, $(date -u +%FT%TZ)"
    echo
    echo "commit $(git -C "$BENCH/.." rev-parse --short HEAD 2> /dev/null || echo -)"
    echo "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "SERVER_CPUS=${SERVER_CPUS:-0} GEN_CPUS=${GEN_CPUS:-1}"
    echo
    echo "| workers / rate / commit_delay | e2e p50 / p99 (ms) | ack p50 / p99 (ms) | integrity | postgres cpu | result |"
    echo "|---|---|---|---|---|---|"
} > "$OUT/table.md"

for w in $WORKERS_LIST; do
    for f in $FLUSH; do
        for r in $RATES; do
            pt="w$w r$r d$f"
            dir="$OUT/w$w-r$r-d$f"
            opts="${PG_OPTS:-}"
            [ "$f" != 0 ] && opts="$opts -c commit_delay=$f -c commit_siblings=0"
            if [ "$SCENARIO" = group ]; then
                spec=(GROUP_SPECS="$K:$r" GROUP_SPEC_1K=)
            else
                spec=(DM_RATES="$r" DM_RATE_1K=)
            fi
            env PG_OPTS="$opts" SERVER_WORKERS="$w" DURATION="$DURATION" \
                "${spec[@]}" MIXED_SIZES= \
                bash "$BENCH/run.sh" --modes chat --scenarios "$SCENARIO" \
                --reps "$REPS" --out "$dir" > "$dir.log" 2>&1 || true
            row "$pt" "$dir/run.log" | tee -a "$OUT/table.md"
        done
    done
done

echo "sweep-write: $OUT/table.md"
