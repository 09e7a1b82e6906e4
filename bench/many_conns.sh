#!/usr/bin/env bash
# 100,000 idle WebSocket connections on this machine's limits (issue 5, "Scale").
#
#   bench/many_conns.sh [CONNS] [GATEWAYS] [WORKERS] [DURATION] [SOURCES] [RAMP]
#   defaults: 100000 7 8 30s 127.0.0.2-127.0.0.9 10000 (connections opened per second)
#   one million: bench/many_conns.sh 1000000 64 64 60s 127.0.0.2-127.0.0.65 20000
#   (IMGW_MANY_OUT names the JSON file, default bench/results/many_conns.json; LOADGEN_THREADS
#   threads per worker, default 1: each thread does one blocking handshake at a time, so more
#   threads keep more handshakes in flight when 100 processes share two cores;
#   SETUP_TIMEOUT, default 300s, bounds the connecting phase; HEARTBEAT_MS, default 30000, is
#   the gateways' heartbeat interval, which loadgen follows)
#
# One process may hold at most 20,000 open files here (a hard limit), so both sides are spread:
# GATEWAYS imgw processes bind the SAME WebSocket and TCP ports with SO_REUSEPORT (the kernel
# spreads the accepted connections over them; each has its own admin port and data directory),
# and loadgen runs WORKERS worker processes over the source addresses 127.0.0.2-127.0.0.9 (one
# source address has about 28,000 ephemeral ports towards one target). Every connection does
# the WebSocket upgrade and `hello`, then heartbeats. At the end the script prints loadgen's
# summary and each gateway's connection count (/metrics) and RSS, and writes the JSON file;
# the peak sample also gives the kernel's slab memory (/proc/meminfo `Slab`, both ends of
# every socket: gateway and loadgen) against the count before the run. It stops what it
# started.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${1:-100000}
GATEWAYS=${2:-7}
WORKERS=${3:-8}
DURATION=${4:-30s}
SOURCES=${5:-127.0.0.2-127.0.0.9}
RAMP=${6:-10000}
WS_PORT=${IMGW_MANY_WS_PORT:-28480}
TCP_PORT=${IMGW_MANY_TCP_PORT:-28490}
ADMIN_BASE=${IMGW_MANY_ADMIN_BASE:-28500}
DIR=$(mktemp -d /tmp/imgw-many.XXXXXX)
OUT=${IMGW_MANY_OUT:-bench/results/many_conns.json}

. bench/lib.sh
build_release

cat >"$DIR/imgw.toml" <<EOF
[server]
share_ports = true
# Idle connections: the store is not on their path (the default, local, opens one per gateway).
durability = "memory"
[limits]
idle_timeout_ms = 600000
heartbeat_ms = ${HEARTBEAT_MS:-30000}
EOF

SLAB_BEFORE=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

for ((i = 0; i < GATEWAYS; i++)); do
    "$IMGW" serve --config "$DIR/imgw.toml" --insecure-dev-auth --shards 1 \
        --ws-listen "127.0.0.1:$WS_PORT" --tcp-listen "127.0.0.1:$TCP_PORT" \
        --admin-listen "127.0.0.1:$((ADMIN_BASE + i))" --data-dir "$DIR/data$i" \
        --log warn >"$DIR/imgw$i.log" 2>&1 &
    pids+=($!)
done
for ((i = 0; i < GATEWAYS; i++)); do
    for _ in $(seq 1 200); do
        kill -0 "${pids[$i]}" 2>/dev/null ||
            { echo "gateway $i exited: $(tail -3 "$DIR/imgw$i.log")" >&2; exit 1; }
        # /readyz: the shards listen (the admin port answers before they do).
        curl -sf "http://127.0.0.1:$((ADMIN_BASE + i))/readyz" >/dev/null && break
        sleep 0.1
    done
done

# Each gateway's RSS before any connection: the per-connection figure leaves it out.
rss0=()
for ((i = 0; i < GATEWAYS; i++)); do
    rss0+=("$(awk '/VmRSS/ {print $2}' "/proc/${pids[$i]}/status")")
done

# While loadgen holds the connections, sample every gateway every 5 s (connections from
# /metrics, RSS from /proc) and keep the sample with the most connections.
sample_once() {
    local total=0 i n rss rss_total=0 rss_added=0 slab
    for ((i = 0; i < GATEWAYS; i++)); do
        n=$(curl -s "http://127.0.0.1:$((ADMIN_BASE + i))/metrics" |
            awk '/^imgw_connections_authenticated[{ ]/ {s += $NF} END {print s + 0}')
        rss=$(awk '/VmRSS/ {print $2}' "/proc/${pids[$i]}/status")
        echo "gateway $i: $n authenticated connections, RSS $rss KiB"
        total=$((total + n))
        rss_total=$((rss_total + rss))
        rss_added=$((rss_added + rss - rss0[i]))
    done
    slab=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
    echo "all gateways: $total authenticated connections, RSS $rss_total KiB"
    if [ "$total" -gt 0 ]; then
        echo "per connection: gateway RSS $((rss_added * 1024 / total)) B (above each" \
            "gateway's RSS before the run), kernel slab $(((slab - SLAB_BEFORE) * 1024 / total))" \
            "B (both ends of the socket)"
    fi
}
sampler() {
    local best=0 total
    while sleep 5; do
        sample_once >"$DIR/now.txt"
        total=$(awk '/^all gateways/ {print $3}' "$DIR/now.txt")
        if [ "$total" -ge "$best" ]; then
            best=$total
            cp "$DIR/now.txt" "$DIR/sample.txt"
        fi
    done
}
sampler &
sampler_pid=$!
pids+=("$sampler_pid")

status=0
"$LOADGEN" idle --target "ws://127.0.0.1:$WS_PORT/ws" --conns "$CONNS" --workers "$WORKERS" \
    --threads "${LOADGEN_THREADS:-1}" --setup-timeout "${SETUP_TIMEOUT:-300s}" \
    --sources "$SOURCES" --ramp "$RAMP" --duration "$DURATION" --json "$OUT" || status=$?
kill "$sampler_pid" 2>/dev/null || true
echo "peak sample:"
cat "$DIR/sample.txt" 2>/dev/null || echo "(no sample)"
{
    echo "commit $(git rev-parse --short HEAD); $CONNS connections, $GATEWAYS gateways," \
        "$WORKERS loadgen workers x ${LOADGEN_THREADS:-1} threads, sources $SOURCES," \
        "ramp $RAMP/s, held $DURATION, heartbeat every ${HEARTBEAT_MS:-30000} ms"
    cat "$DIR/sample.txt" 2>/dev/null || echo "(no sample)"
} >"${OUT%.json}.peak.txt"
echo "loadgen exit status $status; JSON in $OUT"
exit "$status"
