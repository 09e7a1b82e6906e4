#!/bin/bash
# One run of bench/results/delivery_local.md: a fresh `imgw serve --durability local --shards 1`
# on cores 0-1, loadgen chat on core 1, then the store counters.
# usage: CFG="--config FILE" LOADGEN=path OUT=dir bench/local_chat_run.sh IMGW_BIN RATE DURATION TAG
BIN=$1; RATE=$2; DUR=$3; TAG=$4; shift 4
LOADGEN=${LOADGEN:-target/release/loadgen}
D=${OUT:-/tmp/imgw-bench}/d-$TAG; rm -rf "$D"; mkdir -p "$D"
taskset -c 0,1 "$BIN" serve $CFG --durability local --insecure-dev-auth --shards 1 --data-dir "$D/data" \
  --ws-listen 127.0.0.1:18080 --tcp-listen 127.0.0.1:19000 --admin-listen 127.0.0.1:19090 > "$D/log" 2>&1 &
PID=$!
for i in $(seq 50); do curl -sf 127.0.0.1:19090/readyz >/dev/null && break; sleep 0.1; done
taskset -c 1 "$LOADGEN" chat --target ws://127.0.0.1:18080/ws --rate "$RATE" --duration "$DUR" --quiet \
  --json "$D/r.json" "$@" > "$D/out" 2>&1
curl -s 127.0.0.1:19090/metrics | grep -E '^imgw_store_(commits|ops)_total|commit_seconds' > "$D/metrics"
kill $PID; wait $PID 2>/dev/null
echo "$TAG load=$(cut -d' ' -f1 /proc/loadavg) $(grep -E 'latency \(ms\)|acked|delivered ' "$D/out" | tr -s ' ' | tr '\n' '|') $(tr '\n' ' ' < "$D/metrics")"
