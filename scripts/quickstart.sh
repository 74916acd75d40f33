#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, then run the default job (breast_cancer_dp, 3 sites,
# DP-SGD at each site, CKKS-encrypted aggregation) in FLARE's simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
./scripts/setup_venv.sh
. .venv/bin/activate
OUT=${OUT:-out/quickstart}
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
clinfed simulate breast_cancer_dp --sites 3 --out "$OUT" "$@" 2> "$OUT.log" || { tail -20 "$OUT.log"; exit 1; }
echo "quickstart finished in $(( $(date +%s) - start )) s (simulator log: $OUT.log)"
