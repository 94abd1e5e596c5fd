#!/usr/bin/env bash
# Installs the Debian (bookworm) packages that building, running and testing
# ngx_chat_module need. Idempotent: asks apt only about what is missing, and
# runs `apt-get update` only when something is missing. Needs root.
#
#   scripts/install-deps.sh            # install what is missing
#   scripts/install-deps.sh --check    # exit 1 (and list them) if any is missing
#   scripts/install-deps.sh --runtime  # only what building and running need
#                                      # (no browsers, no npm packages: images)
set -euo pipefail

runtime=0
if [ "${1:-}" = --runtime ]; then
    runtime=1
    shift
fi

PACKAGES=(
    build-essential dpkg-dev        # cc, make; dpkg-dev for `apt-get source`
    nginx nginx-dev                 # /usr/sbin/nginx 1.22 + /usr/share/nginx/src
    libpq-dev libjansson-dev libssl-dev
    libpcre2-dev zlib1g-dev         # static nginx build (make static)
    postgresql postgresql-client    # PostgreSQL 15 on bookworm
    openssl curl procps perl        # openssl rand, pgrep, prove
    python3 python3-websockets python3-psycopg2 python3-jwt
    python3-cryptography python3-wsproto
)
# the browser tests' (and their npm packages, below)
if [ "$runtime" = 0 ]; then
    PACKAGES+=(
        chromium                    # playwright-core drives it
        firefox-esr                 # puppeteer-core, over WebDriver BiDi
        fonts-noto-color-emoji      # emoji in the demo's screenshots
    )
fi

# Node.js and npm: the machine image may ship its own; Debian's otherwise.
if [ "$runtime" = 0 ] && { ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; }; then
    PACKAGES+=(nodejs npm)
fi

# npm packages of the browser client and its tests (client/package-lock.json)
npm_deps() {
    [ "$runtime" = 0 ] || return 0
    local client
    client="$(cd "$(dirname "$0")/.." && pwd)/client"
    if [ ! -d "$client/node_modules/playwright-core" ] ||
       [ ! -d "$client/node_modules/puppeteer-core" ]; then
        echo "install-deps: npm ci in client/"
        (cd "$client" && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages present"
    [ "${1:-}" = --check ] || npm_deps
    exit 0
fi

if [ "${1:-}" = --check ]; then
    echo "install-deps: missing: ${missing[*]}" >&2
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing: ${missing[*]}; run this script as root" >&2
    exit 1
fi

echo "install-deps: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

# Keep the packages' init scripts from starting system services (a system
# nginx on port 80, a system PostgreSQL cluster on 5432) while installing:
# the project runs its own instances. Docker images already ship this file.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    own_policy=1
    trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
fi

new_nginx=0
for p in "${missing[@]}"; do [ "$p" = nginx ] && new_nginx=1; done

apt-get update -qq
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

if [ "$own_policy" = 1 ]; then
    rm -f "$policy"
    own_policy=0
fi

# If the nginx package started the system nginx anyway (policy-rc.d was not
# ours and allowed it), stop and disable it so it does not hold port 80.
# Only when this run installed nginx: a system nginx someone runs on purpose
# is left alone.
if [ "$new_nginx" = 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    else
        update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
    # a master started from /etc/nginx (no -p prefix of ours)
    for pid in $(pgrep -f '^nginx: master process /usr/sbin/nginx' || true); do
        if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- ' -p '; then
            echo "install-deps: stopping the system nginx (pid $pid)"
            invoke-rc.d nginx stop >/dev/null 2>&1 || /usr/sbin/nginx -s quit || true
        fi
    done
fi

npm_deps
echo "install-deps: done"
