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
# -rfEs: the summary lists every failure, error and skip with its reason
if [ $# -gt 0 ]; then
  echo "== pytest $*"
  exec pytest -p no:cacheprovider -rfEs --durations=30 "$@"
fi
# The whole suite in two parts. The unit, functional and contract tests (fakes, in-process) run two at a time
# (pytest-xdist, one worker per core), and with them the real-part tests that boot no guest and depend on no
# timing (marker shares_machine: the directory servers, the Debian package and its systemd machine, a kasou
# without guests, and the guests whose checks allow minutes: the Debian boots, an import, an installer CD, the
# backups, snapshots, devices, firmware and TPM, mirrors, QEMU's TLS and its confinement). A file's
# tests go to one worker (--dist loadfile), so a file's servers and package are set up once. Then the tests of real parts (QEMU guests, etcd,
# Chromium) one at a time, alone on the machine, as their timings (HA leases, boots) expect.
echo "== pytest: unit, functional and contract tests, and real parts that share the machine (two at a time)"
pytest -p no:cacheprovider -rfEs --durations=15 -n 2 --dist loadfile \
  -m "not scenario and (shares_machine or not (qemu or etcd or directory or deb))"
echo "== pytest: real QEMU, etcd, Chromium (one at a time)"
exec pytest -p no:cacheprovider -rfEs --durations=40 -m "not scenario and (qemu or etcd or directory or deb) and not shares_machine"
