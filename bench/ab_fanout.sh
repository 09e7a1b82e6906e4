#!/usr/bin/env bash
# Before/after of group fan-out, alternating two builds in one run: `imgw serve --shards 1`
# with bench/peers/imgw-bench.toml pinned to core 0, `loadgen fanout --conns 2001 --fanout 2000
# --group` pinned to core 1 (as bench/side_by_side.sh runs imgw), RUNS times per rate, codec
# and build. Prints one line per run and the medians per (build, codec, rate).
#
#   bench/ab_fanout.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS] [RATES] [CODECS]
#   (defaults: 3, "50 200 600", "json protobuf"; DURATION=10s)
#
# Build the old one in a worktree with its own target directory, for example:
#   git worktree add /tmp/old REV &&
#   (cd /tmp/old && CARGO_TARGET_DIR=/tmp/oldtarget cargo build --release -p imgw --bin imgw)
# loadgen is the new build's for both, so only the gateway differs; OLD_ARGS and NEW_ARGS add
# loadgen flags per side instead (the same build twice with OLD_ARGS="--group-ack-ms 100"
# compares two client behaviours). The new build's stage
# latencies (imgw_stage_seconds, scraped from /metrics after each run) are printed as the mean
# per stage when the build exports them.
set -u
OLD=$1 NEW=$2 RUNS=${3:-3} RATES=${4:-"50 200 600"} CODECS=${5:-"json protobuf"}
DURATION=${DURATION:-10s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$(mktemp -d /tmp/ab-fanout.XXXXXX)
for k in $(seq 1 "$RUNS"); do
  for rate in $RATES; do
    for codec in $CODECS; do
      for v in old new; do
        if [ $v = old ]; then B=$OLD; else B=$NEW; fi
        gw_start "$B/imgw" 0 --shards 1 --config "$ROOT/bench/peers/imgw-bench.toml" || exit 1
        j=$OUT/$v-$codec-$rate-$k.json
        taskset -c 1 "$NEW/loadgen" fanout --conns 2001 --fanout 2000 --rate "$rate" --group \
          --protocol imgw --codec "$codec" --target "ws://$GW_WS/ws" \
          --heartbeat-ms 600000 --duration "$DURATION" --grace 3s --server-pid "$GW_PID" --quiet \
          $(if [ $v = old ]; then echo "${OLD_ARGS:-}"; else echo "${NEW_ARGS:-}"; fi) \
          --json "$j" >/dev/null 2>&1
        curl -sf "$GW_ADMIN/metrics" >"$j.metrics" || true
        gw_stop
        python3 - "$j" "$v" "$codec" "$rate" "$k" <<'PY'
import json, re, sys
j = json.load(open(sys.argv[1])); v, codec, rate, k = sys.argv[2:6]
l = j["latency_us"]; m = j["messages"]
stages = {}
acks = 0
try:
    for line in open(sys.argv[1] + ".metrics"):
        g = re.match(r'imgw_stage_seconds_(sum|count)\{shard="\d+",stage="(\w+)"\} (\S+)', line)
        if g:
            stages.setdefault(g[2], {})[g[1]] = float(g[3])
        g = re.match(r'imgw_frames_in_total\{[^}]*op="ack"[^}]*\} (\S+)', line)
        if g:
            acks += int(float(g[1]))
except FileNotFoundError:
    pass
st = " ".join(f"{s}={1e6 * d['sum'] / d['count']:.0f}us" for s, d in stages.items() if d.get("count"))
print(f"{v} {codec} rate {rate} run {k}: p50 {l['p50']/1000:.2f} p99 {l['p99']/1000:.2f} "
      f"p999 {l['p999']/1000:.2f} ms, send lag p99 {j['send_lag_us']['p99']/1000:.2f} ms, "
      f"lost {m['lost']}, acks read {acks}, cpu/delivery {(j.get('server_proc') or {}).get('cpu_per_delivery_us', 0):.3f} us {st}",
      flush=True)
PY
      done
    done
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
rows = {}
for p in glob.glob(os.path.join(sys.argv[1], "*.json")):
    v, codec, rate, k = os.path.basename(p)[:-5].split("-")
    j = json.load(open(p))
    rows.setdefault((codec, int(rate), v), []).append(j)
print("\nmedians: codec rate build: p50 / p99 / p999 ms, send lag p99 ms, CPU us per delivery")
for key in sorted(rows):
    js = rows[key]
    med = lambda f: statistics.median(f(j) for j in js)
    print(f"{key[0]:8} {key[1]:4} {key[2]}: {med(lambda j: j['latency_us']['p50'])/1000:.2f} / "
          f"{med(lambda j: j['latency_us']['p99'])/1000:.2f} / {med(lambda j: j['latency_us']['p999'])/1000:.2f}, "
          f"lag {med(lambda j: j['send_lag_us']['p99'])/1000:.2f}, "
          f"cpu {med(lambda j: (j.get('server_proc') or {}).get('cpu_per_delivery_us', 0)):.3f} ({len(js)} runs)")
PY
