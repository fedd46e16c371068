#!/usr/bin/env bash
# A long schemathesis run (the CLI, every phase: examples, coverage, fuzzing, stateful) against a
# real API: uvicorn on a free 127.0.0.1 port over a fresh embedded catalog in a temporary folder,
# once with a key of each role (viewer, submitter, maintainer, admin). The CI runs a bounded,
# in-process version of the same checks: tests/api/test_schemathesis.py.
#
#   scripts/schemathesis.sh                      # 200 examples per operation and role
#   MAX_EXAMPLES=1000 scripts/schemathesis.sh    # longer
#   CHECKS=all scripts/schemathesis.sh           # also positive_data_acceptance & co (informative:
#                                                # a schema cannot say which bytes are a model)
# Reports (JUnit) go to $REPORT_DIR (default: the temporary folder, kept when a run fails).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MAX_EXAMPLES=${MAX_EXAMPLES:-200}
SEED=${SEED:-1}
# One worker: with two, hypothesis' lambda-source cache hit an internal "AST constructor recursion
# depth mismatch" once (a tool bug, not an API failure).
WORKERS=${WORKERS:-1}
CHECKS=${CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,ignored_auth,missing_required_header}
ROLES=(viewer submitter maintainer admin)

work=$(mktemp -d -t quantyard-schemathesis-XXXXXX)
REPORT_DIR=${REPORT_DIR:-$work/reports}
mkdir -p "$REPORT_DIR"
server=""
status=0
cleanup() {
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [[ $status -eq 0 && "$REPORT_DIR" == "$work/reports" ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

export QUANTYARD_DATA_DIR="$work/data" QUANTYARD_AUTH=required
unset QUANTYARD_DATABASE_URL QUANTYARD_BROKER_URL QUANTYARD_STORAGE_URL
declare -A secret
for role in "${ROLES[@]}"; do
  secret[$role]=$($PY -m quantyard.cli keys create --data-dir "$work/data" --role "$role" --name "schemathesis-$role" 2>/dev/null)
done

port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PY -m uvicorn --factory api.app:create_app --host 127.0.0.1 --port "$port" --log-level warning &
server=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done

for role in "${ROLES[@]}"; do
  echo "== schemathesis as $role: $MAX_EXAMPLES examples per operation, checks $CHECKS"
  $PY -m schemathesis.cli run "http://127.0.0.1:$port/openapi.json" \
      -H "Authorization: Bearer ${secret[$role]}" \
      --checks "$CHECKS" --max-examples "$MAX_EXAMPLES" --seed "$SEED" --workers "$WORKERS" \
      --suppress-health-check all --request-timeout 30 \
      --report junit --report-dir "$REPORT_DIR/$role" || status=1
done
if [[ $status -ne 0 ]]; then echo "schemathesis found failures; reports in $REPORT_DIR" >&2; fi
exit $status
