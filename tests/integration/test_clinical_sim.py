"""survival_km, cox_ph and glm on real FLARE simulator runs under CKKS, against lifelines and statsmodels.

Each job runs on a `clinfed data split` of a bundled real dataset; the references are fitted on the
pooled table of the same split (the union of the site databases' rows). Four runs (~15-50 s each on
two cores): KM of gbsg2 by hormone therapy over 3 sites, site-stratified Cox on flchain (7,874
patients, 4 numeric covariates, 5 sites), pooled Cox on gbsg2 binned to 30 days, logistic regression
on breast_cancer over 3 sites; and a
bad-input run through the CLI (fewer than 3 sites: one line, exit 2, nothing in any ledger).
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinfed.analytics.km import bin_index
from clinfed.data.sitedb import find_site_databases, read_site_table, site_columns, split_dataset
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow


def _pooled(data_dir: Path) -> pd.DataFrame:
    """The union of the sites' tables, with a `site` column (what a statistician would fit)."""
    frames = []
    for site, path in find_site_databases(data_dir).items():
        table = read_site_table(path, site_columns(path))
        frames.append(pd.DataFrame(table).assign(site=site))
    return pd.concat(frames, ignore_index=True)


def _simulate(tmp_path: Path, job: str, sites: int, data_dir: Path, **extra) -> tuple[dict, float]:
    start = time.monotonic()
    summary = run_simulation(
        SimulationRequest(
            job=job,
            sites=sites,
            out=tmp_path / job,
            data_dir=str(data_dir),
            min_cell=extra.pop("min_cell", None),
            extra={"data_dir": str(data_dir), **extra},
        )
    )
    return summary, time.monotonic() - start


def _bytes_per_site_round(summary: dict) -> float:
    sent = [e["bytes_sent"] for r in summary["rounds"] for e in r["sites"].values() if e["status"] == "ok"]
    return float(np.mean(sent))


def test_survival_km_equals_lifelines_on_binned_gbsg2(tmp_path):
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    data = tmp_path / "gbsg2"
    split_dataset("gbsg2", 3, data, seed=1)
    summary, seconds = _simulate(tmp_path, "survival_km", 3, data, group="horTh", time_bin=30, min_cell=1)
    assert summary["encrypted"] is True and summary["final"]["status"] == "released", summary["final"]
    km = summary["km"]
    pooled = _pooled(data)
    pooled["tb"] = bin_index(pooled["time"].to_numpy(), 30) * 30.0
    worst = 0.0
    for level, curve in km["groups"].items():
        rows = pooled[pooled["horTh"] == level]
        fit = KaplanMeierFitter().fit(rows["tb"], rows["event"])
        ref = fit.survival_function_at_times(curve["time"]).to_numpy()
        worst = max(worst, float(np.max(np.abs(np.array(curve["survival"]) - ref))))
        assert curve["at_risk"][0] == len(rows)
        assert curve["median"] == pytest.approx(fit.median_survival_time_)
    assert worst < 1e-6, worst
    a, b = (pooled[pooled["horTh"] == v] for v in ("no", "yes"))
    ref_chi2 = logrank_test(a["tb"], b["tb"], a["event"], b["event"]).test_statistic
    assert km["logrank"]["chi2"] == pytest.approx(ref_chi2, rel=1e-6)
    assert (tmp_path / "survival_km" / "survival_km-km.png").stat().st_size > 0  # curves + numbers at risk
    prov = summary["provenance"]["km"]
    assert prov["n"] == len(pooled) and prov["sites"] == ["site-1", "site-2", "site-3"]
    print(
        f"\nKM gbsg2 3 sites: max |ΔS| {worst:.2e}, χ² {km['logrank']['chi2']} vs {ref_chi2:.7g}, "
        f"{seconds:.1f} s, {summary['rounds_completed']} round(s), {_bytes_per_site_round(summary):.0f} B/site/round"
    )


def test_cox_ph_stratified_equals_lifelines_on_flchain(tmp_path):
    from lifelines import CoxPHFitter

    covs = ["age", "creatinine", "kappa", "lambda"]
    data = tmp_path / "flchain"
    split_dataset("flchain", 5, data, seed=2)
    summary, seconds = _simulate(tmp_path, "cox_ph", 5, data, covariates=covs, strata="site")
    assert summary["final"]["status"] == "released", summary["final"]
    cox = summary["cox"]
    pooled = _pooled(data)[["time", "event", *covs, "site"]].dropna()
    # lifelines' default first step (0.95) diverges on flchain's unscaled covariates (log-likelihood
    # -24052 against the optimum's -12328); a half step and tight tolerances reach the optimum.
    tight = {"step_size": 0.5, "precision": 1e-12, "r_precision": 1e-15, "max_steps": 200}
    ref = CoxPHFitter().fit(pooled, "time", "event", strata=["site"], fit_options=tight)
    coef_rel = max(abs(cox["coef"][c]["coef"] / ref.params_[c] - 1) for c in covs)
    se_diff = max(abs(cox["coef"][c]["se"] - ref.standard_errors_[c]) for c in covs)
    assert coef_rel < 1e-4, coef_rel
    assert se_diff < 1e-3, se_diff
    assert cox["loglik"] == pytest.approx(ref.log_likelihood_, rel=1e-6)
    assert cox["concordance"] == pytest.approx(ref.concordance_index_, abs=1e-6)
    assert cox["n"] == len(pooled) and cox["converged"] and cox["iterations"] <= 10
    assert seconds <= 120
    assert (tmp_path / "cox_ph" / "cox_ph-cox.png").stat().st_size > 0  # forest plot
    print(
        f"\nCox flchain 5 sites stratified: coef max rel {coef_rel:.1e}, SE max |Δ| {se_diff:.1e}, "
        f"{cox['iterations']} iterations, {seconds:.1f} s, {summary['rounds_completed']} rounds, "
        f"{_bytes_per_site_round(summary):.0f} B/site/round"
    )


def test_cox_ph_pooled_on_binned_gbsg2_equals_lifelines(tmp_path):
    """One baseline over all sites: risk sets cross sites, so sites send per-bin sums (30-day bins)."""
    from lifelines import CoxPHFitter

    covs = ["age", "pnodes", "tsize"]
    data = tmp_path / "gbsg2"
    split_dataset("gbsg2", 3, data, seed=4)
    summary, seconds = _simulate(tmp_path, "cox_ph", 3, data, covariates=covs, strata="none", time_bin=30)
    assert summary["final"]["status"] == "released", summary["final"]
    cox = summary["cox"]
    pooled = _pooled(data)[["time", "event", *covs]].dropna()
    pooled["time"] = bin_index(pooled["time"].to_numpy(), 30) * 30.0
    ref = CoxPHFitter().fit(pooled, "time", "event", fit_options={"precision": 1e-12, "r_precision": 1e-15})
    coef_rel = max(abs(cox["coef"][c]["coef"] / ref.params_[c] - 1) for c in covs)
    se_diff = max(abs(cox["coef"][c]["se"] - ref.standard_errors_[c]) for c in covs)
    assert coef_rel < 1e-4 and se_diff < 1e-3, (coef_rel, se_diff)
    assert cox["strata"] is None and cox["time_bin"] == 30
    # Pooled pairs cross sites: C comes from 256-bin score histograms, pairs within a bin count as ties
    # (measured 1.1e-3 here, where integer covariates crowd the linear predictor; 2.4e-4 with 1024 bins).
    assert cox["concordance"] == pytest.approx(ref.concordance_index_, abs=2e-3)
    print(
        f"\nCox gbsg2 3 sites pooled (30-day bins): coef max rel {coef_rel:.1e}, SE max |Δ| {se_diff:.1e}, "
        f"C {cox['concordance']} vs {ref.concordance_index_:.7f}, {cox['iterations']} iterations, {seconds:.1f} s, "
        f"{summary['rounds_completed']} rounds, {_bytes_per_site_round(summary):.0f} B/site/round (mean)"
    )


def test_glm_binomial_equals_statsmodels_on_breast_cancer(tmp_path):
    import statsmodels.api as sm

    covs = ["mean_radius", "mean_texture"]
    data = tmp_path / "bc"
    split_dataset("breast_cancer", 3, data, seed=3)
    summary, seconds = _simulate(tmp_path, "glm", 3, data, family="binomial", outcome="malignant", covariates=covs)
    assert summary["final"]["status"] == "released", summary["final"]
    glm = summary["glm"]
    pooled = _pooled(data)
    ref = sm.GLM(pooled["malignant"], sm.add_constant(pooled[covs]), family=sm.families.Binomial()).fit()
    names = {"intercept": "const", **{c: c for c in covs}}
    coef_diff = max(abs(glm["coef"][n]["coef"] - ref.params[r]) for n, r in names.items())
    se_diff = max(abs(glm["coef"][n]["se"] - ref.bse[r]) for n, r in names.items())
    assert coef_diff < 1e-5, coef_diff
    assert se_diff < 1e-4, se_diff
    assert glm["deviance"] == pytest.approx(ref.deviance, rel=1e-6)
    assert glm["n"] == len(pooled)
    print(
        f"\nGLM breast_cancer 3 sites: coef max |Δ| {coef_diff:.1e}, SE max |Δ| {se_diff:.1e}, "
        f"{glm['iterations']} iterations, {seconds:.1f} s, {_bytes_per_site_round(summary):.0f} B/site/round"
    )


def test_bad_input_is_one_line_exit_2_and_no_ledger(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "gbsg2"
    split_dataset("gbsg2", 3, data, seed=0)
    # At submission (make_recipe, what `clinfed simulate` calls first): one-line ValueErrors.
    from clinfed.jobs import load_job

    with pytest.raises(ValueError, match="no column 'nope'"):
        load_job("cox_ph").make_recipe(sites=3, data_dir=str(data), covariates=["age", "nope"])
    with pytest.raises(ValueError, match="text"):
        load_job("cox_ph").make_recipe(sites=3, data_dir=str(data), covariates=["age", "horTh"])
    with pytest.raises(ValueError, match="no output DP"):  # a method without a per-patient bound
        load_job("cox_ph").make_recipe(sites=3, data_dir=str(data), covariates=["age"], epsilon=1.0)
    # A site with no events (its split.json says so): a Cox fit is refused before anything runs.
    import json

    manifest = json.loads((data / "split.json").read_text())
    manifest["sites"]["site-2"]["events"] = 0
    no_events = tmp_path / "no_events"
    no_events.mkdir()
    (no_events / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="site-2 has no events"):
        load_job("cox_ph").make_recipe(sites=3, data_dir=str(no_events), covariates=["age"])
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_job("survival_km").make_recipe(sites=3, data_dir=str(data), group="nope")
    with pytest.raises(ValueError, match="at least 3 sites"):
        load_job("glm").make_recipe(sites=2, outcome="event", covariates=["age"])
    out = tmp_path / "out"
    split = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "data", "split", "--dataset", "nope", "--sites", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert split.returncode == 2 and "unknown dataset 'nope'" in split.stderr, split.stderr
    assert len(split.stderr.strip().splitlines()) == 1 and not out.exists()
    cases = {
        "fewer than 3 sites": ["cox_ph", "--sites", "2", "--covariates", "age"],
        "unknown covariate": ["cox_ph", "--sites", "3", "--covariates", "age,no_such_column"],
    }
    for why, args in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "clinfed.cli", "simulate", *args, "--data-dir", str(data), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (why, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (why, proc.stderr)
        assert not list(out.rglob("*ledger*")), why


def test_survival_km_on_whas500_by_gender_and_output_dp_charged_to_the_ledger(tmp_path):
    """A second dataset (whas500, 3 sites, by gender) exact against lifelines; then the same job with
    output DP (ε = 1, yearly bins) on a federation whose sites have a budget of 1.2: the first DP run is
    charged to every site's ledger (what summary.json says it charged), its curves are noisy but close;
    the second is refused by every site at admission, and no ledger moves."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    from clinfed.privacy.ledger import PrivacyLedger

    data = tmp_path / "whas500"
    split_dataset("whas500", 3, data, seed=5)
    summary, seconds = _simulate(tmp_path, "survival_km", 3, data, group="gender", time_bin=30, min_cell=1)
    assert summary["final"]["status"] == "released", summary["final"]
    pooled = _pooled(data)
    pooled["tb"] = bin_index(pooled["time"].to_numpy(), 30) * 30.0
    worst = 0.0
    for level, curve in summary["km"]["groups"].items():
        rows = pooled[pooled["gender"] == level]
        fit = KaplanMeierFitter().fit(rows["tb"], rows["event"])
        ref = fit.survival_function_at_times(curve["time"]).to_numpy()
        worst = max(worst, float(np.max(np.abs(np.array(curve["survival"]) - ref))))
    assert worst < 1e-6, worst
    a, b = (pooled[pooled["gender"] == v] for v in sorted(summary["km"]["groups"]))
    ref_chi2 = logrank_test(a["tb"], b["tb"], a["event"], b["event"]).test_statistic
    assert summary["km"]["logrank"]["chi2"] == pytest.approx(ref_chi2, rel=1e-6)
    assert "dp" not in summary and all(e["status"] == "accepted" for e in summary["admission"].values())
    print(f"\nKM whas500 3 sites by gender: max |ΔS| {worst:.2e}, {seconds:.1f} s")

    workspace = tmp_path / "federation"
    runs = []
    for i in range(2):
        runs.append(
            run_simulation(
                SimulationRequest(
                    job="survival_km",
                    sites=3,
                    out=tmp_path / f"dp{i}",
                    data_dir=str(data),
                    epsilon=1.0,
                    site_budget=1.2,
                    workspace=workspace,
                    extra={"data_dir": str(data), "time_bin": 365},
                )
            )
        )
        if i == 0:
            ledgers = {
                s: PrivacyLedger(workspace / s / "local" / "privacy_ledger.json", s)
                for s in ("site-1", "site-2", "site-3")
            }
            spent = {s: ledger.epsilon() for s, ledger in ledgers.items()}
    first, second = runs
    assert first["final"]["status"] == "released", first["final"]
    assert first["dp"]["noise_multiplier"] > 1 and first["dp"]["sensitivity"] == 1.0
    for site, eps in spent.items():
        assert 0.9 < eps <= 1.0 and first["privacy"]["epsilon_charged"][site] == pytest.approx(eps), site
    exact = KaplanMeierFitter().fit(bin_index(pooled["time"].to_numpy(), 365) * 365.0, pooled["event"])
    curve = first["km"]["groups"]["all"]
    noisy_gap = np.abs(np.array(curve["survival"]) - exact.survival_function_at_times(curve["time"]).to_numpy())
    # Noised (never the exact curve), yet close while many are at risk (σ ≈ 4 patients per cell at ε = 1).
    assert noisy_gap.max() > 0 and noisy_gap[:3].max() < 0.1, noisy_gap
    # Second DP run: two ε = 1 Gaussian releases compose (RDP) to ~1.45 > 1.2 at every site: refused
    # before any count leaves, nothing charged.
    assert second["final"]["status"] == "not released" and second["rounds_completed"] == 0, second["final"]
    assert all(e["status"] == "refused" and "budget" in e["reason"] for e in second["admission"].values())
    assert {s: ledger.epsilon() for s, ledger in ledgers.items()} == spent
    print(f"KM whas500 output DP ε=1: max |ΔS| vs exact {noisy_gap.max():.3f}; second run refused at admission")


def test_glm_gaussian_equals_statsmodels_on_whas500(tmp_path):
    """A second dataset and family: linear regression of BMI on age and heart rate (whas500, 3 sites)."""
    import statsmodels.api as sm

    covs = ["age", "hr"]
    data = tmp_path / "whas500"
    split_dataset("whas500", 3, data, seed=6)
    summary, seconds = _simulate(tmp_path, "glm", 3, data, family="gaussian", outcome="bmi", covariates=covs)
    assert summary["final"]["status"] == "released", summary["final"]
    glm = summary["glm"]
    pooled = _pooled(data)[["bmi", *covs]].dropna()
    ref = sm.GLM(pooled["bmi"], sm.add_constant(pooled[covs]), family=sm.families.Gaussian()).fit()
    names = {"intercept": "const", **{c: c for c in covs}}
    coef_diff = max(abs(glm["coef"][n]["coef"] - ref.params[r]) for n, r in names.items())
    se_diff = max(abs(glm["coef"][n]["se"] - ref.bse[r]) for n, r in names.items())
    assert coef_diff < 1e-5 and se_diff < 1e-4, (coef_diff, se_diff)
    assert glm["deviance"] == pytest.approx(ref.deviance, rel=1e-6) and glm["n"] == len(pooled)
    print(
        f"\nGLM gaussian whas500 3 sites: coef max |Δ| {coef_diff:.1e}, SE max |Δ| {se_diff:.1e}, "
        f"{glm['iterations']} iterations, {seconds:.1f} s, {_bytes_per_site_round(summary):.0f} B/site/round"
    )
