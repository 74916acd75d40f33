"""Benchmark tables in docs/ are generated from the benchmarks' JSON, never typed by hand.

docs/benchmarks.md holds blocks between two markers::

    <!-- generated: dp (docs/bench/dp.json) -->
    ...table...
    <!-- end generated: dp -->

`render` rewrites every block from its JSON file (`scripts/bench_tables.py` writes the file; the
docs test checks that the file already equals its rendering, so a number edited by hand, or a JSON
re-run without regenerating, fails the suite).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[a-z_]+) \((?P<source>[^)]+)\) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


def dp_table(result: dict) -> str:
    from clinfed.bench.dp_bench import markdown_table

    setup = result.get("setup", {})
    return (
        markdown_table(result)
        + f"\n\nOne torch thread, median of {setup.get('repeats', '?')} epochs after the first, each model and "
        f"mode in a fresh process; {setup.get('cpu_cores', '?')} cores, load average "
        f"{setup.get('load_average_after', math.nan):.1f} after the run. × time: wall (CPU time in brackets)."
    )


def he_table(result: dict) -> str:
    lines = [
        "| contender | B/param up | down | encrypt s | aggregate s | decrypt s | round s | max rel err | "
        "max err / σ | server MB | site MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result.items():
        lines.append(
            f"| {name} | {row['bytes_per_param']:.2f} | {row.get('download_bytes_per_param', math.nan):.2f} | "
            f"{row['encrypt_seconds']:.3f} | {row['aggregate_seconds']:.3f} | {row['decrypt_seconds']:.3f} | "
            f"{row['round_seconds']:.3f} | {row['max_rel_error']:.1e} | "
            f"{row.get('max_error_noise_std', math.nan):.3f} | "
            f"{row.get('server_peak_rss_mb', math.nan):.1f} | {row.get('site_peak_rss_mb', math.nan):.1f} |"
        )
    first = next(iter(result.values()))
    lines.append("")
    lines.append(
        f"{first['params']:,} parameters, {first['sites']} sites, median of {first.get('repeats', 1)} round(s)."
    )
    if "ours" in result and "flare_he" in result:
        ours, flare = result["ours"], result["flare_he"]
        lines[-1] += (
            f" ours vs FLARE HE: {ours['bytes_per_param'] / flare['bytes_per_param']:.2f}× bytes, "
            f"{ours['round_seconds'] / flare['round_seconds']:.2f}× round time."
        )
    if "noise_std" in first:
        lines[-1] += f" Each site's update carries noise σ = {first['noise_std']:.2e} per coordinate"
        if "quantum" in result.get("ours", {}):
            ours = result["ours"]
            lines[-1] += (
                f"; ours rounds to δ = {ours['quantum']:.2e} (σ/{first['noise_std'] / ours['quantum']:.0f}) "
                f"within ±{ours['value_bound']:.2e}, {ours.get('clamped_values', 0)} values clamped"
            )
        lines[-1] += "."
    return "\n".join(lines)


def baselines_table(result: dict) -> str:
    from clinfed.bench.baselines import hard_n_train, markdown_table

    setup = result.get("setup", {})
    sizes = ", ".join(
        f"{dim.upper()} {entry['n_train'] or hard_n_train(entry['job'])} training samples per site"
        for dim, entry in result.get("dims", {}).items()
    )
    return (
        markdown_table(result)
        + f"\n\n{setup.get('sites', '?')} sites, `--difficulty hard`, {sizes}; one torch thread, "
        f"{setup.get('cpu_cores', '?')} cores, load average {setup.get('load_average', math.nan):.1f} at the end. "
        f"Federation: {setup.get('federation', '?')}. clip: without DP the batch gradient's norm (no noise), "
        "under DP-SGD the per-sample norm; the setting is chosen on the sweep's seed, which the seeds of the "
        "first table never were; DP noise and batch order come from OS entropy whatever the seed."
    )


def secagg_table(result: dict) -> str:
    from clinfed.bench.secagg_bench import markdown_table

    return markdown_table(result)


def compression_table(result: dict) -> str:
    from clinfed.bench.compression_bench import markdown_table

    return markdown_table(result)


def grid_table(result: dict) -> str:
    """The noise-tied grid against the fixed grid, per job (`scripts/grid_utility.py`)."""
    lines = [
        "| job | settings | format | grid | fields | quantum | clamped | upload B/param | metric |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for job, entry in result.items():
        settings = ", ".join(f"{k} {v}" for k, v in {"sites": entry.get("sites"), "rounds": entry.get("rounds")}.items()
                             if v is not None)  # fmt: skip
        rest = [f"{k} {v}" for k, v in (entry.get("settings") or {}).items()] or ["job defaults"]
        settings = ", ".join(filter(None, [settings, *rest]))
        for fmt, row in entry["formats"].items():
            he = row.get("he_format") or {}
            lines.append(
                f"| {entry.get('job', job)} | {settings or 'defaults'} | {fmt} | {he.get('grid', '?')} | "
                f"{he.get('fields', '?')} | "
                f"{he.get('quantum', math.nan):.2e} | {he.get('clamped_values', '–')} | "
                f"{he.get('upload_bytes_per_param') or math.nan:.2f} | {row['metric']} {row['value']:.4f} |"
            )
    return "\n".join(lines)


TABLES = {
    "dp": dp_table,
    "he": he_table,
    "grid": grid_table,
    "secagg": secagg_table,
    "compression": compression_table,
    "baselines": baselines_table,
}


def render(text: str, root: Path) -> str:
    """`text` with every generated block rebuilt from its JSON (paths relative to the repository `root`)."""

    def one(match: re.Match) -> str:
        name, source = match.group("name"), match.group("source")
        if name not in TABLES:
            raise ValueError(f"unknown generated table {name!r} (known: {', '.join(TABLES)})")
        result = json.loads((root / source).read_text())
        return f"{match.group(1)}{TABLES[name](result)}\n{match.group(5)}"

    return BLOCK.sub(one, text)
