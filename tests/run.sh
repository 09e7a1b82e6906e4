#!/usr/bin/env bash
# The project's test command (README.md): installs what is missing, starts the external services
# the backend tests use (MariaDB, Redis, the tansu broker: tests/services.sh, stopped again at
# the end if this run started them), then runs every test of the workspace through real sockets
# where a feature has them, the JavaScript SDK's and the browser pages' tests (clients/js), and
# the Autobahn conformance run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
# Services that already answer (the user's, or a previous run's) are used and left running.
already_up=$(tests/services.sh status)
services_env=$(tests/services.sh start)
set -a
eval "$services_env"
set +a
[ -n "$already_up" ] || trap 'tests/services.sh stop' EXIT
cargo nextest run --workspace --all-targets --no-fail-fast "$@"
# The TypeScript SDK and the --web pages against the gateway just built: the committed
# clients/js/dist must match its sources (the binary embeds it), then the SDK's tests in Node
# and the pages' tests in Debian's chromium (screenshots in $target/browser-tests).
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
cargo build --quiet --bin imgw
(
    cd clients/js
    export IMGW_BIN="$target/debug/imgw" BROWSER_TEST_OUT="$target/browser-tests"
    npm run --silent check-dist
    npm test --silent
    npm run --silent test:browser
)
tests/autobahn.sh
