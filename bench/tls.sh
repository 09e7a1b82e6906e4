#!/usr/bin/env bash
# TLS against plain, side by side in one invocation (issue 12's benchmarks).
#
#   bench/tls.sh [CONNS] [RUNS]        defaults: 19000 3
#
# For each run and each listener (tcp, tls, ws, wss) a fresh one-shard gateway (the other core
# runs loadgen) takes CONNS idle connections from 4 loadgen workers as fast as they come
# (`loadgen idle --ramp 0`), each doing its TLS handshake (ECDSA P-256 certificate made here
# with openssl, TLS 1.3), the WebSocket upgrade where there is one, and `hello`. loadgen's
# --server-pid gives the gateway's CPU time from the first connect until all are up (per
# connection: the inverse is handshakes per core-second) and its RSS per connection once all
# are up. Then `loadgen chat` (200 connections, 5,000 msgs/s, 10 s) over ws and wss gives the
# gateway's CPU time per delivered message. Medians of RUNS runs go to
# bench/results/tls.md with the commit measured. It stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${1:-19000}
RUNS=${2:-3}
DIR=$(mktemp -d /tmp/imgw-tls-bench.XXXXXX)
OUT=bench/results/tls.md
PORT_BASE=${IMGW_TLS_BENCH_PORT:-28600}

. bench/lib.sh
build_release

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE \
    -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2>/dev/null
cat >"$DIR/imgw.toml" <<EOF
[server]
durability = "memory"
[limits]
idle_timeout_ms = 600000
heartbeat_ms = 60000
sends_per_sec = 100000
send_burst = 100000
EOF

gw_pid=
cleanup() {
    [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

start_gateway() {
    rm -rf "$DIR/data"
    "$IMGW" serve --config "$DIR/imgw.toml" --insecure-dev-auth --shards 1 \
        --ws-listen "127.0.0.1:$PORT_BASE" --tcp-listen "127.0.0.1:$((PORT_BASE + 1))" \
        --wss-listen "127.0.0.1:$((PORT_BASE + 2))" --tls-listen "127.0.0.1:$((PORT_BASE + 3))" \
        --admin-listen "127.0.0.1:$((PORT_BASE + 4))" --tls-cert "$DIR/cert.pem" \
        --tls-key "$DIR/key.pem" --data-dir "$DIR/data" --log warn >"$DIR/imgw.log" 2>&1 &
    gw_pid=$!
    # /readyz: every shard has bound its listeners (the admin port answers before they do).
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$((PORT_BASE + 4))/readyz" >/dev/null && return
        sleep 0.1
    done
    echo "gateway did not start" >&2
    exit 1
}
stop_gateway() {
    kill "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
    gw_pid=
}
# Each listener's run connects from its own source addresses: a run leaves its client ports
# in TIME_WAIT for a minute, and four runs of 19,000 from the same four addresses exhaust them.
sources() {
    case $1 in
    tcp) echo 127.0.0.2-127.0.0.5 ;;
    tls) echo 127.0.0.6-127.0.0.9 ;;
    ws) echo 127.0.0.10-127.0.0.13 ;;
    wss) echo 127.0.0.14-127.0.0.17 ;;
    esac
}
target() {
    case $1 in
    tcp) echo "tcp://127.0.0.1:$((PORT_BASE + 1))" ;;
    tls) echo "tls://127.0.0.1:$((PORT_BASE + 3))" ;;
    ws) echo "ws://127.0.0.1:$PORT_BASE/ws" ;;
    wss) echo "wss://127.0.0.1:$((PORT_BASE + 2))/ws" ;;
    esac
}

for run in $(seq 1 "$RUNS"); do
    for l in tcp tls ws wss; do
        start_gateway
        "$LOADGEN" idle --target "$(target "$l")" --conns "$CONNS" --workers 4 --ramp 0 \
            --sources "$(sources "$l")" --duration 3s --setup-timeout 120s \
            --tls-ca "$DIR/cert.pem" --server-pid "$gw_pid" --quiet \
            --json "$DIR/idle-$l-$run.json" >/dev/null
        stop_gateway
        echo "run $run $l: idle done"
    done
    for l in ws wss; do
        start_gateway
        "$LOADGEN" chat --target "$(target "$l")" --conns 200 --rate 5000 --duration 10s \
            --tls-ca "$DIR/cert.pem" --server-pid "$gw_pid" --quiet --expect-no-loss \
            --json "$DIR/chat-$l-$run.json" | tail -4
        stop_gateway
        echo "run $run $l: chat done"
    done
done

python3 - "$DIR" "$RUNS" "$CONNS" "$(git rev-parse --short HEAD)" >"$OUT" <<'EOF'
import json, statistics, sys
d, runs, conns, commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def med(kind, l, f):
    return statistics.median(f(json.load(open(f"{d}/{kind}-{l}-{r}.json"))) for r in range(1, runs + 1))
print(f"# TLS against plain (bench/tls.sh {conns} {runs})\n")
print(f"Commit {commit}; medians of {runs} runs in one invocation; one-shard gateway, loadgen on the")
print("other core; ECDSA P-256 certificate, TLS 1.3 (rustls, ring provider). \"CPU per connection\"")
print("is the gateway's utime+stime from the first connect until all were up, over the connections")
print("(accept, TLS handshake, WebSocket upgrade, hello): its inverse is connections per core-second.\n")
print(f"| listener | connections up | CPU per connection (us) | connections per core-second | RSS per connection (B) |")
print("|---|---|---|---|---|")
for l in ["tcp", "tls", "ws", "wss"]:
    up = med("idle", l, lambda j: j["connected"])
    cpu = med("idle", l, lambda j: j["server_proc"]["cpu_per_connect_us"])
    rss = med("idle", l, lambda j: j["server_proc"]["rss_per_conn_bytes"])
    print(f"| {l} | {up:.0f} | {cpu:.1f} | {1e6 / cpu if cpu else 0:,.0f} | {rss:,.0f} |")
print("\nChat, 200 connections, 5,000 msgs/s for 10 s (loadgen chat --expect-no-loss):\n")
print("| listener | delivered | gateway CPU per delivery (us) | p50 / p99 latency (ms) |")
print("|---|---|---|---|")
for l in ["ws", "wss"]:
    dl = med("chat", l, lambda j: j["messages"]["delivered"])
    cpu = med("chat", l, lambda j: j["server_proc"]["cpu_per_delivery_us"])
    p50 = med("chat", l, lambda j: j["latency_us"]["p50"]) / 1000
    p99 = med("chat", l, lambda j: j["latency_us"]["p99"]) / 1000
    print(f"| {l} | {dl:.0f} | {cpu:.2f} | {p50:.2f} / {p99:.2f} |")
EOF
cat "$OUT"
