"""Attack (issue 12, item 5): statistics releases that spend ε but are never charged.

cohort_stats' output-DP releases spend privacy as surely as a DP-SGD round does; a ledger that only
knows DP-SGD lets a lead run statistics forever, or past a budget that training already used up.
The ledger must charge every mechanism and compose them by its stated rule: Gaussian spends in one
RDP history (Opacus), pure-ε Laplace releases added on top (basic composition), at the site's δ.

The expected numbers come from Opacus' own accountant stepped by hand and from plain addition, not
from the ledger. Old code has no way to charge a Laplace release: the tests fail on that assertion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.privacy.ledger import BudgetExceeded, PrivacyLedger

SITE = "site-1"
DELTA = 1e-5


def _ledger(tmp_path: Path, audit: AuditLog | None = None) -> PrivacyLedger:
    path = tmp_path / "local" / "privacy_ledger.json"
    try:
        ledger = PrivacyLedger(path, SITE, delta=DELTA, audit=audit)
    except TypeError:  # old code: a ledger without an audit log
        ledger = PrivacyLedger(path, SITE, delta=DELTA)
    assert hasattr(ledger, "reserve"), "the ledger has no way to charge a statistics (Laplace / Gaussian) release"
    return ledger


def _trained(ledger: PrivacyLedger) -> float:
    """Three DP-SGD rounds; returns ε as Opacus' accountant, stepped by hand, puts it."""
    acc = RDPAccountant()
    for rnd in range(3):
        ledger.record("train_job", rnd, 1.1, 0.05, 20)
        for _ in range(20):
            acc.step(noise_multiplier=1.1, sample_rate=0.05)
    return float(acc.get_epsilon(delta=DELTA))


def test_a_laplace_release_adds_exactly_its_epsilon(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    dp_sgd = _trained(ledger)
    assert ledger.epsilon() == pytest.approx(dp_sgd, rel=1e-9)
    spend = ledger.reserve("cohort_stats", 0, mechanism="laplace", epsilon=0.5, budget=100.0)
    assert ledger.epsilon() == pytest.approx(dp_sgd + 0.5, rel=1e-9), "the Laplace release was not charged"
    assert spend.epsilon_after == pytest.approx(dp_sgd + 0.5, rel=1e-9)
    # The RDP history stays exactly what Opacus consumed; the pure ε is listed beside it.
    assert ledger.history == [[1.1, 0.05, 60]]
    assert ledger.pure_epsilons == [0.5]


def test_a_gaussian_statistics_release_joins_the_rdp_history(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _trained(ledger)
    ledger.reserve("cohort_stats", 0, noise_multiplier=4.0, sample_rate=1.0, steps=1)
    acc = RDPAccountant()
    for _ in range(60):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    acc.step(noise_multiplier=4.0, sample_rate=1.0)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)


def test_a_release_over_budget_is_refused_and_not_charged(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, SITE)
    ledger = _ledger(tmp_path, audit)
    dp_sgd = _trained(ledger)
    with pytest.raises(BudgetExceeded, match=f"{SITE}: privacy budget exhausted") as refused:
        ledger.reserve("cohort_stats", 0, mechanism="laplace", epsilon=0.5, budget=dp_sgd + 0.4)
    assert isinstance(refused.value, SiteRefusal)
    assert len(str(refused.value).splitlines()) == 1
    assert ledger.epsilon() == pytest.approx(dp_sgd, rel=1e-9), "a refused release was charged"
    # Within budget it is charged, and the audit log carries the same spend.
    ledger.reserve("cohort_stats", 0, mechanism="laplace", epsilon=0.5, budget=dp_sgd + 0.6)
    records = [json.loads(line) for line in audit.path.read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "epsilon_spent" and r.get("mechanism") == "laplace"]
    assert record["spend_epsilon"] == 0.5
    assert record["epsilon"] == pytest.approx(dp_sgd + 0.5, rel=1e-9)


def test_job_admission_counts_planned_statistics_releases(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    dp_sgd = _trained(ledger)
    planned = [(1.1, 0.05, 20)] * 2
    acc = RDPAccountant()
    for _ in range(100):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    whole_job = float(acc.get_epsilon(delta=DELTA)) + 1.5
    assert ledger.admit(whole_job + 0.01, planned, pure_epsilon=1.5) == pytest.approx(whole_job, rel=1e-9)
    with pytest.raises(BudgetExceeded, match=rf"{SITE}: this job would take ε from {dp_sgd:.2f} to .*refusing"):
        ledger.admit(whole_job - 0.01, planned, pure_epsilon=1.5)
    assert ledger.epsilon() == pytest.approx(dp_sgd, rel=1e-9), "admission must not charge anything"
