# bench/lib.sh — shell helpers shared by bench/run.sh and bench/soak.sh.
# Sourced, not run. Every wait is bounded.

port_busy() {       # port: something listens on 127.0.0.1:port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2> /dev/null
}

wait_port() {       # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_busy "$1" && return 0
        sleep 0.1
    done
    return 1
}

wait_gone() {       # pid seconds: exited (or a zombie)
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -d "/proc/$1" ] || return 0
        grep -q '^State:.*Z' "/proc/$1/status" 2> /dev/null && return 0
        sleep 0.1
    done
    return 1
}

# gnuplot-nox from Debian when it is missing; false when it cannot be had
ensure_gnuplot() {  # apt log file
    command -v gnuplot > /dev/null 2>&1 && return 0
    apt-get install -y -q gnuplot-nox > "$1" 2>&1 \
        || { apt-get update -q >> "$1" 2>&1 \
             && apt-get install -y -q gnuplot-nox >> "$1" 2>&1; }
}
