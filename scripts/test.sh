#!/usr/bin/env bash
# The whole test suite: lint, unit tests, then integration tests that run FLARE's simulator and a
# provisioned federation on loopback. Creates .venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_venv.sh
. .venv/bin/activate
ruff check custom tests jobs scripts
python -m pytest -q --durations=25 tests "$@"
