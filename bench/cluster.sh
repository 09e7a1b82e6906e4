#!/usr/bin/env bash
# Cluster benchmark (issue 11): imgw nodes on 127.0.0.1 sharing the MariaDB, Redis and broker
# of tests/services.sh, driven by one loadgen. Writes bench/results/cluster.md (medians) and
# the raw per-run loadgen JSON under bench/results/cluster/.
#
#   bench/cluster.sh [--duration 10s] [--repeats 3] [--rates "1000 5000"] [--conns 1000]
#                    [--fanout-nodes "1 2 3"] [--members 500] [--fanout-rate 50] [--out DIR]
#
# Rows:
# - chat, same node: one node, every connection on it. chat, cross node: two nodes, the
#   connections spread over both round robin, so every conversation crosses nodes.
# - fan-out: one group of --members members spread over 1, 2 or 3 nodes, one publisher
#   sending --fanout-rate messages per second to it; deliveries per second and the CPU time of
#   all nodes (from /proc) per delivery.
# - The cost on the shared services per acked chat message: Redis commands (INFO
#   commandstats), MariaDB statements (Questions) and Kafka records (imgw's counters).
# Every node has one shard; the machine's two cores are shared by the nodes, the services and
# loadgen, so the figures are the cluster's costs, not a fleet's capacity.
# tansu's memory storage slows as topics pile up (every test and run makes its own): start
# from a fresh broker (tests/services.sh stop-kafka; tests/services.sh start-kafka).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=10s
REPEATS=3
RATES="1000 5000"
CONNS=1000
FANOUT_NODES="1 2 3"
MEMBERS=500
FANOUT_RATE=50
OUT=$ROOT/bench/results
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --fanout-nodes) FANOUT_NODES=$2; shift 2 ;;
        --members) MEMBERS=$2; shift 2 ;;
        --fanout-rate) FANOUT_RATE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
eval "$(tests/services.sh start)"
. bench/lib.sh
build_release || exit 1
RAW=$OUT/cluster
mkdir -p "$RAW"
rm -f "$RAW"/*
# Node logs and the generated config stay out of the results.
WORK=$(mktemp -d)
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src loadgen || echo "+dirty")

mysql_q() { mysql -h127.0.0.1 -P"${IMGW_MYSQL_PORT:-3306}" -uimgw -pimgw -N -e "$1"; }
redis_calls() {
    redis-cli -u "$IMGW_REDIS_URL" INFO commandstats |
        awk -F'[=,:]' '/^cmdstat_/ {s += $3} END {print s + 0}'
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

PIDS=()
DB=""
stop_nodes() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    [ -z "$DB" ] || mysql_q "DROP DATABASE IF EXISTS $DB" || true
    DB=""
}
trap stop_nodes EXIT

# start_nodes N TAG: N nodes on a fresh database, key prefix and topics.
start_nodes() {
    local n=$1 tag=$2
    DB=imgw_bench_${tag//-/_}_$$
    mysql_q "CREATE DATABASE $DB"
    cat >"$WORK/imgw.toml" <<EOF
[limits]
sends_per_sec = 100000
send_burst = 100000
[runtime]
pin = false
[redis]
key_prefix = "$DB:"
[kafka]
messages_topic = "$DB.messages"
push_topic = ""
${KAFKA_EXTRA:-}
[cluster]
topic_prefix = "$DB.node."
EOF
    for i in $(seq 1 "$n"); do
        "$BIN/imgw" serve --config "$WORK/imgw.toml" --insecure-dev-auth --shards 1 \
            --durability backend --mysql "mysql://imgw:imgw@127.0.0.1:${IMGW_MYSQL_PORT:-3306}/$DB" \
            --redis "$IMGW_REDIS_URL" --kafka "$IMGW_KAFKA" --node-id "b$i" --log warn \
            --ws-listen "127.0.0.1:$((18080 + i))" --tcp-listen "127.0.0.1:$((19000 + i))" \
            --admin-listen "127.0.0.1:$((19100 + i))" 2>"$WORK/node$i.log" &
        PIDS+=($!)
    done
    for i in $(seq 1 "$n"); do
        for _ in $(seq 1 200); do
            curl -sf "127.0.0.1:$((19100 + i))/readyz" >/dev/null && break
            sleep 0.1
        done
    done
}

metric_sum() { # name: the sum over the running nodes
    local s=0 v
    for i in $(seq 1 ${#PIDS[@]}); do
        v=$(curl -s "127.0.0.1:$((19100 + i))/metrics" | awk -v m="$1" '$1 == m {print $2}')
        s=$(python3 -c "print($s + ${v:-0})")
    done
    echo "$s"
}

# Kafka records the nodes produced for messages: the messages topic and the relays, less the
# presence relays (logins and logouts, reported apart in the notes).
kafka_records() {
    python3 -c "print($(metric_sum imgw_kafka_produced_total) + $(metric_sum imgw_cluster_relayed_total) - $(metric_sum imgw_cluster_relayed_presence_total))"
}

targets() { # n: --target flags for nodes 1..n
    for i in $(seq 1 "$1"); do printf -- '--target ws://127.0.0.1:%d/ws ' $((18080 + i)); done
}

# run NAME NODES LOADGEN-ARGS...: one loadgen run, with the nodes' CPU and the services'
# counters around it (in NAME.env).
run() {
    local name=$1 nodes=$2; shift 2
    start_nodes "$nodes" "$name"
    local r0 q0 k0 c0=0
    r0=$(redis_calls); q0=$(mysql_q "SHOW GLOBAL STATUS LIKE 'Questions'" | awk '{print $2}')
    k0=$(kafka_records)
    for p in "${PIDS[@]}"; do c0=$((c0 + $(cpu_ticks "$p"))); done
    # shellcheck disable=SC2046
    "$BIN/loadgen" "$@" $(targets "$nodes") --duration "$DURATION" --quiet \
        --json "$RAW/$name.json" >"$RAW/$name.txt" 2>&1 || true
    local r1 q1 k1 c1=0
    r1=$(redis_calls); q1=$(mysql_q "SHOW GLOBAL STATUS LIKE 'Questions'" | awk '{print $2}')
    k1=$(kafka_records)
    for p in "${PIDS[@]}"; do c1=$((c1 + $(cpu_ticks "$p"))); done
    cat >"$RAW/$name.env" <<EOF
confirm_s=$(metric_sum imgw_kafka_confirm_seconds_sum)
confirms=$(metric_sum imgw_kafka_confirm_seconds_count)
transit_s=$(metric_sum imgw_cluster_relay_transit_seconds_sum)
transits=$(metric_sum imgw_cluster_relay_transit_seconds_count)
redis=$((r1 - r0))
mysql=$((q1 - q0))
kafka=$(python3 -c "print(int($k1 - $k0))")
cpu_s=$(python3 -c "print(($c1 - $c0) / $(getconf CLK_TCK))")
EOF
    stop_nodes
    echo "$name: $(grep -E '^  (integrity|latency)' "$RAW/$name.txt" | tr -s ' ' | tr '\n' ' ')" >&2
}

for k in $(seq 1 "$REPEATS"); do
    for rate in $RATES; do
        run "same-$rate-$k" 1 chat --conns "$CONNS" --rate "$rate" --expect-no-loss
        run "cross-$rate-$k" 2 chat --conns "$CONNS" --rate "$rate" --expect-no-loss
    done
    for n in $FANOUT_NODES; do
        run "fanout-$n-$k" "$n" fanout --group --conns $((MEMBERS + 1)) --fanout "$MEMBERS" \
            --rate "$FANOUT_RATE"
    done
done

python3 - "$RAW" "$OUT/cluster.md" "$COMMIT" "$REPEATS" "$DURATION" "$RATES" "$FANOUT_NODES" \
    "$CONNS" "$MEMBERS" "$FANOUT_RATE" <<'PY'
import json, statistics, sys, pathlib
raw, out, commit, repeats, duration, rates, fnodes, conns, members, frate = sys.argv[1:]
raw = pathlib.Path(raw)
def load(name):
    j = json.loads((raw / f"{name}.json").read_text())
    env = dict(l.split("=", 1) for l in (raw / f"{name}.env").read_text().split())
    return j, {k: float(v) for k, v in env.items()}
def med(xs):
    return statistics.median(xs)
def rng(xs, fmt):
    return f"{fmt(med(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"
ms = lambda v: f"{v / 1000:.1f}"
def transit(runs):
    if not any(e["transits"] for _, e in runs):
        return "-"
    return f"{med([e['transit_s'] * 1e3 / max(e['transits'], 1) for _, e in runs]):.1f}"
lines = [
    f"# Cluster benchmark (`bench/cluster.sh`), commit {commit}",
    "",
    f"Medians of {repeats} runs of {duration} (min-max in brackets); every node one shard, all",
    "nodes, MariaDB, Redis, the broker and loadgen share this machine's 2 cores. Durability",
    "`backend` (MySQL + Kafka confirmations before `send_ack`). The broker is tansu with memory",
    "storage (tests/services.sh): its produce confirmation and the relay's transit through it",
    "(both from imgw's own counters) are given apart, as they dominate the cross-node figures.",
    "Measured against a freshly started broker: its memory storage slows as topics pile up.",
    "",
    f"## 1:1 chat, {conns} connections",
    "",
    "| rate msgs/s | placement | acked/s | p50 ms | p99 ms | lost / dup / disorder | Kafka confirm ms (avg per batch) | relay transit ms (avg) | Redis cmds/msg | MariaDB stmts/msg | Kafka records/msg | node CPU µs/msg |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for rate in rates.split():
    for place, label in (("same", "same node"), ("cross", "cross node (2 nodes)")):
        runs = [load(f"{place}-{rate}-{k}") for k in range(1, int(repeats) + 1)]
        acked = [j["messages"]["acked"] for j, _ in runs]
        secs = [j["run_s"] for j, _ in runs]
        bad = [j["messages"]["lost"] + j["messages"]["duplicates"] + j["messages"]["out_of_order"] for j, _ in runs]
        per = lambda key: [e[key] / max(a, 1) for (_, e), a in zip(runs, acked)]
        lines.append(
            f"| {rate} | {label} | {rng([a / s for a, s in zip(acked, secs)], lambda v: f'{v:.0f}')} "
            f"| {rng([j['latency_us']['p50'] for j, _ in runs], ms)} "
            f"| {rng([j['latency_us']['p99'] for j, _ in runs], ms)} | {max(bad)} "
            f"| {med([e['confirm_s'] * 1e3 / max(e['confirms'], 1) for _, e in runs]):.1f} "
            f"| {transit(runs)} "
            f"| {med(per('redis')):.2f} | {med(per('mysql')):.2f} | {med(per('kafka')):.2f} "
            f"| {med([e['cpu_s'] * 1e6 / max(a, 1) for (_, e), a in zip(runs, acked)]):.0f} |"
        )
lines += [
    "",
    f"## Group fan-out: one group of {members} members spread over the nodes, {frate} messages/s",
    "",
    "Kafka records count the messages topic and the relays of messages (presence relays of",
    "the members' logins left out: one per other node per login and logout).",
    "",
    "| nodes | deliveries/s | p50 ms | p99 ms | node CPU µs/delivery | Kafka records/group message |",
    "|---|---|---|---|---|---|",
]
for n in fnodes.split():
    runs = [load(f"fanout-{n}-{k}") for k in range(1, int(repeats) + 1)]
    dl = [j["messages"]["delivered"] for j, _ in runs]
    secs = [j["run_s"] for j, _ in runs]
    sends = [max(j["counters"]["acked"] / int(members), 1) for j, _ in runs]
    lines.append(
        f"| {n} | {rng([d / s for d, s in zip(dl, secs)], lambda v: f'{v:.0f}')} "
        f"| {rng([j['latency_us']['p50'] for j, _ in runs], ms)} "
        f"| {rng([j['latency_us']['p99'] for j, _ in runs], ms)} "
        f"| {med([e['cpu_s'] * 1e6 / max(d, 1) for (_, e), d in zip(runs, dl)]):.1f} "
        f"| {med([e['kafka'] / s for (_, e), s in zip(runs, sends)]):.2f} |"
    )
lines += ["", "Raw runs: `bench/results/cluster/` (loadgen JSON, summary text, service counters).", ""]
pathlib.Path(out).write_text("\n".join(lines))
print("\n".join(lines))
PY
