#!/usr/bin/env bash
# A 100,000-member group (issue 16): how long a group `send` waits for its `send_ack`, how long
# the online members wait for the message, and the gateway's CPU per delivery.
#
# Per run: `imgw serve --shards 1 --durability DURABILITY --config bench/peers/imgw-bench.toml`
# pinned to core 0 (bench/lib.sh); the group `bg-t0` made through the admin API with
# MEMBERS - ONLINE - 1 offline members (`POST /groups`, then `POST /groups/dev/bg-t0/members`,
# 1,000 users a request); then `loadgen fanout --conns ONLINE+1 --fanout ONLINE --group
# --user-prefix bg-` pinned to core 1: its ONLINE + 1 connections join that same group (loadgen
# names it `{prefix}t0`), which makes MEMBERS members, and its publisher sends RATE messages a
# second for DURATION. The member count is read back (`GET /groups/dev/bg-t0/members`) after
# the run. One process per side: ONLINE stays under the 20,000 descriptors a process may have
# on this machine (the offline members cost the gateway no descriptor and no per-message work:
# a group message is one timeline entry, pushed to online members only).
#
# With UWS=1, each run also measures uWebSockets.js (bench/peers/uws, `npm ci` there first)
# right after imgw, pinned the same way, with `loadgen fanout --protocol plainws` and ONLINE
# subscribers of one topic: the same sockets written per message, with no membership, no
# sequence, no ack and nothing stored, so only its delivery latency and CPU compare.
#
#   bench/big_group.sh RELEASE_DIR [RUNS] [RATES] [ONLINE] [MEMBERS]
#   (defaults: 3, "1 2", 19000, 100000; DURATION=20s, DURABILITY=local, CODEC=json, UWS=0;
#   IMGW_LOADGEN_ARGS adds loadgen flags to imgw's runs, for example "--group-ack-ms 60000")
#
# Prints a line per run (send -> send_ack p50 / p99, publish -> delivery p50 / p99, deliveries,
# lost, gateway CPU per delivery and per group message) and the medians per server and rate.
# The CPU is the whole process's over the measured run (its idle work included), while one
# core serves it: at 19,000 online members a message costs about 0.3 s of it, so
# rates above a few messages a second overload the core and measure the queue.
set -u
B=$1 RUNS=${2:-3} RATES=${3:-"1 2"} ONLINE=${4:-19000} MEMBERS=${5:-100000}
DURATION=${DURATION:-20s} DURABILITY=${DURABILITY:-local} CODEC=${CODEC:-json} UWS=${UWS:-0}
UWS_PORT=${UWS_PORT:-28191}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OFFLINE=$((MEMBERS - ONLINE - 1))
[ "$OFFLINE" -ge 1 ] || { echo "MEMBERS must exceed ONLINE + 1" >&2; exit 2; }
echo "imgw: $("$B/imgw" --version); $MEMBERS members, $ONLINE online + the publisher, durability $DURABILITY, $CODEC"
OUT=$(mktemp -d /tmp/big-group.XXXXXX)
# report JSON RATE RUN MEMBERS: one line for one run.
report() {
  python3 - "$@" "$ONLINE" <<'PY'
import json, os, sys
path, rate, k, members, online = sys.argv[1:6]
server = os.path.basename(path).split("-")[0]
try:
    j = json.load(open(path))
except (OSError, ValueError):
    print(f"{server} rate {rate} run {k}: no report; loadgen said:\n" + open(path + ".out").read()[-2000:])
    sys.exit(0)
a, l, m = j["ack_latency_us"], j["latency_us"], j["messages"]
cpu = (j.get("server_proc") or {}).get("cpu_per_delivery_us", 0)
ack = "-" if server == "uws" else f"{a['p50']/1000:.2f} p99 {a['p99']/1000:.2f}"
print(f"{server} rate {rate} run {k}: members {members}, send->ack p50 {ack} ms, "
      f"delivery p50 {l['p50']/1000:.2f} p99 {l['p99']/1000:.2f} ms, deliveries {l['count']}, "
      f"lost {m['lost']}, cpu {cpu:.3f} us/delivery = {cpu * int(online) / 1000:.2f} ms/message, "
      f"pass {j.get('pass')}", flush=True)
PY
}
for k in $(seq 1 "$RUNS"); do
  for rate in $RATES; do
    gw_start "$B/imgw" 0 --shards 1 --durability "$DURABILITY" \
      --config "$ROOT/bench/peers/imgw-bench.toml" || exit 1
    python3 - "$GW_ADMIN" "$OFFLINE" <<'PY' || { gw_stop; exit 1; }
import json, sys, urllib.request
admin, offline = sys.argv[1], int(sys.argv[2])
def post(path, body):
    req = urllib.request.Request(f"http://{admin}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert 200 <= r.status < 300, (path, r.status)
users = [f"off-{i}" for i in range(offline)]
post("/groups", {"tenant": "dev", "group": "bg-t0", "users": users[:1000]})
for i in range(1000, offline, 1000):
    post("/groups/dev/bg-t0/members", {"users": users[i:i + 1000]})
PY
    j=$OUT/imgw-$rate-$k.json
    taskset -c 1 "$B/loadgen" fanout --conns $((ONLINE + 1)) --fanout "$ONLINE" --group \
      --user-prefix bg- --rate "$rate" --protocol imgw --codec "$CODEC" \
      --target "ws://$GW_WS/ws" --heartbeat-ms 600000 --duration "$DURATION" --grace 5s \
      --server-pid "$GW_PID" --quiet ${IMGW_LOADGEN_ARGS:-} --json "$j" >"$j.out" 2>&1
    members=$(curl -sf "$GW_ADMIN/groups/dev/bg-t0/members" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["members"] if isinstance(d, dict) else d))' 2>/dev/null)
    gw_stop
    report "$j" "$rate" "$k" "${members:-?}"
    if [ "$UWS" = 1 ]; then
      uws_start "$UWS_PORT" || exit 1
      up=$UWS_PID
      j=$OUT/uws-$rate-$k.json
      taskset -c 1 "$B/loadgen" fanout --conns $((ONLINE + 1)) --fanout "$ONLINE" \
        --rate "$rate" --protocol plainws --target "ws://127.0.0.1:$UWS_PORT/" \
        --duration "$DURATION" --grace 5s --server-pid "$up" --quiet --json "$j" >"$j.out" 2>&1
      kill "$up"; wait "$up" 2>/dev/null
      report "$j" "$rate" "$k" "-"
    fi
  done
done
python3 - "$OUT" "$ONLINE" <<'PY'
import glob, json, os, statistics, sys
rows = {}
for p in glob.glob(os.path.join(sys.argv[1], "*.json")):
    server, rate, _ = os.path.basename(p)[:-5].split("-")
    try:
        rows.setdefault((server, int(rate)), []).append(json.load(open(p)))
    except ValueError:
        pass
print("\nmedians: server, rate msgs/s: send->ack p50 / p99 ms, delivery p50 / p99 ms, CPU us per delivery")
for key in sorted(rows, key=lambda k: (k[1], k[0])):
    js = rows[key]
    med = lambda f: statistics.median(f(j) for j in js)
    ack = "-" if key[0] == "uws" else (f"{med(lambda j: j['ack_latency_us']['p50'])/1000:.2f} / "
                                        f"{med(lambda j: j['ack_latency_us']['p99'])/1000:.2f}")
    print(f"{key[0]:5} {key[1]:4}: {ack}, "
          f"{med(lambda j: j['latency_us']['p50'])/1000:.2f} / {med(lambda j: j['latency_us']['p99'])/1000:.2f}, "
          f"{med(lambda j: (j.get('server_proc') or {}).get('cpu_per_delivery_us', 0)):.3f} ({len(js)} runs)")
PY
rm -rf "$OUT"
