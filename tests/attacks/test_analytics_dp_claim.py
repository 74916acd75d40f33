"""Attack: a job that *claims* output DP at ε = 1 but ships a noise multiplier 80× too small.

The job config is untrusted (the server or a researcher writes it). If a site charged its ledger with
the ε written in the config, or admitted the job on it, the release would be nearly noiseless while
the ledger said ε = 1. The site must take z, and only z, and let its own ledger say what it costs.
"""

import pytest

from clinfed.analytics.methods import KaplanMeier, dp_config
from clinfed.analytics.registry import make_method
from clinfed.analytics.sums_fl import SumsExecutor
from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.fl.participant import SitePolicy
from clinfed.privacy.ledger import PrivacyLedger


def _site(tmp_path, method: dict, **policy) -> SumsExecutor:
    ex = SumsExecutor(method=method, num_sites=3, job_label="survival_km")
    ex.site, ex.root, ex.run_id = "site-1", tmp_path / "site-1", "run-1"
    (ex.root / "local").mkdir(parents=True)
    ex.policy = SitePolicy(**policy)
    ex.audit = AuditLog(ex.root, ex.site)
    ex._m = make_method(method)
    return ex


def _km(dp: dict) -> dict:
    return {"method": "km", "group": None, "levels": None, "time_bin": 30.0, "n_bins": 10, "dp": dp}


def test_honest_dp_config_costs_what_it_claims(tmp_path):
    dp = dp_config("survival_km", KaplanMeier.dp_sensitivity, 1.0, 1e-5)
    site = _site(tmp_path, _km(dp))
    admission = site._admit()
    assert admission["planned_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert site._charge() == pytest.approx(admission["planned_epsilon"], rel=1e-6)
    ledger = PrivacyLedger(site.root / "local" / "privacy_ledger.json", "site-1")
    assert ledger.epsilon() == pytest.approx(admission["planned_epsilon"], rel=1e-6)


def test_a_claimed_epsilon_with_a_tiny_noise_multiplier_is_charged_what_it_really_costs(tmp_path):
    honest = dp_config("survival_km", KaplanMeier.dp_sensitivity, 1.0, 1e-5)
    forged = {**honest, "noise_multiplier": honest["noise_multiplier"] / 80}  # still says epsilon: 1.0
    site = _site(tmp_path, _km(forged))
    with pytest.raises(SiteRefusal, match="max_job_epsilon"):
        site._admit()
    # Under a permissive policy the forged job is admitted, but at its true cost, not the ε it claims.
    site = _site(tmp_path / "lax", _km(forged), max_job_epsilon=1e9)
    assert site._admit()["planned_epsilon"] > 50
    assert site._charge() > 50


def test_a_budget_too_small_refuses_at_admission_and_writes_nothing(tmp_path):
    dp = dp_config("survival_km", KaplanMeier.dp_sensitivity, 1.0, 1e-5)
    site = _site(tmp_path, _km(dp), epsilon_budget=0.5)
    with pytest.raises(SiteRefusal, match="budget"):
        site._admit()
    assert PrivacyLedger(site.root / "local" / "privacy_ledger.json", "site-1").spends == []


def test_a_job_delta_above_the_sites_is_refused(tmp_path):
    dp = dp_config("survival_km", KaplanMeier.dp_sensitivity, 1.0, 1e-3)
    with pytest.raises(SiteRefusal, match="δ"):
        _site(tmp_path, _km(dp))._admit()


def test_methods_without_a_per_patient_bound_refuse_dp():
    cox = {"method": "cox", "covariates": ["age"], "strata": "site", "dp": {"noise_multiplier": 5.0}}
    with pytest.raises(ValueError, match="no output DP"):
        make_method(cox)
    with pytest.raises(ValueError, match="no output DP"):
        dp_config("cox_ph", None, 1.0, 1e-5)
