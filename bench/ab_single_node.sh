#!/usr/bin/env bash
# Before/after on one node, alternating two builds: `imgw serve --shards 1 --durability local`
# under `loadgen chat --conns 1000 --rate 5000 --duration 8s --expect-no-loss`, RUNS times each.
#
#   bench/ab_single_node.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [RUNS]
#
# Build the old one in a worktree with its own target directory, for example:
#   git worktree add /tmp/old REV && cp -a target/release /tmp/oldtarget/ &&
#   (cd /tmp/old && CARGO_TARGET_DIR=/tmp/oldtarget cargo build --release -p imgw -p loadgen)
# Prints acked, lost, p50 and p99 (ms) per run; loadgen is the new build's.
# OLD_ARGS / NEW_ARGS add flags to each side's `imgw serve` (the same build both sides with a
# setting on and off: NEW_ARGS="--config on.toml" OLD_ARGS="--config off.toml").
set -u
OLD=$1 NEW=$2 RUNS=${3:-3}
for k in $(seq 1 "$RUNS"); do
  for v in old new; do
    if [ $v = old ]; then B=$OLD X=${OLD_ARGS:-}; else B=$NEW X=${NEW_ARGS:-}; fi
    d=$(mktemp -d)
    "$B/imgw" serve --insecure-dev-auth --shards 1 --durability local --data-dir "$d" --log error \
      --ws-listen 127.0.0.1:28080 --tcp-listen 127.0.0.1:29000 --admin-listen 127.0.0.1:29090 \
      $X 2>/dev/null &
    p=$!
    until curl -sf 127.0.0.1:29090/readyz >/dev/null; do sleep 0.1; done
    "$NEW/loadgen" chat --target ws://127.0.0.1:28080/ws --conns 1000 --rate 5000 \
      --duration 8s --expect-no-loss --quiet --json "$d.json" >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    python3 -c "
import json; j=json.load(open('$d.json')); m=j['messages']; l=j['latency_us']
print('$v run $k', 'acked', m['acked'], 'lost', m['lost'], 'p50', l['p50']/1000, 'p99', l['p99']/1000, j['pass'])"
    rm -rf "$d" "$d.json"
  done
done
