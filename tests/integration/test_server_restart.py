"""Claim: a deployed server killed mid-job and restarted from its kit finishes the job with the
expected number of rounds, resuming from its last persisted (encrypted) global model.

FLARE 2.9 marks jobs that were running when the server died ABANDONED (component snapshots were
removed), so the resume point is clinfed's own: SecureFedAvg writes the encrypted global model and
the round log to the server's `checkpoints/` after every round, keyed by the job's *submission*:
resubmitting the same exported job folder continues from there (a new export would start over, see
tests/attacks/test_resume_and_outputs.py). Real FLARE processes on loopback; the kill is SIGKILL.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from clinfed.deploy import federation
from clinfed.deploy.provision import provision
from clinfed.deploy.submit import submit

# port 18102 is shared with the other loopback federations: under `pytest -n`, one worker runs them in turn
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("loopback_federation")]

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "provisioning" / "localhost.yml"
ROUNDS = 5


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 18102)) == 0:
            pytest.fail("port 18102 on 127.0.0.1 is in use; localhost.yml's federation needs it")
    kits = provision(PROJECT, tmp_path_factory.mktemp("restart"))
    federation.up(kits, timeout=180)
    try:
        yield kits
    finally:
        federation.down(kits)


def test_killed_server_resumes_the_job_from_its_last_encrypted_round(fed, tmp_path):
    from clinfed.jobs import load_job

    lead = fed / "lead@clinfed.local"
    recipe = load_job("breast_cancer_dp").make_recipe(sites=3, rounds=ROUNDS)
    recipe.export(str(tmp_path / "job"))
    job_folder = tmp_path / "job" / recipe.name
    first = submit(job_folder, lead, wait=False)
    assert first.status == "SUBMITTED"
    deadline = time.monotonic() + 240
    checkpoint = None
    while time.monotonic() < deadline:
        found = sorted((fed / "localhost" / "checkpoints").glob("breast_cancer_dp-*.json"))
        if found and json.loads(found[0].read_text())["next_round"] >= 2:
            checkpoint = found[0]
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job never completed two rounds")
    state = json.loads(checkpoint.read_text())
    assert "ckks_file" in state["global"] and "arrays" not in state["global"], "the resume point is ciphertext only"
    blob = checkpoint.with_name(state["global"]["ckks_file"])
    assert blob.exists() and state["global"]["ckks_count"] >= 1  # binary records, not hex inside the JSON

    server = federation._read_pids(fed)["localhost"]
    tree = [psutil.Process(server["pid"]), *psutil.Process(server["pid"]).children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)

    federation.up(fed, timeout=180)  # restarts only the server; the sites reconnect by themselves
    out = tmp_path / "resumed"
    second = submit(job_folder, lead, wait=True, out=out, timeout=600)  # the same submission, resubmitted
    assert second.status == "FINISHED:COMPLETED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_at_round"] >= 2
    assert summary["rounds_completed"] == ROUNDS
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS))
    assert summary["final"]["metrics"]["auc"] >= 0.95
    # the resumed run spends only what the job planned: the sites' ε stays within the job's target
    assert all(p["epsilon"] <= 3.0 * 1.02 for p in summary["privacy"].values())
    assert not checkpoint.exists() and not blob.exists(), "a finished job leaves no resume point behind"
