#!/usr/bin/env python3
"""Run the compression bench (`clinfed.bench.compression_bench`) and write docs/bench/compression.json,
then regenerate the docs' tables from it (`scripts/bench_tables.py`).

    python scripts/compression_bench.py [--rounds 5] [--fraction 0.01] [--models 12k,185k]
        [--stream-json PATH]   # a `clinfed bench stream --params N --compression F --json PATH` result
        [--stream-params N]    # or run that stream bench here (125000000: the 125 M row)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "custom"))

from clinfed.bench.compression_bench import MODELS, run_compression_bench, save  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--stream-json", type=Path, default=None)
    parser.add_argument("--stream-params", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "compression.json")
    args = parser.parse_args()
    stream = json.loads(args.stream_json.read_text()) if args.stream_json else None
    if args.stream_params:
        from clinfed.bench.stream_bench import run_stream_bench

        stream = run_stream_bench(params=args.stream_params, sites=args.sites, compression=args.fraction)
    models = [m for m in args.models.split(",") if m]
    settings = {"image_size": args.image_size, "n_train": args.n_train}
    result = run_compression_bench(models, args.rounds, args.sites, args.fraction, settings, stream)
    save(result, args.out)
    print(f"JSON: {args.out}")
    return subprocess.call([sys.executable, str(ROOT / "scripts" / "bench_tables.py")])


if __name__ == "__main__":
    sys.exit(main())
