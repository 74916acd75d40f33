"""Attack (issue 23, item 4): a server that repeats round 0 gets a fresh DP-SGD run and charge each time.

Old code reserved a spend and trained again for every `train` task, so a server resending round 0
spent the site's budget past the job's admitted ε (`max_job_epsilon` was checked only at admission),
each answer a fresh DP-trained update of the same data. Fixed: one spend per (run, round): a repeated
round is refused before anything is charged, and a run's total never exceeds what admission accepted.
"""

from __future__ import annotations

import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.privacy.ledger import PrivacyLedger

from .sitekit import send
from .test_free_counting_queries import _site, train_meta


def test_repeating_round_0_is_refused_and_charged_once(monkeypatch, tmp_path):
    ex = _site(monkeypatch, tmp_path, rounds=2)
    admitted = ex._admission["planned_epsilon"]
    first = send(ex, "train", FLModel(params={}, meta=train_meta(ex, tmp_path), current_round=0))
    assert first.meta["status"] == "ok", first.meta.get("reason")
    repeats = [send(ex, "train", FLModel(params={}, meta=train_meta(ex, tmp_path), current_round=0)) for _ in range(3)]
    ledger = PrivacyLedger(tmp_path / "site-1" / "local" / "privacy_ledger.json", "site-1")
    spends = [(s.run, s.round) for s in ledger.spends]
    assert spends == [("run-1", 0)], f"round 0 charged {len(spends)} times"
    assert all(r.meta["status"] == "refused" for r in repeats)
    assert "round 0" in repeats[0].meta["reason"] and repeats[0].meta["reason"].startswith("site-1")
    assert ledger.epsilon_of_run("run-1") <= admitted + 1e-9


def test_a_run_never_spends_past_what_admission_accepted(monkeypatch, tmp_path):
    ex = _site(monkeypatch, tmp_path, rounds=2)
    admitted = ex._admission["planned_epsilon"]
    for rnd in (0, 1):
        reply = send(ex, "train", FLModel(params={}, meta=train_meta(ex, tmp_path), current_round=rnd))
        assert reply.meta["status"] in (
            "ok",
            "failed",  # round 1's global model is empty here; only the charge matters
        )
    ledger = PrivacyLedger(tmp_path / "site-1" / "local" / "privacy_ledger.json", "site-1")
    assert ledger.epsilon_of_run("run-1") == pytest.approx(admitted, rel=1e-6)


def test_resubmitting_a_run_cannot_spend_past_max_job_epsilon(monkeypatch, tmp_path):
    """A resumed run (the same run key, a new submission) is admitted again, but on the run's whole ε."""
    from clinfed.fl.participant import write_site_policy

    ex = _site(monkeypatch, tmp_path, rounds=2)
    for rnd in (0, 1):
        send(ex, "train", FLModel(params={}, meta=train_meta(ex, tmp_path), current_round=rnd))
    spent = PrivacyLedger(tmp_path / "site-1" / "local" / "privacy_ledger.json", "site-1").epsilon_of_run("run-1")
    write_site_policy(tmp_path / "site-1", max_job_epsilon=spent * 1.2)
    again = _site(monkeypatch, tmp_path, rounds=2, admit=False)  # the server "resumes" the finished run at 0
    reply = send(again, "admit", FLModel(params={}, meta={"run_key": "run-1"}))
    assert reply.meta["status"] == "refused", "a resubmitted run was admitted for a second full spend"
    assert "max_job_epsilon" in reply.meta["reason"]
