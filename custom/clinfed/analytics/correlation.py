"""Pearson correlation and covariance matrices with n per pair, from pairwise sums over sites.

Why pairwise: pandas' `DataFrame.corr()` / `.cov()` use, for each pair of variables, the rows
where both are present (pairwise-complete), and report no n; a statistician needs the n behind
each entry. Every entry is a function of six sums over that pair's rows, which a site can encrypt
and the server can add, so the matrices equal pandas' on the pooled table (the tests check 1e-9).
Values are shifted by public centres (the reference dataset's means) before the products, so the
cross-products carry no large cancellation under CKKS' absolute error.

Site vector (`correlation_site_local`), p variables, P = p(p+1)/2 pairs (i ≤ j, row-major), 6·P:
``[n_ij, Σx_i, Σx_j, Σx_i², Σx_j², Σx_i·x_j] per pair`` over the rows with x_i and x_j present.

Small cells: a pair with fewer rows than the minimum cell (but some) has its entries and n
withheld (None), and so has a pair with no rows or no variance (NaN in pandas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clinfed.analytics.federated import Table, sum_site_vectors


def pairs(p: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(p) for j in range(i, p)]


def correlation_site_local(x: np.ndarray, shift: Sequence[float] | None = None) -> np.ndarray:
    """This site's six sums per pair of columns of `x` (n × p, NaN missing), shifted by `shift`."""
    x = np.asarray(x, dtype=float)
    x = x - (np.zeros(x.shape[1]) if shift is None else np.asarray(shift, dtype=float))
    out = []
    for i, j in pairs(x.shape[1]):
        ok = ~np.isnan(x[:, i]) & ~np.isnan(x[:, j])
        a, b = x[ok, i], x[ok, j]
        out.append([ok.sum(), a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])
    return np.asarray(out, dtype=float).ravel()


def correlation_combine(summed: np.ndarray, names: Sequence[str], min_cell: int = 1) -> dict[str, Any]:
    """summary.json's `correlation`: {variables, matrix, covariance, n, withheld} (None where withheld)."""
    p = len(names)
    s = np.asarray(summed, dtype=float).reshape(-1, 6)
    corr: list[list[float | None]] = [[None] * p for _ in range(p)]
    cov: list[list[float | None]] = [[None] * p for _ in range(p)]
    count: list[list[int | None]] = [[None] * p for _ in range(p)]
    withheld = []
    for (i, j), (n, si, sj, sii, sjj, sij) in zip(pairs(p), s, strict=True):
        n = float(np.rint(n))
        if 0 < n < min_cell:
            withheld.append(f"{names[i]}, {names[j]}")
            continue
        count[i][j] = count[j][i] = int(n)
        if n < 2:
            continue
        cxy = (sij - si * sj / n) / (n - 1)
        vx, vy = (sii - si * si / n) / (n - 1), (sjj - sj * sj / n) / (n - 1)
        cov[i][j] = cov[j][i] = float(cxy)
        if vx > 0 and vy > 0:
            corr[i][j] = corr[j][i] = float(np.clip(cxy / np.sqrt(vx * vy), -1.0, 1.0))
    return {"variables": list(names), "matrix": corr, "covariance": cov, "n": count, "withheld": withheld}


def fit_federated(
    site_tables: Mapping[str, Table], names: Sequence[str], shift: Sequence[float] | None = None, min_cell: int = 1
) -> dict[str, Any]:
    """`correlation` over sites with plain sums standing in for the encrypted ones."""
    vectors = {
        s: correlation_site_local(np.column_stack([np.asarray(t[c], dtype=float) for c in names]), shift)
        for s, t in site_tables.items()
    }
    return correlation_combine(sum_site_vectors(vectors), names, min_cell)
