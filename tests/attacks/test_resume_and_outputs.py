"""Attacks (issue 12, items 10 and 11) on one reused federation workspace.

Item 10: resume was keyed by the job's name, so a *new* submission of a job silently continued an
older unfinished run (its model, its round log and its run key, hence its noise calibration). Only the
same submission may resume.

Item 11: what leaves a site. A site's reply carried its whole multi-job ledger history, and every
metric at full precision. Only this job's spends (and the site's total) may leave; the site's policy
rounds or withholds metrics.
"""

import json

import pytest

from clinfed.fl.participant import write_site_policy
from clinfed.simulate import SimulationRequest, run_simulation

from .simjobs import ledger_spends

pytestmark = pytest.mark.slow

STALE_RUN = "older-unfinished-run"


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    ws = base / "federation"
    first = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=2, out=base / "one", workspace=ws))
    # an older run of the same job that never finished, as the server left it (any naming scheme)
    stale = {
        "job": "breast_cancer_dp",
        "next_round": 2,
        "completed": 2,
        "rounds": [{"round": 0, "sites": {}}, {"round": 1, "sites": {}}],
        "privacy": {},
        "admission": {},
        "sites": ["site-1", "site-2", "site-3"],
        "layout": None,
        "encrypted": True,
        "global": None,
        "run_key": STALE_RUN,
    }
    folder = ws / "server" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("breast_cancer_dp.json", "breast_cancer_dp-0123456789abcdef.json"):
        (folder / name).write_text(json.dumps(stale))
    write_site_policy(ws / "site-3", metrics="withhold")
    second = run_simulation(
        SimulationRequest(job="breast_cancer_dp", sites=3, rounds=3, out=base / "two", workspace=ws)
    )
    return ws, first, second


def test_a_new_submission_does_not_continue_an_older_unfinished_run(two_jobs):
    ws, _, second = two_jobs
    assert second["resumed_at_round"] == 0
    assert [r["round"] for r in second["rounds"]] == [0, 1, 2]
    assert second["rounds_completed"] == 3
    runs = {s["run"] for s in ledger_spends(ws / "site-1")}
    assert STALE_RUN not in runs


def test_a_site_sends_only_this_jobs_spends(two_jobs):
    _, first, second = two_jobs
    for site in ("site-1", "site-2", "site-3"):
        mine, before = second["privacy"][site], first["privacy"][site]
        # the first job's history must not travel with the second job's results
        # (same site, same batches per round: the 3-round job's own history is 3/2 of the 2-round job's)
        steps, first_steps = sum(h[2] for h in mine["history"]), sum(h[2] for h in before["history"])
        assert steps * 2 == first_steps * 3, f"{site} sent {steps} steps of history for a 3-round job"
        assert mine["epsilon"] <= 3.0 + 1e-6
        assert mine["site_total_epsilon"] > before["epsilon"]


def test_a_site_policy_withholds_its_metrics(two_jobs):
    _, _, second = two_jobs
    for rnd in second["rounds"]:
        assert rnd["sites"]["site-3"]["metrics"] == {}
        assert rnd["sites"]["site-1"]["metrics"]["auc"] == round(rnd["sites"]["site-1"]["metrics"]["auc"], 3)
    assert "site-3" not in second["final"]["per_site"]
