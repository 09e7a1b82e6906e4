#!/usr/bin/env bash
# The relay layouts side by side (bench/relay_topics.rs), each run on a freshly started tansu
# (its memory storage slows as topics pile up), alternating: RUNS runs of each.
#
#   cargo build --release --example relay_topics
#   bench/relay_topics.sh [RUNS] [NODES] [RATE] [SECONDS] [PARTITIONS]   # 3 3 5000 10 3
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3} NODES=${2:-3} RATE=${3:-5000} SECONDS_=${4:-10} PARTS=${5:-3}
BIN=${CARGO_TARGET_DIR:-target}/release/examples/relay_topics
eval "$(tests/services.sh env 2>/dev/null || true)"
for n in $(seq 1 "$RUNS"); do
    for layout in node partition; do
        tests/services.sh stop-kafka >/dev/null 2>&1 || true
        tests/services.sh start-kafka >/dev/null 2>&1
        sleep 2
        "$BIN" "$NODES" "$RATE" "$SECONDS_" "$PARTS" "$layout" | tail -1
    done
done
