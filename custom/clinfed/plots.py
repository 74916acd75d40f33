"""Figures a researcher reads after a run: utility and privacy spend per round, from summary.json alone.

The plots take the summary dict and nothing else, so the same figure can be redrawn from any
finished run (simulator, POC or deployed) without access to a site. They use matplotlib's object
API on an Agg canvas rather than pyplot: no display is needed, and no global figure state is shared
with other threads (the FLARE simulator runs sites as threads of one process).
"""

from __future__ import annotations

import math
from pathlib import Path


def round_series(summary: dict, metric: str) -> tuple[list[int], list[float], dict[str, list[tuple[int, float]]]]:
    """(rounds, mean `metric` of the sites that reported it, {site: [(round, ε)]}) from a summary.

    A site that was refused or failed in a round has no metric for that round and is left out of
    that round's mean rather than counted as zero; its ε is still plotted, since a refusal spends
    nothing but the ledger still stands where it stood.
    """
    rounds, means = [], []
    eps: dict[str, list[tuple[int, float]]] = {}
    for entry in summary.get("rounds", []):
        rnd = int(entry["round"])
        values = []
        for site, result in entry.get("sites", {}).items():
            value = result.get("metrics", {}).get(metric)
            if result.get("status") == "ok" and value is not None and math.isfinite(float(value)):
                values.append(float(value))
            if result.get("epsilon") is not None:
                eps.setdefault(site, []).append((rnd, float(result["epsilon"])))
        rounds.append(rnd)
        means.append(sum(values) / len(values) if values else math.nan)
    return rounds, means, eps


def plot_rounds(summary: dict, path: Path, metric: str) -> Path:
    """Two panels: the sites' mean `metric` per round (and the final global model's), each site's ε per round."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds, means, eps = round_series(summary, metric)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_metric, ax_eps = fig.subplots(1, 2)
    ax_metric.plot(rounds, means, marker="o", label=f"mean of sites' local {metric}")
    final = summary.get("final", {}).get("metrics", {}).get(metric)
    if final is not None and rounds:
        ax_metric.axhline(float(final), color="black", linestyle="--", label=f"final global model {float(final):.3f}")
    ax_metric.set_xlabel("round")
    ax_metric.set_ylabel(metric)
    ax_metric.set_title(f"{metric} per round")
    ax_metric.legend(loc="lower right")
    for site in sorted(eps):
        xs, ys = zip(*eps[site], strict=True)
        ax_eps.plot(xs, ys, marker="o", label=site)
    budgets = {p.get("budget") for p in summary.get("privacy", {}).values() if p.get("budget") is not None}
    for budget in sorted(budgets):
        ax_eps.axhline(float(budget), color="red", linestyle=":", label=f"site budget {float(budget):g}")
    ax_eps.set_xlabel("round")
    ax_eps.set_ylabel("ε (cumulative)")
    ax_eps.set_title("privacy spent per site")
    if eps:
        ax_eps.legend(loc="upper left")
    for ax in (ax_metric, ax_eps):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.get('job', '')} ({'encrypted' if summary.get('encrypted') else 'plaintext'} aggregation)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
