#!/usr/bin/env bash
# The project's test command (README.md): installs what is missing, starts the external services
# the backend tests use (MariaDB, Redis, the tansu broker: tests/services.sh, stopped again at
# the end if this run started them), then runs every test of the workspace through real sockets
# where a feature has them, and the Autobahn conformance run.
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
tests/autobahn.sh
