#!/usr/bin/env bash
# Builds ngx_chat_module.
#
#   scripts/build.sh dyn      dynamic module for Debian's /usr/sbin/nginx
#                             -> build/dyn/ngx_chat_module.so
#   scripts/build.sh static   nginx 1.22 (Debian's patched source) with the
#                             module compiled in -> build/static/nginx
#      ASAN=1  -> build/static-asan/nginx (-O1 -fsanitize=address)
#      UBSAN=1 adds -fsanitize=undefined (alone: build/static-ubsan/nginx)
#
# Warnings are errors: nginx's own CFLAGS carry -W (= -Wextra) -Wall -Werror
# -Wno-unused-parameter for every object, the module's included.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
NGX_SRC=${NGX_SRC:-/usr/share/nginx/src}
JOBS=${JOBS:-$(nproc)}

# Debian's own --with-cc-opt/--with-ld-opt (minus -ffile-prefix-map). The
# configure feature tests are compiled with these flags: extra warning flags
# here (-Wextra -Werror) make some tests fail and change ngx_auto_config.h
# (NGX_HAVE_PWRITE, ...), which must match the Debian binary.
DEB_CC_OPT="-g -O2 -fstack-protector-strong -Wformat -Werror=format-security -fPIC -Wdate-time -D_FORTIFY_SOURCE=2"
DEB_LD_OPT="-Wl,-z,relro -Wl,-z,now -fPIC"

# Re-runs configure when `config`, the flags or the nginx sources changed.
needs_configure() {   # builddir stamp-content
    local bd=$1 want=$2
    [ -f "$bd/Makefile" ] && [ -f "$bd/.configured" ] || return 0
    [ "$(cat "$bd/.configured")" = "$want" ] || return 0
    return 1
}

build_dyn() {
    local bd=$REPO/build/dyn
    [ -f "$NGX_SRC/configure" ] || {
        echo "build: $NGX_SRC/configure not found (apt-get install nginx-dev)" >&2; exit 1; }
    local stamp
    stamp="dyn $(sha1sum "$REPO/config" | cut -d' ' -f1) $(dpkg-query -W -f='${Version}' nginx-dev 2>/dev/null) $DEB_CC_OPT"
    if needs_configure "$bd" "$stamp"; then
        echo "build: configuring dynamic module in build/dyn"
        rm -rf "$bd"
        mkdir -p "$bd"
        (cd "$NGX_SRC" && . ./conf_flags &&
            ./configure "${NGX_CONF_FLAGS[@]}" \
                --with-cc-opt="$DEB_CC_OPT" --with-ld-opt="$DEB_LD_OPT" \
                --add-dynamic-module="$REPO" --builddir="$bd") \
            > "$bd/configure.log" 2>&1 || {
                tail -n 30 "$bd/configure.log" >&2
                echo "build: configure failed, see build/dyn/configure.log" >&2
                rm -f "$bd/Makefile"; exit 1; }
        echo "$stamp" > "$bd/.configured"
    fi
    make -s -f "$bd/Makefile" -C "$NGX_SRC" -j"$JOBS" modules
    # A shared object links with undefined symbols; nginx would refuse it at
    # load_module time ("undefined symbol"). Catch it here: every ngx_*
    # symbol the module needs must be exported by the nginx binary.
    local nginx_bin=${NGINX:-/usr/sbin/nginx} unresolved
    if [ -x "$nginx_bin" ]; then
        unresolved=$(comm -23 \
            <(nm -u "$bd/ngx_chat_module.so" | awk '$2 ~ /^ngx_/ {print $2}' | sort -u) \
            <(nm -D --defined-only "$nginx_bin" | awk '{print $3}' | sort -u))
        if [ -n "$unresolved" ]; then
            echo "build: ngx_chat_module.so has unresolved symbols:" $unresolved >&2
            exit 1
        fi
    fi
    echo "build: $bd/ngx_chat_module.so"
}

ensure_source() {   # prints the nginx source dir under build/src
    local srcroot=$REPO/build/src dir
    dir=$(ls -d "$srcroot"/nginx-1.*/ 2>/dev/null | head -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/configure" ]; then
        echo "${dir%/}"; return
    fi
    command -v dpkg-source >/dev/null || {
        echo "build: dpkg-dev missing (scripts/install-deps.sh)" >&2; exit 1; }
    local src=/etc/apt/sources.list.d/debian-src.sources
    if [ ! -f "$src" ] && ! grep -rqs '^\(Types:.*deb-src\|deb-src \)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        [ -f /etc/apt/sources.list.d/debian.sources ] || {
            echo "build: no /etc/apt/sources.list.d/debian.sources to derive a deb-src entry from" >&2; exit 1; }
        echo "build: adding $src" >&2
        sed 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src"
        apt-get update -qq >&2
    fi
    mkdir -p "$srcroot"
    echo "build: apt-get source nginx into build/src" >&2
    # The newest source version is not always on the mirror (a security
    # update's .dsc can 404): fall back to the other versions apt knows.
    local v got=0 versions
    versions=$(apt-cache showsrc nginx 2>/dev/null | awk '/^Version:/ {print $2}' | sort -r -V -u)
    if [ -z "$versions" ]; then
        apt-get update -qq >&2
        versions=$(apt-cache showsrc nginx 2>/dev/null | awk '/^Version:/ {print $2}' | sort -r -V -u)
    fi
    for v in ${versions:-candidate}; do
        [ "$v" = candidate ] && v=
        if (cd "$srcroot" && apt-get source -q "nginx${v:+=$v}") > "$srcroot/apt-source.log" 2>&1; then
            got=1; break
        fi
        echo "build: nginx source ${v:-(candidate)} not available, trying another version" >&2
    done
    [ "$got" = 1 ] || cat "$srcroot/apt-source.log" >&2
    [ "$got" = 1 ] || { echo "build: could not fetch the nginx source" >&2; exit 1; }
    dir=$(ls -d "$srcroot"/nginx-1.*/ | head -n 1)
    echo "${dir%/}"
}

build_static() {
    local name=static cc_opt="-g -O2" ld_opt="" san=""
    if [ "${ASAN:-0}" = 1 ]; then san=address; name=static-asan; fi
    if [ "${UBSAN:-0}" = 1 ]; then
        san=${san:+$san,}undefined
        [ "$name" = static ] && name=static-ubsan
    fi
    if [ -n "$san" ]; then
        cc_opt="-O1 -g -fsanitize=$san -fno-omit-frame-pointer -DNGX_DEBUG_PALLOC -DNGX_DEBUG_MALLOC"
        ld_opt="-fsanitize=$san"
    fi
    local src bd=$REPO/build/$name
    src=$(ensure_source)
    local stamp
    stamp="$name $(sha1sum "$REPO/config" | cut -d' ' -f1) $(basename "$src") $cc_opt $ld_opt"
    if needs_configure "$bd" "$stamp"; then
        echo "build: configuring $name nginx in build/$name"
        rm -rf "$bd"
        mkdir -p "$bd"
        (cd "$src" && ./configure \
            --prefix="$bd/prefix" --error-log-path=stderr \
            --with-debug --with-threads --with-pcre-jit \
            --with-http_ssl_module --with-http_v2_module \
            --with-http_realip_module --with-http_stub_status_module \
            --with-http_auth_request_module \
            --with-cc-opt="$cc_opt" ${ld_opt:+--with-ld-opt="$ld_opt"} \
            --add-module="$REPO" --builddir="$bd") \
            > "$bd/configure.log" 2>&1 || {
                tail -n 30 "$bd/configure.log" >&2
                echo "build: configure failed, see build/$name/configure.log" >&2
                rm -f "$bd/Makefile"; exit 1; }
        echo "$stamp" > "$bd/.configured"
    fi
    make -s -f "$bd/Makefile" -C "$src" -j"$JOBS" build
    echo "build: $bd/nginx"
}

case "${1:-dyn}" in
    dyn) build_dyn ;;
    static) build_static ;;
    *) echo "usage: $0 dyn|static" >&2; exit 2 ;;
esac
