"""An r×c contingency table with Pearson's χ² (and Fisher's exact test for 2×2) from summed cell counts.

Why it federates exactly: every cell is a count of patients, a sum over sites; the server adds
the sites' encrypted tables and the release site computes the tests on the pooled table, so the
statistics are scipy's on the pooled rows (the tests check this), not a meta-analysis.

Site vector (`crosstab_site_local`), R row levels × C column levels, row-major, length R·C: the
site's complete cases (both columns present) with a row and column value among the job's public
levels (read from the bundled reference dataset at submission); other values are not counted.

Definitions as scipy 1.x: `chi2_contingency` with its default continuity correction (Yates, only
when df = 1, i.e. a 2×2 table), df = (r−1)(c−1); `fisher_exact` two-sided for 2×2.

Zero-cell rule: a row or column level with no patient at all (a zero margin) is dropped before
the tests, as its expected counts would be 0 (scipy refuses such a table); zero cells inside
the table are kept. `expected_below_5` counts the cells whose expected count is under 5 (Cochran's
rule: the χ² approximation is then doubtful and Fisher's test, given for 2×2, is the one to read).

Small cells: the table is released only when every cell is 0 or ≥ the minimum cell (DataSHIELD's
``nfilter.tab`` rule); otherwise nothing is released (`SmallCell`), since the margins and the
statistic together would give back a withheld cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from clinfed.analytics.federated import Table, sum_site_vectors
from clinfed.analytics.stats import level_text


class SmallCell(ValueError):
    """A pooled cell below the minimum cell: the table is not released (the message names no count)."""


def level_texts(values: Any) -> np.ndarray:
    """Each cell as its level's text (1, 1.0 and "1" are "1"), None where missing."""
    return np.array([level_text(v) for v in values], dtype=object)


def crosstab_site_local(
    rows: Sequence[Any], cols: Sequence[Any], row_levels: Sequence[str], col_levels: Sequence[str]
) -> np.ndarray:
    """This site's R×C cell counts over its rows with both values among the public levels (flat)."""
    r, c = level_texts(rows), level_texts(cols)
    out = np.zeros((len(row_levels), len(col_levels)))
    for i, a in enumerate(row_levels):
        for j, b in enumerate(col_levels):
            out[i, j] = np.count_nonzero((r == str(a)) & (c == str(b)))
    return out.ravel()


def _chi2(table: np.ndarray, correction: bool = True) -> tuple[float, int, np.ndarray]:
    """Pearson's χ² of a table without zero margins, with Yates' correction at df = 1 (scipy's rule)."""
    n = table.sum()
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / n
    df = (table.shape[0] - 1) * (table.shape[1] - 1)
    observed = table
    if df == 1 and correction:
        diff = expected - observed
        observed = observed + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    return float(((observed - expected) ** 2 / expected).sum()), df, expected


def fisher_2x2(table: np.ndarray) -> float:
    """Two-sided Fisher exact p of a 2×2 table: the hypergeometric tables no more likely than the one seen
    (scipy's rule, with its relative tolerance 1 + 1e-7 for ties in probability)."""
    (a, b), (c, d) = np.rint(table).astype(np.int64)
    n1, n2, k = a + b, c + d, a + c
    dist = stats.hypergeom(n1 + n2, n1, k)
    support = np.arange(max(0, k - n2), min(k, n1) + 1)
    pmf = dist.pmf(support)
    p0 = dist.pmf(a)
    return float(min(1.0, pmf[pmf <= p0 * (1 + 1e-7)].sum()))


def crosstab_combine(
    summed: np.ndarray, row_levels: Sequence[str], col_levels: Sequence[str], min_cell: int = 1
) -> dict[str, Any]:
    """summary.json's `crosstab` from the summed cell counts; SmallCell when a cell is under the minimum."""
    table = np.rint(np.asarray(summed, dtype=float)).reshape(len(row_levels), len(col_levels))
    small = (table > 0) & (table < min_cell)
    if small.any():
        i, j = np.argwhere(small)[0]
        raise SmallCell(
            f"cell {row_levels[i]} × {col_levels[j]} of the pooled table holds fewer than the minimum cell "
            f"{min_cell}: the table is not released"
        )
    keep_r, keep_c = table.sum(axis=1) > 0, table.sum(axis=0) > 0
    tested = table[np.ix_(keep_r, keep_c)]
    dropped = [str(v) for v, k in zip(row_levels, keep_r, strict=True) if not k]
    dropped += [str(v) for v, k in zip(col_levels, keep_c, strict=True) if not k]
    out: dict[str, Any] = {
        "rows": list(map(str, row_levels)),
        "cols": list(map(str, col_levels)),
        "table": table.astype(int).tolist(),
        "n": int(table.sum()),
        "dropped_levels": dropped,
        "chi2": None,
        "df": None,
        "p": None,
        "correction": False,
        "expected_below_5": None,
        "fisher_p": None,
    }
    if min(tested.shape) < 2:
        return out  # one level left on a side: no test
    chi2, df, expected = _chi2(tested)
    out.update(
        chi2=chi2,
        df=df,
        p=float(stats.chi2.sf(chi2, df)),
        correction=df == 1,
        expected_below_5=int((expected < 5).sum()),
    )
    if tested.shape == (2, 2):
        out["fisher_p"] = fisher_2x2(tested)
    return out


def fit_federated(
    site_tables: Mapping[str, Table],
    rows: str,
    cols: str,
    row_levels: Sequence[str],
    col_levels: Sequence[str],
    min_cell: int = 1,
) -> dict[str, Any]:
    """`crosstab` over sites with plain sums standing in for the encrypted ones."""
    vectors = {
        s: crosstab_site_local(
            np.asarray(t[rows], dtype=object), np.asarray(t[cols], dtype=object), row_levels, col_levels
        )
        for s, t in site_tables.items()
    }
    return crosstab_combine(sum_site_vectors(vectors), row_levels, col_levels, min_cell)
