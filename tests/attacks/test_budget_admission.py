"""Attack (issue 12, item 3): a job planned beyond a site's budget makes the site train until the
budget runs out and drop out mid-job, spending ε on a model it never finishes. Each site must check the
job's whole planned spend at job start and refuse the job as a whole, spending nothing.
"""

import pytest

from clinfed.simulate import SimulationRequest, run_simulation

from .simjobs import ledger_spends

pytestmark = pytest.mark.slow


def test_a_job_over_budget_is_refused_whole_before_any_spend(tmp_path):
    summary = run_simulation(
        SimulationRequest(job="breast_cancer_dp", sites=3, rounds=8, out=tmp_path, site_budget=2.0)
    )
    for site in ("site-1", "site-2", "site-3"):
        assert ledger_spends(tmp_path / "workspace" / site) == [], f"{site} spent ε on a job it could not finish"
        verdict = summary["admission"][site]
        assert verdict["status"] == "refused" and "refusing the whole job" in verdict["reason"]
    assert summary["rounds_completed"] == 0
