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


def plot_roc(roc: dict, path: Path) -> Path:
    """The pooled ROC curve with its AUC (and the bins' resolution), and beside it the calibration curve
    when the block has one (`clinfed.analytics.roc.roc_combine`: mean predicted vs observed per group)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cal = roc.get("calibration")
    calibrated = isinstance(cal, dict) and cal.get("mean_predicted")
    fig = Figure(figsize=(10 if calibrated else 5, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if calibrated else 1)
    ax_roc = axes[0] if calibrated else axes
    auc, resolution = roc.get("auc"), roc.get("auc_resolution")
    label = "AUC " + (f"{float(auc):.4f}" if isinstance(auc, int | float) else "?")
    if isinstance(resolution, int | float):
        label += f" (± {float(resolution):.1e}, binned scores)"
    # straight lines between the released points (ties within a merged step count half, as the AUC does);
    # (1, 1) is every curve's end, drawn even where the last few patients' step was merged away
    ax_roc.plot([*roc["fpr"], 1.0], [*roc["tpr"], 1.0], marker=".", label=label)
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title("ROC of the final model, all sites' held-out patients")
    ax_roc.legend(loc="lower right")
    if calibrated:
        ax_cal = axes[1]
        ax_cal.plot(cal["mean_predicted"], cal["observed"], marker="o", label="pooled sites")
        ax_cal.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        ax_cal.set_xlabel("mean predicted probability")
        ax_cal.set_ylabel("observed fraction of positives")
        ax_cal.set_title("calibration")
        ax_cal.legend(loc="upper left")
    for ax in axes if calibrated else [axes]:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_km(km: dict, path: Path) -> Path:
    """Kaplan–Meier step curves per group (released bins only) with a numbers-at-risk table below.

    Drawn from summary.json's `km` block alone: the at-risk row shows the released at-risk count of
    each group at evenly spaced times (the last released bin at or before each tick), so every number
    in the figure is one the release already carries (0 or ≥ the minimum cell).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = km.get("groups") or {}
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax, ax_risk = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4, 1]}, sharex=True)
    horizon = max((max(g["time"]) for g in groups.values() if g["time"]), default=1.0)
    ticks = [horizon * i / 5 for i in range(6)]
    for row, (level, g) in enumerate(sorted(groups.items())):
        times, surv = [0.0, *g["time"]], [1.0, *g["survival"]]
        (line,) = ax.step(times, surv, where="post", label=str(level))
        at_risk = []
        for t in ticks:
            # patients at risk just after t: the first released bin ending after t (0 past the end)
            later = [n for tt, n in zip(g["time"], g["at_risk"], strict=True) if tt > t]
            at_risk.append(later[0] if later else 0)
        for t, n in zip(ticks, at_risk, strict=True):
            ax_risk.text(t, row, str(n), ha="center", va="center", color=line.get_color(), fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("survival")
    logrank = km.get("logrank")
    title = f"Kaplan–Meier, {km.get('time_bin'):g}-day bins"
    if logrank:
        title += f" — log-rank χ²={logrank['chi2']:.3g}, df={logrank['df']}, p={logrank['p']:.3g}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(loc="lower left")
    ax_risk.set_yticks(range(len(groups)), [str(k) for k in sorted(groups)])
    ax_risk.set_ylim(-0.5, max(len(groups), 1) - 0.5)
    ax_risk.invert_yaxis()
    ax_risk.set_xticks(ticks)
    ax_risk.set_xlabel("time (days); numbers at risk below")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_forest(cox: dict, path: Path) -> Path:
    """Hazard ratios with 95 % CIs on a log axis, one row per covariate, from summary.json's `cox`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list((cox.get("coef") or {}).items())
    fig = Figure(figsize=(7, 1.2 + 0.5 * max(len(rows), 1)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (_, c) in enumerate(rows):
        ax.plot([c["ci_low"], c["ci_high"]], [i, i], color="black")
        ax.plot([c["hr"]], [i], marker="s", color="tab:blue")
        ax.text(
            1.02,
            i,
            f"{c['hr']:.3g} ({c['ci_low']:.3g}–{c['ci_high']:.3g})",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=9,
        )
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("hazard ratio (95 % CI)")
    strata = "stratified by site" if cox.get("strata") == "site" else f"pooled, {cox.get('time_bin')}-day bins"
    ax.set_title(f"Cox PH ({strata}), n={cox.get('n')}, events={cox.get('events')}, C={cox.get('concordance', 0):.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
