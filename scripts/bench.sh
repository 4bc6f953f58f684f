#!/usr/bin/env bash
# Performance figures (README "Performance"). Builds in release mode and
# prints one table; `scripts/bench.sh quick` runs a smaller version.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench perf -- "$@"
