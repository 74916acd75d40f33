"""The statistician's toolbox (crosstab, ttest, correlation, cumulative incidence, Poisson offset, ROC) equals its
pooled references; each method's disclosure rule holds; a foreign option exits 2.

The reference numbers are `scripts/analytics_table.py`'s, the very rows docs/toolbox.md shows.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lifelines")
pytest.importorskip("statsmodels")

from clinfed.analytics import cif, correlation, crosstab, roc, ttest

ROOT = Path(__file__).resolve().parents[2]


def _table_script():
    spec = importlib.util.spec_from_file_location("analytics_table", ROOT / "scripts" / "analytics_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "rows", ["crosstab_rows", "ttest_rows", "correlation_rows", "cif_rows", "glm_offset_rows", "roc_rows"]
)
def test_method_equals_its_pooled_reference(rows):
    for row in getattr(_table_script(), rows)():
        assert row["max_rel_diff"] <= row["tolerance"], row


def test_crosstab_refuses_a_small_cell_and_drops_a_zero_margin():
    from scipy import stats

    site = {"a": np.array(["x"] * 10 + ["y"] * 12), "b": np.array(["u"] * 6 + ["v"] * 4 + ["u"] * 2 + ["v"] * 10)}
    with pytest.raises(crosstab.SmallCell, match="fewer than the minimum cell 3") as err:
        crosstab.fit_federated({"s1": site}, "a", "b", ["x", "y"], ["u", "v"], min_cell=3)
    assert "2" not in str(err.value).replace("minimum cell 3", "")  # the small count is not named
    # a declared level nobody has (zero margin) is dropped before the tests, as scipy would refuse it
    res = crosstab.fit_federated({"s1": site}, "a", "b", ["x", "y", "z"], ["u", "v"], min_cell=1)
    assert res["dropped_levels"] == ["z"]
    chi2, p, df, _ = stats.chi2_contingency([[6, 4], [2, 10]])
    assert res["chi2"] == pytest.approx(chi2, rel=1e-12) and res["p"] == pytest.approx(p, rel=1e-12)
    assert res["df"] == df == 1 and res["correction"]
    assert res["fisher_p"] == pytest.approx(stats.fisher_exact([[6, 4], [2, 10]])[1], rel=1e-12)
    assert res["expected_below_5"] == 2


def test_ttest_withholds_a_small_group_and_tests_the_rest():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(50, 10, 40), rng.normal(55, 10, 30), [70.0, 71.0]])
    g = np.array(["a"] * 40 + ["b"] * 30 + ["c"] * 2, dtype=object)
    res = ttest.fit_federated({"s": {"x": x, "g": g}}, "x", "g", ["a", "b", "c"], shift=50.0, min_cell=5)
    assert res["withheld"] == ["c"] and "c" not in res["groups"]
    ref = stats.ttest_ind(x[:40], x[40:70], equal_var=False)
    assert res["welch"]["t"] == pytest.approx(ref.statistic, rel=1e-10) and res["anova"] is None


def test_correlation_withholds_a_small_pair():
    x = np.column_stack([np.arange(20.0), np.arange(20.0) ** 1.5, np.r_[np.full(17, np.nan), 1.0, 2.0, 4.0]])
    res = correlation.correlation_combine(correlation.correlation_site_local(x), ["a", "b", "c"], min_cell=5)
    assert res["n"][0][1] == 20 and res["n"][0][2] is None and res["matrix"][1][2] is None
    assert res["withheld"] == ["a, c", "b, c", "c, c"]


def test_cif_small_cells_are_merged_to_the_minimum():
    from clinfed.data.clinical import load_dataset

    fl = load_dataset("flchain").iloc[:800]
    table = {c: fl[c].to_numpy() for c in ("time", "event", "chapter")}
    res, notes = cif.fit_federated(
        {"s": table}, causes=["Circulatory", cif.OTHER], cause_col="chapter", time_bin=30, n_bins=200, min_cell=5
    )
    curve = res["groups"]["all"]
    assert min(curve["at_risk"]) >= 5 and "merged" in notes["all"]
    for values in curve["cif"].values():  # each step of a CIF is d_c·S/n: d_c is 0 or ≥ 5
        assert np.all(np.diff(values) >= 0)
    exact, _ = cif.fit_federated(
        {"s": table}, causes=["Circulatory", cif.OTHER], cause_col="chapter", time_bin=30, n_bins=200, min_cell=1
    )
    # merging moves events later, never changes how many: the curves end at the same height
    assert curve["cif"]["other"][-1] == pytest.approx(exact["groups"]["all"]["cif"]["other"][-1], abs=0.02)


def test_roc_points_equal_sklearn_on_binned_scores():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 600)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 600), 0, 1)
    res = roc.fit_federated({"a": (s[:300], y[:300]), "b": (s[300:], y[300:])}, n_bins=50)
    binned = np.minimum(np.floor(s * 50), 49)
    fpr, tpr, _ = roc_curve(y, binned, drop_intermediate=False)
    assert np.allclose(res["fpr"], fpr) and np.allclose(res["tpr"], tpr)
    assert sum(res["calibration"]["n"]) == 600


def test_toolbox_methods_refuse_output_dp_they_cannot_bound():
    from clinfed.analytics.registry import make_method

    dp = {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 2.0}
    with pytest.raises(ValueError, match="no output DP"):
        make_method({"method": "ttest", "variable": "x", "group": "g", "levels": ["a", "b"], "dp": dp})
    m = make_method(
        {"method": "crosstab", "rows": "a", "cols": "b", "row_levels": ["x"], "col_levels": ["u"], "dp": dp}
    )
    assert m.planned_spends() == [(2.0, 1.0, 1)]


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "crosstab", "--variable", "age"],
        ["simulate", "glm", "--rows", "horTh"],
        ["simulate", "ttest", "--covariates", "age"],
        ["simulate", "cumulative_incidence", "--offset", "log(time)"],
    ],
)
def test_an_option_the_job_does_not_take_exits_2_in_one_line(argv, capsys):
    from clinfed.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "does not apply to" in err and "\n" not in err


def _irls_rounds(config, sites):
    """The GLM strategy's rounds with plain sums standing in for the encrypted ones: (result, rounds)."""
    from clinfed.analytics.registry import make_method

    m = make_method(config)
    data = {s: m.load(t, s, 5) for s, t in sites.items()}
    iterate = None
    for rounds in range(1, 30):
        summed = sum(m.site_local(d, "irls", iterate) for d in data.values())
        step = m.step(summed, "irls", 5)
        if step.result is not None:
            return step.result, rounds
        iterate = step.iterate
    raise AssertionError("no release")


def test_glm_data_start_saves_rounds_and_lands_on_statsmodels():
    import statsmodels.api as sm

    from clinfed.analytics.federated import split_table
    from clinfed.data.clinical import load_dataset

    gbsg = load_dataset("gbsg2")
    covs = ["age", "tsize", "pnodes"]
    sites = split_table({c: gbsg[c].to_numpy() for c in ["event", "time", *covs]}, 3, seed=1)
    config = {"method": "glm", "family": "poisson", "outcome": "event", "covariates": covs, "offset": "time"}
    config |= {"offset_log": True, "max_iter": 25}
    zero, zero_rounds = _irls_rounds(config, sites)
    data, data_rounds = _irls_rounds({**config, "start": "data"}, sites)
    ref = sm.GLM(
        gbsg["event"], sm.add_constant(gbsg[covs]), family=sm.families.Poisson(), offset=np.log(gbsg["time"])
    ).fit(tol=1e-13)
    for res in (zero, data):
        coef = np.array([res["coef"][n]["coef"] for n in ["intercept", *covs]])
        assert np.max(np.abs(coef / ref.params.to_numpy() - 1)) < 1e-6 and res["converged"]
        assert res["coef"]["age"]["irr"] == pytest.approx(np.exp(ref.params["age"]), rel=1e-6)
    assert (zero_rounds, data_rounds) == (13, 7)
