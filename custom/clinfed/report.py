"""report.html: what a statistician reads after a run, written from summary.json alone.

Why from the summary alone: the same report can be redrawn from any finished run (simulator, POC,
deployed) without access to a site, and every number in it is one the run released. The page is
self-contained (figures inline as base64 PNG, CSS inline, no script, nothing fetched), so it opens
from a mail attachment or an air-gapped laptop. Tables follow what statisticians already read:
lifelines' Cox summary (coef, exp(coef), se, CI, z, p), statsmodels' GLM summary, a KM table with
numbers at risk. Each figure fits its job: KM curves for `km`, forest plots for `cox` and `glm`, a
per-round figure only for training jobs. A block this module does not know (a new method's
``crosstab``, ``ttest``, ``correlation``, ``cif``, ``roc`` …) is rendered generically as tables, so a
new key never breaks the report.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"
#: rows of a long table shown before the rest is folded away
MAX_ROWS = 60
#: keys of the summary rendered by their own sections (or deliberately not shown)
KNOWN = {
    "job", "method", "sites", "encrypted", "rounds_completed", "rounds", "final", "privacy", "admission",
    "statistics", "psi", "km", "cox", "glm", "provenance", "suppression", "dp", "policy_override",
    "resumed_at_round", "submission", "bytes_sent", "compression",
}  # fmt: skip
TRAINING_METRICS = ("auc", "dice", "accuracy")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:3px 8px;
text-align:right;vertical-align:top}th{background:#f3f3f3}td.l,th.l{text-align:left}
.meta td{text-align:left}.bad{color:#a00}.ok{color:#070}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9em}details{margin:.4em 0}
"""


# --- small helpers ------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number as a statistician reads it: ints exact, floats to `digits` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e12:
            return str(int(value))
        if value != 0 and (abs(value) < 1e-4 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return _e(value)


def _p(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value < 0.005:
        return "&lt;0.005" if value >= 1e-300 else "&lt;1e-300"
    return _num(value, 3)


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first `left` columns left-aligned; long tables folded."""

    def row(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(cells))
            + "</tr>"
        )

    head = row([_e(h) for h in header], "th")
    body = [row(r, "td") for r in rows]
    if len(body) <= MAX_ROWS:
        return f"<table>{head}{''.join(body)}</table>"
    shown = "".join(body[:MAX_ROWS])
    rest = "".join(body[MAX_ROWS:])
    return (
        f"<table>{head}{shown}</table><details><summary>{len(body) - MAX_ROWS} more rows</summary>"
        f"<table>{head}{rest}</table></details>"
    )


def _figure(draw: Callable[[Path], Any], alt: str) -> str:
    """A figure drawn by `draw(path)` inlined as a base64 PNG; a figure that fails to draw is a note."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "figure.png"
            draw(path)
            data = base64.b64encode(path.read_bytes()).decode()
    except Exception as exc:  # a report never fails on a figure
        return f"<p class=note>figure not drawn: {_e(type(exc).__name__)}: {_e(str(exc)[:200])}</p>"
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _agg_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


# --- sections --------------------------------------------------------------------------------------------
def _overview(summary: dict) -> str:
    final = summary.get("final") or {}
    rows = [
        ("job", _e(summary.get("job", "?"))),
        ("method", _e(summary.get("method", "training" if is_training(summary) else "—"))),
        ("sites", _e(", ".join(summary.get("sites") or []))),
        ("aggregation", "encrypted (CKKS)" if summary.get("encrypted") else "<span class=bad>plaintext</span>"),
        ("rounds completed", _num(summary.get("rounds_completed"))),
    ]
    if final.get("status"):
        cls = "ok" if final["status"] == "released" else "bad"
        reason = f" — {_e(final.get('reason'))}" if final.get("reason") else ""
        rows.append(("outcome", f"<span class={cls}>{_e(final['status'])}</span>{reason}"))
    if final.get("release_site"):
        rows.append(("release site", _e(final["release_site"])))
    if summary.get("policy_override"):
        rows.append(("policy override", f"<span class=bad>{_e(summary['policy_override'])}</span>"))
    metrics = final.get("metrics") or {}
    rows += [(f"final {k}", _num(v)) for k, v in metrics.items() if not isinstance(v, dict | list)]
    body = "".join(f"<tr><th class=l>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class=meta>{body}</table>"


def _admission(summary: dict) -> str:
    adm = summary.get("admission") or {}
    if not adm:
        return ""
    rows = []
    for site, a in sorted(adm.items()):
        a = a if isinstance(a, dict) else {"status": a}
        cls = "ok" if a.get("status") in ("accepted", "ok") else "bad"
        rows.append(
            [_e(site), f"<span class={cls}>{_e(a.get('status', '?'))}</span>", _num(a.get("planned_epsilon")),
             _e(a.get("reason", ""))]
        )  # fmt: skip
    return "<h2>Admission</h2>" + _table(["site", "status", "planned ε", "reason"], rows, left=2)


def _privacy(summary: dict) -> str:
    priv = summary.get("privacy") or {}
    out = []
    charged = priv.get("epsilon_charged") if isinstance(priv.get("epsilon_charged"), dict) else None
    per_site = {k: v for k, v in priv.items() if isinstance(v, dict) and k != "epsilon_charged"}
    if per_site:
        rows = [
            [_e(s), _num(p.get("epsilon")), _num(p.get("delta")), _e(p.get("accountant", "")), _num(p.get("budget")),
             _num(p.get("site_total_epsilon")), _num(len(p.get("history") or []))]
            for s, p in sorted(per_site.items())
        ]  # fmt: skip
        out.append(_table(["site", "ε (this job)", "δ", "accountant", "budget", "site total ε", "spends"], rows))
    if charged:
        out.append(_table(["site", "ε charged (output DP)"], [[_e(s), _num(v)] for s, v in sorted(charged.items())]))
    dp = summary.get("dp")
    if isinstance(dp, dict):
        out.append("<h3>Output DP</h3>" + _kv_table(dp))
    if not out:
        return "<h2>Privacy</h2><p class=note>no differential-privacy spend in this job (ε = 0 at every site)</p>"
    return "<h2>Privacy: ε per site</h2>" + "".join(out)


def _suppression(summary: dict) -> str:
    rows = []
    for block, prov in sorted((summary.get("provenance") or {}).items()):
        if not isinstance(prov, dict):
            continue
        what = prov.get("suppressed", "none")
        text = "; ".join(f"{k}: {v}" for k, v in what.items()) if isinstance(what, dict) else str(what)
        rows.append([_e(block), _e(", ".join(prov.get("sites") or [])), _num(prov.get("n")), _e(text or "none")])
    out = ""
    if rows:
        out += _table(["block", "contributing sites", "n used", "suppressed (and why)"], rows, left=4)
    if isinstance(summary.get("suppression"), dict):
        out += "<h3>Small-cell suppression</h3>" + _kv_table(summary["suppression"])
    return "<h2>Disclosure control: what was suppressed and why</h2>" + out if out else ""


def _km(km: dict) -> str:
    from clinfed.plots import plot_km

    out = ["<h2>Kaplan–Meier</h2>", _figure(lambda p: plot_km(km, p), "Kaplan–Meier curves with numbers at risk")]
    lr = km.get("logrank")
    if lr:
        out.append(
            f"<p>log-rank test: χ² = {_num(lr.get('chi2'))}, df = {_num(lr.get('df'))}, p = {_p(lr.get('p'))}</p>"
        )
    for level, g in sorted((km.get("groups") or {}).items()):
        ci = g.get("median_ci") or [None, None]
        median = "not reached" if g.get("median") is None else _num(g.get("median"))
        out.append(
            f"<h3>{_e(level)}</h3><p>median survival {median} "
            f"(95 % CI {_num(ci[0])}–{_num(ci[1])}), time bins of {_num(km.get('time_bin'))} days</p>"
        )
        rows = [
            [_num(t), _num(n), _num(d), _num(c), _num(s, 5)]
            for t, n, d, c, s in zip(
                g.get("time", []), g.get("at_risk", []), g.get("events", []), g.get("censored", []),
                g.get("survival", []), strict=False,
            )
        ]  # fmt: skip
        out.append(_table(["time", "at risk", "events", "censored", "survival"], rows))
    return "".join(out)


def _cox(cox: dict) -> str:
    from clinfed.plots import plot_forest

    rows = []
    for name, c in (cox.get("coef") or {}).items():
        z = c["coef"] / c["se"] if c.get("se") else None
        rows.append(
            [_e(name), _num(c.get("coef")), _num(c.get("hr")), _num(c.get("se")), _num(c.get("ci_low")),
             _num(c.get("ci_high")), _num(z), _p(c.get("p"))]
        )  # fmt: skip
    strata = "stratified by site" if cox.get("strata") == "site" else f"pooled baseline, {cox.get('time_bin')}-day bins"
    meta = (
        f"<p>Cox proportional hazards (Efron ties), {_e(strata)}: n = {_num(cox.get('n'))}, "
        f"events = {_num(cox.get('events'))}, log-likelihood = {_num(cox.get('loglik'), 8)}, "
        f"concordance = {_num(cox.get('concordance'))}, iterations = {_num(cox.get('iterations'))}, "
        f"converged = {_num(cox.get('converged'))}</p>"
    )
    header = ["covariate", "coef", "exp(coef)", "se(coef)", "exp(coef) lower 95%", "exp(coef) upper 95%", "z", "p"]
    return (
        "<h2>Cox proportional hazards</h2>" + meta + _table(header, rows)
        + _figure(lambda p: plot_forest(cox, p), "forest plot of hazard ratios")
    )  # fmt: skip


def plot_glm_forest(glm: dict, path: Path) -> Path:
    """Coefficients with 95 % CIs, one row per term (intercept left out); exp scale for log/logit links."""
    rows = [(k, c) for k, c in (glm.get("coef") or {}).items() if k != "intercept"]
    ratio = glm.get("family") in ("binomial", "poisson")
    fig = _agg_figure(7, 1.2 + 0.5 * max(len(rows), 1))
    ax = fig.subplots()
    for i, (_, c) in enumerate(rows):
        lo, mid, hi = (math.exp(v) if ratio else v for v in (c["ci_low"], c["coef"], c["ci_high"]))
        ax.plot([lo, hi], [i, i], color="black")
        ax.plot([mid], [i], marker="s", color="tab:blue")
        ax.text(1.02, i, f"{mid:.3g} ({lo:.3g}–{hi:.3g})", transform=ax.get_yaxis_transform(), va="center", fontsize=9)
    ax.axvline(1.0 if ratio else 0.0, color="grey", linestyle=":")
    if ratio:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    label = {"binomial": "odds ratio", "poisson": "rate ratio"}.get(str(glm.get("family")), "coefficient")
    ax.set_xlabel(f"{label} (95 % CI)")
    ax.set_title(f"GLM ({glm.get('family')}), n={glm.get('n')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _glm(glm: dict) -> str:
    rows = [
        [_e(name), _num(c.get("coef")), _num(c.get("se")), _num(c.get("z")), _p(c.get("p")), _num(c.get("ci_low")),
         _num(c.get("ci_high"))]
        for name, c in sorted((glm.get("coef") or {}).items(), key=lambda kv: kv[0] != "intercept")
    ]  # fmt: skip
    meta = (
        f"<p>Generalised linear model, family {_e(glm.get('family'))}: n = {_num(glm.get('n'))}, "
        f"deviance = {_num(glm.get('deviance'), 8)}, iterations = {_num(glm.get('iterations'))}"
        + (f", converged = {_num(glm.get('converged'))}" if "converged" in glm else "")
        + "</p>"
    )
    header = ["term", "coef", "std err", "z", "P>|z|", "[0.025", "0.975]"]
    return (
        "<h2>Generalised linear model</h2>" + meta + _table(header, rows)
        + _figure(lambda p: plot_glm_forest(glm, p), "forest plot of GLM coefficients")
    )  # fmt: skip


def _statistics(stats: dict) -> str:
    cols = ["count", "mean", "std", "median", "q25", "q75"]
    rows = []
    extra: dict[str, Any] = {}
    for group, features in stats.items():
        if not isinstance(features, dict):
            continue
        for feature, st in features.items():
            if isinstance(st, dict) and any(k in st for k in cols):
                rows.append([_e(group), _e(feature), *(_num(st.get(k)) for k in cols)])
            else:
                extra[f"{group} / {feature}"] = st
    out = "<h2>Cohort statistics</h2>" + _table(["group", "feature", *cols], rows, left=2)
    if extra:
        out += "<h3>Proportions and rates</h3>" + _generic(extra)
    return out


def _psi(psi: dict) -> str:
    return "<h2>Private set intersection</h2>" + _kv_table(psi)


def is_training(summary: dict) -> bool:
    """A training job's summary (a model metric per round, DP-SGD spends), not an analytics or PSI release."""
    if "method" in summary or summary.get("psi"):
        return False
    final = summary.get("final") or {}
    metrics = final.get("metrics") or {}
    spends = any(isinstance(p, dict) and "history" in p for p in (summary.get("privacy") or {}).values())
    return final.get("primary_metric") in TRAINING_METRICS or any(m in metrics for m in TRAINING_METRICS) or spends


def _rounds(summary: dict) -> str:
    """Per-round table for every job; the per-round figure only for training jobs (their metric per round)."""
    rounds = summary.get("rounds") or []
    if not rounds:
        return ""
    training = is_training(summary)
    metric = (summary.get("final") or {}).get("primary_metric", "auc") if training else None
    rows = []
    for rnd in rounds:
        for site, e in sorted((rnd.get("sites") or {}).items()):
            if not isinstance(e, dict):
                continue
            value = (e.get("metrics") or {}).get(metric) if metric else None
            rows.append(
                [_num(rnd.get("round")), _e(rnd.get("phase", "")), _e(site), _e(e.get("status", "")),
                 *([_num(value)] if training else []), _num(e.get("epsilon")), _num(e.get("bytes_sent")),
                 _e(e.get("reason", ""))]
            )  # fmt: skip
    header = ["round", "phase", "site", "status", *([metric or ""] if training else []), "ε", "bytes sent", "reason"]
    out = "<h2>Rounds</h2>"
    if training:
        from clinfed.plots import plot_rounds

        out += _figure(lambda p: plot_rounds(summary, p, str(metric)), f"{metric} and ε per round")
    return out + _table(header, rows, left=4)


def _roc(roc: dict) -> str:
    """The pooled ROC curve and calibration (training jobs' `roc`), or why none was released."""
    fpr, tpr = roc.get("fpr"), roc.get("tpr")
    out = "<h2>ROC</h2>"
    if isinstance(fpr, list) and isinstance(tpr, list) and fpr and len(fpr) == len(tpr):
        from clinfed.plots import plot_roc

        out += _figure(lambda p: plot_roc(roc, p), "ROC curve")
    elif roc.get("status") in ("skipped", "withheld"):
        return out + f"<p class=note>No ROC released ({_e(roc['status'])}): {_e(roc.get('reason', ''))}</p>"
    return out + _generic(roc)


# --- generic rendering of any block ----------------------------------------------------------------------
def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _kv_table(d: dict) -> str:
    rows = [[_e(k), _num(v) if _scalar(v) else _generic(v, depth=1)] for k, v in d.items()]
    return _table(["", "value"], rows, left=2)


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as tables: a dict of scalars as key/value rows, a dict of dicts of scalars as a
    matrix, a list of lists as a grid, a list of scalars inline; deeper structures nested."""
    if _scalar(value):
        return _num(value)
    if value in ({}, []):
        return "none"
    if depth > 4:
        return _e(str(value)[:500])
    if isinstance(value, list):
        if all(_scalar(v) for v in value):
            shown = ", ".join(_num(v) for v in value[:MAX_ROWS])
            return shown + (f", … ({len(value)} values)" if len(value) > MAX_ROWS else "")
        if all(isinstance(v, list) and all(_scalar(x) for x in v) for v in value):
            width = max(len(v) for v in value)
            return _table(["", *map(str, range(width))], [[str(i), *(_num(x) for x in v)] for i, v in enumerate(value)])
        return _table(["#", "value"], [[str(i), _generic(v, depth + 1)] for i, v in enumerate(value)])
    if isinstance(value, dict):
        if value and all(isinstance(v, dict) and all(_scalar(x) for x in v.values()) for v in value.values()):
            cols = list(dict.fromkeys(k for v in value.values() for k in v))
            return _table(["", *cols], [[_e(k), *(_num(v.get(c)) for c in cols)] for k, v in value.items()])
        return _kv_table({k: v for k, v in value.items()})
    return _e(value)


# --- the page -----------------------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[dict], str]] = {
    "km": _km,
    "cox": _cox,
    "glm": _glm,
    "statistics": _statistics,
    "psi": _psi,
    "roc": _roc,
}


def render_report(summary: dict) -> str:
    """The report page for `summary` (one run's summary.json) as self-contained HTML text."""
    parts = [f"<h1>{_e(summary.get('job', 'clinfed run'))}</h1>", _overview(summary), _admission(summary)]
    for key, render in SECTIONS.items():
        block = summary.get(key)
        if isinstance(block, dict) and block:
            parts.append(render(block))
    for key, block in summary.items():  # a block this module does not know: as tables
        if key in KNOWN or key in SECTIONS or block in (None, {}, []):
            continue
        parts.append(f"<h2>{_e(key)}</h2>" + _generic(block))
    parts += [_suppression(summary), _privacy(summary), _rounds(summary)]
    parts.append(
        "<p class=note>Written by clinfed from summary.json alone; every number here is one the run released.</p>"
    )
    title = _e(f"clinfed report: {summary.get('job', '')}")
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(p for p in parts if p)}</body></html>\n"
    )


def write_report(summary: dict, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` for `summary`; returns its path."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summary), encoding="utf-8")
    return path
