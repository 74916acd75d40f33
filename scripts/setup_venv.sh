#!/usr/bin/env bash
# Create .venv and install clinfed with its pinned dependencies. torch goes first and exactly:
# torch==2.13.0 is the CPU wheel on these machines; any other torch pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import clinfed, nvflare, tenseal, opacus, monai, sksurv, lifelines, statsmodels, xdist" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import clinfed, nvflare, tenseal, opacus, monai, sksurv, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
