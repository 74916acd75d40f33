"""Claims of breast_cancer_dp, checked on real FLARE simulator runs (no mocks).

Runs are shared per module: one encrypted DP run at the defaults (ε=3), one at ε=1 and one without DP.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinfed.privacy.ledger import epsilon_of
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bc_dp")
    return out, run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=5, out=out))


@pytest.fixture(scope="module")
def nodp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bc_nodp")
    return run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=5, out=out, no_dp=True))


def test_default_run_is_encrypted_complete_and_accurate(dp_run):
    out, summary = dp_run
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["encrypted"] is True
    assert summary["rounds_completed"] == 5
    assert summary["sites"] == ["site-1", "site-2", "site-3"]
    assert all(e["status"] == "ok" for r in summary["rounds"] for e in r["sites"].values())
    assert set(summary["final"]["per_site"]) == {"site-1", "site-2", "site-3"}
    assert summary["final"]["metrics"]["auc"] >= 0.97


def test_pooled_roc_of_the_final_model_matches_sklearn_on_every_sites_held_out_patients(dp_run):
    """summary.json's `roc` (encrypted score histograms, fl.roc_validation) against sklearn's AUC on the
    pooled held-out scores, which each site keeps in its own reports/ folder."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    out, summary = dp_run
    roc = summary["roc"]
    assert roc["status"] == "ok" and roc["sites"] == ["site-1", "site-2", "site-3"], roc
    files = sorted((out / "workspace").glob("site-*/reports/*-heldout-scores.csv"))
    assert [f.parent.parent.name for f in files] == roc["sites"]
    rows = np.concatenate([np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2) for f in files])
    reference = roc_auc_score(rows[:, 1].astype(int), rows[:, 0])
    print(f"pooled ROC: AUC {roc['auc']:.5f}, sklearn {reference:.5f}, resolution {roc['auc_resolution']:.3g}")
    assert abs(roc["auc"] - reference) <= roc["auc_resolution"] + 1e-6
    assert roc["n"] == {"negative": int((rows[:, 1] == 0).sum()), "positive": int(rows[:, 1].sum())}
    assert roc["min_cell"] >= 5 and roc["fpr"][0] == 0.0 and roc["tpr"][0] == 0.0
    assert "ROC curve" in (out / "report.html").read_text()


def test_epsilon_grows_every_round_and_stays_within_target(dp_run):
    _, summary = dp_run
    for site in summary["sites"]:
        eps = [r["sites"][site]["epsilon"] for r in summary["rounds"]]
        assert all(b > a for a, b in itertools.pairwise(eps)), eps
        assert eps[-1] <= 3.0 * 1.02


def test_recorded_epsilon_is_recomputable_from_recorded_history(dp_run):
    _, summary = dp_run
    for site, priv in summary["privacy"].items():
        assert priv["accountant"] == "rdp"
        recomputed = epsilon_of(priv["history"], priv["delta"], "rdp")
        assert recomputed == pytest.approx(priv["epsilon"], rel=0.02), site
        steps = sum(h[2] for h in priv["history"])
        assert steps > 0


def test_dp_costs_at_most_003_auc(dp_run, nodp_run):
    _, summary = dp_run
    assert nodp_run["final"]["metrics"]["auc"] - summary["final"]["metrics"]["auc"] <= 0.03
    assert all(p.get("epsilon", 0.0) == 0.0 for p in nodp_run["privacy"].values())


def test_auc_097_is_reachable_at_epsilon_1(tmp_path):
    summary = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=3, rounds=5, out=tmp_path, epsilon=1.0))
    assert summary["final"]["metrics"]["auc"] >= 0.97
    assert max(p["epsilon"] for p in summary["privacy"].values()) <= 1.0 * 1.02


def test_server_side_holds_no_secret_key_and_no_plaintext_model(dp_run):
    out, _ = dp_run
    from clinfed.he.context import load_server_context

    server_files = [p for p in (out / "workspace" / "server").rglob("*") if p.is_file()]
    server_files += [p for p in (out / "workspace" / "flare" / "breast_cancer_dp" / "server").rglob("*") if p.is_file()]
    names = {p.name for p in server_files}
    assert "client_context.tenseal" not in names
    assert not any(n.endswith((".npz", ".pt", ".pth", ".npy")) for n in names), names
    ctx = load_server_context(out / "workspace" / "server" / "local" / "server_context.tenseal")
    assert not ctx.is_private()
    assert "global_model.ckks.json" in names


def test_exported_job_is_a_valid_flare_job_that_flares_simulator_runs(tmp_path):
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinfed.cli",
            "export",
            "breast_cancer_dp",
            "--out",
            str(tmp_path / "jobs"),
            "--sites",
            "3",
            "--rounds",
            "1",
            "--no-encrypt",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rc.returncode == 0, rc.stderr
    job_dir = tmp_path / "jobs" / "breast_cancer_dp"
    meta = json.loads((job_dir / "meta.json").read_text())
    assert JobMetaKey.DEPLOY_MAP.value in meta
    assert not list(job_dir.rglob("*.py")), "job folders carry configuration, not code"
    valid, error, _ = JobMetaValidator().validate(
        "breast_cancer_dp", zip_directory_to_bytes(str(tmp_path / "jobs"), "breast_cancer_dp")
    )
    assert valid, error
    # And FLARE's own simulator CLI runs it as is.
    from clinfed.simulate import SimulationRequest, allow_clinfed_components, prepare_participants

    root = tmp_path / "participants"
    prepare_participants(SimulationRequest(job="breast_cancer_dp", sites=3, encrypt=False), root)
    ws = tmp_path / "flare_ws"
    allow_clinfed_components(ws)
    env = {**os.environ, "CLINFED_SIM_ROOT": str(root)}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "nvflare"), "simulator", str(job_dir), "-w", str(ws), "-n", "3", "-t", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    summary = json.loads((ws / "server" / "simulate_job" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1, proc.stdout[-2000:]
    assert summary["encrypted"] is False
