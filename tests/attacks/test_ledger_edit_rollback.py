"""Attack (issue 23, item 6): the privacy ledger could be edited, or rolled back with its audit log.

Spends were matched to the audit log's `epsilon_spent` records on job, round, mechanism and run only,
and the file's own δ and accountant overrode the site's: setting every noise multiplier to 100 and δ
to 0.5 took ε from ~5.9 to below zero and the ledger opened cleanly. Restoring an older ledger
together with its audit log was not noticed either. Fixed: every spend parameter is matched against
its audit record; δ and accountant come from the policy only; ε is never negative; at job start a
site checks its audit log against the head its peers anchored (the server hands its anchors over in
the `admit` task), so a rolled-back folder refuses the job.
"""

from __future__ import annotations

import json
import shutil

import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.fl import payload
from clinfed.privacy.ledger import PrivacyLedger

from .sitekit import SumsFederation, send
from .test_site_owned_floors import KM, _km_tables

SITE = "site-1"


def _ledger(root, **kw) -> PrivacyLedger:
    return PrivacyLedger(root / "local" / "privacy_ledger.json", SITE, audit=AuditLog(root, SITE), **kw)


def _spent(root) -> float:
    ledger = _ledger(root)
    for rnd in range(3):
        ledger.reserve("job", rnd, noise_multiplier=1.0, sample_rate=0.2, steps=50, run="run-a")
    return ledger.epsilon()


def test_edited_noise_multipliers_and_delta_do_not_open_cleanly(tmp_path):
    before = _spent(tmp_path)
    assert before > 3
    path = tmp_path / "local" / "privacy_ledger.json"
    data = json.loads(path.read_text())
    for spend in data["spends"]:
        spend["noise_multiplier"] = 100.0
    data["delta"] = 0.5
    path.write_text(json.dumps(data))
    try:
        after = _ledger(tmp_path).epsilon()
    except SiteRefusal as exc:
        assert "noise_multiplier" in str(exc) or "lacks" in str(exc)
        return
    pytest.fail(f"an edited ledger opened cleanly: ε {before:.2f} → {after:.2f}")


def test_the_files_delta_never_overrides_the_sites_and_epsilon_is_never_negative(tmp_path):
    before = _spent(tmp_path)
    path = tmp_path / "local" / "privacy_ledger.json"
    data = json.loads(path.read_text())
    data["delta"], data["accountant"] = 0.5, "prv"
    path.write_text(json.dumps(data))
    ledger = _ledger(tmp_path, delta=1e-5, accountant="rdp")
    assert (ledger.delta, ledger.accountant) == (1e-5, "rdp")
    assert ledger.epsilon() == pytest.approx(before, rel=1e-9)
    lax = PrivacyLedger(tmp_path / "other.json", SITE, delta=0.9)
    lax.record("job", 0, 100.0, 0.01, 1)
    assert lax.epsilon() >= 0.0


def test_a_site_rolled_back_with_its_audit_log_refuses_the_next_job(tmp_path):
    fed = SumsFederation(tmp_path / "fed", KM, _km_tables())
    site = fed.sites[SITE]
    server = AuditLog(tmp_path / "server", "server")
    backup = tmp_path / "backup"
    shutil.copytree(site.root, backup)  # the hospital's folder as it was
    _spent(site.root)  # a DP job spends; its messages carried the site's head, which the server anchored
    payload.record_anchor(server, {payload.AUDIT_HEAD_KEY: list(site.audit.head)}, job="j", round_num=0, peer=SITE)
    shutil.rmtree(site.root)
    shutil.copytree(backup, site.root)  # rolled back: ledger and audit log together, consistent again
    _ledger(site.root)  # opens cleanly: the two agree with each other
    anchors = payload.peer_anchors(server, [SITE]) if hasattr(payload, "peer_anchors") else {}
    meta = fed.meta("counts", 0, **{payload.ANCHORS_KEY if hasattr(payload, "ANCHORS_KEY") else "anchors": anchors})
    reply = send(site, "admit", FLModel(params={}, meta=meta))
    assert reply.meta["status"] == "refused", "a rolled-back site accepted the job"
    assert "anchor" in reply.meta["reason"] and reply.meta["reason"].startswith(SITE)
