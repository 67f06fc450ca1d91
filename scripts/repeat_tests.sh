#!/usr/bin/env bash
# Run the whole test suite N times in a row (default 30), each in a fresh process with its own PYTHONHASHSEED, and
# count the passes; stops at the first failure and keeps its log. Flaky tests are bugs: this is how they are found.
#   bash scripts/repeat_tests.sh [N] [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}
shift || true
log=$(mktemp -t perfit-repeat-XXXX.log)
for i in $(seq 1 "$n"); do
  start=$(date +%s)
  if PYTHONHASHSEED=$i .venv/bin/python -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1; then
    echo "run $i/$n: passed in $(( $(date +%s) - start )) s ($(tail -1 "$log"))"
  else
    echo "run $i/$n: FAILED (PYTHONHASHSEED=$i); log: $log"
    grep -E "^(FAILED|ERROR)" "$log"
    exit 1
  fi
done
echo "passes=$n/$n"
