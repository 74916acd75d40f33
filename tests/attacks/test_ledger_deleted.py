"""Attack (issue 12, item 4): delete (or roll back) a site's ledger and its budget starts over.

A site's ledger is the only memory of how much ε it has released. If the file is deleted, cut, or
replaced by an older backup, a ledger that silently starts again from what is on disk lets the site
spend its whole budget a second time. The site's audit log records every spend too (hash-chained,
and anchored by its peers), so the site must compare the two and refuse to train while its audit
log holds spends its ledger lacks; `clinfed audit verify` must report the mismatch as well.

Old code's ledger took no audit log (its executor appended `epsilon_spent` itself): the helpers
below fall back to that, so on old code these tests fail on their assertions, not on a TypeError.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clinfed.audit import AuditLog, verify
from clinfed.errors import SiteRefusal
from clinfed.privacy.ledger import PrivacyLedger

SITE = "site-2"
JOB = "breast_cancer_dp"


def _open(folder: Path) -> tuple[PrivacyLedger, AuditLog]:
    """The site's ledger opened as a site opens it: cross-checked against its own audit log."""
    audit = AuditLog(folder, SITE)
    path = folder / "local" / "privacy_ledger.json"
    try:
        return PrivacyLedger(path, SITE, audit=audit), audit
    except TypeError:  # old code: no cross-check possible
        return PrivacyLedger(path, SITE), audit


def _spend(ledger: PrivacyLedger, audit: AuditLog, rnd: int) -> None:
    """One DP-SGD round charged; the audit record is written by the ledger (or, on old code, as its executor did)."""
    spend = ledger.record(JOB, rnd, 1.2, 0.1, 10, run="run-a")
    if getattr(ledger, "audit", None) is None:
        audit.append(
            "epsilon_spent",
            job=JOB,
            round=rnd,
            epsilon=spend.epsilon_after,
            delta=ledger.delta,
            noise_multiplier=1.2,
            sample_rate=0.1,
            steps=10,
        )


def _site_that_spent(folder: Path, rounds: int = 5) -> Path:
    ledger, audit = _open(folder)
    for rnd in range(rounds):
        _spend(ledger, audit, rnd)
    assert ledger.epsilon() > 0
    return ledger.path


def test_deleted_ledger_is_refused_not_restarted_at_zero(tmp_path: Path) -> None:
    path = _site_that_spent(tmp_path)
    path.unlink()
    with pytest.raises(SiteRefusal, match=rf"{SITE}: audit log records 5 privacy spends its ledger lacks"):
        ledger, _ = _open(tmp_path)
        pytest.fail(f"{SITE} reopened a deleted ledger at ε {ledger.epsilon():.3f} instead of refusing")
    assert not path.exists(), "the refused ledger must not be recreated empty"
    report = verify(tmp_path)
    assert any(p.startswith(f"{path}: missing") and "5 privacy spends" in p for p in report.problems), report.problems


def test_ledger_restored_from_an_older_copy_is_refused(tmp_path: Path) -> None:
    ledger, audit = _open(tmp_path)
    _spend(ledger, audit, 0)
    backup = tmp_path / "backup.json"
    shutil.copy(ledger.path, backup)
    for rnd in range(1, 4):
        _spend(ledger, audit, rnd)
    shutil.copy(backup, ledger.path)  # rolled back: 3 rounds of ε forgotten
    with pytest.raises(SiteRefusal, match=r"3 privacy spends its ledger lacks \(first: job breast_cancer_dp round 1\)"):
        reopened, _ = _open(tmp_path)
        pytest.fail(f"{SITE} reopened a rolled-back ledger at ε {reopened.epsilon():.3f} instead of refusing")


def test_ledger_deleted_while_a_job_runs_refuses_the_next_round(tmp_path: Path) -> None:
    ledger, audit = _open(tmp_path)
    for rnd in range(2):
        _spend(ledger, audit, rnd)
    ledger.path.unlink()
    with pytest.raises(SiteRefusal, match="ledger lacks"):
        _spend(ledger, audit, 2)


def test_audit_verify_reports_a_ledger_that_lacks_spends(tmp_path: Path) -> None:
    path = _site_that_spent(tmp_path, rounds=3)
    path.write_text('{"site": "site-2", "delta": 1e-05, "accountant": "rdp", "spends": []}')
    report = verify(tmp_path)
    assert not report.ok, "verify accepted a ledger missing every spend its audit log records"
    assert any(str(path) in p and "3 privacy spends its ledger lacks" in p for p in report.problems), report.problems


def test_an_honest_site_reopens_and_a_new_site_starts_at_zero(tmp_path: Path) -> None:
    path = _site_that_spent(tmp_path / "old", rounds=2)
    reopened, _ = _open(tmp_path / "old")
    assert len(reopened.spends) == 2 and reopened.path == path
    assert verify(tmp_path / "old").ok
    fresh, _ = _open(tmp_path / "new")
    assert fresh.epsilon() == 0.0 and fresh.spends == []
