"""GLM by IRLS on summed X'WX and X'Wz equals statsmodels' GLM on the pooled table; disclosure guards refuse."""

import numpy as np
import pandas as pd
import pytest

sm = pytest.importorskip("statsmodels.api")
from sklearn.datasets import load_breast_cancer, load_diabetes  # noqa: E402

from clinfed.analytics import federated as fed  # noqa: E402
from clinfed.analytics import glm  # noqa: E402

FAMILIES = {"binomial": sm.families.Binomial, "gaussian": sm.families.Gaussian, "poisson": sm.families.Poisson}


def _breast_cancer():
    df = load_breast_cancer(as_frame=True).frame
    df.columns = [c.replace(" ", "_") for c in df.columns]
    return df


def _diabetes():
    return load_diabetes(as_frame=True, scaled=False).frame


def _rossi():
    lifelines_datasets = pytest.importorskip("lifelines.datasets")
    df = lifelines_datasets.load_rossi()
    df["log_weeks"] = np.log(df["week"])
    return df


CASES = {
    "binomial": (
        _breast_cancer,
        "target",
        ["mean_radius", "mean_texture", "mean_smoothness", "mean_symmetry"],
        None,
        3,
    ),
    "gaussian": (_diabetes, "target", ["age", "sex", "bmi", "bp", "s5"], None, 5),
    "poisson": (_rossi, "prio", ["age", "fin", "race", "wexp", "mar"], "log_weeks", 4),
}


@pytest.mark.parametrize("family", list(CASES))
def test_federated_irls_equals_statsmodels_glm_on_the_pooled_table(family):
    load, outcome, names, offset, n_sites = CASES[family]
    df = load()
    sites = fed.split_table({c: df[c].to_numpy() for c in df}, n_sites, seed=4)
    ours = glm.fit_federated(sites, family=family, outcome=outcome, covariates=names, offset=offset, min_cell=5)
    x = sm.add_constant(df[names]).rename(columns={"const": glm.INTERCEPT})
    ref = sm.GLM(df[outcome], x, family=FAMILIES[family](), offset=None if offset is None else df[offset]).fit()
    keys = [glm.INTERCEPT, *names]
    coef = np.array([ours["coef"][k]["coef"] for k in keys])
    se = np.array([ours["coef"][k]["se"] for k in keys])
    assert np.max(np.abs(coef - ref.params[keys].to_numpy())) < 1e-5
    assert np.max(np.abs(se - ref.bse[keys].to_numpy())) < 1e-4
    assert abs(ours["deviance"] - ref.deviance) < 1e-8 * max(1.0, ref.deviance)
    ci = ref.conf_int().loc[keys]
    assert np.max(np.abs(np.array([ours["coef"][k]["ci_low"] for k in keys]) - ci[0])) < 1e-4
    assert np.max(np.abs(np.array([ours["coef"][k]["z"] for k in keys]) - ref.tvalues[keys])) < 1e-3
    assert np.max(np.abs(np.array([ours["coef"][k]["p"] for k in keys]) - ref.pvalues[keys])) < 1e-6
    assert ours["family"] == family and ours["n"] == len(df) and ours["converged"] and ours["iterations"] <= 25
    rate_ratios = {"irr", "irr_ci"} if family == "poisson" else set()  # exp(coef) and its CI: rate ratios
    assert set(ours["coef"][glm.INTERCEPT]) == {"coef", "se", "z", "p", "ci_low", "ci_high", *rate_ratios}


def test_site_vector_layout_and_sums_add_up():
    df = _breast_cancer()
    names = ["mean_radius", "mean_texture"]
    x = np.column_stack([np.ones(len(df)), df[names].to_numpy()])
    y = df["target"].to_numpy(dtype=float)
    beta = np.array([0.5, -0.1, 0.02])
    pooled = glm.glm_site_local(x, y, beta, "binomial")
    assert pooled.size == 6 + 3 + 3
    parts = fed.split_rows(len(y), 4, seed=1)
    summed = fed.sum_site_vectors(
        {f"s{i}": glm.glm_site_local(x[idx], y[idx], beta, "binomial") for i, idx in enumerate(parts)}
    )
    np.testing.assert_allclose(summed, pooled, rtol=1e-12)


def test_too_many_parameters_for_a_site_are_refused_naming_it():
    df = _diabetes()
    sites = fed.split_table({c: df[c].to_numpy() for c in df}, 3, seed=0)
    sites["site-3"] = {c: v[:15] for c, v in sites["site-3"].items()}  # 6 parameters > 0.33 × 15
    with pytest.raises(ValueError, match=r"site-3: 6 parameters exceed 0.33 × 15 rows"):
        glm.fit_federated(sites, family="gaussian", outcome="target", covariates=["age", "sex", "bmi", "bp", "s5"])


def test_a_rare_binary_outcome_level_at_one_site_is_refused_naming_it():
    df = _breast_cancer()
    sites = fed.split_table({c: df[c].to_numpy() for c in df}, 3, seed=0)
    s2 = sites["site-2"]
    keep = np.flatnonzero(s2["target"] == 1).tolist() + np.flatnonzero(s2["target"] == 0)[:3].tolist()
    sites["site-2"] = {c: v[keep] for c, v in s2.items()}
    with pytest.raises(ValueError, match=r"site-2: target = 0 has 3 rows, fewer than the minimum cell 5"):
        glm.fit_federated(sites, family="binomial", outcome="target", covariates=["mean_radius"], min_cell=5)


def test_a_rare_binary_covariate_level_is_refused_and_the_check_is_a_pure_function():
    counts = {
        "site-1": {"n": 200, "levels": {"smoker": {"0": 150, "1": 50}}},
        "site-2": {"n": 120, "levels": {"smoker": {"0": 118, "1": 2}}},
    }
    with pytest.raises(ValueError, match=r"site-2: smoker = 1 has 2 rows"):
        glm.disclosure_check(counts, n_params=3, min_cell=5)
    glm.disclosure_check(counts, n_params=3, min_cell=2)
    x = np.column_stack([np.ones(6), [0, 0, 1, 1, 1, 1], [1.5, 2, 3, 4, 5, 6]])
    found = glm.site_counts(np.array([0, 1, 0, 1, 1, 1]), x, ["intercept", "smoker", "age"], "y", "binomial")
    assert found == {"n": 6, "levels": {"y": {"0": 2, "1": 4}, "smoker": {"0": 2, "1": 4}}}


def test_an_unknown_family_or_non_numeric_covariate_is_one_line():
    df = pd.DataFrame({"y": [0, 1] * 20, "grp": ["a", "b"] * 20, "age": np.arange(40.0)})
    sites = fed.split_table({c: df[c].to_numpy() for c in df}, 3)
    with pytest.raises(ValueError, match="family must be one of binomial, gaussian, poisson"):
        glm.fit_federated(sites, family="gamma", outcome="y", covariates=["age"])
    with pytest.raises(ValueError, match=r"site-1: column 'grp' is not numeric \(encode it first\)"):
        glm.fit_federated(sites, family="binomial", outcome="y", covariates=["grp"], min_cell=1)
