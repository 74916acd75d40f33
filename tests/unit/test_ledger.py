"""Claims about the site's privacy ledger: ε comes from Opacus' accountant, persists, and is enforced."""

import pytest
from opacus.accountants import RDPAccountant

from clinfed.privacy.ledger import BudgetExceeded, PrivacyLedger, compact_history


def test_epsilon_equals_opacus_accountant_fed_the_same_steps(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", "site-1")
    acc = RDPAccountant()
    for rnd in range(4):
        ledger.record("job", rnd, 1.3, 0.1, 10)
        for _ in range(10):
            acc.step(noise_multiplier=1.3, sample_rate=0.1)
    assert ledger.history == [[1.3, 0.1, 40]]
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_grows_with_every_spend_and_survives_reopening(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, "site-1")
    eps = [ledger.record("a", r, 1.0, 0.2, 5).epsilon_after for r in range(3)]
    assert eps == sorted(eps) and eps[0] > 0
    again = PrivacyLedger(path, "site-1")
    assert again.epsilon() == pytest.approx(eps[-1])
    assert again.record("b", 0, 1.0, 0.2, 5).epsilon_after > eps[-1]


def test_a_spend_past_the_budget_is_refused_naming_the_site(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", "site-7")
    first = ledger.check(10.0, 1.0, 0.2, 5)
    ledger.record("a", 0, 1.0, 0.2, 5)
    with pytest.raises(BudgetExceeded, match="site-7: privacy budget exhausted"):
        ledger.check(first * 1.1, 1.0, 0.2, 5)


def test_ledger_of_another_site_is_rejected(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger(path, "site-1").record("a", 0, 1.0, 0.2, 5)
    with pytest.raises(ValueError, match="belongs to site-1"):
        PrivacyLedger(path, "site-2")


def test_compact_history_merges_only_consecutive_equal_mechanisms():
    assert compact_history([(1.0, 0.1, 2), (1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 1)]) == [
        [1.0, 0.1, 5],
        [2.0, 0.1, 1],
        [1.0, 0.1, 1],
    ]
