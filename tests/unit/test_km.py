"""Kaplan–Meier, log-rank and medians from summed per-bin site counts equal lifelines on the pooled binned table."""

import math

import numpy as np
import pandas as pd
import pytest

lifelines = pytest.importorskip("lifelines")
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.datasets import load_gbsg2, load_waltons  # noqa: E402
from lifelines.statistics import logrank_test, multivariate_logrank_test  # noqa: E402
from lifelines.utils import median_survival_times  # noqa: E402

from clinfed.analytics import federated as fed  # noqa: E402
from clinfed.analytics import km  # noqa: E402

TIME_BIN = 30.0


@pytest.fixture(scope="module")
def gbsg2():
    df = load_gbsg2().rename(columns={"cens": "event"})
    return {c: df[c].to_numpy() for c in df}


def _lifelines_km(times, events):
    return KaplanMeierFitter().fit(times, events)


def _none_if_inf(v):
    return None if math.isinf(v) else float(v)


def test_km_per_group_equals_lifelines_on_pooled_binned_times(gbsg2):
    sites = fed.split_table(gbsg2, 4, seed=1)
    res, notes = km.fit_federated(sites, time_bin=TIME_BIN, group_col="tgrade")
    assert set(res) == {"time_bin", "groups", "logrank"}
    assert notes == {"I": "none", "II": "none", "III": "none"}
    binned = km.bin_index(gbsg2["time"], TIME_BIN) * TIME_BIN
    grade = gbsg2["tgrade"].astype(str)
    for level, curve in res["groups"].items():
        assert set(curve) == {"time", "survival", "at_risk", "events", "censored", "median", "median_ci"}
        ref = _lifelines_km(binned[grade == level], gbsg2["event"][grade == level])
        sf = ref.survival_function_.iloc[1:, 0]  # lifelines' row at t = 0 is S = 1
        table = ref.event_table.iloc[1:]
        np.testing.assert_array_equal(curve["time"], sf.index.to_numpy())
        assert np.max(np.abs(np.array(curve["survival"]) - sf.to_numpy())) < 1e-6
        np.testing.assert_array_equal(curve["at_risk"], table["at_risk"].to_numpy())
        np.testing.assert_array_equal(curve["events"], table["observed"].to_numpy())
        np.testing.assert_array_equal(curve["censored"], table["censored"].to_numpy())
        assert curve["median"] == _none_if_inf(ref.median_survival_time_)
        lo, hi = median_survival_times(ref.confidence_interval_).to_numpy().ravel()
        assert curve["median_ci"] == [_none_if_inf(lo), _none_if_inf(hi)]
    ref = multivariate_logrank_test(binned, grade, gbsg2["event"])
    assert abs(res["logrank"]["chi2"] / ref.test_statistic - 1) < 1e-6
    assert res["logrank"]["df"] == ref.degrees_of_freedom == 2
    assert abs(res["logrank"]["p"] - ref.p_value) < 1e-9


def test_two_group_logrank_equals_logrank_test_and_medians_match():
    df = load_waltons()
    sites = fed.split_table(
        {"time": df["T"].to_numpy(), "event": df["E"].to_numpy(), "group": df["group"].to_numpy()}, 3, seed=5
    )
    res, _ = km.fit_federated(sites, time_bin=3, group_col="group")
    binned = km.bin_index(df["T"], 3) * 3
    a = (df["group"] == "control").to_numpy()
    ref = logrank_test(binned[a], binned[~a], df["E"][a], df["E"][~a])
    assert abs(res["logrank"]["chi2"] / ref.test_statistic - 1) < 1e-6
    assert res["logrank"]["df"] == 1
    for level, mask in (("control", a), ("miR-137", ~a)):
        ref_km = _lifelines_km(binned[mask], df["E"][mask])
        assert res["groups"][level]["median"] == _none_if_inf(ref_km.median_survival_time_)


def test_site_vectors_are_counts_that_add_up_to_the_pooled_counts(gbsg2):
    levels = ["I", "II", "III"]
    n_bins = km.n_bins_for(gbsg2["time"].max(), TIME_BIN)
    sites = fed.split_table(gbsg2, 5, seed=2)
    vectors = {
        s: km.km_site_local(t["time"], t["event"], t["tgrade"], levels=levels, time_bin=TIME_BIN, n_bins=n_bins)
        for s, t in sites.items()
    }
    assert {v.size for v in vectors.values()} == {2 * len(levels) * n_bins}
    pooled = km.km_site_local(
        gbsg2["time"], gbsg2["event"], gbsg2["tgrade"], levels=levels, time_bin=TIME_BIN, n_bins=n_bins
    )
    np.testing.assert_array_equal(fed.sum_site_vectors(vectors), pooled)
    assert pooled.sum() == len(gbsg2["time"])


def test_times_past_the_horizon_are_censored_at_it_and_the_curve_before_it_is_unchanged(gbsg2):
    sites = fed.split_table(gbsg2, 3, seed=3)
    full, _ = km.fit_federated(sites, time_bin=TIME_BIN)
    short, _ = km.fit_federated(sites, time_bin=TIME_BIN, n_bins=40)
    s_full, s_short = full["groups"][km.ALL], short["groups"][km.ALL]
    assert s_short["time"][-1] == 40 * TIME_BIN
    k = len(s_short["time"])
    np.testing.assert_allclose(s_short["survival"], s_full["survival"][:k], rtol=0, atol=1e-12)
    assert sum(s_short["events"]) + sum(s_short["censored"]) == len(gbsg2["time"])


def test_sum_refuses_vectors_of_different_lengths_naming_the_site():
    with pytest.raises(ValueError, match="site-2: vector has 3 values, site-1 sent 4"):
        fed.sum_site_vectors({"site-1": np.zeros(4), "site-2": np.zeros(3)})


@pytest.mark.parametrize("min_cell", [3, 5, 10])
def test_min_cell_releases_only_zero_or_at_least_min_cell_and_keeps_every_patient(gbsg2, min_cell):
    sites = fed.split_table(gbsg2, 4, seed=1)
    res, notes = km.fit_federated(sites, time_bin=TIME_BIN, group_col="tgrade", min_cell=min_cell)
    grade = gbsg2["tgrade"].astype(str)
    for level, curve in res["groups"].items():
        released = np.array(curve["events"] + curve["censored"] + curve["at_risk"])
        assert np.all((released == 0) | (released >= min_cell)), (
            level,
            released[(released > 0) & (released < min_cell)],
        )
        assert curve["at_risk"][0] == (grade == level).sum() == sum(curve["events"]) + sum(curve["censored"])
        assert notes[level] != "none"
        # The released table is a Kaplan–Meier table in lifelines' sense: its own curve and median.
        ends = np.repeat(curve["time"], np.array(curve["events"]) + np.array(curve["censored"]))
        flags = np.concatenate(
            [np.r_[np.ones(d), np.zeros(c)] for d, c in zip(curve["events"], curve["censored"], strict=True)]
        )
        ref = _lifelines_km(ends, flags)
        np.testing.assert_allclose(curve["survival"], ref.survival_function_.iloc[1:, 0], atol=1e-12)
        assert curve["median"] == _none_if_inf(ref.median_survival_time_)


def test_min_cell_merges_defers_and_truncates_a_small_tail():
    counts = np.array([[1, 1, 1, 0, 4, 0, 1], [0, 2, 0, 3, 1, 0, 1]])
    out = km.enforce_min_cell(counts, 3)
    # Bins 1-3: three single events close one bin at bin 3, its 2 censorings deferred; bin 4: the
    # 2 + 3 censorings alone; bin 5: 4 events, its 1 censoring deferred; bin 7's event and
    # censoring with that 1 (3 patients) are the tail, released as censored at bin 5.
    np.testing.assert_array_equal(out.end, [3, 4, 5])
    np.testing.assert_array_equal(out.events, [3, 0, 4])
    np.testing.assert_array_equal(out.censored, [0, 5, 3])
    np.testing.assert_array_equal(out.at_risk, [15, 12, 7])
    assert "2 bins merged" in out.note and "3 censorings deferred" in out.note
    assert "tail truncated after bin 5: 3 patients (1 events)" in out.note


def test_a_tail_too_small_for_an_event_only_bin_truncates_one_bin_earlier():
    counts = np.array([[1, 1, 1, 0, 4, 0, 1], [0, 2, 0, 3, 0, 0, 1]])
    out = km.enforce_min_cell(counts, 3)
    # Bin 5 has no censorings to absorb the 2-patient tail: the curve ends at bin 4 instead, where
    # bin 5's and the tail's 6 patients are released as censored (never an event moved earlier).
    np.testing.assert_array_equal(out.end, [3, 4])
    np.testing.assert_array_equal(out.events, [3, 0])
    np.testing.assert_array_equal(out.censored, [0, 11])
    assert "tail truncated after bin 4: 6 patients (5 events)" in out.note


def test_a_group_smaller_than_the_minimum_cell_is_withheld():
    out = km.enforce_min_cell(np.array([[1, 0, 1], [0, 2, 0]]), 5)
    assert out.end.size == 0 and out.note.startswith("withheld: 4 patients")
    summed = np.concatenate([np.array([[1, 0, 1], [0, 2, 0]]).ravel(), np.array([[3, 5, 2], [4, 3, 6]]).ravel()])
    res, notes = km.km_combine(summed, levels=["a", "b"], time_bin=1, n_bins=3, min_cell=5)
    assert list(res["groups"]) == ["b"] and res["logrank"] is None and notes["a"].startswith("withheld")


def test_min_cell_one_changes_nothing(gbsg2):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(2, 50)).astype(float)
    out = km.enforce_min_cell(counts, 1)
    nz = np.flatnonzero(counts.sum(axis=0))
    np.testing.assert_array_equal(out.end, nz + 1)
    np.testing.assert_array_equal(out.events, counts[0, nz])
    assert out.note == "none"


def test_binning_rounds_up_to_a_bin_end():
    np.testing.assert_array_equal(
        km.bin_index(np.array([0, 0.5, 30, 31, 60, 60.0000001, 0.3 * 100]), 30), [1, 1, 1, 2, 2, 3, 1]
    )
    with pytest.raises(ValueError, match="time bin must be positive"):
        km.bin_index(np.array([1.0]), 0)


def test_missing_times_are_dropped_as_incomplete_cases(gbsg2):
    table = dict(gbsg2)
    table["time"] = table["time"].astype(float).copy()
    table["time"][:10] = np.nan
    res, _ = km.fit_federated({"site-1": table, "site-2": gbsg2, "site-3": gbsg2}, time_bin=TIME_BIN)
    assert res["groups"][km.ALL]["at_risk"][0] == 3 * len(gbsg2["time"]) - 10
    assert isinstance(pd.Series(res["groups"][km.ALL]["survival"]).iloc[-1], float)


def test_consistent_counts_are_non_negative_integers_and_unbiased_on_sparse_bins():
    """Clipping each noisy bin at 0 inflates a sparse histogram (~0.4σ per empty bin); the isotonic
    fit of the cumulative counts keeps totals near the truth."""
    from clinfed.analytics.km import consistent_counts, isotonic_increasing

    assert np.allclose(isotonic_increasing([1, 3, 2, 2, 5, 4]), [1, 7 / 3, 7 / 3, 7 / 3, 4.5, 4.5])
    rng = np.random.default_rng(0)
    true = np.zeros(2 * 100)
    true[rng.integers(0, 200, 60)] += 1
    totals, clipped = [], []
    for _ in range(200):
        noisy = true + rng.normal(0, 4.0, true.shape)
        out = consistent_counts(noisy, 2)
        assert (out >= 0).all() and np.array_equal(out, np.rint(out))
        totals.append(out.sum())
        clipped.append(np.clip(np.rint(noisy), 0, None).sum())
    assert abs(np.mean(totals) - true.sum()) < 0.25 * abs(np.mean(clipped) - true.sum())
