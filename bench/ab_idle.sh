#!/usr/bin/env bash
# Before/after of what an idle gateway costs, alternating two gateway builds. Per run a fresh
# `imgw serve --shards 1` (bench/peers/imgw-bench.toml, pinned to core 0) holds CONNS idle
# connections (0: none; `loadgen idle` on core 1 from a source address of the run's own, with
# no heartbeat during the run) and is watched for SECONDS: its CPU time (`perf stat -e
# task-clock`), its context switches (about one per sleep of the shard's executor) and its
# `io_uring_enter` calls. One line per run, then the medians per build.
#
#   bench/ab_idle.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS] [CONNS] [SECONDS]
#   (defaults: 3, 0, 10)
#
# Needs perf (linux-perf). loadgen is the new build's for both.
set -u
OLD=$1 NEW=$2 RUNS=${3:-3} CONNS=${4:-0} SECONDS_IDLE=${5:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$(mktemp -d /tmp/ab-idle.XXXXXX)
src=20
one_run() {
  local v=$1 k=$2 lg= f=$OUT/$1-$2.txt
  if [ "$CONNS" -gt 0 ]; then
    taskset -c 1 "$NEW/loadgen" idle --target "ws://$GW_WS/ws" --conns "$CONNS" --workers 4 \
      --ramp 0 --sources "127.0.0.$src" --heartbeat-ms 600000 \
      --duration "$((SECONDS_IDLE + 30))s" --setup-timeout 60s --quiet >/dev/null 2>&1 &
    lg=$!
    src=$((src + 1))
    [ "$src" -gt 250 ] && src=20
    # Until every connection is up (`imgw_connections` from the admin listener).
    local i n=0
    for i in $(seq 600); do
      n=$(gw_metric imgw_connections)
      [ "$n" -ge "$CONNS" ] && break
      sleep 0.1
    done
    sleep 1
  fi
  perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_io_uring_enter \
    -p "$GW_PID" -o "$f" -- sleep "$SECONDS_IDLE" >/dev/null 2>&1
  [ -n "$lg" ] && kill "$lg" 2>/dev/null && wait "$lg" 2>/dev/null
  # One line per run, and its figures (CPU ms, io_uring_enter calls, context switches) in
  # $OUT/BUILD-RUN.sum for the medians.
  python3 - "$f" "$v" "$k" "$SECONDS_IDLE" "$OUT/$v-$k.sum" <<'PY'
import sys
c = {}
for line in open(sys.argv[1]):
    p = line.strip().split(",")
    if len(p) > 2 and p[0] and p[0][0].isdigit():
        c[p[2]] = float(p[0])
cpu, enters = c.get("task-clock", 0), c.get("syscalls:sys_enter_io_uring_enter", 0)
switches = c.get("context-switches", 0)
open(sys.argv[5], "w").write(f"{cpu} {enters} {switches}\n")
s = float(sys.argv[4])
print(f"{sys.argv[2]} run {sys.argv[3]}: cpu {cpu / s:.2f} ms/s, context switches {switches / s:.0f}/s, "
      f"io_uring_enter {enters / s:.0f}/s ({enters / (switches or 1):.1f} per switch)", flush=True)
PY
}
ab_gateways "$OLD" "$NEW" "$RUNS" one_run || exit 1
python3 - "$OUT" "$SECONDS_IDLE" <<'PY'
import glob, os, statistics, sys
runs = {}
for f in glob.glob(os.path.join(sys.argv[1], "*.sum")):
    v = os.path.basename(f).split("-")[0]
    runs.setdefault(v, []).append([float(x) for x in open(f).read().split()])
s = float(sys.argv[2])
for v, xs in sorted(runs.items()):
    cpu, enters, switches = (statistics.median(x[i] for x in xs) for i in range(3))
    print(f"median {v}: cpu {cpu / s:.2f} ms/s, io_uring_enter {enters / s:.0f}/s, "
          f"context switches {switches / s:.0f}/s, runs {len(xs)}")
PY
rm -rf "$OUT"
