"""Claims about the site's privacy ledger: ε comes from Opacus' accountant, persists, and is enforced."""

import pytest
from opacus.accountants import RDPAccountant

from clinfed.audit import AuditLog, read_records
from clinfed.errors import SiteRefusal
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


def test_admission_refuses_the_whole_job_in_one_line_and_writes_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", "site-1")
    ledger.record("old", 0, 1.0, 0.2, 5)
    spent = ledger.epsilon()
    planned = [(1.0, 0.2, 5)] * 4
    whole = ledger.admit(None, planned)
    assert whole > spent
    with pytest.raises(
        BudgetExceeded, match=rf"^site-1: this job would take ε from {spent:.2f} to {whole:.2f} > budget"
    ):
        ledger.admit(whole - 0.01, planned)
    assert len(ledger.spends) == 1 and ledger.epsilon() == spent


def test_runs_are_accounted_apart_but_compose_into_the_site_total(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", "site-1")
    ledger.record("a", 0, 1.0, 0.2, 5, run="run-a")
    ledger.reserve("b", 0, noise_multiplier=2.0, sample_rate=0.1, steps=3, run="run-b")
    ledger.reserve("b", 1, mechanism="laplace", epsilon=0.25, run="run-b")
    assert [s.round for s in ledger.spends_of_run("run-b")] == [0, 1]
    assert ledger.history_of_run("run-a") == [[1.0, 0.2, 5]]
    alone = PrivacyLedger(tmp_path / "a.json", "site-1")
    alone.record("a", 0, 1.0, 0.2, 5)
    assert ledger.epsilon_of_run("run-a") == pytest.approx(alone.epsilon())
    assert ledger.epsilon_of_run("run-b") > 0.25
    alone.record("a", 1, 1.0, 0.2, 5)
    assert ledger.epsilon_of_run_if("run-a", [(1.0, 0.2, 5)]) == pytest.approx(alone.epsilon())
    assert ledger.epsilon_of_run_if("run-b", [], 0.5) == pytest.approx(ledger.epsilon_of_run("run-b") + 0.5)
    assert ledger.history == [[1.0, 0.2, 5], [2.0, 0.1, 3]] and ledger.pure_epsilons == [0.25]


def test_meaningless_spends_are_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", "site-1")
    with pytest.raises(ValueError, match="site-1: a laplace release needs a finite epsilon"):
        ledger.reserve("s", 0, mechanism="laplace")
    with pytest.raises(ValueError, match="noise_multiplier > 0"):
        ledger.reserve("j", 0, noise_multiplier=0.0, sample_rate=0.1, steps=5)
    with pytest.raises(ValueError, match="unknown DP mechanism"):
        ledger.reserve("j", 0, mechanism="exponential", epsilon=1.0)
    assert ledger.spends == []


def test_an_unreadable_ledger_is_refused_not_replaced(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger(path, "site-1").record("a", 0, 1.0, 0.2, 5)
    path.write_text(path.read_text()[:40])  # cut mid-file
    with pytest.raises(SiteRefusal, match=r"^site-1: privacy ledger .* is unreadable"):
        PrivacyLedger(path, "site-1")
    assert len(path.read_text()) == 40


def test_a_ledger_computes_at_the_policys_delta_never_the_files(tmp_path):
    """Issue 23, item 6: the file's δ is not trusted (it was once adopted: an edit to δ = 0.5 gave ε < 0)."""
    path = tmp_path / "l.json"
    PrivacyLedger(path, "site-1", delta=1e-6).record("a", 0, 1.0, 0.2, 5)
    assert PrivacyLedger(path, "site-1", delta=1e-5).delta == 1e-5


def test_reserve_writes_the_audit_record_with_the_spend(tmp_path):
    audit = AuditLog(tmp_path, "site-1")
    ledger = PrivacyLedger(tmp_path / "local" / "privacy_ledger.json", "site-1", audit=audit)
    spend = ledger.reserve("j", 3, noise_multiplier=1.0, sample_rate=0.2, steps=5, run="r", budget=100.0)
    (record,) = read_records(audit.path, "epsilon_spent")
    assert {k: record[k] for k in ("job", "round", "run", "mechanism", "steps")} == {
        "job": "j",
        "round": 3,
        "run": "r",
        "mechanism": "gaussian",
        "steps": 5,
    }
    assert record["epsilon"] == spend.epsilon_after and record["delta"] == ledger.delta
    with pytest.raises(ValueError, match="site-2's own audit log"):
        PrivacyLedger(tmp_path / "other.json", "site-2", audit=audit)
