#!/usr/bin/env bash
# Dependency audit, offline: every crate version in Cargo.lock against the
# RustSec advisory database copy in ../shared/advisory-db (the build
# machines cannot reach GitHub). Fails on any vulnerability and, with
# -D warnings, on unmaintained, unsound or yanked-advisory warnings too.
# Installs cargo-audit from crates.io (by name, --locked) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
db="${FTTP_ADVISORY_DB:-../shared/advisory-db}"
if [ ! -d "$db/crates" ]; then
    echo "audit-deps: no advisory database at $db" >&2
    exit 1
fi
snapshot=$(grep -o '([0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\})' "$db/SNAPSHOT.md" | head -1 | tr -d '()' || true)
echo "audit-deps: RustSec advisory database snapshot of ${snapshot:-unknown date} ($db)"
if ! command -v cargo-audit >/dev/null 2>&1; then
    echo "audit-deps: installing cargo-audit (once per machine, a few minutes)"
    cargo install cargo-audit --locked --quiet
fi
# --stale: the copy is older than cargo-audit would like; its date is printed above.
cargo audit --db "$db" --no-fetch --stale -D warnings
