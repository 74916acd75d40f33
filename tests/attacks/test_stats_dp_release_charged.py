"""Attack (issue 12, item 5, statistics side): output-DP statistics releases are never charged.

Every site's records are in a cohort_stats release, so an ε-DP release spends ε at every site.
Old code reports the ε in summary.json and writes nothing to any ledger: a lead can run DP
statistics forever, or after training has used up a site's budget. Fixed code: each site reserves
the release's ε in its own ledger before it sends its pass-1 sum, and a site whose remaining budget
is below the release's ε refuses the job at admission (and its rows stay out of the release).
"""

from __future__ import annotations

import pytest

from clinfed.fl.participant import write_site_policy
from clinfed.privacy.ledger import PrivacyLedger
from clinfed.simulate import SimulationRequest, run_simulation

EPSILON = 1.0
FEATURES = ["mean radius", "mean area", "worst concavity"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_charged")
    ws = root / "ws"
    for i in range(1, 4):
        write_site_policy(ws / f"site-{i}", epsilon_budget=10.0)
    write_site_policy(ws / "site-4", epsilon_budget=0.5)  # less left than the release's ε
    req = SimulationRequest(
        job="cohort_stats", sites=4, out=root / "out", workspace=ws, epsilon=EPSILON, extra={"features": FEATURES}
    )
    return ws, run_simulation(req)


def _epsilon(ws, site: str) -> float:
    return PrivacyLedger(ws / site / "local" / "privacy_ledger.json", site).epsilon()


def test_every_contributing_site_is_charged_the_release_epsilon(dp_run):
    ws, summary = dp_run
    assert summary["final"]["status"] == "released" and summary["dp"]["epsilon"] == EPSILON
    for site in ("site-1", "site-2", "site-3"):
        assert summary["final"]["per_site"][site]["contributed"]
        assert _epsilon(ws, site) == pytest.approx(EPSILON), f"{site}'s ledger does not hold the release's ε"


def test_a_site_without_budget_for_the_release_refuses_it(dp_run):
    ws, summary = dp_run
    entry = summary["admission"]["site-4"]  # the whole job, before any of its rows leaves
    assert entry["status"] == "refused", "site-4 put its rows into a release its budget cannot pay for"
    assert entry["reason"].startswith("site-4") and "budget" in entry["reason"] and "\n" not in entry["reason"]
    assert not summary["final"]["per_site"]["site-4"]["contributed"]
    assert _epsilon(ws, "site-4") == 0.0
