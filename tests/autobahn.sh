#!/usr/bin/env bash
# Autobahn fuzzingclient conformance, cases 1-10 (12.* and 13.* are permessage-deflate, which
# imgw does not negotiate), run by PyPI's `kosoku` against a WebSocket echo server.
#
# Usage: tests/autobahn.sh
# Environment:
#   SERVER_CMD       command that starts an echo server in the foreground; `{addr}` in it is
#                    replaced by HOST:PORT (a free port on 127.0.0.1). Default: `imgw serve
#                    --ws-echo` (its /echo endpoint), built with cargo (PROFILE=debug|release,
#                    default debug).
#   AUTOBAHN_PATH    request path of the WebSocket endpoint (default /echo).
#   AUTOBAHN_OUT     report directory (default: a fresh temporary directory).
#   AUTOBAHN_TIMEOUT seconds allowed for the whole kosoku run (default 900).
#   AUTOBAHN_ARGS    extra kosoku arguments (e.g. "-i 6.*" to run a subset).
# Exits with kosoku's status: 0 when no case FAILED (NON-STRICT and INFORMATIONAL are fine).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kosoku >/dev/null 2>&1; then
    python3 -m pip install --quiet kosoku
fi

path="${AUTOBAHN_PATH:-/echo}"
out="${AUTOBAHN_OUT:-$(mktemp -d -t autobahn.XXXXXX)}"
mkdir -p "$out"

ports_file=
if [ -n "${SERVER_CMD:-}" ]; then
    # Another server is told a port found free a moment ago (it cannot report one it bound).
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    addr="127.0.0.1:${port}"
    cmd="${SERVER_CMD//\{addr\}/$addr}"
else
    profile="${PROFILE:-debug}"
    flag=()
    [ "$profile" = release ] && flag=(--release)
    cargo build --quiet "${flag[@]}" --bin imgw
    # imgw's conformance echo endpoint (/echo, enabled by --ws-echo), on one shard, on port 0:
    # it writes the port it bound to the ports file.
    ports_file="$out/ports.json"
    rm -f "$ports_file"
    cmd="\"${CARGO_TARGET_DIR:-target}/${profile}/imgw\" serve --config tests/autobahn.toml --ws-echo --insecure-dev-auth --durability memory --shards 1 --ws-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --ports-file $ports_file --log warn"
fi

echo "autobahn: starting server: $cmd"
bash -c "exec $cmd" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

ready=0
for _ in $(seq 1 100); do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "autobahn: server exited before listening" >&2
        exit 2
    fi
    if [ -n "$ports_file" ] && [ -z "${addr:-}" ] && [ -s "$ports_file" ]; then
        # Written once, whole (renamed into place).
        addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ws"])' "$ports_file")
        port=${addr##*:}
    fi
    if [ -n "${addr:-}" ] && (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" != 1 ]; then
    echo "autobahn: server did not listen on ${addr:-its port} within 10 s" >&2
    exit 2
fi

echo "autobahn: kosoku -m fuzzingclient -x '12.*' -x '13.*' ${AUTOBAHN_ARGS:-} -o $out ws://${addr}${path}"
status=0
# shellcheck disable=SC2086 # AUTOBAHN_ARGS is a list of words on purpose
timeout "${AUTOBAHN_TIMEOUT:-900}" kosoku -m fuzzingclient -x '12.*' -x '13.*' ${AUTOBAHN_ARGS:-} \
    -o "$out" "ws://${addr}${path}" >"$out/kosoku.log" 2>&1 || status=$?
tail -n 40 "$out/kosoku.log"

if [ -f "$out/index.json" ]; then
    python3 - "$out/index.json" <<'EOF'
import collections, json, sys
cases = {}
for per_server in json.load(open(sys.argv[1])).values():
    cases.update(per_server)
worst = {"FAILED": 4, "UNIMPLEMENTED": 3, "NON-STRICT": 2, "INFORMATIONAL": 1, "OK": 0}
counts = collections.Counter()
for case, r in sorted(cases.items()):
    b = max(r["behavior"], r["behaviorClose"], key=lambda x: worst.get(x, 5))
    counts[b] += 1
    if b != "OK":
        print(f"  {case}: behavior={r['behavior']} close={r['behaviorClose']}")
print("autobahn: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" ({len(cases)} cases)")
EOF
fi
if [ "$status" = 124 ]; then
    echo "autobahn: kosoku timed out after ${AUTOBAHN_TIMEOUT:-900} s" >&2
fi
echo "autobahn: reports in $out; kosoku exit status $status"
exit "$status"
