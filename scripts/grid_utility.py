#!/usr/bin/env python3
"""Utility of the noise-tied compact grid against the fixed grid (issue 25, item 5): each job simulated
once per format, same settings; writes one job's rows into docs/bench/grid.json, then regenerates the
docs' tables (`scripts/bench_tables.py`). DP noise differs from run to run, so one run each compares
the formats only within that noise.

    python scripts/grid_utility.py breast_cancer_dp
    python scripts/grid_utility.py segmentation_dp --extra '{"image_size": 32, "n_train": 128}' --rounds 3
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "custom"))

from clinfed.simulate import SimulationRequest, run_simulation  # noqa: E402

FORMATS = ("compact", "compact-fixed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--extra", default="{}", help="job settings as JSON (the simulator's extra)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/clinfed-grid-utility"))
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "grid.json")
    parser.add_argument("--label", default=None, help="the row's key in the JSON (default: the job)")
    args = parser.parse_args()
    extra = json.loads(args.extra)
    rows = {}
    for fmt in FORMATS:
        start = time.monotonic()
        summary = run_simulation(
            SimulationRequest(
                job=args.job, sites=args.sites, rounds=args.rounds, out=args.out / f"{args.job}-{fmt}",
                extra={**extra, "he_format": fmt},
            )
        )  # fmt: skip
        final = summary["final"]
        rows[fmt] = {
            "metric": final["primary_metric"],
            "value": final["metrics"][final["primary_metric"]],
            "rounds": summary["rounds_completed"],
            "he_format": summary["he_format"],
            "seconds": round(time.monotonic() - start, 1),
        }
        print(fmt, json.dumps(rows[fmt]), flush=True)
    doc = json.loads(args.json.read_text()) if args.json.exists() else {}
    entry = {"job": args.job, "sites": args.sites, "rounds": args.rounds, "settings": extra, "formats": rows}
    doc[args.label or args.job] = entry
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return subprocess.call([sys.executable, str(ROOT / "scripts" / "bench_tables.py")])


if __name__ == "__main__":
    sys.exit(main())
