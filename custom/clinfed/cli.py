"""`clinfed`: simulate, export, deploy and inspect the bundled federated jobs.

Bad arguments exit 2 with one line on stderr and no traceback; a job that fails at a site is reported
in summary.json, not as a crash of the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clinfed.argtypes import HE_FORMATS, channel_list, fraction, positive_float, positive_int
from clinfed.jobs import JOB_NAMES, UnknownJob, available_jobs


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump: a person reads it, a script checks rc
        raise UsageError(f"{self.prog}: {message}")


def inject_spec(text: str) -> tuple[str, str]:
    from clinfed.fl.faults import FAULT_KINDS

    site, sep, kind = text.partition("=")
    if not sep or not site or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"expected SITE=KIND with KIND in {', '.join(FAULT_KINDS)}, got '{text}'")
    return site, kind


def cohort_arg(text: str) -> str:
    """`--cohort`: all or intersect (cohort_stats' rows), or the path of an existing cohort definition file."""
    if text in ("all", "intersect") or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is neither all, intersect nor an existing cohort definition file")


def job_name(text: str) -> str:
    if text not in available_jobs():
        known = ", ".join(available_jobs()) or ", ".join(JOB_NAMES)
        raise argparse.ArgumentTypeError(f"unknown job '{text}' (available: {known})")
    return text


def he_contenders(text: str) -> list[str]:
    """`--contenders a,b`: names checked against the HE bench's contenders (argparse: exit 2 otherwise)."""
    from clinfed.bench.he_bench import CONTENDERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown contender(s) {unknown or text!r} (known: {', '.join(CONTENDERS)})")
    return names


def _site_counts(text: str) -> tuple[int, ...]:
    """`--setup-sites 3,10,20`: site counts of at least 3 (argparse: exit 2 otherwise)."""
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected site counts like 3,10,20, got {text!r}") from None
    if not counts or min(counts) < 3:
        raise argparse.ArgumentTypeError(f"secure aggregation needs at least 3 sites per count, got {text!r}")
    return counts


def dp_models(text: str) -> tuple[str, ...]:
    """`bench dp --models a,b`: names checked against the DP bench's models (argparse: exit 2 otherwise)."""
    from clinfed.bench.dp_bench import MODELS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r} (known: {', '.join(MODELS)})")
    return names


def baseline_dims(text: str) -> tuple[str, ...]:
    """`bench baselines --dims 2d,3d`: checked against the bench's imaging jobs."""
    from clinfed.bench.baselines import JOBS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in JOBS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(JOBS)}, got {text!r}")
    return names


def _number_list(text: str, parse, what: str) -> list:
    try:
        values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v is not None and v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive {what}, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    return _number_list(text, float, "numbers")


def int_list(text: str) -> list[int]:
    return _number_list(text, int, "integers")


def clip_list(text: str) -> list[float | None]:
    """`--clips none,0.1,1`: clip norms of the sweep; `none` is no clipping."""
    return _number_list(text, lambda v: None if v.lower() == "none" else float(v), "numbers or none")


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
    sim.add_argument(
        "--cohort",
        type=cohort_arg,
        default=None,
        metavar="all|intersect|FILE",
        help="cohort_stats: rows to describe (all, intersect); or, for every clinical job, an OMOP cohort definition "
        "file for --data-dir of `clinfed data omop`",
    )
    # clinical analytics (survival_km, cox_ph, glm): variables by name, never tables or SQL
    sim.add_argument("--covariates", type=str, default=None, metavar="A,B", help="cox_ph / glm: covariate columns")
    sim.add_argument("--strata", choices=["site", "none"], default=None, help="cox_ph: one baseline per site or pooled")
    sim.add_argument("--group", type=str, default=None, metavar="COL", help="survival_km: curves per level of COL")
    sim.add_argument("--time-bin", type=positive_float, default=None, metavar="DAYS", help="event-time bin width")
    sim.add_argument("--family", choices=["binomial", "gaussian", "poisson"], default=None, help="glm: family")
    sim.add_argument("--outcome", type=str, default=None, metavar="COL", help="glm: outcome column")
    sim.add_argument(
        "--difficulty", choices=["standard", "hard"], default=None, help="segmentation jobs: synthetic data difficulty"
    )
    sim.add_argument(
        "--public-pretrain",
        type=positive_int,
        default=None,
        metavar="N",
        help="segmentation_dp: pretrain on N public synthetic images before DP-SGD (free under DP)",
    )
    sim.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="imaging jobs: seed of the sites' synthetic data and of the initial weights (default 0)",
    )
    sim.add_argument("--lr", type=positive_float, default=None, metavar="X", help="imaging jobs: Adam's learning rate")
    sim.add_argument(
        "--local-epochs", type=positive_int, default=None, metavar="N", help="imaging jobs: local epochs per round"
    )
    sim.add_argument(
        "--clip",
        type=positive_float,
        default=None,
        metavar="C",
        help="imaging jobs: DP-SGD's per-sample clip norm; with --no-dp, the batch gradient's norm (no noise)",
    )
    sim.add_argument(
        "--compression",
        type=fraction,
        default=None,
        metavar="F",
        help="training jobs: each site sends F (e.g. 0.01) of its update's coordinates, the rest later",
    )
    sim.add_argument(
        "--he-format",
        choices=list(HE_FORMATS),
        default=None,
        help="training jobs: encrypted dense updates as compact integers on the DP noise's grid (default, "
        "~1.9 B/param for large models), on the fixed grid (compact-fixed, ~3.75) or as CKKS reals (real, 16)",
    )
    sim.add_argument(
        "--channels",
        type=channel_list,
        default=None,
        metavar="A,B,C",
        help="segmentation jobs: the UNet's channels per level (default 8,16,32; 32,64,128 has 186 k parameters)",
    )
    # --- cohort_stats on a `clinfed data split` folder (issue 13; --group above names its group column) ---
    sim.add_argument("--features", type=str, default=None, metavar="A,B", help="cohort_stats: numeric columns")
    sim.add_argument("--proportions", type=str, default=None, metavar="C,D", help="cohort_stats: categorical columns")
    sim.add_argument("--rate", type=str, default=None, metavar="EVENT:TIME", help="cohort_stats: incidence rate")
    sim.add_argument("--rate-per", type=positive_float, default=None, metavar="N", help="rate per N person-time")
    sim.add_argument("--rate-unit", type=str, default=None, metavar="TEXT", help="person-time unit, e.g. person-days")
    # --- end of cohort_stats options ---
    # --- the statistician's toolbox (issue 24); --group above is also ttest's and cumulative_incidence's ---
    sim.add_argument("--rows", type=str, default=None, metavar="COL", help="crosstab: row column")
    sim.add_argument("--cols", type=str, default=None, metavar="COL", help="crosstab: column column")
    sim.add_argument("--variable", type=str, default=None, metavar="COL", help="ttest: numeric column")
    sim.add_argument("--variables", type=str, default=None, metavar="A,B,C", help="correlation: numeric columns")
    sim.add_argument("--offset", type=str, default=None, metavar="COL|log(COL)", help="glm: offset (log exposure)")
    sim.add_argument(
        "--cause", type=str, default=None, metavar="COL:A,B", help="cumulative_incidence: cause column and causes"
    )
    # --- end of toolbox options ---

    exp = sub.add_parser("export", help="write a plain FLARE job folder, ready to submit")
    exp.add_argument("job", type=job_name)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--sites", type=positive_int, default=3)
    exp.add_argument("--rounds", type=positive_int, default=None)
    exp.add_argument("--no-encrypt", action="store_true")
    exp.add_argument("--epsilon", type=positive_float, default=None)
    exp.add_argument("--compression", type=fraction, default=None, metavar="F")
    exp.add_argument("--channels", type=channel_list, default=None, metavar="A,B,C")
    exp.add_argument("--he-format", choices=list(HE_FORMATS), default=None)
    bench = sub.add_parser("bench", help="benchmarks: print a table, write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    he = bench_sub.add_parser("he", help="plaintext FedAvg vs FLARE's HE vs clinfed's CKKS aggregation")
    he.add_argument("--params", type=positive_int, default=1_000_000)
    he.add_argument("--sites", type=positive_int, default=3)
    he.add_argument(
        "--contenders",
        type=he_contenders,
        default=None,
        metavar="A,B",
        help="some of plaintext,flare_he,ours,ours_flare_params,ours_real (default: all)",
    )
    he.add_argument("--repeats", type=positive_int, default=3, help="rounds per contender; the table shows medians")
    he.add_argument("--json", type=Path, default=None)
    dp = bench_sub.add_parser("dp", help="one local epoch per model: non-private, Opacus hooks, ghost clipping")
    dp.add_argument("--json", type=Path, default=None)
    dp.add_argument("--models", type=dp_models, default=None, metavar="A,B", help="some of tabular,unet2d,unet3d")
    dp.add_argument("--repeats", type=positive_int, default=3, help="timed epochs after the first (median)")
    base = bench_sub.add_parser(
        "baselines", help="hard imaging task: tuned non-private baselines vs DP-SGD, over seeds"
    )
    base.add_argument("--json", type=Path, default=None, help="written after every run (a partial bench keeps rows)")
    base.add_argument("--dims", type=baseline_dims, default=None, metavar="2d,3d", help="some of 2d,3d")
    base.add_argument("--lrs", type=float_list, default=None, metavar="A,B", help="sweep: learning rates")
    base.add_argument("--clips", type=clip_list, default=None, metavar="none,C", help="sweep: clip norms (none: off)")
    base.add_argument("--epochs", type=int_list, default=None, metavar="A,B", help="sweep: local epochs per round")
    base.add_argument("--seeds", type=int_list, default=None, metavar="A,B,C", help="seeds of the final runs")
    base.add_argument("--rounds", type=positive_int, default=None, help="rounds per run (default: the job's)")
    base.add_argument("--n-train", type=positive_int, default=None, help="training images per site (default: hard's)")
    base.add_argument("--epsilon", type=positive_float, default=8.0, help="the DP run's target ε per site")
    base.add_argument("--resume", action="store_true", help="keep the runs --json FILE already holds")
    stream = bench_sub.add_parser(
        "stream", help="one encrypted, streamed round of a model-sized update through FLARE's simulator"
    )
    stream.add_argument("--params", type=positive_int, default=1_000_000, help="values (125000000: a 500 MB model)")
    stream.add_argument("--sites", type=positive_int, default=3)
    stream.add_argument("--out", type=Path, default=None, help="folder for the run and stream_bench.json")
    stream.add_argument(
        "--compression", type=fraction, default=None, metavar="F",
        help="send only F of the values (compressed wire format) and compare with the dense compact upload",
    )  # fmt: skip
    stream.add_argument("--json", type=Path, default=None)
    secagg = bench_sub.add_parser(
        "secagg", help="secure aggregation's cost: a round beside FLARE's HE and ours, setup per site vs sites"
    )
    secagg.add_argument("--params", type=positive_int, default=1_000_000)
    secagg.add_argument("--sites", type=positive_int, default=3)
    secagg.add_argument("--repeats", type=positive_int, default=3)
    secagg.add_argument("--setup-sites", type=_site_counts, default=(3, 10, 20), metavar="3,10,20")
    secagg.add_argument("--large-params", type=positive_int, default=None, help="also one round this size (25000000)")
    secagg.add_argument("--large-sites", type=positive_int, default=20)
    secagg.add_argument("--json", type=Path, default=None)
    soak = bench_sub.add_parser("soak", help="many rounds in the simulator, RSS per round")
    soak.add_argument("--rounds", type=positive_int, default=30)
    soak.add_argument("--sites", type=positive_int, default=3)
    soak.add_argument("--json", type=Path, default=None)

    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit", required=True, parser_class=_Parser)
    verify = audit_sub.add_parser("verify", help="exit 0 if every chain is intact, 1 naming file and line if not")
    verify.add_argument("path", type=Path)

    privacy = sub.add_parser("privacy", help="privacy ledger tools")
    privacy_sub = privacy.add_subparsers(dest="privacy", required=True, parser_class=_Parser)
    rep = privacy_sub.add_parser("report", help="per-site ε spend from the sites' ledgers")
    rep.add_argument("path", type=Path)

    attack = sub.add_parser("attack", help="privacy attacks against our own updates")
    attack_sub = attack.add_subparsers(dest="attack", required=True, parser_class=_Parser)
    inv = attack_sub.add_parser("invert", help="gradient inversion with and without DP-SGD")
    inv.add_argument("--json", type=Path, default=None)
    inv.add_argument("--png", type=Path, default=None)
    inv.add_argument("--epsilon", type=positive_float, default=8.0)

    from clinfed.data.cli_data import add_parsers as add_data_parsers
    from clinfed.deploy.commands import add_parsers

    add_parsers(sub)
    add_data_parsers(sub)
    return parser


def _write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"JSON: {path.resolve()}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "he":
        from clinfed.bench.he_bench import format_table, run_he_bench

        result = run_he_bench(params=args.params, sites=args.sites, contenders=args.contenders, repeats=args.repeats)
    elif args.bench == "dp":
        from clinfed.bench.dp_bench import format_table, run_dp_bench

        result = run_dp_bench(repeats=args.repeats, **({"models": args.models} if args.models else {}))
    elif args.bench == "baselines":
        from clinfed.bench.baselines import format_table, run_baselines, sweep_grid

        sweep = {k: getattr(args, a) for k, a in (("lrs", "lrs"), ("clips", "clips"), ("epochs", "epochs"))}
        result = run_baselines(
            dims=args.dims or ("2d", "3d"),
            grid=sweep_grid(**{k: v for k, v in sweep.items() if v is not None}),
            epsilon=args.epsilon,
            rounds=args.rounds,
            n_train=args.n_train,
            json_path=args.json,
            resume=json.loads(args.json.read_text()) if args.resume and args.json and args.json.is_file() else None,
            **({"seeds": args.seeds} if args.seeds else {}),
        )
    elif args.bench == "stream":
        from clinfed.bench.stream_bench import format_table, run_stream_bench

        result = run_stream_bench(
            params=args.params, sites=args.sites, out=args.out, compression=args.compression or 0.0
        )
    elif args.bench == "secagg":
        from clinfed.bench.secagg_bench import format_table, run_secagg_bench

        result = run_secagg_bench(
            params=args.params,
            sites=args.sites,
            repeats=args.repeats,
            setup_sites=args.setup_sites,
            large_params=args.large_params,
            large_sites=args.large_sites,
        )
    else:
        from clinfed.bench.soak import format_table, run_soak

        result = run_soak(rounds=args.rounds, sites=args.sites)
    print(format_table(result))
    _write_json(args.json, result)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from clinfed.audit import main_verify

    return main_verify(str(args.path))


def cmd_privacy(args: argparse.Namespace) -> int:
    from clinfed.privacy.report import report

    try:
        print(report(args.path))
    except FileNotFoundError as exc:
        raise UsageError(f"clinfed privacy report: {exc}") from None
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from clinfed.attack.invert import format_table, run_invert

    png = args.png or (args.json.with_suffix(".png") if args.json else Path("out") / "attack_invert.png")
    result = run_invert(json_path=str(args.json) if args.json else None, png_path=str(png), epsilon=args.epsilon)
    print(format_table(result))
    print(f"PNG: {png.resolve()}")
    if args.json:
        print(f"JSON: {args.json.resolve()}")
    return 0


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
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in final.items())
        trained = any(k in final for k in ("auc", "dice", "accuracy"))
        lines.append(("final global model on held-out sets: " if trained else "final: ") + shown)
    for group, features in (summary.get("statistics") or {}).items():
        # the first feature with a released mean (a withheld feature, proportions or a rate have none)
        first = next(
            ((n, st) for n, st in features.items() if isinstance(st, dict) and st.get("mean") is not None), None
        )
        if first:
            name, st = first
            lines.append(f"{group}: n={st.get('count')}  {name}: mean={st['mean']:.4f} std={st.get('std') or 0:.4f}")
    lines.extend(_analysis_lines(summary))
    withheld = (summary.get("suppression") or {}).get("groups_withheld")
    if withheld:
        lines.append(f"withheld groups: {withheld}")
    psi = summary.get("psi")
    if psi:
        lines.append(
            f"PSI intersection: {psi.get('intersection_size')} (expected {psi.get('expected_intersection_size')}), "
            f"per site {psi.get('per_site')}"
        )
    return "\n".join(lines)


def _analysis_lines(summary: dict) -> list[str]:
    """One line per released estimate of survival_km, cox_ph and glm (the rest is in summary.json)."""
    lines = []
    km = summary.get("km") or {}
    for level, curve in (km.get("groups") or {}).items():
        start = curve["at_risk"][0] if curve.get("at_risk") else "?"
        lines.append(f"KM {level}: at risk {start}, median {curve.get('median')}")
    if km.get("logrank"):
        lr = km["logrank"]
        lines.append(f"log-rank χ²={lr.get('chi2')} df={lr.get('df')} p={lr.get('p')}")
    for block in ("cox", "glm"):
        fit = summary.get(block) or {}
        for name, c in (fit.get("coef") or {}).items():
            hr = f" HR={c['hr']:.4g}" if c.get("hr") is not None else ""
            hr += f" IRR={c['irr']:.4g}" if c.get("irr") is not None else ""  # Poisson: (incidence-)rate ratio
            lines.append(f"{block} {name}: coef={c['coef']:.6g} se={c['se']:.4g}{hr} p={c['p']:.3g}")
    lines.extend(_toolbox_lines(summary))
    return lines


def _toolbox_lines(summary: dict) -> list[str]:
    """One line per released test of crosstab, ttest, correlation and cumulative_incidence."""
    lines = []
    ct = summary.get("crosstab") or {}
    if ct:
        lines.append(f"crosstab {ct.get('rows')} × {ct.get('cols')}: table {ct.get('table')}")
        lines.append(f"χ²={ct.get('chi2')} df={ct.get('df')} p={ct.get('p')} Fisher p={ct.get('fisher_p')}")
    tt = summary.get("ttest") or {}
    for level, g in (tt.get("groups") or {}).items():
        lines.append(f"{level}: n={g['n']} mean={g['mean']:.6g} sd={g['sd']:.6g}")
    for key in ("student", "welch", "anova"):
        if tt.get(key):
            lines.append(f"{key}: " + " ".join(f"{k}={v}" for k, v in tt[key].items()))
    corr = summary.get("correlation") or {}
    names = corr.get("variables") or []
    for i, row in enumerate(corr.get("matrix") or []):
        shown = " ".join("   -   " if v is None else f"{v:7.4f}" for v in row)
        lines.append(f"r {names[i]:>12}: {shown}")
    cif = summary.get("cif") or {}
    for level, curve in (cif.get("groups") or {}).items():
        last = {c: round(v[-1], 4) for c, v in curve["cif"].items()}
        lines.append(f"CIF {level}: at risk {curve['at_risk'][0]}, at {curve['time'][-1]:g}: {last}")
    for cause, test in (cif.get("tests") or {}).items():
        lines.append(f"cause-specific log-rank {cause}: χ²={test['chi2']} df={test['df']} p={test['p']}")
    return lines


ANALYTICS_OPTIONS = ("cohort", "covariates", "strata", "group", "time_bin", "family", "outcome")
# cohort_stats' options (issue 13): handed to make_recipe as given ("a,b" and "event:time" parsed there)
ANALYTICS_OPTIONS += ("features", "proportions", "rate", "rate_per", "rate_unit")
# imaging jobs (issue 15): the synthetic data's difficulty
ANALYTICS_OPTIONS += ("difficulty", "public_pretrain")
# training jobs (issue 15): top-F compressed updates
ANALYTICS_OPTIONS += ("compression",)
# imaging jobs (issue 15): a bigger UNet (`--channels 32,64,128`)
ANALYTICS_OPTIONS += ("channels",)
# training jobs (issue 14): the encrypted updates' wire format
ANALYTICS_OPTIONS += ("he_format",)
# imaging jobs (issue 25): seed, learning rate and clip norm, for tuned non-private baselines
ANALYTICS_OPTIONS += ("seed", "lr", "clip", "local_epochs")
# the statistician's toolbox (issue 24): its options, and the analytics options each of its jobs takes
ANALYTICS_OPTIONS += ("rows", "cols", "variable", "variables", "offset", "cause")
TOOLBOX_OPTIONS = {
    "crosstab": ("rows", "cols"),
    "ttest": ("variable", "group"),
    "correlation": ("variables",),
    "cumulative_incidence": ("group", "cause", "time_bin"),
}
OPTION_JOBS = {"rows": ("crosstab",), "cols": ("crosstab",), "variable": ("ttest",), "variables": ("correlation",)}
OPTION_JOBS |= {"offset": ("glm",), "cause": ("cumulative_incidence",)}
TRAINING_JOBS = ("breast_cancer_dp", "segmentation_dp", "segmentation3d_dp")
IMAGING_JOBS = ("segmentation_dp", "segmentation3d_dp")


# jobs that build their rows from an OMOP cohort definition (`--cohort FILE`, docs/omop.md)
# every clinical job: the toolbox's too (issue 24); not psi_linkage (it links ids, it reads no cohort)
COHORT_FILE_JOBS = ("survival_km", "cox_ph", "glm", "cohort_stats")
COHORT_FILE_JOBS += ("crosstab", "ttest", "correlation", "cumulative_incidence")


def _check_channels(command: str, args: argparse.Namespace) -> None:
    if getattr(args, "channels", None) is not None and args.job not in IMAGING_JOBS:
        raise UsageError(f"clinfed {command}: --channels is for {' and '.join(IMAGING_JOBS)}, not {args.job}")
    if getattr(args, "he_format", None) is not None and args.job not in TRAINING_JOBS:
        raise UsageError(f"clinfed {command}: --he-format is for the training jobs, not {args.job}")


#: options checked against the job's `make_recipe` parameters (CLI name → parameter), besides ANALYTICS_OPTIONS
_GENERAL_OPTIONS = {
    "min_cell": "min_cell",
    "epsilon": "epsilon",
    "rounds": "rounds",
    "clip": "clip_norm",
}  # --data-dir: the sites' policy, any job


def _given(value: object) -> bool:
    return value is not None and value is not False


def _check_applies(command: str, args: argparse.Namespace) -> None:
    """Refuse (one line, exit 2) an option the chosen job or mode does not take (issue 23, item 8).

    Why: every job's `make_recipe` swallows unknown keywords (``**_``), so `--time-bin` given to a
    site-stratified Cox, or `--covariates` to a training job, was silently ignored and the person
    believed a setting that never applied. An option applies when the job's `make_recipe` names it.
    """
    import inspect

    from clinfed.jobs import load_job

    params = inspect.signature(load_job(args.job).make_recipe).parameters
    # `is not False`, not `not in (None, False)`: 0 == False, and `--seed 0` is an option given
    given = [n for n in dict.fromkeys((*ANALYTICS_OPTIONS, *_GENERAL_OPTIONS)) if _given(getattr(args, n, None))]
    if getattr(args, "no_encrypt", False):
        given.append("encrypt")
    for name in given:
        if name == "cohort" and getattr(args, "cohort", None) not in ("all", "intersect"):
            continue  # a cohort definition file: checked against COHORT_FILE_JOBS where it is handed on
        if _GENERAL_OPTIONS.get(name, name) not in params:
            flag = "--no-encrypt" if name == "encrypt" else "--" + name.replace("_", "-")
            raise UsageError(f"clinfed {command}: {flag} does not apply to {args.job}")
    if args.job == "cox_ph" and getattr(args, "strata", None) == "site" and getattr(args, "time_bin", None):
        raise UsageError(
            f"clinfed {command}: --time-bin does not apply to cox_ph --strata site (each site keeps its own "
            "baseline on exact times; only the pooled fit bins them)"
        )


def _check_toolbox_options(command: str, args: argparse.Namespace) -> None:
    """An analytics option the job does not take exits 2 in one line (instead of being ignored)."""
    given = [n for n in ANALYTICS_OPTIONS if getattr(args, n, None) is not None]
    if getattr(args, "cohort", None) not in (None, "all", "intersect"):
        given.remove("cohort")  # a cohort definition file: checked against COHORT_FILE_JOBS where it is handed on
    allowed = TOOLBOX_OPTIONS.get(args.job)
    for name in given:
        jobs = OPTION_JOBS.get(name)
        if (jobs is not None and args.job not in jobs) or (allowed is not None and name not in allowed):
            flag = "--" + name.replace("_", "-")
            takes = ", ".join("--" + o.replace("_", "-") for o in allowed) if allowed else None
            raise UsageError(
                f"clinfed {command}: {flag} does not apply to {args.job}"
                + (f" (it takes {takes})" if takes else f" (it is for {', '.join(jobs or ())})")
            )


def _analytics_options(args: argparse.Namespace) -> dict:
    """The analytics options given on the command line, as keyword arguments of the job's make_recipe."""
    extra = {name: getattr(args, name) for name in ANALYTICS_OPTIONS if getattr(args, name, None) is not None}
    if extra.get("cohort") not in (None, "all", "intersect"):  # an OMOP cohort definition file
        import inspect

        from clinfed.jobs import load_job

        takes = "cohort_file" in inspect.signature(load_job(args.job).make_recipe).parameters
        if args.job not in COHORT_FILE_JOBS or not takes:
            raise UsageError(f"clinfed simulate: --cohort FILE does not apply to {args.job}")
        extra["cohort_file"] = extra.pop("cohort")
    if "covariates" in extra:
        extra["covariates"] = [c.strip() for c in extra["covariates"].split(",") if c.strip()]
    if "clip" in extra:
        extra["clip_norm"] = extra.pop("clip")
    return extra


def cmd_simulate(args: argparse.Namespace) -> int:
    from clinfed.simulate import SimulationRequest, run_simulation

    _check_channels("simulate", args)
    _check_applies("simulate", args)
    _check_toolbox_options("simulate", args)
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
        extra=_analytics_options(args),
    )
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"clinfed simulate: --data-dir {args.data_dir}: no such folder")
    try:
        summary = run_simulation(req)
    except RuntimeError as exc:
        print(f"clinfed simulate: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(_round_table(summary))
    if summary.get("policy_override"):
        print("policy override: DP switched off at every simulated site by --no-dp (simulator only)")
    for admission in summary.get("admission", {}).values():
        if admission.get("status") == "refused":
            print(f"refused the job: {admission.get('reason')}")
    print(f"encrypted: {summary.get('encrypted')}  rounds completed: {summary.get('rounds_completed')}")
    print(f"summary: {Path(out).resolve() / 'summary.json'}")
    print(f"report: {Path(out).resolve() / 'report.html'}")
    refused = [a.get("reason", "") for a in summary.get("admission", {}).values() if a.get("status") == "refused"]
    if refused and summary.get("final", {}).get("status") == "not released":
        # the sites refused the job at admission (their policy, a floor, the budget): bad input, nothing ran
        print(f"clinfed simulate: refused at admission: {refused[0]}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clinfed.jobs import load_job

    module = load_job(args.job)
    rounds = args.rounds or module.DEFAULTS.get("rounds", 1)
    epsilon = args.epsilon if args.epsilon is not None else module.DEFAULTS.get("epsilon")
    _check_channels("export", args)
    _check_applies("export", args)
    names = ("compression", "channels", "he_format")
    extra = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    recipe = module.make_recipe(sites=args.sites, rounds=rounds, encrypt=not args.no_encrypt, epsilon=epsilon, **extra)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe.export(str(args.out))
    print(f"exported {args.job} to {(args.out / recipe.name).resolve()}")
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "export": cmd_export,
    "bench": cmd_bench,
    "audit": cmd_audit,
    "privacy": cmd_privacy,
    "attack": cmd_attack,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
        if handler is None:
            raise UsageError(f"clinfed: no handler for '{args.command}'")
        return handler(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (UnknownJob, ValueError) as exc:
        print(f"clinfed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
