#!/usr/bin/env bash
# The whole test suite: lint, unit tests, then integration tests that run FLARE's simulator and a
# provisioned federation on loopback. Creates .venv first if it is missing.
#
# Tests run in CLINFED_TEST_WORKERS processes (pytest-xdist; default 2, CI's core count): a FLARE
# simulation spends much of its wall time in the framework's own start-up and shut-down waits, so two
# at once use both cores. Tests that bind the provisioned federation's fixed loopback ports share one
# xdist group (`loopback_federation`) and so run one after another in one worker. 0 runs them serially.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_venv.sh
. .venv/bin/activate
ruff check custom tests jobs scripts
python -m pytest -q -n "${CLINFED_TEST_WORKERS:-2}" --dist loadgroup --durations=25 tests "$@"
