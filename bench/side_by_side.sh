#!/usr/bin/env bash
# Side-by-side benchmark: imgw and three peer servers (NATS 2.9 over WebSocket,
# uWebSockets.js, tokio-tungstenite) under the same loadgen scenarios on one machine, the
# server pinned to core 0 and loadgen to core 1. Writes ONE table of medians:
# bench/results/side_by_side.md and .json (raw per-run JSON under bench/results/side_by_side/).
#
#   bench/side_by_side.sh [--duration 10s] [--repeats 3] [--servers "imgw nats uws tt"]
#                         (also: imgw-pb, imgw with the Protobuf codec instead of JSON)
#                         [--scenarios "idle idle19k idle19k_early idle19k_url fanout20 fanout50
#                                       fanout200 fanout600 chat"] (idle19k_early, idle19k_url:
#                                       imgw only)
#                         [--server-core 0] [--loadgen-core 1] [--out DIR] [--table-only]
#
# Installs what is missing first: nats-server (apt), the uWebSockets.js package (npm, into
# bench/peers/uws/node_modules), and builds tt-server, imgw and loadgen (release).
# Environment: CARGO_TARGET_DIR (imgw and loadgen), TT_TARGET_DIR (tt-server).
# Rows of servers not named in --servers stay from earlier runs (each invocation is listed in
# the table); --table-only rebuilds the table from the runs in bench/results/side_by_side/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$ROOT/bench/peers
. "$ROOT/bench/lib.sh"
DURATION=10s
REPEATS=3
SERVERS="imgw nats uws tt"
SCENARIOS="idle idle19k idle19k_early idle19k_url fanout20 fanout50 fanout200 fanout600 chat"
SERVER_CORE=0
LOADGEN_CORE=1
OUT=$ROOT/bench/results
TABLE_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --server-core) SERVER_CORE=$2; shift 2 ;;
        --loadgen-core) LOADGEN_CORE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --table-only) TABLE_ONLY=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TT_TARGET_DIR=${TT_TARGET_DIR:-$TARGET_DIR/tt-server}
IMGW=$TARGET_DIR/release/imgw
LOADGEN=$TARGET_DIR/release/loadgen
TT=$TT_TARGET_DIR/release/tt-server
RAW=$OUT/side_by_side
WORK=$(mktemp -d /tmp/side-by-side.XXXXXX)
mkdir -p "$RAW"

say() { echo "[side-by-side $(date -u +%H:%M:%S)] $*" >&2; }

make_table() {
# ---- the table -----------------------------------------------------------------------------
python3 - "$RAW" "$OUT" <<'PY'
import json, os, statistics, sys, glob
raw, out = sys.argv[1:3]
invocations = []
try:
    with open(os.path.join(raw, "invocations.jsonl")) as f:
        invocations = [json.loads(l) for l in f if l.strip()]
except FileNotFoundError:
    pass
order_s = ["imgw", "imgw-pb", "nats", "uws", "tt"]
names = {"imgw": "imgw", "imgw-pb": "imgw (Protobuf)", "nats": "NATS 2.9 (ws)", "uws": "uWebSockets.js", "tt": "tokio-tungstenite"}
order_c = ["idle", "idle19k", "idle19k_early", "idle19k_url", "fanout20", "fanout50", "fanout200", "fanout600", "chat"]
titles = {"idle": "2000 idle connections", "idle19k": "19000 idle connections",
          "idle19k_early": "19000 idle connections, hello sent with the upgrade",
          "idle19k_url": "19000 idle connections, hello in the upgrade's URL",
          "fanout20": "fan-out 2000 subs, 20 pub/s",
          "fanout50": "fan-out 2000 subs, 50 pub/s", "fanout200": "fan-out 2000 subs, 200 pub/s",
          "fanout600": "fan-out 2000 subs, 600 pub/s", "chat": "1:1 chat, 5000 msgs/s"}
runs = {}
for path in sorted(glob.glob(os.path.join(raw, "*.json"))):
    base = os.path.basename(path)[:-5]
    s, sc, rep = base.rsplit("-", 2)
    try:
        with open(path) as f:
            runs.setdefault((s, sc), []).append(json.load(f))
    except Exception as e:
        print(f"skipping {path}: {e}", file=sys.stderr)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
rows = []
for s in order_s + sorted({k[0] for k in runs} - set(order_s)):
    for sc in order_c + sorted({k[1] for k in runs} - set(order_c)):
        rs = runs.get((s, sc))
        if not rs:
            continue
        sp = [r.get("server_proc") or {} for r in rs]
        idle = sc.startswith("idle")
        m = lambda f: med([f(r) for r in rs])
        row = {
            "server": s, "scenario": sc, "runs": len(rs),
            "rss_per_idle_conn_bytes": med([p.get("rss_per_conn_bytes") for p in sp]) if idle else None,
            "cpu_per_delivery_us": None if idle else med([p.get("cpu_per_delivery_us") for p in sp]),
            "cpu_per_connect_us": med([p.get("cpu_per_connect_us") for p in sp]) if idle else None,
            "delivered_per_s": None if idle else m(lambda r: r["delivered_per_s"]),
            "offered_deliveries_per_s": None if idle else m(lambda r: r["rate"] * (r.get("fanout") or 1)),
            "p50_ms": None if idle else m(lambda r: r["latency_us"]["p50"] / 1000),
            "p99_ms": None if idle else m(lambda r: r["latency_us"]["p99"] / 1000),
            "p999_ms": None if idle else m(lambda r: r["latency_us"]["p999"] / 1000),
            "loss": None if idle else m(lambda r: r["messages"]["lost"] + r["messages"]["unconfirmed"]),
            "duplicates": None if idle else m(lambda r: r["messages"]["duplicates"]),
            "connected": m(lambda r: r["connected"]),
            "loadgen_send_lag_p99_ms": None if idle else m(lambda r: r["send_lag_us"]["p99"] / 1000),
            "loadgen_cpu_wait_s": m(lambda r: r.get("loadgen_cpu_wait_s", 0)),
            "errors": m(lambda r: sum(r.get("errors", {}).values())),
        }
        rows.append(row)
def fmt(v, nd=2):
    if v is None:
        return "-"
    return f"{v:,.{nd}f}"
# The rows of a server come from the last invocation that ran it.
latest = {}
for k, inv in enumerate(invocations):
    for x in inv["servers"].split():
        latest[x] = k
used = []
for k, inv in enumerate(invocations):
    mine = [x for x in order_s + sorted(set(latest) - set(order_s)) if latest.get(x) == k]
    if mine:
        used.append(dict(inv, used_for=mine))
meta = {
    "invocations": used,
    "statistic": "median of the repeats", "host_cpus": os.cpu_count(),
    "server_core": 0, "loadgen_core": 1,
    "notes": [
        "Two cores in all: loadgen shares the machine with the server, and anything else running shows in the load average above.",
        "RSS per idle connection: (VmRSS once all 2000 (19000) are up - VmRSS before) / 2000 (19000); "
        "kernel socket memory is not in VmRSS.",
        "CPU per connection set up (idle rows): server utime+stime from before the first connect until all are up "
        "/ connections: accept, the WebSocket upgrade, for imgw also `hello` (token check) and `welcome`, for NATS "
        "its CONNECT; 1e6 / this is connections per core-second. The 19000 row opens them as fast as they come "
        "from 4 loadgen workers and 4 source addresses of its own per run; \"hello sent with the upgrade\" "
        "(imgw only) is loadgen --early-hello: imgw's Rust client writes the WebSocket upgrade request and "
        "`hello` at once and the gateway answers the 101 and `welcome` in one write (a browser cannot); "
        "\"hello in the upgrade's URL\" (imgw only) is loadgen --url-hello: the `hello` in the request target's "
        "`hello` parameter, as a browser can send it (the JS SDK's helloInUrl), answered the same way.",
        "CPU per delivery: server utime+stime from go to the end of the grace period / deliveries.",
        "Latency: receive time minus intended send time (open loop, coordinated omission corrected).",
        "loss = lost + unconfirmed: sent (written, or acked by imgw) and not delivered by the end of a 3 s grace; "
        "where loadgen cannot keep up (high send lag, p50 in seconds) this counts copies still queued in the "
        "server or the kernel when the grace ended, not copies the server dropped.",
        "imgw subscribers acknowledge what they received (fan-out: a cumulative `ack {group}` once a second per "
        "subscriber, in 20 slices of the connections, as the SDK's `groupAckDelayMs`: a group ack only moves the "
        "member's catch-up cursor; before 2026-12-06 loadgen acked every 32 deliveries and every 100 ms, up to 10 acks/s; "
        "chat: after each read), as its "
        "clients do; the peers have no acknowledgement, so imgw's server CPU per delivery includes reading "
        "those acks, and imgw's chat messages are also acked to the sender (`send_ack`).",
        "imgw (Protobuf): the same gateway and scenarios with `--codec protobuf`; loadgen decodes a Protobuf "
        "envelope far faster than a JSON one, so these rows show the gateway where the JSON rows show loadgen's limit.",
        "loadgen runs on one core; where its send lag p99 is high the row is loadgen-bound, not server-bound.",
        "imgw fan-out uses one group (group_join + send to the group); the peers use one topic.",
    ],
}
with open(os.path.join(out, "side_by_side.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
lines = [
    "# Side-by-side: imgw and peer servers",
    "",
    "Written by `bench/side_by_side.sh`: medians of the repeats (runs column); server pinned to core 0, "
    "loadgen to core 1, loopback, 64-byte bodies, on a 2-core machine: the load average before "
    "and after each invocation says how quiet it was. Within a repeat the servers of an "
    "invocation take turns scenario by scenario (since commit 1c4de7c; before, server by "
    "server). Runs that produced these rows:",
    "",
] + [f"- {i['started']} to {i['finished']}, commit {i.get('commit', 'not recorded')}: "
     f"{', '.join(names.get(x, x) for x in i['used_for'])}; "
     f"{i['duration']} per run, {i['repeats']} repeats; load average before {i['loadavg_before']}, "
     f"after {i['loadavg_after']}"
     for i in used] + [
    "",
    "| server | scenario | runs | RSS per idle conn (B) | server CPU per connection set up (us) | server CPU per delivery (us) | delivered/s | p50 ms | p99 ms | p999 ms | loss | dups | loadgen send lag p99 ms |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lines.append("| " + " | ".join([
        names.get(r["server"], r["server"]), titles.get(r["scenario"], r["scenario"]), str(r["runs"]),
        fmt(r["rss_per_idle_conn_bytes"], 0), fmt(r["cpu_per_connect_us"], 1),
        fmt(r["cpu_per_delivery_us"], 3),
        fmt(r["delivered_per_s"], 0), fmt(r["p50_ms"], 3), fmt(r["p99_ms"], 3),
        fmt(r["p999_ms"], 3), fmt(r["loss"], 0), fmt(r["duplicates"], 0),
        fmt(r["loadgen_send_lag_p99_ms"], 3)]) + " |")
lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]] + [""]
with open(os.path.join(out, "side_by_side.md"), "w") as f:
    f.write("\n".join(lines))
print("\n".join(lines))
PY
}

if [ $TABLE_ONLY = 1 ]; then
    make_table
    exit 0
fi

# ---- install and build ---------------------------------------------------------------------
need_apt_updated=1
apt_install() {
    if [ $need_apt_updated = 1 ]; then apt-get update -qq; need_apt_updated=0; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
for s in $SERVERS; do
    case $s in
        nats) command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] \
                || apt_install nats-server ;;
        uws)
            command -v node >/dev/null || apt_install nodejs npm
            if [ ! -d "$PEERS/uws/node_modules/@trufflesuite/uws-js-unofficial" ]; then
                say "npm install (uWebSockets.js)"
                (cd "$PEERS/uws" && npm ci --no-audit --no-fund)
            fi ;;
        tt)
            say "building tt-server"
            CARGO_TARGET_DIR=$TT_TARGET_DIR cargo build --release -q \
                --manifest-path "$PEERS/tt-server/Cargo.toml" ;;
    esac
done
command -v taskset >/dev/null || apt_install util-linux
NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
# The commit measured (imgw and loadgen are built from the work tree).
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD)
git -C "$ROOT" diff --quiet HEAD -- src loadgen Cargo.toml Cargo.lock ||
    COMMIT="$COMMIT with uncommitted changes"
say "building imgw and loadgen (release)"
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p imgw --bin imgw \
    -p loadgen)

# ---- servers -------------------------------------------------------------------------------
SERVER_PID=
start_server() {
    local s=$1
    case $s in
        imgw|imgw-pb)
            rm -rf "$WORK/imgw-data"
            taskset -c "$SERVER_CORE" "$IMGW" serve --insecure-dev-auth --shards 1 \
                --config "$PEERS/imgw-bench.toml" --ws-listen 127.0.0.1:18090 \
                --tcp-listen 127.0.0.1:18091 --admin-listen 127.0.0.1:18092 \
                --data-dir "$WORK/imgw-data" >"$WORK/server.log" 2>&1 &
            SERVER_PID=$!; wait_port 18090 ;;
        nats)
            taskset -c "$SERVER_CORE" "$NATS_SERVER" -c "$PEERS/nats.conf" \
                >"$WORK/server.log" 2>&1 &
            SERVER_PID=$!; wait_port 8093 ;;
        uws)
            taskset -c "$SERVER_CORE" node "$PEERS/uws/server.js" 8091 127.0.0.1 \
                >"$WORK/server.log" 2>&1 &
            SERVER_PID=$!; wait_port 8091 ;;
        tt)
            taskset -c "$SERVER_CORE" "$TT" 127.0.0.1:8092 >"$WORK/server.log" 2>&1 &
            SERVER_PID=$!; wait_port 8092 ;;
    esac
    sleep 0.3
}
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
trap 'stop_server; rm -rf "$WORK"' EXIT

target_of() {
    case $1 in
        imgw) echo "--protocol imgw --target ws://127.0.0.1:18090/ws --heartbeat-ms 600000" ;;
        imgw-pb) echo "--protocol imgw --codec protobuf --target ws://127.0.0.1:18090/ws --heartbeat-ms 600000" ;;
        nats) echo "--protocol nats --target ws://127.0.0.1:8093/" ;;
        uws) echo "--protocol plainws --target ws://127.0.0.1:8091/" ;;
        tt) echo "--protocol plainws --target ws://127.0.0.1:8092/" ;;
    esac
}
scenario_args() {
    local s=$1 sc=$2 src=$3 group=
    case $s in imgw*) group=--group ;; esac
    case $sc in
        idle) echo "idle --conns 2000 --duration 3s" ;;
        # Client ports of a run stay in TIME_WAIT: each run connects from 4 addresses of its own.
        idle19k*) echo "idle --conns 19000 --workers 4 --ramp 0 --duration 2s --setup-timeout 120s" \
            "--sources 127.0.0.$src-127.0.0.$((src + 3))"
            case $sc in
                idle19k_early) echo "--early-hello" ;;
                idle19k_url) echo "--url-hello" ;;
            esac ;;
        fanout*) echo "fanout --conns 2001 --fanout 2000 --rate ${sc#fanout} $group --duration $DURATION" ;;
        chat) echo "chat --conns 1000 --rate 5000 --duration $DURATION" ;;
        *) echo "unknown scenario $sc" >&2; return 1 ;;
    esac
}

# ---- runs ----------------------------------------------------------------------------------
# Only this run's servers start afresh: rows of other servers already in $RAW stay, so one
# server can be measured again (--servers imgw) and the table still has every row.
for s in $SERVERS; do rm -f "$RAW/$s"-*.json; done
SRC=20
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Scenario by scenario within each repeat: the servers' runs of one scenario follow each other
# within a minute or two, so the machine's drift over an invocation (about 2x by the hour)
# falls on all of them alike rather than on whichever server ran last.
for rep in $(seq 1 "$REPEATS"); do
    for sc in $SCENARIOS; do
        for s in $SERVERS; do
            case $s:$sc in imgw*:*) ;; *:idle19k_early | *:idle19k_url) continue ;; esac
            start_server "$s"
            out="$RAW/$s-$sc-$rep.json"
            say "$s $sc run $rep/$REPEATS"
            # shellcheck disable=SC2046
            taskset -c "$LOADGEN_CORE" "$LOADGEN" $(scenario_args "$s" "$sc" "$SRC") $(target_of "$s") \
                --server-pid "$SERVER_PID" --grace 3s --quiet --json "$out" \
                >"$WORK/loadgen.out" 2>&1 || say "  loadgen exit $? (see $out)"
            grep -E "delivered|latency \(|integrity|server " "$WORK/loadgen.out" | sed 's/^/    /' >&2 || true
            case $sc in idle19k*) SRC=$((SRC + 4)); [ "$SRC" -gt 250 ] && SRC=20 ;; esac
            stop_server
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
printf '{"started":"%s","finished":"%s","servers":"%s","scenarios":"%s","duration":"%s","repeats":%s,"loadavg_before":"%s","loadavg_after":"%s","commit":"%s"}\n' \
    "$STARTED" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SERVERS" "$SCENARIOS" "$DURATION" "$REPEATS" \
    "$LOAD_BEFORE" "$LOAD_AFTER" "$COMMIT" >>"$RAW/invocations.jsonl"

make_table
