"""`clinfed`: simulate, export, deploy and inspect the bundled federated jobs.

Bad arguments exit 2 with one line on stderr and no traceback; a job that fails at a site is reported
in summary.json, not as a crash of the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from clinfed.jobs import JOB_NAMES, UnknownJob, available_jobs


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump: a person reads it, a script checks rc
        raise UsageError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def inject_spec(text: str) -> tuple[str, str]:
    from clinfed.faults import FAULT_KINDS

    site, sep, kind = text.partition("=")
    if not sep or not site or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"expected SITE=KIND with KIND in {', '.join(FAULT_KINDS)}, got '{text}'")
    return site, kind


def job_name(text: str) -> str:
    if text not in available_jobs():
        known = ", ".join(available_jobs()) or ", ".join(JOB_NAMES)
        raise argparse.ArgumentTypeError(f"unknown job '{text}' (available: {known})")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clinfed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="run a job in FLARE's simulator")
    sim.add_argument("job", type=job_name)
    sim.add_argument("--sites", type=positive_int, default=3)
    sim.add_argument("--rounds", type=positive_int, default=None)
    sim.add_argument("--out", type=Path, default=None, help="folder for summary.json, plots and the workspace")
    sim.add_argument(
        "--workspace", type=Path, default=None, help="participants' persistent folders (reuse across runs)"
    )
    sim.add_argument("--no-encrypt", action="store_true", help="plaintext FedAvg, for comparison only")
    sim.add_argument("--epsilon", type=positive_float, default=None, help="target ε per site for this job")
    sim.add_argument("--no-dp", action="store_true", help="train without DP-SGD (utility reference)")
    sim.add_argument("--site-budget", type=positive_float, default=None, help="each site's own ε budget (its policy)")
    sim.add_argument("--min-cell", type=positive_int, default=None)
    sim.add_argument("--data-dir", type=str, default=None)
    sim.add_argument("--inject", type=inject_spec, action="append", default=[], metavar="SITE=KIND")

    exp = sub.add_parser("export", help="write a plain FLARE job folder, ready to submit")
    exp.add_argument("job", type=job_name)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--sites", type=positive_int, default=3)
    exp.add_argument("--rounds", type=positive_int, default=None)
    exp.add_argument("--no-encrypt", action="store_true")
    exp.add_argument("--epsilon", type=positive_float, default=None)
    return parser


def _round_table(summary: dict) -> str:
    metric = summary.get("final", {}).get("primary_metric", "auc")
    lines = [f"{'round':>5}  {'site':<8} {'status':<8} {metric:>7} {'ε':>7} {'bytes':>10}  reason"]
    for rnd in summary.get("rounds", []):
        for site, entry in sorted(rnd["sites"].items()):
            value = entry.get("metrics", {}).get(metric, float("nan"))
            lines.append(
                f"{rnd['round']:>5}  {site:<8} {entry['status']:<8} {value:>7.4f} {entry.get('epsilon', 0.0):>7.3f} "
                f"{entry.get('bytes_sent', 0):>10}  {entry.get('reason', '')}"
            )
    final = summary.get("final", {}).get("metrics", {})
    if final:
        lines.append("final global model on held-out sets: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from clinfed.simulate import SimulationRequest, run_simulation

    out = args.out or Path("out") / args.job
    req = SimulationRequest(
        job=args.job,
        sites=args.sites,
        rounds=args.rounds,
        out=out,
        workspace=args.workspace,
        encrypt=not args.no_encrypt,
        epsilon=args.epsilon,
        no_dp=args.no_dp,
        site_budget=args.site_budget,
        min_cell=args.min_cell,
        data_dir=args.data_dir,
        inject=dict(args.inject),
    )
    summary = run_simulation(req)
    print(_round_table(summary))
    print(f"encrypted: {summary.get('encrypted')}  rounds completed: {summary.get('rounds_completed')}")
    print(f"summary: {Path(out).resolve() / 'summary.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clinfed.jobs import load_job

    module = load_job(args.job)
    rounds = args.rounds or module.DEFAULTS.get("rounds", 1)
    epsilon = args.epsilon if args.epsilon is not None else module.DEFAULTS.get("epsilon")
    recipe = module.make_recipe(sites=args.sites, rounds=rounds, encrypt=not args.no_encrypt, epsilon=epsilon)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe.export(str(args.out))
    print(f"exported {args.job} to {(args.out / recipe.name).resolve()}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except UnknownJob as exc:
        print(f"clinfed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _jsonable(obj) -> str:
    return json.dumps(obj, indent=2)


if __name__ == "__main__":
    sys.exit(main())
