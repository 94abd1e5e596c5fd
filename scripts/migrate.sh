#!/usr/bin/env bash
# Applies the schema migrations sql/NNN_*.sql in order.
#
#   scripts/migrate.sh <psql connection args...>
#   e.g. scripts/migrate.sh -h /path/to/socketdir -p 5433 -U postgres -d chat
#
# Each migration file records itself at its end:
#   INSERT INTO chat_schema_version(version) VALUES (N);
# The runner applies, in numeric order, every file whose number is greater
# than max(version) of chat_schema_version (0 while the table does not exist),
# each in a single transaction (psql --single-transaction, ON_ERROR_STOP), and
# checks afterwards that the file recorded its version.
#
# MIGRATIONS_DIR overrides the directory (default: the repo's sql/).
# PSQL overrides the psql binary.
set -euo pipefail
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${MIGRATIONS_DIR:-$REPO/sql}
if [ -z "${PSQL:-}" ]; then
    PSQL=psql
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -r -V); do
        [ -x "$d/psql" ] && { PSQL=$d/psql; break; }
    done
fi

q() {   # one value from a query
    "$PSQL" "$@" -X -q -A -t -v ON_ERROR_STOP=1
}

has_table=$(q "$@" -c "SELECT to_regclass('chat_schema_version') IS NOT NULL")
current=0
if [ "$has_table" = t ]; then
    current=$(q "$@" -c "SELECT coalesce(max(version), 0) FROM chat_schema_version")
fi

shopt -s nullglob
files=("$DIR"/[0-9]*_*.sql)
if [ ${#files[@]} -eq 0 ]; then
    echo "migrate: no migrations in $DIR (schema version $current)"
    exit 0
fi

# numeric order, whatever the zero padding
mapfile -t files < <(for f in "${files[@]}"; do
    b=$(basename "$f"); n=${b%%_*}; echo "$((10#$n)) $f"; done | sort -n -k1,1 | cut -d' ' -f2-)

applied=0
prev=-1
for f in "${files[@]}"; do
    b=$(basename "$f"); n=$((10#${b%%_*}))
    if [ "$n" = "$prev" ]; then
        echo "migrate: two migrations numbered $n" >&2; exit 1
    fi
    prev=$n
    [ "$n" -gt "$current" ] || continue
    echo "migrate: applying $b"
    "$PSQL" "$@" -X -q -v ON_ERROR_STOP=1 --single-transaction -f "$f" >/dev/null
    got=$(q "$@" -c "SELECT count(*) FROM chat_schema_version WHERE version = $n" 2>/dev/null || echo 0)
    if [ "$got" != 1 ]; then
        echo "migrate: $b did not record version $n in chat_schema_version" >&2
        exit 1
    fi
    applied=$((applied + 1))
    current=$n
done
echo "migrate: schema version $current ($applied applied)"
