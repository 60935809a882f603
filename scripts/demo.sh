#!/usr/bin/env bash
# kasou's main job on the embedded default: one host, state in SQLite, the host
# agent and the REST API on 127.0.0.1, the tiny guest image, and a sample VM booted.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/kasou demo "$@"
