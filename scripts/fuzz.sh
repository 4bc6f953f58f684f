#!/usr/bin/env bash
# Bounded fuzzing of every reader of untrusted bytes (JSON and XML Parameters,
# tasks, import): the property tests of tests/hostile_input.rs with many more
# cases, in release mode, stopped after SECONDS (default 60).
# Usage: scripts/fuzz.sh [SECONDS] [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
cases=${2:-200000}
cargo test --release --test hostile_input --no-run
start=$(date +%s)
set +e
PROPTEST_CASES=$cases timeout "$secs" cargo test --release --test hostile_input -- --test-threads 2
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -eq 124 ]; then
  echo "fuzz: stopped after ${elapsed}s with no failure (time bound reached before $cases cases per property)"
  exit 0
fi
echo "fuzz: finished in ${elapsed}s (exit $rc)"
exit "$rc"
