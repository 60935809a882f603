#!/usr/bin/env bash
# Install everything, then run kasou's whole test suite: lint, types, unit,
# functional, and the integration tests that boot real QEMU guests.
# Extra arguments go to pytest (e.g. -m "not qemu" for the fast part only).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== mypy"
mypy
echo "== layers (import-linter: docs/architecture.md, 'What may import what')"
lint-imports --no-logo --no-cache
echo "== tiny guest image"
kasou image build tiny
echo "== pytest"
# -rfEs: the summary lists every failure, error and skip with its reason
exec pytest -p no:cacheprovider -rfEs --durations=30 "$@"
