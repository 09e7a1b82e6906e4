#!/usr/bin/env bash
# RSS per idle authenticated connection, alternating two builds in one run: `imgw serve
# --shards 1` with bench/peers/imgw-bench.toml pinned to core 0, `loadgen idle --conns CONNS`
# (2 workers over 127.0.0.2-127.0.0.3, WebSocket upgrade and `hello`, then silence) sampling
# the server with --server-pid: (RSS with every connection up - RSS before) / CONNS, and the
# server's CPU per connection set up (its handshake, `hello` and welcome, the loopback
# kernel work of both ends included). RUNS times per build; one line per run, then medians.
#
#   bench/idle_rss.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS] [CONNS]   (defaults: 3, 19000)
#
# One process may hold at most 20,000 descriptors here, so 19,000 is the most one gateway
# takes. loadgen is the new build's for both.
set -u
OLD=$1 NEW=$2 RUNS=${3:-3} CONNS=${4:-19000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$(mktemp -d /tmp/idle-rss.XXXXXX)
one_run() {
  local v=$1 k=$2 j=$OUT/$1-$2.json
  "$NEW/loadgen" idle --target "ws://$GW_WS/ws" --conns "$CONNS" --workers 2 \
    --sources 127.0.0.2-127.0.0.3 --duration 5s --heartbeat-ms 600000 --server-pid "$GW_PID" \
    --quiet --json "$j" >/dev/null 2>&1
  python3 - "$j" "$v" "$k" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); sp = j.get("server_proc") or {}
print(f"{sys.argv[2]} run {sys.argv[3]}: {sp.get('rss_per_conn_bytes', 0):.0f} B per connection, "
      f"{sp.get('cpu_per_connect_us', 0):.1f} us of server CPU per connection set up", flush=True)
PY
}
ab_gateways "$OLD" "$NEW" "$RUNS" one_run || exit 1
echo "medians ($CONNS connections):"
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
for v in ("old", "new"):
    rows = [json.load(open(f)).get("server_proc") or {} for f in sorted(glob.glob(os.path.join(sys.argv[1], f"{v}-*.json")))]
    if rows:
        rss = statistics.median(r.get("rss_per_conn_bytes", 0) for r in rows)
        cpu = statistics.median(r.get("cpu_per_connect_us", 0) for r in rows)
        print(f"{v}: {rss:.0f} B per connection, {cpu:.1f} us per connection set up ({len(rows)} runs)")
PY
rm -rf "$OUT"
