"""Claims of site-owned privacy on real simulator runs: budgets hold across rounds and jobs, and
the audit trail detects any edited, removed or reordered line."""

import shutil
import subprocess
import sys

import pytest

from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """Budget 3.5 and two jobs each planned for ε = 3: the first is admitted and spends ~3.0; the
    second would compose to ~4 > 3.5, so every site refuses it whole at job start."""
    base = tmp_path_factory.mktemp("budget")
    ws = base / "federation"
    first = run_simulation(
        SimulationRequest(job="breast_cancer_dp", sites=3, rounds=3, out=base / "run1", workspace=ws, site_budget=3.5)
    )
    second = run_simulation(
        SimulationRequest(job="breast_cancer_dp", sites=3, rounds=3, out=base / "run2", workspace=ws, site_budget=3.5)
    )
    return ws, first, second


def test_an_admitted_job_trains_every_round_within_the_budget(budget_run):
    _, first, _ = budget_run
    assert {a["status"] for a in first["admission"].values()} == {"accepted"}
    assert first["rounds_completed"] == 3
    for site in first["sites"]:
        assert [r["sites"][site]["status"] for r in first["rounds"]] == ["ok"] * 3
    assert all(p["epsilon"] <= 3.0 + 1e-6 and p["budget"] == 3.5 for p in first["privacy"].values())


def test_a_later_job_on_the_same_workspace_is_refused_whole_from_what_was_spent(budget_run):
    _, first, second = budget_run
    assert second["rounds_completed"] == 0 and second["rounds"] == []
    for site, verdict in second["admission"].items():
        assert verdict["status"] == "refused"
        assert verdict["reason"].startswith(f"{site}: ") and "budget 3.5" in verdict["reason"]
        # nothing spent by the refused job; the site's total is what the first job spent
        assert second["privacy"][site]["epsilon"] == 0.0
        assert second["privacy"][site]["site_total_epsilon"] == pytest.approx(first["privacy"][site]["epsilon"])


def _verify(path):
    return subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "audit", "verify", str(path)], capture_output=True, text=True, timeout=120
    )


def test_audit_verify_passes_on_the_real_run(budget_run):
    ws, _, _ = budget_run
    proc = _verify(ws)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "audit intact" in proc.stdout


@pytest.mark.parametrize("tamper", ["edit", "remove", "reorder"])
def test_audit_verify_fails_naming_file_and_line_when_one_line_is_touched(budget_run, tmp_path, tamper):
    ws, _, _ = budget_run
    copy = tmp_path / "copy"
    shutil.copytree(ws / "site-1" / "audit", copy / "site-1" / "audit")
    shutil.copytree(ws / "server" / "audit", copy / "server" / "audit")
    log = copy / "site-1" / "audit" / "site-1.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) > 5
    if tamper == "edit":
        lines[3] = lines[3].replace('"job":"breast_cancer_dp"', '"job":"breast_cancer_dX"')
    elif tamper == "remove":
        del lines[3]
    else:
        lines[3], lines[4] = lines[4], lines[3]
    log.write_text("".join(lines))
    proc = _verify(copy)
    assert proc.returncode == 1
    assert f"{log}:4" in proc.stdout + proc.stderr


def test_privacy_report_lists_every_site(budget_run):
    ws, _, _ = budget_run
    proc = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "privacy", "report", str(ws)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for site in ("site-1", "site-2", "site-3"):
        assert f"{site}: ε = " in proc.stdout
