#!/usr/bin/env bash
# Acked msgs/s and latency of 1:1 chat at durability `local` (embedded store) and `backend`
# (MariaDB), RUNS runs each, medians (docs/STORE.md, "MySQL backend: measured").
#
#   tests/services.sh start
#   cargo build --release -p loadgen -p imgw --bins
#   bench/mysql_vs_local.sh [RATE] [RUNS] [DURATION]      # defaults 5000 3 15s
#
# Each run starts a fresh imgw (1 shard, dev auth, a fresh data directory or a fresh database
# `imgw_bench`), runs `loadgen chat` against it and keeps its JSON.
set -euo pipefail
RATE=${1:-5000}
RUNS=${2:-3}
DURATION=${3:-15s}
CONNS=${CONNS:-1000}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
MYSQL=${IMGW_MYSQL_URL:-mysql://imgw:imgw@127.0.0.1:3306/imgw}
BASE=${MYSQL%/*}
OUT=${OUT:-/tmp/imgw-bench-mysql}
mkdir -p "$OUT"
port=${PORT:-28380}

run_one() { # durability run
    local dur=$1 n=$2 extra=()
    local data="$OUT/data-$dur-$n"
    rm -rf "$data"
    if [ "$dur" = backend ]; then
        mariadb -h127.0.0.1 -uimgw -pimgw -e "DROP DATABASE IF EXISTS imgw_bench; CREATE DATABASE imgw_bench"
        extra=(--mysql "$BASE/imgw_bench")
    fi
    "$BIN/imgw" serve --insecure-dev-auth --shards 1 --durability "$dur" "${extra[@]}" \
        --data-dir "$data" --ws-listen 127.0.0.1:$port --tcp-listen 127.0.0.1:$((port + 1)) \
        --admin-listen 127.0.0.1:$((port + 2)) --log warn 2>"$OUT/imgw-$dur-$n.log" &
    local pid=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$((port + 2))/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$BIN/loadgen" chat --target "ws://127.0.0.1:$port/ws" --conns "$CONNS" --rate "$RATE" \
        --duration "$DURATION" --json "$OUT/$dur-$RATE-$n.json" >"$OUT/$dur-$RATE-$n.txt" 2>/dev/null || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$data"
}

for n in $(seq 1 "$RUNS"); do
    for dur in local backend; do
        run_one "$dur" "$n"
    done
done

python3 - "$OUT" "$RATE" "$RUNS" <<'PY'
import json, statistics, sys
out, rate, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(f"rate {rate} msgs/s offered, medians of {runs} runs")
print("| durability | acked msgs/s | ack p50 ms | ack p99 ms | delivery p99 ms | lost | dup |")
print("|---|---:|---:|---:|---:|---:|---:|")
for dur in ["local", "backend"]:
    rows = []
    for n in range(1, runs + 1):
        try:
            j = json.load(open(f"{out}/{dur}-{rate}-{n}.json"))
        except (OSError, ValueError):
            continue
        m = j["messages"]
        rows.append((m["acked"] / j["run_s"], j["ack_latency_us"]["p50"] / 1000,
                     j["ack_latency_us"]["p99"] / 1000, j["latency_us"]["p99"] / 1000,
                     m["lost"], m["duplicates"]))
    if not rows:
        print(f"| {dur} | no data | | | | | |")
        continue
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"| {dur} | {med[0]:,.0f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | "
          f"{max(r[4] for r in rows)} | {max(r[5] for r in rows)} |")
    print("  runs: " + "; ".join(f"{r[0]:,.0f}/s p99 {r[2]:.2f}" for r in rows), file=sys.stderr)
PY
