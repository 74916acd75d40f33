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
# FLARE's own log lines go to the log file; the terminal shows the round table and the summary path.
if ! clinfed simulate breast_cancer_dp --sites 3 --out "$OUT" "$@" > "$OUT.log" 2>&1; then
  tail -20 "$OUT.log"
  exit 1
fi
sed -n '/^round  site/,$p' "$OUT.log"
echo "quickstart finished in $(( $(date +%s) - start )) s (simulator log: $OUT.log)"
