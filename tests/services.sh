#!/usr/bin/env bash
# Installs (when missing) and starts the external services of SPEC 6 on 127.0.0.1, each with a
# private data directory, and stops what it started:
#
#   tests/services.sh start    # install what is missing, start, print the URLs (KEY=VALUE lines)
#   tests/services.sh stop     # stop what `start` started (services found already running stay)
#   tests/services.sh status   # print the URLs of what answers
#   tests/services.sh env      # the URLs only, for `eval "$(tests/services.sh env)"`
#   tests/services.sh stop-redis|start-redis|stop-kafka|start-kafka
#                              # one service, for outage experiments by hand (only what this
#                              # script started can be stopped; tests/services.rs starts its
#                              # own private servers for its outage tests)
#   tests/services.sh start-mysql | stop-mysql | kill-mysql
#                              # MariaDB alone: start it (installed already), stop it (SIGTERM),
#                              # or SIGKILL it; stop/kill only act on a MariaDB this script
#                              # started. With IMGW_SERVICES_DIR and IMGW_MYSQL_PORT the outage
#                              # tests run a private instance this way (tests/mysql.rs).
#
#   MariaDB 10.11  Debian package mariadb-server      IMGW_MYSQL_URL  mysql://imgw:imgw@127.0.0.1:3306/imgw
#   Redis 7        Debian package redis-server        IMGW_REDIS_URL  redis://127.0.0.1:6379/
#   tansu 0.6.0    cargo install (memory storage)     IMGW_KAFKA      127.0.0.1:9092
#
# tansu is the Kafka-compatible test broker. Its build takes 9 to 13 minutes on two cores, once
# per machine: an installed binary (in PATH or ~/.cargo/bin) is reused. It does not create topics
# on first use; imgw and the tests create theirs.
#
# Ports and the state directory can be moved: IMGW_MYSQL_PORT, IMGW_REDIS_PORT, IMGW_KAFKA_PORT,
# IMGW_SERVICES_DIR (default /tmp/imgw-services). A service already answering on its port
# (a system MariaDB on 3306, say) is used as it is; `stop` leaves it running.
set -euo pipefail

MYSQL_PORT=${IMGW_MYSQL_PORT:-3306}
REDIS_PORT=${IMGW_REDIS_PORT:-6379}
KAFKA_PORT=${IMGW_KAFKA_PORT:-9092}
DIR=${IMGW_SERVICES_DIR:-/tmp/imgw-services}
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "services: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    log "installing $* (Debian packages)"
    as_root apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() {
    # bash's /dev/tcp: no extra tool needed.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port seconds name
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    log "$3 did not open 127.0.0.1:$1 within $2 s"
    return 1
}

urls() {
    echo "IMGW_MYSQL_URL=mysql://imgw:imgw@127.0.0.1:$MYSQL_PORT/imgw"
    echo "IMGW_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
    echo "IMGW_KAFKA=127.0.0.1:$KAFKA_PORT"
}

tansu_bin() {
    command -v tansu 2>/dev/null || true
}

install_all() {
    local missing=()
    command -v mariadbd >/dev/null || missing+=(mariadb-server mariadb-client)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    if [ -z "$(tansu_bin)" ]; then
        log "building tansu $TANSU_VERSION with its memory storage (9 to 13 minutes, once per machine)"
        cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked --quiet
    fi
}

start_mysql() {
    local d="$DIR/mariadb"
    if port_open "$MYSQL_PORT" && [ ! -f "$d/started-by-us" ]; then
        log "MariaDB already answers on $MYSQL_PORT: using it"
    elif [ -f "$d/mariadbd.pid" ] && kill -0 "$(cat "$d/mariadbd.pid")" 2>/dev/null; then
        log "MariaDB (ours) already running"
    else
        mkdir -p "$d"
        if [ ! -d "$d/data/mysql" ]; then
            # Private instances start in parallel (tests/mysql.rs), and one install failed
            # silently in 0.45 s beside another once: install one at a time, try again after a
            # failure, and say what it printed.
            local try
            for try in 1 2 3; do
                if flock /tmp/imgw-mariadb-install.lock mariadb-install-db --no-defaults \
                    --datadir="$d/data" --user="$(id -un)" \
                    --auth-root-authentication-method=socket >"$d/install.log" 2>&1; then
                    break
                fi
                log "mariadb-install-db failed (attempt $try): $(tail -n 5 "$d/install.log" | tr '\n' ' ')"
                rm -rf "$d/data"
                [ "$try" = 3 ] && return 1
                sleep 1
            done
        fi
        # Debian's service normally creates the socket directory; we use our own.
        mariadbd --no-defaults --datadir="$d/data" --bind-address=127.0.0.1 --port="$MYSQL_PORT" \
            --socket="$d/mysqld.sock" --pid-file="$d/mariadbd.pid" --user="$(id -un)" \
            --skip-name-resolve --innodb-buffer-pool-size=128M --max-connections=500 \
            --log-error="$d/error.log" >/dev/null 2>&1 &
        touch "$d/started-by-us"
        wait_port "$MYSQL_PORT" 60 MariaDB
    fi
    # The gateway's database and user (idempotent). Through our socket when we started it,
    # else through TCP as root with no password (a fresh system install), else leave it.
    local sql="CREATE DATABASE IF NOT EXISTS imgw;
        CREATE DATABASE IF NOT EXISTS imgw_test;
        CREATE USER IF NOT EXISTS 'imgw'@'127.0.0.1' IDENTIFIED BY 'imgw';
        CREATE USER IF NOT EXISTS 'imgw'@'localhost' IDENTIFIED BY 'imgw';
        GRANT ALL ON imgw.* TO 'imgw'@'127.0.0.1';
        GRANT ALL ON imgw.* TO 'imgw'@'localhost';
        GRANT ALL ON \`imgw\\_%\`.* TO 'imgw'@'127.0.0.1';
        GRANT ALL ON \`imgw\\_%\`.* TO 'imgw'@'localhost';
        FLUSH PRIVILEGES;"
    if [ -S "$d/mysqld.sock" ]; then
        mariadb --no-defaults --socket="$d/mysqld.sock" -uroot -e "$sql"
    elif ! mariadb --no-defaults -h127.0.0.1 -P"$MYSQL_PORT" -uroot -e "$sql" 2>/dev/null; then
        log "could not create the imgw user on the running MariaDB; create it by hand (see $0)"
    fi
}

start_redis() {
    local d="$DIR/redis"
    if port_open "$REDIS_PORT"; then
        log "Redis already answers on $REDIS_PORT: using it"
        return
    fi
    mkdir -p "$d"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$d" --pidfile "$d/redis.pid" --logfile "$d/redis.log" --daemonize yes >/dev/null
    touch "$d/started-by-us"
    wait_port "$REDIS_PORT" 20 Redis
}

start_kafka() {
    local d="$DIR/tansu"
    if port_open "$KAFKA_PORT"; then
        log "a broker already answers on $KAFKA_PORT: using it"
        return
    fi
    mkdir -p "$d"
    local bin
    bin=$(tansu_bin)
    nohup "$bin" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/ >"$d/tansu.log" 2>&1 &
    echo $! >"$d/tansu.pid"
    touch "$d/started-by-us"
    wait_port "$KAFKA_PORT" 30 tansu
}

stop_pidfile() { # pidfile name
    [ -f "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $2"
    fi
    rm -f "$1"
}

stop_all() {
    [ -f "$DIR/tansu/started-by-us" ] && stop_pidfile "$DIR/tansu/tansu.pid" tansu
    [ -f "$DIR/redis/started-by-us" ] && stop_pidfile "$DIR/redis/redis.pid" Redis
    [ -f "$DIR/mariadb/started-by-us" ] && stop_pidfile "$DIR/mariadb/mariadbd.pid" MariaDB
    rm -f "$DIR"/*/started-by-us
}

status() {
    port_open "$MYSQL_PORT" && echo "IMGW_MYSQL_URL=mysql://imgw:imgw@127.0.0.1:$MYSQL_PORT/imgw"
    port_open "$REDIS_PORT" && echo "IMGW_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
    port_open "$KAFKA_PORT" && echo "IMGW_KAFKA=127.0.0.1:$KAFKA_PORT"
    return 0
}

kill_mysql() {
    local pidfile="$DIR/mariadb/mariadbd.pid"
    [ -f "$DIR/mariadb/started-by-us" ] && [ -f "$pidfile" ] || {
        log "no MariaDB started by this script under $DIR"
        return 1
    }
    local pid
    pid=$(cat "$pidfile")
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    rm -f "$pidfile"
    log "killed MariaDB (SIGKILL)"
}

case "${1:-}" in
start-mysql)
    command -v mariadbd >/dev/null || {
        log "mariadbd is not installed: run $0 start"
        exit 1
    }
    mkdir -p "$DIR"
    start_mysql
    echo "IMGW_MYSQL_URL=mysql://imgw:imgw@127.0.0.1:$MYSQL_PORT/imgw"
    ;;
stop-mysql)
    [ -f "$DIR/mariadb/started-by-us" ] || {
        log "no MariaDB started by this script under $DIR"
        exit 1
    }
    stop_pidfile "$DIR/mariadb/mariadbd.pid" MariaDB
    ;;
kill-mysql) kill_mysql ;;
start)
    install_all
    mkdir -p "$DIR"
    start_mysql
    start_redis
    start_kafka
    urls
    ;;
stop) stop_all ;;
stop-redis) [ -f "$DIR/redis/started-by-us" ] && stop_pidfile "$DIR/redis/redis.pid" Redis ;;
start-redis) mkdir -p "$DIR" && start_redis ;;
stop-kafka) [ -f "$DIR/tansu/started-by-us" ] && stop_pidfile "$DIR/tansu/tansu.pid" tansu ;;
start-kafka) mkdir -p "$DIR" && start_kafka ;;
status) status ;;
env) urls ;;
*)
    echo "usage: $0 start|stop|status|env|start-mysql|stop-mysql|kill-mysql|stop-redis|start-redis|stop-kafka|start-kafka" >&2
    exit 2
    ;;
esac
