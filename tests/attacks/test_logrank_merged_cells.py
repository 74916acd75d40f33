"""Attack (issue 23, item 5): the log-rank test leaked the cells small-cell merging had hidden.

χ² was computed from the per-bin counts *before* `enforce_min_cell` merged them and released to 7
digits, so two tables whose released curves are identical (one event moved between two merged bins)
gave different χ²: the statistic told which bin the event was in. Fixed: the test is computed from
the released (merged) tables only, so equal releases give equal tests; with nothing merged it is
still lifelines' `multivariate_logrank_test` (tests/unit/test_km.py).
"""

from __future__ import annotations

import numpy as np

from clinfed.analytics import km


def _summed(a_events: list[int]) -> np.ndarray:
    """Two groups, six weekly bins: group a's events as given, 5 censorings in its last bin; group b fixed."""
    a = np.array([a_events, [0, 0, 0, 0, 0, 5]])
    b = np.array([[5, 0, 5, 0, 5, 0], [0, 0, 0, 0, 0, 5]])
    return np.concatenate([a.ravel(), b.ravel()]).astype(float)


def test_equal_released_tables_give_equal_logrank():
    one = _summed([2, 3, 0, 5, 0, 0])  # bins 1 and 2 merge into one bin of 5 events
    two = _summed([3, 2, 0, 5, 0, 0])  # one event moved from bin 2 to bin 1: the same release
    r1, n1 = km.km_combine(one, levels=["a", "b"], time_bin=7, n_bins=6, min_cell=5)
    r2, n2 = km.km_combine(two, levels=["a", "b"], time_bin=7, n_bins=6, min_cell=5)
    assert r1["groups"] == r2["groups"] and n1 == n2, "the setup must give identical released curves"
    assert "merged" in n1["a"]
    c1, c2 = r1["logrank"]["chi2"], r2["logrank"]["chi2"]
    assert c1 == c2, f"log-rank χ² {c1:.5f} vs {c2:.5f}: it tells where the merged event was"
