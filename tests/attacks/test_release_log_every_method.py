"""Attack (issue 23, item 7): differencing exact KM, Cox and GLM releases across jobs.

Only cohort_stats kept a release log, so the fits could be asked again over another set of rows and
subtracted: with 4 sites, GLM over the four 3-site subsets gives each site's n, Σy and Σy² (each
site is in three of them: n_i = Σ_subsets n / 3 − n_{not i}); a covariate missing for one patient
shifts the complete-case set between y ~ x1 and y ~ x1 + x2, so the two fits' sums differ by that
patient; KM on 30- and then 31-day bins moves patients across bin edges, giving back cells the
small-cell merging hid. Fixed: every exact release (KM, Cox, GLM, cohort_stats) is admitted by the
site's one release log first, under the rule stated in `clinfed.analytics.release_log`: a site's rows
enter exact fits of one row set only (the contributing sites and which of its rows), and each method
keeps its one grid.
"""

from __future__ import annotations

import itertools

import numpy as np

from .sitekit import SumsFederation

GLM = {"method": "glm", "family": "gaussian", "outcome": "y", "covariates": ["x1"], "offset": None}


def _tables(n_sites: int, missing_x2_at: str | None = None) -> dict[str, dict]:
    rng = np.random.default_rng(11)
    out = {}
    for i in range(1, n_sites + 1):
        x1, x2 = rng.normal(size=30), rng.normal(size=30)
        if f"site-{i}" == missing_x2_at:
            x2[4] = np.nan
        out[f"site-{i}"] = {"y": 1.0 + x1 + rng.normal(size=30), "x1": x1, "x2": x2, "time": rng.uniform(1, 400, 30)}
        out[f"site-{i}"]["event"] = (rng.random(30) < 0.6).astype(float)
    return out


def test_glm_over_the_four_three_site_subsets_is_refused(tmp_path):
    answered = []
    for subset in itertools.combinations(sorted(_tables(4)), 3):
        fed_run = SumsFederation(tmp_path, GLM, _tables(4), run=f"run-{'-'.join(subset)}")
        replies = fed_run.sums("irls", 0, list(subset))
        if all(r.meta["status"] == "ok" for r in replies.values()):
            answered.append(subset)
    assert len(answered) <= 1, f"GLM sums over {len(answered)} different 3-site subsets: each site's n, Σy, Σy² follow"


def test_a_covariate_missing_for_one_patient_cannot_shift_the_complete_cases(tmp_path):
    tables = _tables(3, missing_x2_at="site-2")
    first = SumsFederation(tmp_path, GLM, tables, run="run-a")
    assert all(r.meta["status"] == "ok" for r in first.sums("irls", 0, sorted(first.sites)).values())
    second = SumsFederation(tmp_path, {**GLM, "covariates": ["x1", "x2"]}, tables, run="run-b")
    replies = second.sums("irls", 0, sorted(second.sites))
    assert replies["site-2"].meta["status"] == "refused", "site-2's complete cases shifted by one patient between jobs"
    assert "release log" in replies["site-2"].meta["reason"]
    assert replies["site-1"].meta["status"] == "ok"  # no missing value there: the same rows, a new covariate


def test_km_on_other_bins_is_refused(tmp_path):
    km = {"method": "km", "group": None, "levels": None, "time_bin": 30.0, "n_bins": 14}
    tables = _tables(3)
    first = SumsFederation(tmp_path, km, tables, run="run-a")
    assert all(r.meta["status"] == "ok" for r in first.sums("counts", 0, sorted(first.sites)).values())
    again = SumsFederation(tmp_path, km, tables, run="run-b")  # the same release again: allowed
    assert all(r.meta["status"] == "ok" for r in again.sums("counts", 0, sorted(again.sites)).values())
    shifted = SumsFederation(tmp_path, {**km, "time_bin": 31.0}, tables, run="run-c")
    replies = shifted.sums("counts", 0, sorted(shifted.sites))
    assert {r.meta["status"] for r in replies.values()} == {"refused"}, "KM on 31-day bins after 30-day bins"
    assert "grid" in replies["site-1"].meta["reason"]
