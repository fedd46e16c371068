#!/usr/bin/env bash
# The whole fault suite (tests/faults): the CI slice plus the long variants (10 pool-process
# kills, 10 whole-worker kills, Postgres stopped 30 s and frozen). Each scenario prints its
# timings. Starts its own Postgres, Redis and S3 (never the shared ones); needs the Postgres 15
# binaries (QUANTYARD_TEST_PG_BIN), redis-server and weed on PATH. Extra args go to pytest,
# e.g. scripts/faults.sh -k worker   or   scripts/faults.sh -m "not faults_long".
set -euo pipefail
cd "$(dirname "$0")/.."
export QUANTYARD_REQUIRE_SERVICES="${QUANTYARD_REQUIRE_SERVICES:-1}"
export QUANTYARD_FAULTS_LONG=1
exec python3 -m pytest tests/faults -p no:cacheprovider -q -rA --durations=20 "$@"
