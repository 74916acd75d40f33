"""Two-sample t-tests (Student and Welch) and one-way ANOVA from per-group n, Σx and Σx² summed over sites.

Why it federates exactly: a group's mean and variance are functions of three sums over its
patients, so the pooled tests are scipy's on the pooled rows (the tests check this to 1e-9).
Values are shifted by a public centre `shift` (the reference dataset's mean, known before any
row is read) before squaring: Σ(x − c)² then carries no large cancellation, so CKKS' ~1e-9 absolute
error stays ~1e-12 relative on the variance.

Site vector (`ttest_site_local`), G levels of the group column, length 3·G:
``[n_g, Σ(x − c), Σ(x − c)²] per level``, over complete cases with a group value among the levels.

Definitions as scipy 1.x: `ttest_ind(a, b)` (Student, pooled variance, df = n₁ + n₂ − 2) and
`ttest_ind(a, b, equal_var=False)` (Welch, Satterthwaite df), two-sided, t of the first level
minus the second; `f_oneway` for more than two levels (F, df between and within). sd with ddof 1.

Small cells: a level with fewer patients than the minimum cell (but some) is withheld: its n,
mean and sd are not released and it takes no part in the tests (`withheld`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from clinfed.analytics.crosstab import level_texts
from clinfed.analytics.federated import Table, sum_site_vectors


def ttest_site_local(x: np.ndarray, group: Sequence[Any], levels: Sequence[str], shift: float = 0.0) -> np.ndarray:
    """This site's [n, Σ(x − shift), Σ(x − shift)²] per level (rows with x present)."""
    x = np.asarray(x, dtype=float)
    g = level_texts(group)
    out = np.zeros((len(levels), 3))
    for i, level in enumerate(levels):
        v = x[(g == str(level)) & ~np.isnan(x)] - shift
        out[i] = (v.size, v.sum(), (v * v).sum())
    return out.ravel()


def _t(mean_diff: float, se: float, df: float) -> dict[str, float]:
    t = mean_diff / se
    return {"t": float(t), "df": float(df), "p": float(2 * stats.t.sf(abs(t), df))}


def ttest_combine(summed: np.ndarray, levels: Sequence[str], shift: float = 0.0, min_cell: int = 1) -> dict[str, Any]:
    """summary.json's `ttest` from the summed per-level sums."""
    s = np.asarray(summed, dtype=float).reshape(len(levels), 3)
    n = np.rint(s[:, 0])
    groups: dict[str, Any] = {}
    withheld: list[str] = []
    kept: list[tuple[float, float, float]] = []  # (n, mean, variance)
    for level, (count, s1, s2) in zip(levels, zip(n, s[:, 1], s[:, 2], strict=True), strict=True):
        if count == 0:
            continue
        if count < min_cell:
            withheld.append(str(level))
            continue
        mean_c = s1 / count
        var = max(s2 - count * mean_c * mean_c, 0.0) / (count - 1) if count > 1 else float("nan")
        groups[str(level)] = {"n": int(count), "mean": float(mean_c + shift), "sd": float(np.sqrt(var))}
        kept.append((count, mean_c, var))
    out: dict[str, Any] = {"groups": groups, "withheld": withheld, "student": None, "welch": None, "anova": None}
    if len(kept) == 2:
        (n1, m1, v1), (n2, m2, v2) = kept
        df = n1 + n2 - 2
        pooled = ((n1 - 1) * v1 + (n2 - 1) * v2) / df
        out["student"] = _t(m1 - m2, np.sqrt(pooled * (1 / n1 + 1 / n2)), df)
        a, b = v1 / n1, v2 / n2
        out["welch"] = _t(m1 - m2, np.sqrt(a + b), (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1)))
    elif len(kept) > 2:
        ns, ms, vs = (np.array(c) for c in zip(*kept, strict=True))
        total = ns.sum()
        grand = (ns * ms).sum() / total
        between = (ns * (ms - grand) ** 2).sum()
        within = ((ns - 1) * vs).sum()
        df_b, df_w = len(kept) - 1, total - len(kept)
        f = (between / df_b) / (within / df_w)
        out["anova"] = {"F": float(f), "df": [int(df_b), int(df_w)], "p": float(stats.f.sf(f, df_b, df_w))}
    return out


def fit_federated(
    site_tables: Mapping[str, Table],
    variable: str,
    group: str,
    levels: Sequence[str],
    shift: float = 0.0,
    min_cell: int = 1,
) -> dict[str, Any]:
    """`ttest` over sites with plain sums standing in for the encrypted ones."""
    vectors = {
        s: ttest_site_local(np.asarray(t[variable], dtype=float), np.asarray(t[group], dtype=object), levels, shift)
        for s, t in site_tables.items()
    }
    return ttest_combine(sum_site_vectors(vectors), levels, shift, min_cell)
