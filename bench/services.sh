#!/usr/bin/env bash
# Acked messages/s and latency p99 of 1:1 chat at durability `local` and at `backend` with the
# Kafka-compatible broker (ack after the store commit AND the broker's acks=all report).
#
#   bench/services.sh [RATE] [RUNS]     # defaults 2000 msgs/s, 3 runs per mode
#
# Needs release builds (`cargo build --release -p imgw -p loadgen`) and the broker
# (`tests/services.sh start`; IMGW_KAFKA, default 127.0.0.1:9092). Prints one line per run and
# the medians; raw loadgen reports go to $OUT (default /tmp/imgw-bench-services).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-2000}
RUNS=${2:-3}
KAFKA=${IMGW_KAFKA:-127.0.0.1:9092}
OUT=${OUT:-/tmp/imgw-bench-services}
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$OUT"

run() { # mode run
    local mode=$1 i=$2 port=$((18080 + RANDOM % 1000))
    local dir="$OUT/data-$mode-$i"
    rm -rf "$dir"
    local extra=()
    if [ "$mode" = backend ]; then
        # Fresh topics per run so the runs do not share a partition log.
        cat >"$OUT/kafka-$i.toml" <<EOF
[kafka]
brokers = "$KAFKA"
messages_topic = "bench.$$.$i.messages"
push_topic = ""
[limits]
sends_per_sec = 100000
send_burst = 100000
EOF
        extra=(--config "$OUT/kafka-$i.toml")
    else
        printf '[limits]\nsends_per_sec = 100000\nsend_burst = 100000\n' >"$OUT/local.toml"
        extra=(--config "$OUT/local.toml")
    fi
    "$BIN/imgw" serve "${extra[@]}" --insecure-dev-auth --durability "$mode" \
        --ws-listen "127.0.0.1:$port" --tcp-listen "127.0.0.1:$((port + 1000))" \
        --admin-listen "127.0.0.1:$((port + 2000))" --data-dir "$dir" >"$OUT/imgw-$mode-$i.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$((port + 2000))") 2>/dev/null && break
        sleep 0.1
    done
    sleep 1
    "$BIN/loadgen" chat --target "ws://127.0.0.1:$port/ws" --rate "$RATE" --duration 15s \
        --json "$OUT/$mode-$i.json" --quiet >/dev/null 2>&1 || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$OUT/$mode-$i.json" "$mode" "$i" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["messages"]
acked = t["acked"] / r["run_s"] if r["run_s"] else 0
print(f'{sys.argv[2]:8} run {sys.argv[3]}: acked {acked:8.1f}/s  ack p99 {r["ack_latency_us"]["p99"]/1000:8.2f} ms'
      f'  delivery p99 {r["latency_us"]["p99"]/1000:8.2f} ms  sent {t["sent"]} acked {t["acked"]}'
      f' refused {t["refused"]} lost {t["lost"]} dup {t["duplicates"]}')
EOF
}

for i in $(seq 1 "$RUNS"); do
    run local "$i"
    run backend "$i"
done
python3 - "$OUT" "$RUNS" <<'EOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for mode in ("local", "backend"):
    rs = [json.load(open(f"{out}/{mode}-{i}.json")) for i in range(1, runs + 1)]
    acked = statistics.median(r["messages"]["acked"] / r["run_s"] for r in rs)
    ack99 = statistics.median(r["ack_latency_us"]["p99"] for r in rs) / 1000
    del99 = statistics.median(r["latency_us"]["p99"] for r in rs) / 1000
    print(f"median {mode:8}: acked {acked:8.1f}/s  ack p99 {ack99:8.2f} ms  delivery p99 {del99:8.2f} ms")
EOF
