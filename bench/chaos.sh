#!/usr/bin/env bash
# Fault campaigns at each durability level (issue 14): `loadgen chaos` starts the gateway
# itself, runs 1:1 chat + group fan-out + reconnect churn with integrity checking, and injects
# faults on a schedule drawn from the seed. The table goes to bench/results/chaos.md with the
# commit measured (and is copied into README "Fault campaigns").
#
#   bench/chaos.sh [SECONDS] [SEED]        defaults: 60 1
#
# Rows:
#   memory   gateway pauses and reconnect storms (nothing is stored at `memory`)
#   memory   the same plus SIGKILL: what a crash loses at `memory`, shown, not hidden
#   local    SIGKILL, SIGTERM drain, SIGSTOP of the gateway, storms
#   backend  the same, plus SIGSTOP of MariaDB, Redis and the broker, and Redis stopped and
#            started; needs tests/services.sh (it is run here: it installs and starts what is
#            missing, and its pid files name the processes to pause)
# Each row's exit status is its verdict: 1 on any lost, duplicated or out-of-order message.
set -uo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-60}
SEED=${2:-1}
DIR=$(mktemp -d /tmp/imgw-chaos-bench.XXXXXX)
OUT=bench/results/chaos.md
SVC=${IMGW_SERVICES_DIR:-/tmp/imgw-services}

. bench/lib.sh
build_release || exit 1
tests/setup.sh >/dev/null
set -a
eval "$(tests/services.sh start)"
set +a

LISTEN="--ws-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0"
rows=()

run() { # name durability-label faults serve-args [extra loadgen flags...]
    local name=$1 label=$2 faults=$3 serve=$4
    shift 4
    echo "== $name: $faults" >&2
    "$BIN/loadgen" chaos --serve "--insecure-dev-auth --shards 1 $serve \
        --data-dir $DIR/$name-data $LISTEN" --imgw-bin "$BIN/imgw" \
        --gateway-log "$DIR/$name.log" --duration "${SECS}s" --conns 200 --rate 400 \
        --seed "$SEED" --faults "$faults" --json "$DIR/$name.json" --quiet "$@" \
        >"$DIR/$name.out" 2>"$DIR/$name.err"
    local rc=$?
    tail -3 "$DIR/$name.out" >&2
    rows+=("$(python3 - "$DIR/$name.json" "$label" "$faults" "$rc" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, c = r["messages"], r.get("chaos") or {}
faults = ", ".join(f"{k} {v}" for k, v in sorted(c.get("faults", {}).items())) or "none"
verdict = "PASS" if c.get("pass") else "FAIL"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {faults} | {m['acked']:,} | {m['lost']:,} | "
      f"{m['duplicates']:,} | {m['out_of_order']:,} | {m['unconfirmed']:,} | "
      f"{verdict} (exit {sys.argv[4]}) |")
EOF
)")
}

run memory-pause "memory" "pause,storm" "--durability memory"
run memory-kill "memory" "kill,pause,storm" "--durability memory" --grace 10s
run local "local" "kill,term,pause,storm" "--durability local"

BACKENDS=(--backend "mysql=$SVC/mariadb/mariadbd.pid" --backend "redis=$SVC/redis/redis.pid"
    --backend "kafka=$SVC/tansu/tansu.pid"
    --backend-stop "redis=tests/services.sh stop-redis" --backend-start "redis=tests/services.sh start-redis")
run backend "backend (MariaDB, Redis, Kafka)" \
    "kill,term,pause,storm,pause:mysql,pause:redis,pause:kafka,restart:redis" \
    "--durability backend --mysql $IMGW_MYSQL_URL --redis $IMGW_REDIS_URL --kafka $IMGW_KAFKA" \
    "${BACKENDS[@]}"

commit=$(git rev-parse --short HEAD)
dirty=""
[ -n "$(git status --porcelain -- src loadgen)" ] && dirty=" (with uncommitted changes)"
{
    echo "# Fault campaigns (\`loadgen chaos\`)"
    echo
    echo "Measured at commit \`$commit\`$dirty on $(date -u +%Y-%m-%d) by \`bench/chaos.sh $SECS $SEED\`:"
    echo "one release gateway (\`--shards 1\`) started and restarted by loadgen, 200 connections"
    echo "(100 in 1:1 chat and reconnect churn, 100 in groups of 10), 400 messages/s offered"
    echo "(half 1:1, half group publishes), ${SECS} s of faults drawn from seed $SEED, one at a time"
    echo "with 2-5 s between them, each held 0.5-3 s; then every client reconnects and catches up."
    echo "Acked counts every (message, receiver) pair the gateway acknowledged (a group message once"
    echo "per member). Lost: acked and never delivered; duplicates: shown twice; out of order:"
    echo "within a conversation; unconfirmed: sent, never answered nor delivered."
    echo
    echo "| durability | faults drawn from | faults injected | acked | lost | duplicates | out of order | unconfirmed | verdict |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "At \`memory\` nothing is stored (SPEC 4): a 1:1 message whose receiver is between"
    echo "connections (reconnecting after a storm) is dropped, group pushes"
    echo "missed while reconnecting cannot be synced, and a SIGKILL also loses what was in flight"
    echo "and restarts the groups' timelines and memberships. The memory rows show the loss the"
    echo "campaign finds there, as it must; the durable levels must show none."
} >"$OUT"
cat "$OUT"
rm -rf "$DIR"
