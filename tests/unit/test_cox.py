"""Cox PH from summed site vectors equals lifelines' CoxPHFitter on the pooled table (Efron ties).

References are fitted with lifelines' convergence tightened (precision 1e-12): its default stops
on a relative log-likelihood change of 1e-9, which leaves a coefficient near zero (gbsg2's age,
−1e-4) 1.5e-4 off in relative terms; ours stops after a Newton step under 1e-5 standard errors.
"""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("lifelines")
from lifelines import CoxPHFitter
from lifelines.datasets import load_gbsg2, load_rossi

from clinfed.analytics import cox, km
from clinfed.analytics import federated as fed

ROSSI = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
GBSG2 = ["horTh", "age", "tsize", "pnodes", "progrec", "estrec"]
TIGHT = {"precision": 1e-12, "r_precision": 1e-15}


@pytest.fixture(scope="module")
def rossi():
    df = load_rossi().rename(columns={"week": "time", "arrest": "event"})
    return {c: df[c].to_numpy() for c in df}


@pytest.fixture(scope="module")
def gbsg2():
    df = load_gbsg2().rename(columns={"cens": "event"})
    df["horTh"] = (df["horTh"] == "yes").astype(float)
    return {c: df[c].to_numpy() for c in df}


def _pooled(sites):
    # ignore_index: lifelines aligns predictions by index, and repeated indices scramble its concordance.
    return pd.concat([pd.DataFrame(t).assign(site=s) for s, t in sites.items()], ignore_index=True)


def _compare(ours, ref, names):
    coef = np.array([ours["coef"][k]["coef"] for k in names])
    se = np.array([ours["coef"][k]["se"] for k in names])
    ref_coef, ref_se = ref.params_[names].to_numpy(), ref.standard_errors_[names].to_numpy()
    summary = ref.summary.loc[names]
    return {
        "coef": np.max(np.abs(coef - ref_coef) / np.abs(ref_coef)),
        "se": np.max(np.abs(se - ref_se) / ref_se),
        "hr_ci": max(
            np.max(
                np.abs(np.array([ours["coef"][k]["ci_low"] for k in names]) - summary["exp(coef) lower 95%"])
                / summary["exp(coef) lower 95%"]
            ),
            np.max(
                np.abs(np.array([ours["coef"][k]["ci_high"] for k in names]) - summary["exp(coef) upper 95%"])
                / summary["exp(coef) upper 95%"]
            ),
        ),
        "p": np.max(np.abs(np.array([ours["coef"][k]["p"] for k in names]) - summary["p"])),
        "loglik": abs(ours["loglik"] - ref.log_likelihood_) / abs(ref.log_likelihood_),
        "concordance": abs(ours["concordance"] - ref.concordance_index_),
    }


def test_site_stratified_cox_equals_lifelines_strata_site(rossi):
    sites = fed.split_table(rossi, 4, seed=2)
    ours = cox.fit_federated(sites, covariates=ROSSI, strata="site")
    ref = CoxPHFitter().fit(
        _pooled(sites)[[*ROSSI, "time", "event", "site"]], "time", "event", strata=["site"], fit_options=TIGHT
    )
    diff = _compare(ours, ref, ROSSI)
    assert diff["coef"] < 1e-4 and diff["se"] < 1e-3, diff
    assert diff["hr_ci"] < 1e-3 and diff["p"] < 1e-4 and diff["loglik"] < 1e-9, diff
    # Within-site pairs only, counted exactly at each site: lifelines' stratified concordance.
    assert diff["concordance"] < 1e-12, diff
    assert ours["converged"] and ours["iterations"] <= 10
    assert (ours["n"], ours["events"], ours["strata"], ours["time_bin"]) == (432, 114, "site", None)
    assert set(ours) == {
        "coef",
        "loglik",
        "iterations",
        "converged",
        "n",
        "events",
        "strata",
        "time_bin",
        "concordance",
    }
    assert set(ours["coef"]["prio"]) == {"coef", "se", "hr", "ci_low", "ci_high", "p"}


@pytest.mark.parametrize(
    ("dataset", "names", "time_bin", "n_sites"), [("rossi", ROSSI, 2.0, 3), ("gbsg2", GBSG2, 30.0, 5)]
)
def test_pooled_cox_on_binned_times_equals_lifelines_on_the_pooled_binned_table(
    request, dataset, names, time_bin, n_sites
):
    table = request.getfixturevalue(dataset)
    sites = fed.split_table(table, n_sites, seed=3)
    ours = cox.fit_federated(sites, covariates=names, strata=None, time_bin=time_bin)
    pooled = _pooled(sites)
    pooled["time"] = km.bin_index(pooled["time"], time_bin) * time_bin
    ref = CoxPHFitter().fit(pooled[[*names, "time", "event"]], "time", "event", fit_options=TIGHT)
    diff = _compare(ours, ref, names)
    assert diff["coef"] < 1e-4 and diff["se"] < 1e-3 and diff["loglik"] < 1e-9, diff
    # Cross-site pairs from per-bin histograms of the linear predictor: ties within a score bin.
    assert diff["concordance"] < 1e-3, diff
    assert ours["converged"] and ours["iterations"] <= 10
    assert ours["strata"] is None and ours["time_bin"] == time_bin and ours["n"] == len(table["time"])


def test_pooled_site_vectors_add_up_to_the_vector_of_the_pooled_table(rossi):
    x = np.column_stack([rossi[c] for c in ROSSI]).astype(float)
    beta = np.linspace(-0.2, 0.2, len(ROSSI))
    center = x.mean(axis=0)
    p, q = len(ROSSI), len(ROSSI) * (len(ROSSI) + 1) // 2
    n_bins = 26
    pooled = cox.cox_pooled_site_local(rossi["time"], rossi["event"], x, beta, time_bin=2, n_bins=n_bins, center=center)
    assert pooled.size == n_bins * (3 + 3 * p + 2 * q) + 1
    parts = fed.split_rows(len(x), 4, seed=0)
    summed = fed.sum_site_vectors(
        {
            f"site-{i}": cox.cox_pooled_site_local(
                rossi["time"][idx], rossi["event"][idx], x[idx], beta, time_bin=2, n_bins=n_bins, center=center
            )
            for i, idx in enumerate(parts)
        }
    )
    np.testing.assert_allclose(summed, pooled, rtol=1e-12, atol=1e-9)
    strat = cox.cox_stratified_site_local(rossi["time"], rossi["event"], x, beta)
    assert strat.size == 3 + p + q


def test_a_site_with_no_events_is_refused_naming_it(rossi):
    sites = fed.split_table(rossi, 3, seed=1)
    sites["site-2"] = dict(sites["site-2"], event=np.zeros_like(sites["site-2"]["event"]))
    with pytest.raises(ValueError, match="site-2: no events"):
        cox.fit_federated(sites, covariates=ROSSI)


def test_unknown_covariate_is_one_line_naming_site_and_column(rossi):
    with pytest.raises(ValueError, match="site-1: no column 'weight'"):
        cox.fit_federated(fed.split_table(rossi, 3), covariates=["age", "weight"])


def test_flchain_stratified_over_five_sites_converges_in_ten_iterations():
    datasets = pytest.importorskip("sksurv.datasets")
    x, y = datasets.load_flchain()
    df = x.assign(time=y["futime"], event=y["death"].astype(float))
    df["sex"] = (df["sex"].astype(str) == "M").astype(float)
    names = ["age", "sex", "kappa", "lambda"]
    table = {c: df[c].to_numpy(dtype=float) for c in [*names, "time", "event"]}
    sites = fed.split_table(table, 5, seed=0)
    ours = cox.fit_federated(sites, covariates=names, strata="site")
    ref = CoxPHFitter().fit(_pooled(sites), "time", "event", strata=["site"], fit_options=TIGHT)
    diff = _compare(ours, ref, names)
    assert ours["converged"] and ours["iterations"] <= 10
    assert diff["coef"] < 1e-4 and diff["se"] < 1e-3, diff
