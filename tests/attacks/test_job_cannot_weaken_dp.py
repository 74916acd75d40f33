"""Attack (issue 12, item 2): a lead edits the exported job to switch DP off, or to ask for ε = 10^6
or δ = 0.5, and submits it. The site's own policy decides: every site must refuse the job before
training, in one line naming the setting, and spend nothing.
"""

import pytest

import clinfed.simulate
from clinfed.simulate import SimulationRequest, run_simulation

from .simjobs import ledger_spends, tampered_job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"enabled": False}, "dp_args.enabled"),
        ({"target_epsilon": 1e6}, "dp_args.target_epsilon"),
        ({"delta": 0.5}, "dp_args.delta"),
    ],
    ids=["dp-off", "epsilon-1e6", "delta-0.5"],
)
def test_an_edited_job_trains_at_no_site(edit, named, tmp_path, monkeypatch):
    monkeypatch.setattr(clinfed.simulate, "load_job", lambda name: tampered_job(name, **edit))
    summary = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=2, out=tmp_path))
    assert summary["rounds_completed"] == 0
    trained = [s for r in summary["rounds"] for s, e in r["sites"].items() if e["status"] == "ok"]
    assert trained == [], f"sites trained under the edited job: {trained}"
    for site in ("site-1", "site-2", "site-3"):
        verdict = summary["admission"][site]
        assert verdict["status"] == "refused"
        assert verdict["reason"].startswith(f"{site}: ") and named in verdict["reason"]
        assert "\n" not in verdict["reason"]
        assert ledger_spends(tmp_path / "workspace" / site) == []


def test_no_dp_is_a_stated_simulator_policy_override(tmp_path):
    summary = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=1, out=tmp_path, no_dp=True))
    assert summary["rounds_completed"] == 1
    assert summary["policy_override"]["require_dp"] is False
    assert all(p["policy_override"] is True for p in summary["privacy"].values())
