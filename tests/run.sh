#!/usr/bin/env bash
# The project's test command (README.md): installs what is missing, starts the external services
# the backend tests use (MariaDB, Redis, the tansu broker: tests/services.sh, stopped again at
# the end if this run started them), then runs every test of the workspace through real sockets
# where a feature has them, and the Autobahn conformance run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
services_env=$(tests/services.sh start)
set -a
eval "$services_env"
set +a
trap 'tests/services.sh stop' EXIT
cargo nextest run --workspace --all-targets --no-fail-fast "$@"
tests/autobahn.sh
