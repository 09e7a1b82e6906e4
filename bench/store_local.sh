#!/usr/bin/env bash
# Durability `local` end to end, two builds side by side (issue 13: the log store against the
# fjall build before it), alternating, RUNS times each:
#  - latency: `imgw serve --shards 1 --durability local` under `loadgen chat --conns 1000
#    --rate 5000 --duration 10s --expect-no-loss`: acked, lost, p50 / p99 / p999 of the ack,
#    and the CPU of the I/O core's thread (`imgw-io`, utime + stime from /proc) per acked
#    message;
#  - throughput: the same at --rate SAT_RATE (default 150000) for 10 s with --conns 2000:
#    acked msgs/s and lost.
#
#   bench/store_local.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS] > out.txt
#
# Each line is one run; the medians go into bench/results/store_local.md by hand, with the
# commits `imgw --version` prints (first lines of the output). Loadgen is the new build's.
set -u
OLD=$1 NEW=$2 RUNS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
SAT_RATE=${SAT_RATE:-150000}
echo "old: $("$OLD/imgw" --version)"
echo "new: $("$NEW/imgw" --version)"
hz=$(getconf CLK_TCK)

# The CPU seconds of the gateway's `imgw-io` thread so far.
io_cpu() {
  local pid=$1 t
  for t in /proc/"$pid"/task/*; do
    if [ "$(cat "$t/comm" 2>/dev/null)" = imgw-io ]; then
      awk -v hz="$hz" '{print ($14 + $15) / hz}' "$t/stat"
      return
    fi
  done
  echo 0
}

run() { # name build rate conns
  local v=$1 B=$2 rate=$3 conns=$4 before after
  # The store on the disk under target/, as a user's data directory would be.
  GW_TMP=$ROOT/target gw_start "$B/imgw" "" --shards 1 --durability local || exit 1
  before=$(io_cpu "$GW_PID")
  "$NEW/loadgen" chat --target "ws://$GW_WS/ws" --conns "$conns" --rate "$rate" \
    --duration 10s --expect-no-loss --quiet --json "$GW_DIR/r.json" >/dev/null 2>&1
  after=$(io_cpu "$GW_PID")
  python3 -c "
import json; j=json.load(open('$GW_DIR/r.json')); m=j['messages']; l=j['latency_us']
acked=m['acked']; io=($after-$before)*1e6/max(acked,1)
print('$v rate $rate', 'acked', acked, 'acked/s', round(acked/10), 'lost', m['lost'],
      'p50', l['p50']/1000, 'p99', l['p99']/1000, 'p999', l['p999']/1000,
      'io_us_per_msg', round(io, 2), j['pass'])"
  gw_stop
}

for k in $(seq 1 "$RUNS"); do
  for v in old new; do
    if [ $v = old ]; then B=$OLD; else B=$NEW; fi
    run "$v" "$B" 5000 1000
  done
done
for k in $(seq 1 "$RUNS"); do
  for v in old new; do
    if [ $v = old ]; then B=$OLD; else B=$NEW; fi
    run "$v" "$B" "$SAT_RATE" 2000
  done
done
