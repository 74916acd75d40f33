"""Claim: a misbehaving or dying site never breaks the round, and the global model stays intact.

For each fault kind, breast_cancer_dp runs 3 encrypted rounds in FLARE's simulator on 4 sites with
site-2 faulty: every round completes with the other three (a sum is never released with fewer than
3 contributors), site-2 is reported "failed" with a one-line reason naming it, and the final model is
still accurate.
"""

import pytest

from clinfed.audit import verify
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow

EXPECTED_REASON = {
    "nan": "NaN/Inf",
    "corrupt": "not a compact-format upload",  # training updates travel in the compact format
    "wrongshape": "expected",
    "crash": "no result this round",
}


@pytest.mark.parametrize("kind", ["nan", "corrupt", "wrongshape", "crash"])
def test_faulty_site_is_excluded_and_the_federation_finishes(kind, tmp_path):
    summary = run_simulation(
        SimulationRequest(
            job="breast_cancer_dp",
            sites=4,
            rounds=3,
            out=tmp_path,
            inject={"site-2": kind},
            extra={"straggler_wait": 5},
        )
    )
    assert summary["rounds_completed"] == 3
    assert summary["encrypted"] is True
    assert summary["final"]["metrics"]["auc"] >= 0.95
    for rnd in summary["rounds"]:
        bad = rnd["sites"]["site-2"]
        assert bad["status"] == "failed"
        assert bad["reason"].startswith("site-2: ")
        assert EXPECTED_REASON[kind] in bad["reason"]
        assert "\n" not in bad["reason"]
        assert {rnd["sites"][s]["status"] for s in ("site-1", "site-3", "site-4")} == {"ok"}
    # the exclusion is on the audit trail, and the trail itself is intact
    server_log = (tmp_path / "workspace" / "server" / "audit" / "server.jsonl").read_text()
    assert '"event":"failed"' in server_log and "site-2" in server_log
    assert verify(tmp_path / "workspace").ok


def test_plaintext_update_with_nan_is_refused_by_the_server_too(tmp_path):
    """Without encryption the server can see the values: a non-finite weight is rejected there."""
    import numpy as np

    from clinfed.he.aggregation import PlainWeightedSum

    acc = PlainWeightedSum()
    acc.add("site-1", {"w": np.ones(3, np.float32)}, 1.0)
    with pytest.raises(ValueError, match=r"site-2: .*NaN/Inf"):
        acc.add("site-2", {"w": np.array([1.0, np.nan, 1.0], np.float32)}, 1.0)
    avg, total, sites = acc.result()
    assert sites == ["site-1"] and total == 1.0 and np.allclose(avg["w"], 1.0)
