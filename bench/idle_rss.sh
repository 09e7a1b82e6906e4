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
OUT=$(mktemp -d /tmp/idle-rss.XXXXXX)
for k in $(seq 1 "$RUNS"); do
  for v in old new; do
    if [ $v = old ]; then B=$OLD; else B=$NEW; fi
    d=$(mktemp -d)
    taskset -c 0 "$B/imgw" serve --insecure-dev-auth --shards 1 \
      --config "$ROOT/bench/peers/imgw-bench.toml" --data-dir "$d" --log error \
      --ws-listen 127.0.0.1:28090 --tcp-listen 127.0.0.1:28091 --admin-listen 127.0.0.1:28092 \
      2>/dev/null &
    p=$!
    until curl -sf 127.0.0.1:28092/readyz >/dev/null; do sleep 0.1; done
    j=$OUT/$v-$k.json
    "$NEW/loadgen" idle --target ws://127.0.0.1:28090/ws --conns "$CONNS" --workers 2 \
      --sources 127.0.0.2-127.0.0.3 --duration 5s --heartbeat-ms 600000 --server-pid $p \
      --quiet --json "$j" >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    rm -rf "$d"
    python3 - "$j" "$v" "$k" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); sp = j.get("server_proc") or {}
print(f"{sys.argv[2]} run {sys.argv[3]}: {sp.get('rss_per_conn_bytes', 0):.0f} B per connection, "
      f"{sp.get('cpu_per_connect_us', 0):.1f} us of server CPU per connection set up", flush=True)
PY
  done
done
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
