#!/usr/bin/env bash
# Before/after of connection set-up, alternating two gateway builds: bench/tls.sh's idle step
# over the plain listeners. Per run a fresh `imgw serve --shards 1` (bench/peers/imgw-bench.toml,
# pinned to core 0) takes CONNS connections from 4 loadgen workers on core 1 as fast as they
# come (`loadgen idle --ramp 0`: connect, WebSocket upgrade where there is one, `hello`), each
# run from 4 source addresses of its own (a run leaves its client ports in TIME_WAIT); all runs
# of one listener, alternating the builds, then the next listener. One line
# per run: the gateway's CPU per connection set up (its inverse is handshakes per core-second)
# and its RSS per connection once all are up, then the medians per (build, listener).
#
#   bench/ab_handshake.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS] [CONNS] [LISTENERS]
#   (defaults: 3, 19000, "tcp ws"; ws_early is ws with `loadgen --early-hello`, the `hello`
#   in the upgrade request's write)
#
# loadgen is the new build's for both (see bench/ab_fanout.sh for building the old one).
set -u
OLD=$1 NEW=$2 RUNS=${3:-3} CONNS=${4:-19000} LISTENERS=${5:-"tcp ws"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$(mktemp -d /tmp/ab-handshake.XXXXXX)
src=20
LISTENER=
one_run() {
  local v=$1 k=$2 l=$LISTENER j=$OUT/$1-$LISTENER-$2.json
  gw_target "$l" || return 1
  taskset -c 1 "$NEW/loadgen" idle --target "$GW_TARGET" "${GW_EARLY[@]}" --conns "$CONNS" --workers 4 --ramp 0 \
    --sources "127.0.0.$src-127.0.0.$((src + 3))" --duration 3s --setup-timeout 120s \
    --server-pid "$GW_PID" --quiet --json "$j" >/dev/null 2>&1
  src=$((src + 4))
  [ "$src" -gt 250 ] && src=20
  python3 - "$j" "$v" "$l" "$k" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); s = j.get("server_proc") or {}
print(f"{sys.argv[2]} {sys.argv[3]} run {sys.argv[4]}: up {j['connected']}, "
      f"cpu/connect {s.get('cpu_per_connect_us', 0):.1f} us, rss/conn {s.get('rss_per_conn_bytes', 0):.0f} B",
      flush=True)
PY
}
# A fresh gateway per run and listener: RSS per connection is read from a gateway that held
# nothing before.
for LISTENER in $LISTENERS; do
  ab_gateways "$OLD" "$NEW" "$RUNS" one_run || exit 1
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
runs = {}
for f in glob.glob(os.path.join(sys.argv[1], "*.json")):
    v, l, _ = os.path.basename(f)[:-5].split("-")
    s = json.load(open(f)).get("server_proc") or {}
    runs.setdefault((v, l), []).append(s.get("cpu_per_connect_us", 0))
for (v, l), xs in sorted(runs.items()):
    m = statistics.median(xs)
    print(f"median {v} {l}: {m:.1f} us per connection ({1e6 / m if m else 0:,.0f} per core-second), runs {len(xs)}")
PY
rm -rf "$OUT"
