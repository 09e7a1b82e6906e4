#!/usr/bin/env bash
# Before/after of 1:1 chat, alternating two gateway builds: bench/side_by_side.sh's chat
# scenario (`loadgen chat --conns 1000 --rate 5000`) against `imgw serve --shards 1` with
# bench/peers/imgw-bench.toml, the gateway pinned to core 0 and loadgen to core 1. One line
# per run: p50 / p99 / p999 of delivery latency and the gateway's CPU per delivery.
#
#   bench/ab_chat.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS]   (default 3; DURATION=10s)
#
# loadgen is the new build's for both (see bench/ab_fanout.sh for building the old one).
set -u
OLD=$1 NEW=$2 RUNS=${3:-3}
DURATION=${DURATION:-10s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$(mktemp -d /tmp/ab-chat.XXXXXX)
one_run() {
  local v=$1 k=$2 j=$OUT/$1-$2.json
  taskset -c 1 "$NEW/loadgen" chat --conns 1000 --rate 5000 --duration "$DURATION" \
    --protocol imgw --target "ws://$GW_WS/ws" --heartbeat-ms 600000 --server-pid "$GW_PID" \
    --grace 3s --quiet --json "$j" >/dev/null 2>&1
  python3 - "$j" "$v" "$k" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); l = j["latency_us"]
print(f"{sys.argv[2]} run {sys.argv[3]}: p50 {l['p50']} p99 {l['p99']} p999 {l['p999']} us, "
      f"cpu {(j.get('server_proc') or {}).get('cpu_per_delivery_us', 0):.1f} us", flush=True)
PY
}
ab_gateways "$OLD" "$NEW" "$RUNS" one_run || exit 1
rm -rf "$OUT"
